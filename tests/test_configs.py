"""The shipped YAML configs say true things, and the shared trainer / data blocks compose as documented.

Layout. ``configs/<dataset>/*.yaml`` are runnable configs; ``configs/<dataset>/shared/trainer.yaml`` and
``shared/data.yaml`` hold the trainer and datamodule blocks that every config of the dataset loads with
``trainer: shared/trainer.yaml`` / ``data: shared/data.yaml`` (``labeled: shared/data.yaml`` inside a
``TransferDataModule``). A config adds callbacks with the top-level ``extra_callbacks:`` list; one whose
trainer differs for good writes its block out (:data:`OWN_TRAINER` names the keys it may change).

Checks:

* keys exist: ``tests/test_cli.py::test_config_builds`` builds every runnable config with
  ``DistillCLI(args=[...], run=False)``, which rejects a key that is not in its target's signature; here,
  every shared file is loaded by some runnable config (so it is built too), and a misspelled key in a
  temporary copy of any file -- runnable or shared -- makes the parse fail (so that check can fail);
* choice comments: a comment on a ``key: value`` line that contains `` | `` lists the valid choices, e.g.
  ``kl: forward  # forward | reverse | symmetric | js | skew_forward | skew_reverse (DistiLLM)``. Each
  ``|``-separated alternative starts with a choice name; anything after the name (``(...)``, ``: ...``,
  ``; ...``) explains it (``||`` is not a separator). The listed set must equal the constant the code
  validates against (:data:`CHOICES`, looked up as ``ClassName.key`` first, then ``key``); a key with a
  choice comment and no entry in :data:`CHOICES` fails, so new choice keys get checked. The value set
  in the YAML (every item of a list, every key of a mapping) must be a valid choice, for every key in
  :data:`CHOICES`, commented with choices or not;
* comments: every ``key: value`` line carries a ``# comment`` on the same line. Exempt: a key that opens a
  nested block (nothing after the colon: ``init_args:``, ``callbacks:``; the keys inside are commented),
  ``class_path: ...`` (also as a list item ``- class_path: ...``: the class names itself) and list items
  that are plain values (``- zoo:digits_cnn``: the list's key is commented);
* comments cite nothing outside the repository: no planning documents, source-document or ticket numbers, and every
  ``*.md`` / ``*.py`` file a comment names exists in the repository.
"""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import pytest
import yaml
from _configs import ALL_YAML, CONFIG_DIR, REPO, RUNNABLE_CONFIGS, SHARED_FILES, referenced_files
from jsonargparse import Namespace
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_distill.batch import LABEL_SHIFTS
from lightning_distill.cache import CACHE_STORAGES
from lightning_distill.callbacks import TemperatureMonitor
from lightning_distill.callbacks.curriculum import SIGNALS, TRIGGERS
from lightning_distill.cli import DistillCLI, _fill_config_placeholder
from lightning_distill.data.tokenized import OBJECTIVES as TOKENIZED_OBJECTIVES
from lightning_distill.data.tokenized import TOKENIZER_KINDS
from lightning_distill.data.transfer_sampler import MODES as TRANSFER_MODES
from lightning_distill.distiller import VOCAB_ALIGNMENTS
from lightning_distill.features import LAYER_MAPPINGS
from lightning_distill.losses import KL_MODES
from lightning_distill.losses.transformer import KD_POSITIONS, LAYER_MAPS
from lightning_distill.module import LOSS_NORMALIZATIONS
from lightning_distill.objectives import FEATURE_LOSSES, PROJECTIONS, WEIGHTINGS
from lightning_distill.objectives.feature import PROJECTORS
from lightning_distill.objectives.transformer import MINILM_RELATIONS
from lightning_distill.objectives.transformer.common import WIDTH_PROJECTIONS
from lightning_distill.temperature import TEMPERATURE_MODES

pytestmark = pytest.mark.usefixtures("restore_global_state")

#: key (or ``ClassName.key``) -> the choices the code validates it against
CHOICES: dict[str, tuple[str, ...]] = {
    "kl": tuple(KL_MODES),
    "mapping": tuple(LAYER_MAPPINGS),
    "temperature_mode": tuple(TEMPERATURE_MODES),
    "weighting": tuple(WEIGHTINGS),
    "projection": tuple(PROJECTIONS),
    "projector": tuple(PROJECTORS),
    "feature_loss": tuple(FEATURE_LOSSES),
    "TeacherCache.storage": tuple(CACHE_STORAGES),
    "ProgressiveCurriculum.trigger": tuple(TRIGGERS),
    "ProgressiveCurriculum.signals": tuple(SIGNALS),
    "TransferDataModule.mode": tuple(TRANSFER_MODES),
    "TokenizedTextDataModule.tokenizer_kind": tuple(TOKENIZER_KINDS),
    "TokenizedTextDataModule.objective": tuple(TOKENIZED_OBJECTIVES),
    "label_shift": tuple(LABEL_SHIFTS),
    "vocab_alignment": tuple(VOCAB_ALIGNMENTS),
    "loss_normalization": tuple(LOSS_NORMALIZATIONS),
    "MiniLMLoss.relations": tuple(MINILM_RELATIONS),
    "TinyBERTLoss.layer_map": tuple(LAYER_MAPS),
    "TinyBERTLoss.projection": tuple(WIDTH_PROJECTIONS),
    "HiddenStateDynamics.layer_map": tuple(LAYER_MAPS),
    "HiddenStateDynamics.projection": tuple(WIDTH_PROJECTIONS),
    "DistilBERTLoss.projection": tuple(WIDTH_PROJECTIONS),
    "kd_positions": tuple(KD_POSITIONS),
}

#: runnable configs with their own trainer block -> the keys in which it may differ from the shared one
OWN_TRAINER: dict[str, set[str]] = {
    "digits/teacher.yaml": {"max_epochs"},  # the shipped zoo:digits_cnn trained for 40 epochs
}

TRAINER_CLASS = "lightning.pytorch.Trainer"
CLI_CLASS = "DistillCLI"


# ------------------------------------------------------------------------------------ YAML walking
@dataclass
class Entry:
    """One ``key: value`` of a YAML file, with the class whose argument it is and its same-line comment."""

    file: Path
    line: int  # 1-based
    key: str
    value: Any  # Python value (yaml.safe_load of the node)
    cls: Optional[str]  # class_path (or TRAINER_CLASS / CLI_CLASS) of the arguments this key belongs to
    comment: Optional[str]

    @property
    def where(self) -> str:
        return f"{self.file.relative_to(REPO)}:{self.line}"


def _split_comment(line: str) -> tuple[str, Optional[str]]:
    """``(code, comment)`` of a YAML line: the comment starts at the first ``#`` outside quotes after a space."""
    quote = None
    for i, ch in enumerate(line):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i], line[i + 1 :].strip()
    return line, None


def _node_value(node: yaml.Node) -> Any:
    return yaml.safe_load(yaml.serialize(node))


def _default_class(path: Path) -> Optional[str]:
    if path.parent.name == "shared" and path.stem == "trainer":
        return TRAINER_CLASS
    return CLI_CLASS if path in RUNNABLE_CONFIGS else None


def entries(path: Path, text: Optional[str] = None) -> list[Entry]:
    text = path.read_text() if text is None else text
    lines = text.splitlines()
    out: list[Entry] = []

    def walk(node: yaml.Node, cls: Optional[str]) -> None:
        if isinstance(node, yaml.SequenceNode):
            for item in node.value:
                walk(item, None)
        if not isinstance(node, yaml.MappingNode):
            return
        keys = {k.value: v for k, v in node.value}
        class_path = keys.get("class_path")
        own = class_path.value if isinstance(class_path, yaml.ScalarNode) else None
        for key_node, value_node in node.value:
            line = key_node.start_mark.line
            _, comment = _split_comment(lines[line])
            out.append(Entry(path, line + 1, key_node.value, _node_value(value_node), cls, comment))
            if key_node.value == "init_args":
                walk(value_node, own)
            elif key_node.value == "trainer" and cls == CLI_CLASS:
                walk(value_node, TRAINER_CLASS)
            else:
                walk(value_node, None)

    walk(yaml.compose(text), _default_class(path))
    return out


# ------------------------------------------------------------------------------------ choices
_SEPARATOR = re.compile(r"(?<!\|) \| (?!\|)")
_NAME = re.compile(r"[A-Za-z_][\w.\-]*")


def parse_choices(comment: Optional[str]) -> Optional[list[str]]:
    """The choice names a comment lists (``None`` if it lists none); ValueError if it lists them unreadably."""
    if not comment:
        return None
    parts = _SEPARATOR.split(comment)
    if len(parts) < 2:
        return None
    names = []
    for part in parts:
        match = _NAME.match(part.strip())
        if not match:
            raise ValueError(f"alternative {part.strip()!r} does not start with a choice name")
        names.append(match.group(0))
    return names


def choice_problems(items: list[Entry]) -> list[str]:
    problems = []
    for e in items:
        short = e.cls.rsplit(".", 1)[-1] if e.cls else None
        table_key = f"{short}.{e.key}" if short and f"{short}.{e.key}" in CHOICES else e.key
        valid = CHOICES.get(table_key)
        try:
            listed = parse_choices(e.comment)
        except ValueError as err:
            problems.append(f"{e.where}: `{e.key}`: unreadable choice comment ({err}): {e.comment!r}")
            continue
        if listed is not None:
            if valid is None:
                problems.append(
                    f"{e.where}: `{e.key}` ({e.cls}) lists choices {listed} but tests/test_configs.py's CHOICES "
                    f"has no entry for {e.key!r} or {short}.{e.key!r}: add the constant the code checks it against"
                )
                continue
            if set(listed) != set(valid):
                problems.append(
                    f"{e.where}: `{e.key}` comment lists {sorted(listed)}, the code accepts {sorted(valid)} "
                    f"(missing {sorted(set(valid) - set(listed))}, unknown {sorted(set(listed) - set(valid))})"
                )
        if valid is not None and e.value is not None:
            values = list(e.value) if isinstance(e.value, (list, dict)) else [e.value]
            bad = [v for v in values if v not in valid]
            if bad:
                problems.append(f"{e.where}: `{e.key}: {e.value}`: {bad} not among the valid choices {list(valid)}")
    return problems


# ------------------------------------------------------------------------------------ comments
_KEY_LINE = re.compile(r"^\s*(?:- )?(?P<key>[^\s:#'\"][^:#]*?):(?:\s+(?P<value>.*?))?\s*$")


def uncommented_lines(path: Path, text: Optional[str] = None) -> list[str]:
    text = path.read_text() if text is None else text
    problems = []
    for number, line in enumerate(text.splitlines(), 1):
        code, comment = _split_comment(line)
        if not code.strip():
            continue  # blank or a whole-line comment
        match = _KEY_LINE.match(code)
        if match is None:
            continue  # a plain list item (`- zoo:digits_cnn`)
        if not match.group("value") or match.group("key") == "class_path":
            continue  # opens a nested block / names a class
        if comment is None:
            problems.append(f"{path.relative_to(REPO)}:{number}: `{line.strip()}` has no comment")
    return problems


# ================================================================================== tests
def _ids(paths: list[Path]) -> list[str]:
    return [str(p.relative_to(CONFIG_DIR)) for p in paths]


def test_every_yaml_file_is_a_config_or_loaded_by_one():
    assert RUNNABLE_CONFIGS and SHARED_FILES
    loaded = set().union(*(referenced_files(c) for c in RUNNABLE_CONFIGS))
    assert {p.resolve() for p in SHARED_FILES} <= loaded, "shared files no config loads"
    for path in SHARED_FILES:
        assert path.parent.name == "shared", f"{path}: a YAML file without `model:` outside a shared/ folder"
    for dataset in sorted({p.parent for p in RUNNABLE_CONFIGS}):
        assert (dataset / "shared" / "trainer.yaml").is_file() and (dataset / "shared" / "data.yaml").is_file()


class _ParseOnly(DistillCLI):
    """Parses (and so validates every key against the signatures) without building anything."""

    def instantiate_classes(self) -> None:
        pass


def _parse(*args: str) -> Namespace:
    return _ParseOnly(args=list(args), run=False).config


def _misspell_a_key(text: str) -> tuple[str, str]:
    """Text with one key misspelled (its last letter doubled), and that key: the first nested
    ``key: value`` (a class argument, e.g. the student's ``num_classes``), else the first top-level one."""
    lines = text.splitlines(keepends=True)
    candidates = []
    for i, line in enumerate(lines):
        match = _KEY_LINE.match(_split_comment(line)[0])
        if match and match.group("value") and match.group("key") not in ("class_path", "seed_everything"):
            candidates.append((not line.startswith(" "), i, match.group("key")))
    _, i, key = min(candidates)
    lines[i] = lines[i].replace(f"{key}:", f"{key}{key[-1]}:", 1)
    return "".join(lines), key


@pytest.mark.parametrize("target", ALL_YAML, ids=_ids(ALL_YAML))
def test_misspelled_key_is_rejected(target, tmp_path, monkeypatch, capsys):
    """A copy of the dataset's configs parses; with one key of ``target`` misspelled it does not."""
    monkeypatch.chdir(tmp_path)
    dataset = target.parent.parent if target.parent.name == "shared" else target.parent
    copy = tmp_path / dataset.name
    shutil.copytree(dataset, copy)
    copied_target = copy / target.relative_to(dataset)
    # the runnable config to parse: the target itself, or the first config that loads it
    config = target if target in RUNNABLE_CONFIGS else next(c for c in RUNNABLE_CONFIGS if target in referenced_files(c))
    copied_config = copy / config.relative_to(dataset)

    _parse("--config", str(copied_config))  # the unmodified copy is valid
    text, key = _misspell_a_key(copied_target.read_text())
    copied_target.write_text(text)
    with pytest.raises(SystemExit):
        _parse("--config", str(copied_config))
    assert f"{key}{key[-1]}" in capsys.readouterr().err


def test_choice_comments_match_the_code():
    problems = [p for path in ALL_YAML for p in choice_problems(entries(path))]
    assert not problems, "\n".join(problems)


def test_choice_check_catches_what_it_should():
    path = CONFIG_DIR / "digits" / "kd.yaml"  # a runnable config, so top-level keys belong to the CLI
    text = (
        "model:\n"
        "  class_path: lightning_distill.KnowledgeDistillation\n"
        "  init_args:\n"
        "    kl: forward        # forward | reverse\n"  # incomplete list
        "    kl_extra: js       # js | kl (no table entry)\n"
        "    mapping: diagonal  # uniform | skip | last\n"  # value not a choice
        "    weighting: mean    # mean | (a note) confidence | learned\n"  # unreadable
        "    temperature_mode: global  # global: one tau | instance: one per sample\n"  # fine
    )
    problems = choice_problems(entries(path, text))
    assert len(problems) == 4, problems
    assert "missing ['js', 'skew_forward', 'skew_reverse', 'symmetric']" in problems[0]
    assert "no entry for 'kl_extra'" in problems[1]
    assert "['diagonal'] not among the valid choices" in problems[2]
    assert "unreadable choice comment" in problems[3]
    assert parse_choices("KL(p_peer || p_student), as in DML") is None  # `||` never separates choices
    assert parse_choices("forward | reverse (KL(p || q)) | js") == ["forward", "reverse", "js"]
    assert parse_choices("the divergence D(p, q)") is None


@pytest.mark.parametrize("path", ALL_YAML, ids=_ids(ALL_YAML))
def test_every_key_is_commented(path):
    problems = uncommented_lines(path)
    assert not problems, "\n".join(problems)


def test_comment_check_catches_a_bare_key():
    text = "trainer:\n  class_path: X\n  max_epochs: 3\n  devices: 1  # one\n  callbacks:\n    - a\n"
    assert uncommented_lines(CONFIG_DIR / "x.yaml", text) == ["configs/x.yaml:3: `max_epochs: 3` has no comment"]


_OUTSIDE = re.compile(r"\bseed \d{3}\b|DESIGN\.md|\bticket\b|\bissue #?\d+|#\d{2,}\b", re.IGNORECASE)
_FILE = re.compile(r"[\w./-]+\.(?:md|py)\b")


@pytest.mark.parametrize("path", ALL_YAML, ids=_ids(ALL_YAML))
def test_comments_cite_only_the_repository(path):
    problems = []
    names = {p.name for p in REPO.rglob("*") if p.suffix in (".md", ".py") and ".git" not in p.parts}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        _, comment = _split_comment(line)
        if not comment:
            continue
        if _OUTSIDE.search(comment):
            problems.append(f"{path.relative_to(REPO)}:{number}: cites a document outside the repository: {comment}")
        for name in _FILE.findall(comment):
            if not (REPO / name).is_file() and Path(name).name not in names:
                problems.append(f"{path.relative_to(REPO)}:{number}: names {name}, which the repository lacks")
    assert not problems, "\n".join(problems)


def test_own_trainer_blocks_differ_from_the_shared_one_only_where_declared():
    seen = set()
    for config in RUNNABLE_CONFIGS:
        trainer = yaml.safe_load(config.read_text())["trainer"]
        if isinstance(trainer, str):
            assert trainer == "shared/trainer.yaml", f"{config}: loads {trainer}"
            continue
        name = str(config.relative_to(CONFIG_DIR))
        assert name in OWN_TRAINER, f"{name} writes its own trainer block: load shared/trainer.yaml or declare it"
        shared = yaml.safe_load((config.parent / "shared" / "trainer.yaml").read_text())
        differing = {k for k in set(trainer) | set(shared) if trainer.get(k) != shared.get(k)}
        assert differing == OWN_TRAINER[name], f"{name}: differs from shared/trainer.yaml in {sorted(differing)}"
        seen.add(name)
    assert seen == set(OWN_TRAINER)


# ------------------------------------------------------------------------------------ composition
def _build(tmp_path: Path, *args: str) -> DistillCLI:
    return DistillCLI(args=[*args, "--trainer.enable_progress_bar", "false"], run=False)


def test_run_directory_is_named_after_the_config(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    kd = _build(tmp_path, "--config", str(CONFIG_DIR / "digits" / "kd.yaml"))
    assert kd.trainer.logger.name == "kd"
    assert Path(kd.trainer.logger.log_dir) == Path("runs/digits/kd/version_0")
    assert [type(c) for c in kd.trainer.callbacks if isinstance(c, ModelCheckpoint)] == [ModelCheckpoint] * 2
    teacher = _build(tmp_path, "--config", str(CONFIG_DIR / "digits" / "teacher.yaml"))
    assert Path(teacher.trainer.logger.log_dir) == Path("runs/digits/teacher/version_0")
    assert teacher.trainer.max_epochs == 40
    text = _build(tmp_path, "--config", str(CONFIG_DIR / "text" / "baseline.yaml"))
    assert Path(text.trainer.logger.log_dir) == Path("runs/text/baseline/version_0")
    # an explicit name wins (lightning-distill compare names its runs this way)
    named = _build(tmp_path, "--config", str(CONFIG_DIR / "digits" / "kd.yaml"), "--trainer.logger.init_args.name", "x")
    assert Path(named.trainer.logger.log_dir) == Path("runs/digits/x/version_0")
    assert not list(tmp_path.iterdir())  # building writes nothing


def test_command_line_and_second_config_change_one_key_of_the_shared_blocks(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    kd = str(CONFIG_DIR / "digits" / "kd.yaml")
    cli = _build(tmp_path, "--config", kd, "--trainer.max_epochs", "60", "--data.init_args.batch_size", "32")
    assert cli.trainer.max_epochs == 60 and cli.datamodule.batch_size == 32
    assert cli.trainer.logger.name == "kd" and len(cli.trainer.checkpoint_callbacks) == 2  # the rest is kept
    # a second --config with only the changed keys merges key by key too; the run is named after it
    (tmp_path / "long.yaml").write_text(
        "trainer:\n  max_epochs: 45\n  callbacks+:\n    - class_path: lightning_distill.callbacks.TemperatureMonitor\n"
    )
    cli = _build(tmp_path, "--config", kd, "--config", str(tmp_path / "long.yaml"))
    assert cli.trainer.max_epochs == 45 and cli.trainer.logger.name == "long"
    assert len(cli.trainer.checkpoint_callbacks) == 2
    assert any(isinstance(c, TemperatureMonitor) for c in cli.trainer.callbacks)
    assert cli.config["trainer"]["deterministic"] is True


def test_extra_callbacks_are_appended_to_the_shared_ones(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = _build(tmp_path, "--config", str(CONFIG_DIR / "digits" / "ctkd.yaml"))
    # (Lightning moves checkpoint callbacks last, so they see what the others logged)
    assert len(cli.trainer.checkpoint_callbacks) == 2
    (monitor,) = [c for c in cli.trainer.callbacks if isinstance(c, TemperatureMonitor)]
    assert monitor.logging_interval == 5
    # the command line can still drop them, as it can trainer.callbacks
    cli = _build(tmp_path, "--config", str(CONFIG_DIR / "digits" / "ctkd.yaml"), "--extra_callbacks", "[]")
    assert not [c for c in cli.trainer.callbacks if isinstance(c, TemperatureMonitor)]


def test_placeholder_without_a_config_file():
    config = Namespace(
        config=None,
        trainer=Namespace(logger=[Namespace(class_path="CSVLogger", init_args=Namespace(name="{config}", save_dir="r/{config}"))]),
    )
    _fill_config_placeholder(config)
    assert config.trainer.logger[0].init_args.name == "lightning_logs"
    assert config.trainer.logger[0].init_args.save_dir == "r/lightning_logs"


def test_a_config_cannot_change_one_key_of_a_block_it_loads(tmp_path, monkeypatch):
    """Why ``extra_callbacks`` and the written-out teacher block exist (the shared files' headers say so):
    jsonargparse replaces a file-loaded group when the same config also sets one of its keys. If this
    fails, jsonargparse learned to merge: simplify the configs and update those headers."""
    monkeypatch.chdir(tmp_path)
    kd = (CONFIG_DIR / "digits" / "kd.yaml").read_text()
    shared = CONFIG_DIR / "digits" / "shared"
    (tmp_path / "one_key.yaml").write_text(
        kd.replace("shared/", f"{shared}/").replace(
            "\nmodel:\n", "\ntrainer.max_epochs: 60             # one key of the loaded block\nmodel:\n", 1
        )
    )
    config = _parse("--config", str(tmp_path / "one_key.yaml"))
    assert config.trainer.max_epochs == 60
    assert config.trainer.logger is None and not config.trainer.callbacks  # the rest of the block is gone
