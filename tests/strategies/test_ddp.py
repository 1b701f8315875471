"""Real 2-process DDP fits on CPU (gloo): no unused-parameter errors, teacher untouched, ranks in sync."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "ddp_fit.py"


@pytest.mark.parametrize("strategy", ["KnowledgeDistillation", "FeatureDistillation"])
def test_ddp_fit_on_two_cpu_processes(strategy, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), strategy, str(tmp_path)], capture_output=True, text=True, timeout=300, env=env
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    for facts in ranks:
        assert facts["global_step"] == 6  # 2 epochs x 3 batches on every rank
        assert facts["teacher_identical"] and facts["teacher_eval"] and facts["loss_finite"]
    # gradients were all-reduced: both replicas of the student hold the same weights
    assert ranks[0]["student_checksum"] == pytest.approx(ranks[1]["student_checksum"], rel=1e-6)
