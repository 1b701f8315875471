"""Resume equals an uninterrupted run, bitwise on the CPU: a real ``lightning-distill fit`` is killed with SIGKILL in
the middle of epoch 2 (a callback kills its own process at a fixed batch, so nothing depends on timing), resumed from
its ``last.ckpt`` (written at the end of epoch 1) and must end with the same student weights as a fit that was never
interrupted. A few configs run by default; every digits config that trains runs with ``pytest -m slow``."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
DIGITS = REPO / "configs" / "digits"
SCRIPTS = Path(__file__).resolve().parent / "scripts"
SHORT = ["--trainer.max_epochs", "3", "--trainer.limit_train_batches", "4", "--trainer.limit_val_batches", "2",
         "--trainer.enable_progress_bar", "false", "--test_after_fit", "false"]  # fmt: skip
FAST = ["teacher", "transfer_kd"]  # dropout (random states); KD on a transfer set (the sampler's epoch)
# data_free_kd reads a synthetic set another command writes; born_again trains generations in one fit
SLOW = sorted(
    p.stem for p in DIGITS.glob("*.yaml") if p.stem not in FAST and p.stem not in ("data_free_kd", "born_again")
)


def _fit(config: str, tmp_path: Path, version: str, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SCRIPTS), str(REPO), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}  # fmt: skip
    cmd = [sys.executable, "-m", "lightning_distill", "fit", "--config", str(DIGITS / f"{config}.yaml"), *SHORT,
           "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"),
           "--trainer.logger.init_args.version", version, *extra]  # fmt: skip
    return subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, env=env, timeout=900)


def _student(path: Path) -> dict[str, torch.Tensor]:
    state = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor) and not k.startswith("teacher.")}


def _check_resume(config: str, tmp_path: Path) -> None:
    straight = _fit(config, tmp_path, "straight")
    assert straight.returncode == 0, straight.stderr[-3000:]
    kill = json.dumps([{"class_path": "kill_switch.KillAt", "init_args": {"epoch": 2, "batch": 2}}])
    killed = _fit(config, tmp_path, "killed", "--extra_callbacks", kill)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    (run,) = (tmp_path / "runs").glob("*/killed")
    last = run / "checkpoints" / "last.ckpt"
    assert torch.load(last, map_location="cpu", weights_only=True)["epoch"] == 1  # written before the kill
    resumed = _fit(config, tmp_path, "killed", "--ckpt_path", str(last))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    (done,) = (tmp_path / "runs").glob("*/straight")
    expected, got = _student(done / "checkpoints" / "last.ckpt"), _student(last)
    assert set(got) == set(expected)
    differ = [k for k in expected if not torch.equal(got[k], expected[k])]
    assert not differ, f"{config}: resumed differs from uninterrupted in {differ[:8]}"


@pytest.mark.parametrize("config", FAST)
def test_killed_and_resumed_fit_equals_an_uninterrupted_one(config, tmp_path):
    _check_resume(config, tmp_path)


# known defect, kept visible: the POCL curriculum's resumed run differs (strict: this fails once it is fixed)
KNOWN = {"pocl": "ProgressiveCurriculum does not yet resume bitwise from a mid-curriculum checkpoint"}


@pytest.mark.slow
@pytest.mark.parametrize(
    "config", [pytest.param(c, marks=pytest.mark.xfail(strict=True, reason=KNOWN[c])) if c in KNOWN else c for c in SLOW]
)
def test_every_digits_config_resumes_bitwise(config, tmp_path):
    _check_resume(config, tmp_path)
