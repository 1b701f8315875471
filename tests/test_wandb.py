"""A short CLI fit with the W&B logger offline: the run holds the documented keys and the full config."""

from __future__ import annotations

import json
import struct
from pathlib import Path

from _wandb import finish_wandb

from lightning_distill.cli import DistillCLI

ROOT = Path(__file__).resolve().parents[1]


def _records(raw: bytes):
    """Records of a ``.wandb`` file: a LevelDB-style log (7-byte file header; 32 KiB blocks of chunks with
    a 7-byte header: crc32, length, type FULL=1 / FIRST=2 / MIDDLE=3 / LAST=4), each a protobuf Record."""
    assert raw[:4] == b":W&B", raw[:7]
    pos, block, buf = 7, 32768, b""
    while pos + 7 <= len(raw):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", raw[pos : pos + 7])
        pos += 7
        if kind == 0 and length == 0:
            pos += (block - pos % block) % block
            continue
        chunk, pos = raw[pos : pos + length], pos + length
        if kind == 1:
            yield chunk
        elif kind == 2:
            buf = chunk
        elif kind == 3:
            buf += chunk
        elif kind == 4:
            yield buf + chunk
            buf = b""


def read_offline_run(run_dir: Path) -> tuple[set[str], dict]:
    """(history keys, config) of an offline W&B run directory."""
    from wandb.proto import wandb_internal_pb2 as pb

    (path,) = run_dir.glob("*.wandb")
    keys, config = set(), {}
    for data in _records(path.read_bytes()):
        record = pb.Record()
        record.ParseFromString(data)
        kind = record.WhichOneof("record_type")
        if kind == "history":
            keys.update(item.key or "/".join(item.nested_key) for item in record.history.item)
        elif kind == "config":
            for item in record.config.update:
                config[item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
    return keys, config


def test_wandb_offline_run_has_documented_keys_and_full_config(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb_home" / var.lower()))
    monkeypatch.chdir(tmp_path)

    try:
        DistillCLI(
            args=[
                "fit", "--config", str(ROOT / "configs" / "digits" / "ctkd.yaml"), "--wandb", "true",
                "--trainer.max_epochs", "2", "--trainer.limit_train_batches", "4", "--trainer.limit_val_batches", "2",
                "--trainer.log_every_n_steps", "1", "--trainer.enable_progress_bar", "false",
            ]
        )
    finally:
        finish_wandb()
    (run_dir,) = (tmp_path / "runs" / "digits" / "wandb").glob("offline-run-*")
    documented = {
        "train/loss", "train/task_loss", "train/kd_loss", "train/temperature", "train/lambda",  # strategy terms
        "temperature/value", "temperature/lambda",  # TemperatureMonitor
        "val/acc", "val/acc_top5", "val/loss", "val/agreement", "val/kl", "val/ece", "val/teacher_acc",
        "test/acc", "test/teacher_acc", "test/agreement",
    }
    keys, config = read_offline_run(run_dir)  # complete: finish_wandb waited for the service to exit
    assert documented <= keys, documented - keys
    # the full resolved config, nested as in the YAML, including the modules the hparams leave out
    assert config["model"]["class_path"] == "lightning_distill.CTKD"
    init = config["model"]["init_args"]
    assert init["student"]["class_path"] == "lightning_distill.models.DigitsMLP"
    assert init["teacher"]["class_path"] == "lightning_distill.models.DigitsCNN"
    assert init["teacher_checkpoint"] == "zoo:digits_cnn" and init["temperature_mode"] == "global"
    assert init["optimizer"]["class_path"] == "torch.optim.Adam"
    assert config["data"]["class_path"] == "lightning_distill.data.DigitsDataModule"
    assert config["trainer"]["max_epochs"] == 2 and config["seed_everything"] == 0
