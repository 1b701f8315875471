"""The multi-seed runner: statistics against hand computation, tables, and one real tiny run."""

from __future__ import annotations

import csv
import math
import os
from pathlib import Path

import pytest

from lightning_distill.experiments import compare, summarize, write_tables

ROOT = Path(__file__).resolve().parents[1]


def _fake(name, seed, last, best, epoch, wall=1.0):
    return {
        "name": name, "seed": seed, "config": f"configs/{name}.yaml", "config_hash": "abc", "test_acc_last": last,
        "test_acc_best": best, "best_epoch": epoch, "val_acc_best": best, "teacher_test_acc": 0.99,
        "epochs": 3, "wall_time_s": wall, "log_dir": "x",
    }


def test_summary_mean_and_sample_std():
    results = [_fake("kd", 0, 0.90, 0.91, 2), _fake("kd", 1, 0.92, 0.95, 4), _fake("kd", 2, 0.94, 0.93, 3)]
    (row,) = summarize(results)
    assert row["test_acc_last_mean"] == pytest.approx(92.0)
    # sample std of 90, 92, 94: sqrt(((-2)^2 + 0 + 2^2) / (3 - 1)) = 2
    assert row["test_acc_last_std"] == pytest.approx(2.0)
    assert row["test_acc_best_mean"] == pytest.approx(93.0)
    assert row["test_acc_best_std"] == pytest.approx(math.sqrt((4 + 4 + 0) / 2))
    assert row["best_epoch_mean"] == pytest.approx(3.0) and row["seeds"] == 3


def test_tables_are_written(tmp_path):
    results = [_fake("a", 0, 0.5, 0.6, 1), _fake("a", 1, 0.7, 0.6, 1), _fake("b", 0, 0.8, None, None)]
    table = write_tables(results, tmp_path, seeds=[0, 1])
    assert "| a | 60.00 ± 14.14 | 60.00 ± 0.00 | 1.0 | 99.00 |" in table
    assert "| b | 80.00 ± 0.00 | n/a | n/a |" in table
    rows = list(csv.DictReader(open(tmp_path / "runs.csv")))
    assert [r["name"] for r in rows] == ["a", "a", "b"]
    assert (tmp_path / "results.md").read_text() == table
    assert len(list(csv.DictReader(open(tmp_path / "results.csv")))) == 2


def test_bad_arguments(tmp_path):
    cfg = str(ROOT / "configs" / "digits" / "baseline.yaml")
    with pytest.raises(FileNotFoundError, match="no such config file"):
        compare(["nope.yaml"], [0], str(tmp_path))
    with pytest.raises(ValueError, match="one name per config"):
        compare([cfg], [0], str(tmp_path), names=["a", "b"])
    with pytest.raises(ValueError, match="KEY=VALUE"):
        compare([cfg], [0], str(tmp_path), overrides=["trainer.max_epochs"])
    with pytest.raises(ValueError, match="at least one seed"):
        compare([cfg], [], str(tmp_path))


def test_real_compare_run(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    cfg = str(ROOT / "configs" / "digits" / "baseline.yaml")
    results = compare(
        [cfg], [0, 1], str(tmp_path / "out"), overrides=["trainer.max_epochs=1", "trainer.limit_train_batches=3"],
        progress=False,
    )
    assert [r["seed"] for r in results] == [0, 1]
    for r in results:
        assert 0.0 <= r["test_acc_last"] <= 1.0 and r["best_epoch"] == 0
        # each run saved its resolved config, which reproduces it on its own
        config = Path(r["log_dir"]) / "config.yaml"
        assert config.is_file() and "seed_everything: " + str(r["seed"]) in config.read_text()
    assert results[0]["test_acc_last"] != results[1]["test_acc_last"]  # different seeds, different runs
    assert os.path.isfile(tmp_path / "out" / "results.md")
