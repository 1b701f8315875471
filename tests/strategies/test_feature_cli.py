"""Every layer mapping runs from YAML through the CLI (configs/digits/hidden_states.yaml + overrides)."""

from __future__ import annotations

from pathlib import Path

import pytest

from lightning_distill.cli import DistillCLI

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "digits" / "hidden_states.yaml"
TEACHER = "[block1, block2.0, block2, block3]"  # N = 4 candidates: [16,8,8], [32,8,8], [32,4,4], [64]
STUDENT = "[block1.0, block2]"  # M = 2: [8,8,8], [16]


@pytest.mark.parametrize(
    ("mapping", "pairs"),
    [
        ("uniform", [("block2.0", "block1.0"), ("block3", "block2")]),  # phi(j) = floor(j N / M) = 2, 4
        ("skip", [("block2.0", "block1.0"), ("block3", "block2")]),  # every k = N // M = 2nd layer
        ("last", [("block2", "block1.0"), ("block3", "block2")]),  # the last M layers: 3, 4
    ],
)
def test_mapping_from_yaml(mapping, pairs, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = DistillCLI(
        args=[
            "fit", "--config", str(CONFIG), "--trainer.fast_dev_run", "2", "--trainer.enable_progress_bar", "false",
            "--model.init_args.teacher_layers", TEACHER, "--model.init_args.student_layers", STUDENT,
            "--model.init_args.mapping", mapping,
        ],
    )
    assert cli.model.pairs == pairs
    assert cli.trainer.global_step == 2
    assert len(cli.model.projections) == 2 and cli.trainer.callback_metrics["train/feature_loss"] >= 0


def test_bad_layer_name_from_yaml_fails_before_training(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=r"has no submodule named 'blok3' \(did you mean 'block3'") as err:
        DistillCLI(args=["fit", "--config", str(CONFIG), "--model.init_args.teacher_layers", "[block1, blok3]"])
    assert "Valid names (from named_modules())" in str(err.value)
    assert not list(tmp_path.rglob("*.ckpt")) and not list(tmp_path.rglob("metrics.csv"))
