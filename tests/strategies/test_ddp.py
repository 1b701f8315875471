"""Real 2-process DDP fits on CPU (gloo): no unused-parameter errors, teacher untouched, ranks in sync."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "ddp_fit.py"


def _run(strategy: str, tmp_path: Path) -> list[dict]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), strategy, str(tmp_path)], capture_output=True, text=True, timeout=300, env=env
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]


@pytest.mark.parametrize("strategy", ["KnowledgeDistillation", "FeatureDistillation"])
def test_ddp_fit_on_two_cpu_processes(strategy, tmp_path):
    ranks = _run(strategy, tmp_path)
    assert [r["world_size"] for r in ranks] == [2, 2]
    for facts in ranks:
        assert facts["global_step"] == 6  # 2 epochs x 3 batches on every rank
        assert facts["teacher_identical"] and facts["teacher_eval"] and facts["loss_finite"]
    # gradients were all-reduced: both replicas of the student hold the same weights
    assert ranks[0]["student_checksum"] == pytest.approx(ranks[1]["student_checksum"], rel=1e-6)


def _csv_rows(path: Path) -> list[dict[str, str]]:
    import csv

    with open(path) as fh:
        return list(csv.DictReader(fh))


def test_ddp_ctkd_temperature_monitor_and_curriculum(tmp_path):
    """CTKD (global) + TemperatureMonitor + ProgressiveCurriculum on 2 processes."""
    r0, r1 = _run("CTKD_global", tmp_path)
    for facts in (r0, r1):
        assert facts["global_step"] == 9 and facts["teacher_identical"] and facts["teacher_eval"] and facts["loss_finite"]
    assert r0["student_checksum"] == pytest.approx(r1["student_checksum"], rel=1e-6)
    # every rank used the same temperature at every step, and was in the same stage every epoch
    assert r0["temperatures"].keys() == r1["temperatures"].keys()
    for step, taus in r0["temperatures"].items():
        assert taus == pytest.approx(r1["temperatures"][step], rel=1e-6), step
    assert r0["stages"] == r1["stages"] == {"0": 0, "1": 1, "2": 2}
    # both ranks share one curriculum order, and each stage's fresh distributed sampler shards the
    # stage's subset: the ranks see disjoint samples, all from the easiest 1/3, 2/3, all of the order
    assert r0["order"] == r1["order"] and len(r0["order"]) == 1079
    for epoch, fraction in (("0", 1 / 3), ("1", 2 / 3), ("2", 1.0)):
        allowed = set(r0["order"][: math.ceil(fraction * 1079)])
        seen0, seen1 = set(r0["seen"][epoch]), set(r1["seen"][epoch])
        assert not seen0 & seen1
        assert seen0 | seen1 <= allowed, epoch
    # the logged values equal what the module used: the CSV rows (rank 0's logger) and each rank's metrics
    rows = [r for r in _csv_rows(tmp_path / "csv" / "version_0" / "metrics.csv") if r.get("temperature/value")]
    assert rows, "TemperatureMonitor wrote nothing"
    for row in rows:
        step = row["step"]  # the monitor writes at trainer.global_step (optimizer steps done)
        assert float(row["temperature/value"]) == pytest.approx(r0["temperatures"][step][0], rel=1e-6)
        assert float(row["temperature/lambda"]) >= 0
    assert len(rows) == len(r0["logged"]) == len(r1["logged"]) == 5  # steps 1, 3, 5, 7, 9
    for step, logged in r0["logged"].items():
        assert logged == pytest.approx(r1["logged"][step], rel=1e-6)


def test_ddp_instance_temperatures_are_reduced_over_both_ranks(tmp_path):
    r0, r1 = _run("CTKD_instance", tmp_path)
    checked = 0
    for step in r0["temperatures"]:
        if int(step) % 2 != 1:  # logging_interval=2 logs after optimizer steps 1, 3, 5, ...
            continue
        values = torch.tensor(r0["temperatures"][step] + r1["temperatures"][step], dtype=torch.float64)
        for facts in (r0, r1):  # both ranks log the same, all-rank statistics
            logged = facts["logged"][step]
            assert logged["temperature/mean"] == pytest.approx(values.mean().item(), rel=1e-5)
            assert logged["temperature/min"] == pytest.approx(values.min().item(), rel=1e-5)
            assert logged["temperature/max"] == pytest.approx(values.max().item(), rel=1e-5)
            assert logged["temperature/std"] == pytest.approx(values.std().item(), rel=1e-4, abs=1e-6)
        checked += 1
    assert checked >= 3
