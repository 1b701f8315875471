"""``teacher_checkpoint`` and the safe checkpoint reader (:mod:`lightning_distill.checkpoint`).

Covers every accepted source (a ``Classifier`` checkpoint, a plain state dict, ``zoo:NAME``, a
distillation checkpoint), that the checkpoints the package writes load with
``weights_only=True``, every refusal (with the message it must give and without touching the
teacher), and ``python -m lightning_distill.zoo export``.
"""

from __future__ import annotations

import errno
import functools
import os
import re
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from _state import IsolatedState
from torch import Tensor, nn

from lightning_distill import Classifier, KnowledgeDistillation
from lightning_distill.checkpoint import AtomicCheckpointIO, extract_state_dict, load_weights, read_checkpoint
from lightning_distill.cli import DistillCLI
from lightning_distill.data import DigitsDataModule
from lightning_distill.models import DigitsCNN, DigitsMLP
from lightning_distill.strategies import BornAgain
from lightning_distill.zoo import ZOO_DIR, available, resolve

pytestmark = pytest.mark.usefixtures("restore_global_state")

REPO = Path(__file__).resolve().parents[1]
TEACHER_CONFIG = REPO / "configs" / "digits" / "teacher.yaml"


# ---------------------------------------------------------------------------------- helpers


def _trainer(root: Path, **kwargs) -> L.Trainer:
    defaults = dict(
        default_root_dir=root,
        accelerator="cpu",
        devices=1,
        max_epochs=1,
        limit_train_batches=2,
        limit_val_batches=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    defaults.update(kwargs)
    return L.Trainer(**defaults)


def _snapshot(module: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _assert_state_equal(module: nn.Module, expected: dict[str, Tensor]) -> None:
    own = module.state_dict()
    assert sorted(own) == sorted(expected)
    for key, value in expected.items():
        assert torch.equal(own[key], value), f"{key} differs from the source tensor"


def _assert_some_differ(module: nn.Module, expected: dict[str, Tensor]) -> None:
    """Guard that makes the equality checks meaningful: the fresh module starts elsewhere."""
    own = module.state_dict()
    assert any(not torch.equal(own[k], v) for k, v in expected.items() if k in own and own[k].is_floating_point())


def _fresh_cnn(seed: int = 123, **kwargs) -> DigitsCNN:
    torch.manual_seed(seed)
    return DigitsCNN(**kwargs)


def _prefixed(state: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


# ------------------------------------------------------------------------- trained sources
@pytest.fixture(scope="module")
def classifier_ckpt(tmp_path_factory) -> Path:
    """A real Lightning checkpoint of a ``Classifier(DigitsCNN())`` run (1 epoch, 2 batches)."""
    root = tmp_path_factory.mktemp("classifier")
    with IsolatedState():
        L.seed_everything(0)
        module = Classifier(DigitsCNN(), optimizer=functools.partial(torch.optim.SGD, lr=0.1))
        trainer = _trainer(root)
        trainer.fit(module, datamodule=DigitsDataModule(batch_size=32, shuffle_seed=0))
        path = root / "classifier.ckpt"
        trainer.save_checkpoint(path)
    return path


@pytest.fixture(scope="module")
def kd_ckpts(tmp_path_factory) -> dict[str, Path]:
    """Checkpoints of one short ``KnowledgeDistillation`` run, without and with the teacher saved."""
    root = tmp_path_factory.mktemp("kd")
    with IsolatedState():
        L.seed_everything(0)
        module = KnowledgeDistillation(DigitsMLP(), DigitsCNN(), teacher_checkpoint="zoo:digits_cnn")
        trainer = _trainer(root)
        trainer.fit(module, datamodule=DigitsDataModule(batch_size=32, shuffle_seed=0))
        paths = {}
        for save_teacher in (False, True):
            module.save_teacher = save_teacher
            paths[f"save_teacher={save_teacher}"] = root / f"kd_save_teacher_{save_teacher}.ckpt"
            trainer.save_checkpoint(paths[f"save_teacher={save_teacher}"])
    return paths


@pytest.fixture(scope="module")
def cli_classifier_ckpt(tmp_path_factory) -> Path:
    """``last.ckpt`` of ``lightning-distill fit --config configs/digits/teacher.yaml`` (shortened)."""
    root = tmp_path_factory.mktemp("cli_teacher")
    with IsolatedState():
        os.chdir(root)  # the config's CSVLogger writes under the relative runs/digits
        DistillCLI(
            args=[
                "fit",
                "--config",
                str(TEACHER_CONFIG),
                "--trainer.default_root_dir",
                str(root),
                "--trainer.max_epochs",
                "1",
                "--trainer.limit_train_batches",
                "2",
                "--trainer.limit_val_batches",
                "1",
                "--trainer.enable_progress_bar",
                "false",
                "--trainer.enable_model_summary",
                "false",
                "--test_after_fit",
                "false",
            ]
        )
    path = root / "runs" / "digits" / "teacher" / "version_0" / "checkpoints" / "last.ckpt"
    assert path.is_file(), f"the CLI run wrote no {path}"
    return path


# ------------------------------------------------------------------------ accepted sources
def test_teacher_from_classifier_checkpoint(classifier_ckpt):
    ckpt = torch.load(classifier_ckpt, map_location="cpu", weights_only=True)
    expected = _prefixed(ckpt["state_dict"], "model.")
    assert expected, "the Classifier checkpoint stores its network under model."
    teacher = _fresh_cnn()
    _assert_some_differ(teacher, expected)
    module = KnowledgeDistillation(DigitsMLP(), teacher, teacher_checkpoint=str(classifier_ckpt))
    assert module.teacher is teacher
    _assert_state_equal(module.teacher, expected)
    assert not module.teacher.training
    assert all(not p.requires_grad for p in module.teacher.parameters())


def test_teacher_from_plain_state_dict(tmp_path):
    source = _fresh_cnn(seed=7)
    with torch.no_grad():  # non-default BatchNorm buffers, so they are checked too
        for m in source.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
                m.num_batches_tracked.fill_(17)
    expected = _snapshot(source)
    path = tmp_path / "plain.pt"
    torch.save(expected, path)
    teacher = _fresh_cnn(seed=8)
    _assert_some_differ(teacher, expected)
    module = KnowledgeDistillation(DigitsMLP(), teacher, teacher_checkpoint=str(path))
    _assert_state_equal(module.teacher, expected)


def test_teacher_from_zoo():
    assert "digits_cnn" in available()
    zoo_file = resolve("zoo:digits_cnn")
    assert zoo_file == ZOO_DIR / "digits_cnn.pt" and zoo_file.is_file()
    expected = torch.load(zoo_file, map_location="cpu", weights_only=True)
    teacher = _fresh_cnn()
    _assert_some_differ(teacher, expected)
    module = KnowledgeDistillation(DigitsMLP(), teacher, teacher_checkpoint="zoo:digits_cnn")
    _assert_state_equal(module.teacher, expected)


@pytest.mark.parametrize("which", ["save_teacher=False", "save_teacher=True"])
def test_teacher_from_distillation_checkpoint_uses_student(kd_ckpts, which):
    ckpt = torch.load(kd_ckpts[which], map_location="cpu", weights_only=True)
    has_teacher_keys = any(k.startswith("teacher.") for k in ckpt["state_dict"])
    assert has_teacher_keys == (which == "save_teacher=True")
    expected = _prefixed(ckpt["state_dict"], "student.")
    torch.manual_seed(99)
    new_teacher = DigitsMLP()  # the architecture of the earlier run's student
    _assert_some_differ(new_teacher, expected)
    module = KnowledgeDistillation(DigitsMLP(hidden=8), new_teacher, teacher_checkpoint=str(kd_ckpts[which]))
    _assert_state_equal(module.teacher, expected)


def test_teacher_from_repdistiller_style_file(tmp_path):
    """``{"model": state_dict, "epoch": ..., "best_acc": ..., "optimizer": ...}`` (RepDistiller's teachers)."""
    source = _fresh_cnn(seed=11)
    expected = _snapshot(source)
    optimizer = torch.optim.SGD(source.parameters(), lr=0.1, momentum=0.9)
    source(torch.rand(4, 1, 8, 8)).sum().backward()
    optimizer.step()  # a non-empty optimizer state, as in a real file
    path = tmp_path / "ckpt_epoch_240.pth"
    torch.save(
        {"epoch": 240, "model": expected, "best_acc": torch.tensor(79.42), "optimizer": optimizer.state_dict()}, path
    )
    teacher = _fresh_cnn(seed=12)
    _assert_some_differ(teacher, expected)
    module = KnowledgeDistillation(DigitsMLP(), teacher, teacher_checkpoint=str(path))
    _assert_state_equal(module.teacher, expected)


def test_extract_state_dict_prefixes():
    a, b = torch.ones(2), torch.zeros(3)
    assert extract_state_dict({"state_dict": {"model.w": a, "other.x": b}}) == {"w": a}
    assert extract_state_dict({"state_dict": {"student.w": a, "teacher.w": b}}) == {"w": a}
    plain = {"w": a, "model_b": b}
    assert extract_state_dict(plain) == plain
    with pytest.raises(ValueError, match="'state_dict' is a list"):
        extract_state_dict({"state_dict": [a]})


# ------------------------------------------------------------- checkpoints load weights_only
def _assert_plain_data(obj, where="hyper_parameters"):
    """Only what ``weights_only`` unpickles without code: containers, primitives, tensors."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            assert isinstance(k, (str, int)), f"{where}: key {k!r}"
            _assert_plain_data(v, f"{where}.{k}")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            _assert_plain_data(v, f"{where}[{i}]")
    else:
        assert obj is None or isinstance(obj, (str, int, float, bool, Tensor)), f"{where}: {type(obj)}"


def test_classifier_checkpoint_loads_weights_only(classifier_ckpt):
    ckpt = torch.load(classifier_ckpt, map_location="cpu", weights_only=True)
    hp = ckpt["hyper_parameters"]
    _assert_plain_data(hp)
    assert hp["label_smoothing"] == 0.0
    assert not {"model", "optimizer", "lr_scheduler"} & set(hp), hp


def test_cli_classifier_checkpoint_loads_weights_only(cli_classifier_ckpt):
    ckpt = torch.load(cli_classifier_ckpt, map_location="cpu", weights_only=True)
    hp = ckpt["hyper_parameters"]
    _assert_plain_data(hp)
    assert hp["_class_path"] == "lightning_distill.Classifier"
    assert not {"model", "optimizer", "lr_scheduler"} & set(hp), hp
    assert ckpt["global_step"] == 2 and ckpt["epoch"] == 0
    expected = _prefixed(ckpt["state_dict"], "model.")
    assert sorted(expected) == sorted(DigitsCNN().state_dict())
    # and it is a valid teacher_checkpoint
    module = KnowledgeDistillation(DigitsMLP(), _fresh_cnn(), teacher_checkpoint=str(cli_classifier_ckpt))
    _assert_state_equal(module.teacher, expected)


def test_distillation_checkpoint_loads_weights_only(kd_ckpts):
    ckpt = torch.load(kd_ckpts["save_teacher=False"], map_location="cpu", weights_only=True)
    _assert_plain_data(ckpt["hyper_parameters"])
    assert ckpt["hyper_parameters"]["teacher_checkpoint"] == "zoo:digits_cnn"
    assert not any(k.startswith("teacher.") for k in ckpt["state_dict"])


# --------------------------------------------------------------------------------- refusals
def test_width_mismatch_names_shape_mismatches(tmp_path):
    path = tmp_path / "w8.pt"
    torch.save(DigitsCNN(width=8).state_dict(), path)
    teacher = _fresh_cnn(width=16)
    before = _snapshot(teacher)
    with pytest.raises(ValueError, match="shape mismatches") as info:
        KnowledgeDistillation(DigitsMLP(), teacher, teacher_checkpoint=str(path))
    msg = str(info.value)
    assert "block1.0.weight: file (8, 1, 3, 3) vs model (16, 1, 3, 3)" in msg
    assert "shape mismatches (16)" in msg and "(4 more)" in msg
    assert "DigitsCNN" in msg and str(path) in msg
    assert "missing keys" not in msg and "unexpected keys" not in msg
    _assert_state_equal(teacher, before)


def test_wrong_architecture_names_missing_and_unexpected_keys(tmp_path):
    path = tmp_path / "mlp.pt"
    torch.save(DigitsMLP().state_dict(), path)
    with pytest.raises(ValueError, match="missing keys") as info:
        load_weights(_fresh_cnn(), path)
    msg = str(info.value)
    for key in ("block1.0.weight", "block1.1.running_mean"):
        assert key in msg
    assert "block1.1.weight: file (16, 64) vs model (16,)" in msg

    # the other direction: every CNN-only key is unexpected in an MLP
    path = tmp_path / "cnn.pt"
    torch.save(DigitsCNN().state_dict(), path)
    with pytest.raises(ValueError, match=r"unexpected keys \(\d+\): block1\.0\.weight") as info:
        load_weights(DigitsMLP(), path)
    assert "block2.0.0.weight" in str(info.value)


def test_missing_and_unexpected_keys_all_listed(tmp_path):
    state = dict(DigitsCNN().state_dict())
    state["extra.weight"] = torch.zeros(1)
    del state["head.bias"]
    path = tmp_path / "edited.pt"
    torch.save(state, path)
    with pytest.raises(ValueError, match=r"missing keys \(1\): head\.bias; unexpected keys \(1\): extra\.weight"):
        load_weights(_fresh_cnn(), path)


class _NotATensor:
    pass


@pytest.mark.parametrize(
    "payload",
    [
        pytest.param(lambda sd: {"state_dict": sd, "obj": _NotATensor()}, id="custom-class"),
        pytest.param(lambda sd: {"state_dict": sd, "opt": functools.partial(torch.optim.SGD, lr=0.1)}, id="partial"),
    ],
)
def test_code_needing_checkpoint_is_refused(tmp_path, payload):
    path = tmp_path / "unsafe.ckpt"
    torch.save(payload(DigitsCNN().state_dict()), path)
    teacher = _fresh_cnn()
    before = _snapshot(teacher)
    with pytest.raises(ValueError, match=r"code execution.*weights_only=True") as info:
        KnowledgeDistillation(DigitsMLP(), teacher, teacher_checkpoint=str(path))
    assert "teacher_checkpoint" in str(info.value) and str(path) in str(info.value)
    _assert_state_equal(teacher, before)


def test_non_dict_checkpoint_is_refused(tmp_path):
    path = tmp_path / "list.pt"
    torch.save(list(DigitsCNN().state_dict().values()), path)
    with pytest.raises(ValueError, match=r"holds a list, expected a state dict or a Lightning checkpoint"):
        read_checkpoint(path)


def test_missing_file(tmp_path):
    path = tmp_path / "nowhere" / "teacher.ckpt"
    with pytest.raises(FileNotFoundError, match=re.escape(str(path))):
        KnowledgeDistillation(DigitsMLP(), DigitsCNN(), teacher_checkpoint=str(path))


def test_zoo_character_teacher_reproduces_its_documented_quality(make_trainer):
    """``zoo:pydoc_char_transformer`` (what configs/text/kd.yaml reads) loads into the architecture the text
    configs build and scores the test perplexity / accuracy its zoo entry and the README state."""
    from lightning_distill.data import TextDataModule
    from lightning_distill.models import CharTransformer

    teacher = CharTransformer(vocab_size=104, d_model=64, n_layers=2, n_heads=4, max_len=256, dropout=0.0)
    module = Classifier(teacher)
    load_weights(module.model, "zoo:pydoc_char_transformer")
    (metrics,) = make_trainer().test(module, datamodule=TextDataModule(seq_len=128, batch_size=32), verbose=False)
    assert metrics["test/perplexity"] == pytest.approx(3.321, abs=0.002)
    assert metrics["test/acc"] == pytest.approx(0.6739, abs=0.0005)


def test_unknown_zoo_name_lists_available():
    with pytest.raises(ValueError, match=r"'zoo:does_not_exist' is not in the zoo; available: \[.*'digits_cnn'"):
        KnowledgeDistillation(DigitsMLP(), DigitsCNN(), teacher_checkpoint="zoo:does_not_exist")


def test_teacher_checkpoint_without_teacher():
    with pytest.raises(ValueError, match=r"`teacher_checkpoint` was given but `teacher` is None"):
        BornAgain(DigitsMLP(), teacher=None, teacher_checkpoint="zoo:digits_cnn")
    with pytest.raises(ValueError, match="needs a `teacher`"):
        KnowledgeDistillation(DigitsMLP(), None, teacher_checkpoint="zoo:digits_cnn")


def test_non_tensor_entry_is_refused_without_touching_the_teacher(tmp_path):
    """A weights_only-loadable file with a plain number where a tensor belongs.

    All keys and shapes of the tensors match, so the checks in ``load_weights`` pass and
    ``load_state_dict`` copies parameter after parameter until it reaches the number: the teacher
    must not end up half-overwritten, and the error must be the documented ``ValueError``.
    """
    source = dict(_fresh_cnn(seed=5).state_dict())
    source["head.bias"] = 3  # sorted after every conv / BN entry: those get copied first
    path = tmp_path / "number.pt"
    torch.save(source, path)
    teacher = _fresh_cnn(seed=6)
    before = _snapshot(teacher)
    try:
        with pytest.raises(ValueError, match="head.bias"):
            load_weights(teacher, path)
    finally:
        changed = [k for k, v in before.items() if not torch.equal(teacher.state_dict()[k], v)]
        assert changed == [], f"a refused checkpoint modified the teacher: {changed}"


@pytest.mark.parametrize("kind", ["truncated", "empty", "text"])
def test_corrupt_file_gives_clear_error(tmp_path, kind):
    """A file that is not a checkpoint at all must give a ValueError naming it, not a raw
    OSError / EOFError, nor the claim that it needs code execution."""
    good = tmp_path / "good.pt"
    torch.save(DigitsCNN().state_dict(), good)
    path = tmp_path / f"{kind}.pt"
    if kind == "truncated":
        data = good.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif kind == "empty":
        path.write_bytes(b"")
    else:
        path.write_text("this is not a checkpoint\n")
    teacher = _fresh_cnn()
    before = _snapshot(teacher)
    with pytest.raises(ValueError, match=re.escape(str(path))) as info:
        load_weights(teacher, path)
    assert "code execution" not in str(info.value)
    _assert_state_equal(teacher, before)


# ------------------------------------------------------------------------------ zoo export
def test_zoo_export_cli_round_trips(classifier_ckpt, tmp_path):
    out = tmp_path / "exported" / "digits_cnn.pt"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-m", "lightning_distill.zoo", "export", str(classifier_ckpt), str(out)],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    assert out.is_file()
    match = re.search(r"wrote (.+) \(([\d.]+) KiB\)", proc.stdout)
    assert match, proc.stdout
    assert Path(match.group(1)) == out
    assert match.group(2) == f"{out.stat().st_size / 1024:.1f}"

    exported = torch.load(out, map_location="cpu", weights_only=True)
    ckpt = torch.load(classifier_ckpt, map_location="cpu", weights_only=True)
    expected = _prefixed(ckpt["state_dict"], "model.")
    assert sorted(exported) == sorted(expected)
    assert all(torch.equal(exported[k], expected[k]) for k in expected)
    net = _fresh_cnn()
    net.load_state_dict(exported, strict=True)
    _assert_state_equal(net, expected)
    # and as a teacher_checkpoint
    module = KnowledgeDistillation(DigitsMLP(), _fresh_cnn(), teacher_checkpoint=str(out))
    _assert_state_equal(module.teacher, expected)


def test_zoo_export_refuses_unsafe_checkpoint(tmp_path):
    from lightning_distill.zoo import export

    path = tmp_path / "unsafe.ckpt"
    torch.save({"state_dict": DigitsCNN().state_dict(), "obj": _NotATensor()}, path)
    with pytest.raises(ValueError, match=r"`checkpoint`=.*code execution"):
        export(path, tmp_path / "out.pt")
    assert not (tmp_path / "out.pt").exists()


def test_load_weights_does_not_alias_file_tensors(tmp_path):
    """Training the student later must not be able to reach into another module through shared storage."""
    path = tmp_path / "plain.pt"
    source = _fresh_cnn(seed=1)
    torch.save(source.state_dict(), path)
    a, b = _fresh_cnn(seed=2), _fresh_cnn(seed=3)
    load_weights(a, path)
    load_weights(b, path)
    with torch.no_grad():
        a.head.weight.add_(1.0)
    assert torch.equal(b.head.weight, source.head.weight)
    assert not torch.equal(a.head.weight, b.head.weight)


# ------------------------------------------------------------------- atomic checkpoint writes
class _FullDisk:
    """A file object whose disk fills after ``room`` bytes: the write stops part-way with ``ENOSPC``."""

    def __init__(self, handle, room: int) -> None:
        self.handle, self.room = handle, room

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.handle.close()

    def write(self, data) -> int:
        data = bytes(data)
        self.handle.write(data[: self.room])
        self.handle.flush()
        raise OSError(errno.ENOSPC, "No space left on device")

    def __getattr__(self, name):
        return getattr(self.handle, name)


def _fill_disk_after(monkeypatch, room: int) -> None:
    import lightning_distill.checkpoint as checkpoint_module

    real_fdopen = os.fdopen
    monkeypatch.setattr(checkpoint_module.os, "fdopen", lambda fd, *a, **k: _FullDisk(real_fdopen(fd, *a, **k), room))


def test_atomic_checkpoint_write_failure_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    io_ = AtomicCheckpointIO()
    path = tmp_path / "checkpoints" / "last.ckpt"
    good = {"state_dict": {"w": torch.arange(6.0)}, "epoch": 3}
    io_.save_checkpoint(good, path)
    before = path.read_bytes()
    _fill_disk_after(monkeypatch, room=100)
    with pytest.raises(OSError, match=r"could not write the checkpoint '.*last\.ckpt' \(No space left on device\); "
                                      r"the previous checkpoint there is untouched") as info:
        io_.save_checkpoint({"state_dict": {"w": torch.zeros(10_000)}, "epoch": 4}, path)
    assert info.value.errno == errno.ENOSPC
    assert path.read_bytes() == before  # byte for byte the good one
    assert torch.load(path, weights_only=True)["epoch"] == 3
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.ckpt"]  # no temporary file left behind


def test_atomic_checkpoint_first_write_failure_leaves_nothing(tmp_path, monkeypatch):
    _fill_disk_after(monkeypatch, room=10)
    with pytest.raises(OSError, match="nothing was written there"):
        AtomicCheckpointIO().save_checkpoint({"epoch": 0}, tmp_path / "last.ckpt")
    assert list(tmp_path.iterdir()) == []


def test_training_survives_a_full_disk_with_its_last_good_checkpoint(tmp_path, monkeypatch):
    """A real fit writes last.ckpt through the plugin; when the disk fills during a later save the fit fails
    with the plugin's message and the earlier last.ckpt still resumes."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    def fit(max_epochs, ckpt_path=None):
        L.seed_everything(0)
        module = Classifier(DigitsMLP(hidden=8))
        trainer = L.Trainer(
            max_epochs=max_epochs, limit_train_batches=2, limit_val_batches=1, logger=False, enable_progress_bar=False,
            enable_model_summary=False, plugins=[AtomicCheckpointIO()], num_sanity_val_steps=0,
            callbacks=[ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, save_top_k=0)],
        )
        trainer.fit(module, datamodule=DigitsDataModule(batch_size=32), ckpt_path=ckpt_path)
        return trainer

    fit(1)
    last = tmp_path / "ckpt" / "last.ckpt"
    good, epochs_done = last.read_bytes(), torch.load(last, weights_only=True)["epoch"]
    _fill_disk_after(monkeypatch, room=1000)
    with pytest.raises(OSError, match="the previous checkpoint there is untouched"):
        fit(2, ckpt_path=last)
    monkeypatch.undo()
    assert last.read_bytes() == good
    assert torch.load(last, weights_only=True)["epoch"] == epochs_done  # still loads, from the first fit
    assert fit(2, ckpt_path=last).current_epoch == 2  # the kept checkpoint resumes


def test_cli_installs_the_atomic_writer(tmp_path):
    cli = DistillCLI(args=["--config", str(TEACHER_CONFIG), "--trainer.default_root_dir", str(tmp_path)], run=False)
    assert type(cli.trainer.strategy.checkpoint_io) is AtomicCheckpointIO


def test_resume_restores_random_states_so_dropout_continues_bitwise(tmp_path):
    """Lightning's checkpoints hold no random states: a resumed run with dropout drew other masks than the
    uninterrupted one. The module saves torch / NumPy / Python states and a resumed fit restores them."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    def fit(max_epochs, directory, ckpt_path=None):
        L.seed_everything(0)
        module = Classifier(nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Dropout(0.5), nn.Linear(32, 10)))
        trainer = L.Trainer(
            max_epochs=max_epochs, limit_train_batches=3, limit_val_batches=1, logger=False, enable_progress_bar=False,
            enable_model_summary=False, default_root_dir=tmp_path, deterministic=True,
            callbacks=[ModelCheckpoint(dirpath=tmp_path / directory, save_last=True, save_top_k=0)],
        )
        trainer.fit(module, datamodule=DigitsDataModule(batch_size=32, shuffle_seed=0), ckpt_path=ckpt_path)
        return module

    straight = fit(3, "straight")
    fit(2, "resumed")
    last = tmp_path / "resumed" / "last.ckpt"
    assert torch.load(last, weights_only=True)["lightning_distill"]["rng"]["torch"].dtype == torch.uint8
    resumed = fit(3, "resumed", ckpt_path=last)
    for name, value in straight.state_dict().items():
        assert torch.equal(resumed.state_dict()[name], value), name
