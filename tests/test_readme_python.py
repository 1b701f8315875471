"""The README's "From Python" example, run as written (all 30 epochs, about 15 s on one core): it must end
where the command-line quickstart it mirrors ends, so the two sections of the README tell the same story."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from _configs import resolved_spec

pytestmark = pytest.mark.usefixtures("restore_global_state")

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
KD_CONFIG = REPO / "configs" / "digits" / "kd.yaml"


def _section(title: str) -> str:
    """The README section whose heading starts with ``title``."""
    text = README.read_text()
    start = text.index(f"\n## {title}")
    end = text.find("\n## ", start + 1)
    return text[start : end if end >= 0 else None]


def _python_example() -> str:
    blocks = re.findall(r"```python\n(.*?)```", _section("From Python"), re.S)
    assert blocks, "the README's 'From Python' section has no python block"
    return blocks[0]


def _quickstart_student_accuracy() -> float:
    """The student's test accuracy in the quickstart's printed summary (in percent)."""
    match = re.search(r"^\s+student \(DigitsMLP, [\d.]+k params\)\s+(\d+\.\d{2})%$", _section("Quickstart"), re.M)
    assert match, "the README quickstart shows no student accuracy"
    return float(match.group(1))


def test_readme_python_example_spells_out_the_quickstart_config():
    """Every setting the quickstart config changes from the module's / Trainer's defaults appears in the example."""
    code = _python_example()
    spec = resolved_spec(KD_CONFIG)
    init = spec["model"]["init_args"]
    expected = [
        f"L.seed_everything({spec['seed_everything']})",
        f"temperature={init['temperature']}",
        f"alpha={init['alpha']}",
        f'teacher_checkpoint="{init["teacher_checkpoint"]}"',
        f"hidden={init['student']['init_args']['hidden']}",
        f"torch.optim.Adam, lr={init['optimizer']['init_args']['lr']}",
        f"CosineAnnealingLR, T_max={init['lr_scheduler']['init_args']['T_max']}",
        f'lr_scheduler_interval="{init["lr_scheduler_interval"]}"',
        f"max_epochs={spec['trainer']['max_epochs']}",
        f'accelerator="{spec["trainer"]["accelerator"]}"',
        f"deterministic={spec['trainer']['deterministic']}",
        f"log_every_n_steps={spec['trainer']['log_every_n_steps']}",
        f"batch_size={spec['data']['init_args']['batch_size']}",
        f"split_seed={spec['data']['init_args']['split_seed']}",
    ]
    missing = [setting for setting in expected if setting not in code]
    assert not missing, f"the README example does not spell out {missing}"


def test_readme_python_example_matches_the_quickstart(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the default Trainer logs to ./lightning_logs
    namespace: dict = {}
    exec(compile(_python_example(), str(README), "exec"), namespace)  # noqa: S102
    trainer = namespace["trainer"]
    assert trainer.current_epoch == 30
    accuracy = 100 * float(trainer.callback_metrics["test/acc"])
    quickstart = _quickstart_student_accuracy()
    print(f"README Python example: {accuracy:.2f}% test accuracy; quickstart (README): {quickstart:.2f}%")
    assert accuracy == pytest.approx(quickstart, abs=1.0)
