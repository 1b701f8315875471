"""The ``lightning-distill`` command (:class:`lightning_distill.cli.DistillCLI`).

Every shipped config builds, the quickstart runs end to end (summary, logs, checkpoint), the
other subcommands work from a checkpoint, runs resume, and the logger switches add their loggers.
"""

from __future__ import annotations

import contextlib
import copy
import csv
import importlib
import io
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from _configs import RUNNABLE_CONFIGS, resolved_spec
from _state import IsolatedState
from _wandb import finish_wandb
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger, WandbLogger
from torch import nn

from lightning_distill.checkpoint import MissingCheckpointError
from lightning_distill.cli import DistillCLI, format_test_summary, missing_checkpoint_message
from lightning_distill.data import DigitsDataModule
from lightning_distill.models import DigitsCNN, DigitsMLP
from lightning_distill.zoo import resolve

pytestmark = pytest.mark.usefixtures("restore_global_state")

REPO = Path(__file__).resolve().parents[1]
CONFIG_DIR = REPO / "configs"
CONFIGS = RUNNABLE_CONFIGS  # the shared blocks (configs/*/shared/) are built as part of the configs that load them
KD_CONFIG = CONFIG_DIR / "digits" / "kd.yaml"

# Quiet, short runs of the digits configs (override the config, keep everything else).
QUICK = [
    "--trainer.enable_progress_bar",
    "false",
    "--trainer.enable_model_summary",
    "false",
    "--trainer.limit_train_batches",
    "2",
    "--trainer.limit_val_batches",
    "1",
    "--trainer.limit_test_batches",
    "1",
]


# ---------------------------------------------------------------------------------- helpers


def _cli(cwd: Path, subcommand: str, *args: str, config: Path = KD_CONFIG) -> DistillCLI:
    with IsolatedState(cwd):
        os.chdir(cwd)
        return DistillCLI(
            args=[subcommand, "--config", str(config), "--trainer.default_root_dir", str(cwd), *QUICK, *args]
        )


def _import(class_path: str):
    module, _, name = class_path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def _subprocess_env() -> dict[str, str]:
    env = dict(os.environ, WANDB_MODE="offline", WANDB_SILENT="true")
    env.setdefault("OMP_NUM_THREADS", "1")  # keeps the runs fast when other tests share the 2 cores
    return env


def _student_state(ckpt: dict) -> dict[str, torch.Tensor]:
    return {k[len("student.") :]: v for k, v in ckpt["state_dict"].items() if k.startswith("student.")}


def _assert_teacher_is_zoo(teacher: nn.Module) -> None:
    zoo = torch.load(resolve("zoo:digits_cnn"), map_location="cpu", weights_only=True)
    own = teacher.state_dict()
    assert sorted(own) == sorted(zoo)
    for key, value in zoo.items():
        assert torch.equal(own[key].cpu(), value), f"teacher.{key} differs from zoo:digits_cnn"


# ------------------------------------------------------------------------- every config builds
@pytest.mark.parametrize("config", CONFIGS, ids=[str(p.relative_to(CONFIG_DIR)) for p in CONFIGS])
def test_config_builds(config, tmp_path, monkeypatch):
    assert CONFIGS, "no YAML config under configs/"
    spec = resolved_spec(config)  # `trainer: shared/trainer.yaml` read in place
    model_spec, data_spec = spec["model"], spec["data"]
    init_args = model_spec.get("init_args", {})

    def no_download(*args, **kwargs):
        raise AssertionError(f"building {config.name} tried to download a dataset")

    import torchvision.datasets.cifar
    import torchvision.datasets.utils

    for target in (torchvision.datasets.utils, torchvision.datasets.cifar):
        for name in ("download_url", "download_and_extract_archive"):
            if hasattr(target, name):
                monkeypatch.setattr(target, name, no_download)

    extra = []
    checkpoint = init_args.get("teacher_checkpoint")
    if isinstance(checkpoint, str) and not checkpoint.startswith("zoo:"):
        # produced by another config's run (see the config's header): not there in a fresh checkout
        extra += ["--model.init_args.teacher_checkpoint", "null"]
    teacher_spec = init_args.get("teacher")
    source_args = teacher_spec.get("init_args", {}) if isinstance(teacher_spec, dict) else {}
    if "module" in source_args:  # a teacher source (FrozenTeacher) with its own checkpoint argument
        checkpoint = source_args.get("checkpoint")
        if isinstance(checkpoint, str) and not checkpoint.startswith("zoo:"):
            # the same config, resolved, with no teacher checkpoint (written outside tmp_path, which must stay empty)
            resolved = copy.deepcopy(spec)
            resolved["model"]["init_args"]["teacher"]["init_args"]["checkpoint"] = None
            config = tmp_path.parent / f"{tmp_path.name}_{config.name}"
            config.write_text(yaml.safe_dump(resolved))
    accelerator = spec.get("trainer", {}).get("accelerator")
    if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        extra += ["--trainer.accelerator", "cpu"]

    monkeypatch.chdir(tmp_path)
    cli = DistillCLI(args=["--config", str(config), "--trainer.default_root_dir", str(tmp_path), *extra], run=False)

    assert type(cli.model) is _import(model_spec["class_path"])
    assert type(cli.datamodule) is _import(data_spec["class_path"])
    for key, value in init_args.items():
        if key == "teacher" and "module" in source_args:  # a teacher source around the teacher network
            assert type(cli.model.teacher_source) is _import(value["class_path"])
            assert type(cli.model.teacher) is _import(source_args["module"]["class_path"])
        elif isinstance(value, dict) and "class_path" in value and isinstance(getattr(cli.model, key, None), nn.Module):
            assert type(getattr(cli.model, key)) is _import(value["class_path"]), key
        elif (
            isinstance(value, (str, int, float, bool))
            and key in cli.model.hparams
            and f"--model.init_args.{key}" not in extra
        ):
            assert cli.model.hparams[key] == value, key
    for key, value in data_spec.get("init_args", {}).items():
        if isinstance(value, (str, int, float, bool)) and hasattr(cli.datamodule, key):
            assert getattr(cli.datamodule, key) == value, key
    if "max_epochs" in spec.get("trainer", {}):
        assert cli.trainer.max_epochs == spec["trainer"]["max_epochs"]
    if isinstance(checkpoint, str) and checkpoint == "zoo:digits_cnn":
        _assert_teacher_is_zoo(cli.model.teacher)
    # building touches no file: no dataset download, no log directory yet
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == []


# ------------------------------------------------------------------------ quickstart end to end
def test_quickstart_end_to_end(tmp_path):
    """The README's quickstart exactly as a user types it (default epochs), checked in depth."""
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "lightning_distill", "fit", "--config", str(KD_CONFIG)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
        env=_subprocess_env(),
    )
    elapsed = time.perf_counter() - start
    print(f"quickstart wall time: {elapsed:.1f} s (OMP_NUM_THREADS={_subprocess_env()['OMP_NUM_THREADS']})")
    assert proc.returncode == 0, proc.stderr[-4000:]

    summary = re.search(r"Test accuracy on (\d+) held-out test samples", proc.stdout)
    assert summary and summary.group(1) == "359", proc.stdout[-2000:]
    student = re.search(r"^\s+student \(DigitsMLP, ([\d.]+k) params\)\s+(\d+\.\d{2})%$", proc.stdout, re.M)
    teacher = re.search(r"^\s+teacher \(DigitsCNN, ([\d.]+k) params\)\s+(\d+\.\d{2})%$", proc.stdout, re.M)
    assert student and teacher, proc.stdout[-2000:]
    assert student.group(1) == "1.2k" and teacher.group(1) == "24.1k"
    student_acc, teacher_acc = float(student.group(2)), float(teacher.group(2))
    assert teacher_acc >= 95.0, teacher_acc
    assert 80.0 <= student_acc <= 100.0, student_acc

    log_dir = tmp_path / "runs" / "digits" / "kd" / "version_0"
    config = yaml.safe_load((log_dir / "config.yaml").read_text())
    assert config["model"]["class_path"] == "lightning_distill.KnowledgeDistillation"
    assert config["model"]["init_args"]["teacher_checkpoint"] == "zoo:digits_cnn"
    assert config["trainer"]["max_epochs"] == 30
    assert config["test_after_fit"] is True and config["wandb"] is False

    with open(log_dir / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    columns = set(rows[0])
    expected = {
        "train/loss",
        "train/kd_loss",
        "train/task_loss",
        "val/acc",
        "val/agreement",
        "val/kl",
        "val/ece",
        "val/loss",
        "val/teacher_acc",
        "test/acc",
        "test/teacher_acc",
    }
    assert expected <= columns, expected - columns
    val_rows = [r for r in rows if r["val/acc"]]
    assert len(val_rows) == 30  # one validation per epoch
    test_rows = [r for r in rows if r["test/acc"]]
    assert len(test_rows) == 2  # the last weights, then the best-validation checkpoint
    # the printed summary is the logged test metrics
    assert float(test_rows[0]["test/acc"]) * 100 == pytest.approx(student_acc, abs=0.006)
    assert float(test_rows[0]["test/teacher_acc"]) * 100 == pytest.approx(teacher_acc, abs=0.006)
    best = re.search(
        r"^Student at its best validation epoch \(epoch (\d+), val/acc ([\d.]+)%\): ([\d.]+)% test accuracy$",
        proc.stdout,
        re.M,
    )
    assert best, proc.stdout[-2000:]
    assert float(test_rows[1]["test/acc"]) * 100 == pytest.approx(float(best.group(3)), abs=0.006)
    assert (log_dir / "checkpoints" / f"best-epoch={best.group(1)}.ckpt").is_file()
    train_rows = [r for r in rows if r["train/loss"]]
    assert train_rows and all(float(r["train/kd_loss"]) >= 0 for r in train_rows)
    assert float(train_rows[-1]["train/loss"]) < float(train_rows[0]["train/loss"])

    last = log_dir / "checkpoints" / "last.ckpt"
    ckpt = torch.load(last, map_location="cpu", weights_only=True)
    keys = list(ckpt["state_dict"])
    assert not [k for k in keys if k.startswith("teacher.")]
    assert sorted(keys) == sorted(f"student.{k}" for k in DigitsMLP().state_dict())
    assert ckpt["epoch"] == 29 and ckpt["global_step"] == 30 * 17


def test_console_script_help(capsys):
    exe = shutil.which("lightning-distill")
    assert exe, "the lightning-distill console script is not on PATH"
    proc = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=120, env=_subprocess_env())
    assert proc.returncode == 0, proc.stderr
    assert "usage:" in proc.stdout
    for sub in ("fit", "validate", "test", "predict"):
        assert re.search(rf"^\s+{sub}\s", proc.stdout, re.M), sub
    # the options DistillCLI adds (in-process: the command's entry point is the same class)
    with pytest.raises(SystemExit) as info:
        DistillCLI(args=["fit", "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for option in ("--wandb ", "--wandb_project", "--tensorboard", "--test_after_fit", "--ckpt_path"):
        assert option in out, option


# --------------------------------------------------------------- validate / test / predict
@pytest.fixture(scope="module")
def kd_fit(tmp_path_factory):
    """A 2-epoch fit of the quickstart config (2 batches per epoch) without the post-fit test."""
    root = tmp_path_factory.mktemp("kd_fit")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        cli = _cli(root, "fit", "--trainer.max_epochs", "2", "--test_after_fit", "false")
    ckpt = root / "runs" / "digits" / "kd" / "version_0" / "checkpoints" / "last.ckpt"
    return SimpleNamespace(root=root, ckpt=ckpt, stdout=out.getvalue(), metrics=dict(cli.trainer.callback_metrics))


def _first_test_batches(n_batches: int = 2, batch_size: int = 64):
    dm = DigitsDataModule(batch_size=batch_size, split_seed=0)
    dm.setup("test")
    n = n_batches * batch_size
    return dm.test_dataset.inputs[:n], dm.test_dataset.targets[:n]


def _student_from(ckpt_path: Path) -> DigitsMLP:
    student = DigitsMLP()
    student.load_state_dict(_student_state(torch.load(ckpt_path, map_location="cpu", weights_only=True)))
    return student.eval()


def test_fit_without_test_after_fit_prints_no_summary(kd_fit):
    assert kd_fit.ckpt.is_file()
    assert "Test accuracy" not in kd_fit.stdout
    assert "student (" not in kd_fit.stdout
    assert not any(k.startswith("test/") for k in kd_fit.metrics)
    assert "val/acc" in kd_fit.metrics


def test_validate_from_checkpoint(kd_fit, tmp_path):
    cli = _cli(tmp_path, "validate", "--ckpt_path", str(kd_fit.ckpt), "--trainer.limit_val_batches", "2")
    metrics = cli.trainer.callback_metrics
    assert {"val/acc", "val/teacher_acc", "val/agreement", "val/kl", "val/loss"} <= set(metrics)
    assert float(metrics["val/teacher_acc"]) >= 0.9
    _assert_teacher_is_zoo(cli.model.teacher)
    expected = _student_state(torch.load(kd_fit.ckpt, map_location="cpu", weights_only=True))
    assert all(torch.equal(cli.model.student.state_dict()[k], v) for k, v in expected.items())


def test_test_from_checkpoint_logs_test_acc(kd_fit, tmp_path):
    cli = _cli(tmp_path, "test", "--ckpt_path", str(kd_fit.ckpt), "--trainer.limit_test_batches", "2")
    metrics = cli.trainer.callback_metrics
    assert "test/acc" in metrics and "test/teacher_acc" in metrics
    # test/acc is the checkpoint's student on the first two test batches
    x, y = _first_test_batches(2)
    with torch.no_grad():
        acc = (_student_from(kd_fit.ckpt)(x).argmax(-1) == y).float().mean()
    assert float(metrics["test/acc"]) == pytest.approx(float(acc), abs=1e-6)
    with torch.no_grad():
        teacher_acc = (cli.model.teacher(x).argmax(-1) == y).float().mean()
    assert float(metrics["test/teacher_acc"]) == pytest.approx(float(teacher_acc), abs=1e-6)
    assert float(teacher_acc) >= 0.9


def test_predict_from_checkpoint(kd_fit, tmp_path):
    cli = _cli(tmp_path, "predict", "--ckpt_path", str(kd_fit.ckpt), "--trainer.limit_predict_batches", "2")
    predictions = cli.trainer.predict_loop.predictions
    assert [tuple(p.shape) for p in predictions] == [(64, 10), (64, 10)]
    x, _ = _first_test_batches(2)
    with torch.no_grad():
        expected = _student_from(kd_fit.ckpt)(x)
    torch.testing.assert_close(torch.cat(predictions), expected)


def test_resume_continues_and_reattaches_teacher(kd_fit, tmp_path):
    ckpt_path = tmp_path / "last.ckpt"
    shutil.copy(kd_fit.ckpt, ckpt_path)
    before = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    assert before["global_step"] == 4 and before["epoch"] == 1
    assert not any(k.startswith("teacher.") for k in before["state_dict"])

    cli = _cli(tmp_path, "fit", "--ckpt_path", str(ckpt_path), "--trainer.max_epochs", "3", "--test_after_fit", "false")
    assert cli.trainer.global_step == 6  # 2 more batches, not 6 from scratch
    assert cli.trainer.current_epoch == 3
    _assert_teacher_is_zoo(cli.model.teacher)
    assert all(not p.requires_grad for p in cli.model.teacher.parameters())
    assert not cli.model.teacher.training

    after = torch.load(
        tmp_path / "runs" / "digits" / "kd" / "version_0" / "checkpoints" / "last.ckpt",
        map_location="cpu",
        weights_only=True,
    )
    assert after["global_step"] == 6 and after["epoch"] == 2
    old, new = _student_state(before), _student_state(after)
    assert any(not torch.equal(old[k], new[k]) for k in old), "the student did not train after resuming"


# ---------------------------------------------------------------------------------- loggers
def test_wandb_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb_home" / var.lower()))

    try:
        cli = _cli(
            tmp_path,
            "fit",
            "--trainer.max_epochs",
            "1",
            "--wandb",
            "true",
            "--wandb_project",
            "ld-test",
            "--test_after_fit",
            "false",
        )
        loggers = cli.trainer.loggers
        assert [type(lg) for lg in loggers] == [CSVLogger, WandbLogger]
        assert loggers[1].save_dir == str(tmp_path / "runs" / "digits")  # absolute, next to the CSV logs
        assert loggers[1].experiment.project == "ld-test"
    finally:
        finish_wandb()
    runs = sorted(tmp_path.glob("**/wandb/offline-run-*"))
    assert len(runs) == 1, runs
    assert runs[0].parent == tmp_path / "runs" / "digits" / "wandb"
    assert list(runs[0].glob("*.wandb")), "the offline run holds no .wandb file"  # complete: finish_wandb waited
    assert (tmp_path / "runs" / "digits" / "kd" / "version_0" / "metrics.csv").is_file()


@pytest.fixture(scope="module")
def tb_run(tmp_path_factory):
    """A 1-epoch fit with ``--tensorboard true`` (and the config's default ``test_after_fit: true``)."""
    root = tmp_path_factory.mktemp("tb_run")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        cli = _cli(root, "fit", "--trainer.max_epochs", "1", "--tensorboard", "true")
    return SimpleNamespace(root=root, cli=cli, stdout=out.getvalue())


def test_tensorboard_logger_and_summary(tb_run):
    cli, root = tb_run.cli, tb_run.root
    loggers = cli.trainer.loggers
    assert [type(lg) for lg in loggers] == [CSVLogger, TensorBoardLogger]
    assert loggers[1].save_dir == "runs/digits" and loggers[1].name == "kd"
    tb_dir = root / loggers[1].log_dir  # relative to the run's working directory
    events = sorted(tb_dir.glob("events.out.tfevents.*"))
    assert events, f"no TensorBoard events file under {tb_dir}"

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb_dir))
    acc.Reload()
    scalars = set(acc.Tags()["scalars"])
    assert {"val/acc", "val/teacher_acc", "test/acc"} <= scalars, scalars

    # test_after_fit defaults to true in the config: the summary is printed, with the logged value
    out = tb_run.stdout
    assert "Test accuracy on 359 held-out test samples" in out
    student = re.search(r"student \(DigitsMLP, 1\.2k params\)\s+(\d+\.\d{2})%", out)
    assert student, out
    assert float(student.group(1)) == pytest.approx(100 * float(cli.trainer.callback_metrics["test/acc"]), abs=0.006)
    assert re.search(r"teacher \(DigitsCNN, 24\.1k params\)\s+\d+\.\d{2}%", out), out


def test_tensorboard_logs_in_the_run_directory(tb_run):
    """One run, one log directory: the TensorBoard events sit next to config.yaml and metrics.csv."""
    csv_logger, tb_logger = tb_run.cli.trainer.loggers
    csv_dir = tb_run.root / csv_logger.log_dir
    assert (csv_dir / "config.yaml").is_file() and (csv_dir / "metrics.csv").is_file()
    runs = sorted(p.name for p in (tb_run.root / "runs" / "digits" / "kd").iterdir())
    assert runs == ["version_0"], f"one fit created {runs}; TensorBoard logged to {tb_logger.log_dir}"
    assert list(csv_dir.glob("**/events.out.tfevents.*")), f"no TensorBoard events under {csv_dir}"


# ------------------------------------------------------------------------ format_test_summary
def test_format_test_summary():
    model = SimpleNamespace(student=DigitsMLP(), teacher=DigitsCNN())
    datamodule = SimpleNamespace(test_dataset=[0] * 359)
    text = format_test_summary(model, {"test/acc": 0.912345, "test/teacher_acc": 0.99164}, datamodule)
    assert text.splitlines() == [
        "Test accuracy on 359 held-out test samples (weights after the last training step):",
        "  student (DigitsMLP, 1.2k params)   91.23%",
        "  teacher (DigitsCNN, 24.1k params)  99.16%",
    ]

    # a teacher that was not tested gets no row (not an "n/a" one)
    text = format_test_summary(model, {"test/acc": 1.0})
    lines = text.splitlines()
    assert lines[0] == "Test accuracy on the test set (weights after the last training step):"
    assert lines[1].endswith("  100.00%") and lines[1].lstrip().startswith("student (DigitsMLP")
    assert len(lines) == 2

    # a zero accuracy is a number, not "missing"; a Classifier-like module has one "model" row
    text = format_test_summary(SimpleNamespace(model=DigitsMLP(hidden=2)), {"test/acc": 0.0})
    assert text.splitlines()[1:] == ["  model (DigitsMLP, 160 params)  0.00%"]
    text = format_test_summary(SimpleNamespace(model=DigitsMLP()), {})
    assert text.splitlines()[1] == "  model (DigitsMLP, 1.2k params)  n/a"


# ------------------------------------------------------------------ summaries of other module kinds
def _fit_stdout(tmp_path: Path, config: Path, *args: str) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        _cli(tmp_path, "fit", *args, config=config)
    return out.getvalue()


def test_born_again_summary_shows_generations_not_an_untested_teacher(tmp_path):
    """BornAgain's teacher is its previous generation, which is not tested: the summary names the generation
    of the tested student and the ensemble of all generations instead of a teacher row reading "n/a"."""
    out = _fit_stdout(
        tmp_path,
        CONFIG_DIR / "digits" / "born_again.yaml",
        *("--trainer.max_epochs", "2", "--model.init_args.generations", "2"),
        *("--model.init_args.epochs_per_generation", "1", "--model.init_args.lr_scheduler.init_args.T_max", "1"),
    )
    assert "n/a" not in out and "teacher (" not in out, out
    assert re.search(r"^  student, generation 2 \(DigitsMLP, 1\.2k params\)\s+\d+\.\d{2}%$", out, re.M), out
    assert re.search(r"^  ensemble of the 2 generations \(2 x DigitsMLP, 2\.4k params\)\s+\d+\.\d{2}%$", out, re.M), out
    assert re.search(
        r"^Student at its best validation epoch \(epoch [01], generation [12], val/acc [\d.]+%\): [\d.]+% test accuracy$",
        out,
        re.M,
    ), out


def test_classifier_summary_calls_it_the_model_throughout(tmp_path):
    out = _fit_stdout(tmp_path, CONFIG_DIR / "digits" / "baseline.yaml", "--trainer.max_epochs", "1")
    assert re.search(r"^  model \(DigitsMLP, 1\.2k params\)\s+\d+\.\d{2}%$", out, re.M), out
    assert re.search(
        r"^Model at its best validation epoch \(epoch 0, val/acc [\d.]+%\): [\d.]+% test accuracy$", out, re.M
    )
    assert "student" not in out.lower() and "teacher" not in out.lower(), out


# ------------------------------------------------------------------ a first run prints no warnings
_WARNING_LINE = re.compile(r"warn|deprecat|💡|\.py:\d+: ", re.I)


@pytest.mark.parametrize("wandb", [False, True], ids=["csv", "wandb"])
def test_quickstart_fit_prints_no_warnings(tmp_path, wandb):
    """Every line a plain `fit` of the quickstart config prints is about the run: no Lightning deprecation,
    logging-interval or advertising lines, and with `--wandb true` (offline) no W&B warnings either."""
    env = _subprocess_env()
    env.pop("WANDB_SILENT")  # what a user sees
    for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        env[var] = str(tmp_path / "wandb_home" / var.lower())
    command = [
        sys.executable,
        "-m",
        "lightning_distill",
        "fit",
        "--config",
        str(KD_CONFIG),
        "--trainer.max_epochs",
        "1",
    ]
    if wandb:
        command += ["--wandb", "true"]
    proc = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "Test accuracy on 359 held-out test samples" in proc.stdout
    noise = [line for line in (proc.stderr + proc.stdout).splitlines() if _WARNING_LINE.search(line)]
    assert not noise, "\n".join(noise)
    if wandb:
        assert list((tmp_path / "runs" / "digits" / "wandb").glob("offline-run-*"))


# ------------------------------------------------------- a run that ends before its first validation
def test_fit_stopped_before_the_first_validation_does_not_warn(tmp_path, recwarn):
    """The monitored checkpoint ranks when validation ends (`save_on_train_epoch_end: false` in every
    shared trainer block): a run stopped before its first validation saves no best checkpoint, silently."""
    for block in sorted(CONFIG_DIR.glob("*/shared/trainer.yaml")) + [CONFIG_DIR / "digits" / "teacher.yaml"]:
        spec = yaml.safe_load(block.read_text())
        callbacks = spec.get("callbacks") or spec["trainer"]["callbacks"]
        monitored = [c["init_args"] for c in callbacks if c["init_args"].get("monitor")]
        assert monitored and all(c.get("save_on_train_epoch_end") is False for c in monitored), block

    cli = _cli(tmp_path, "fit", "--trainer.max_steps", "1", "--test_after_fit", "false")  # 1 of 2 batches
    assert cli.trainer.global_step == 1
    assert "val/acc" not in cli.trainer.callback_metrics  # no validation ran
    checkpoints = tmp_path / "runs" / "digits" / "kd" / "version_0" / "checkpoints"
    assert (checkpoints / "last.ckpt").is_file() and not list(checkpoints.glob("best-*"))
    monitored = [str(w.message) for w in recwarn if "could not find the monitored key" in str(w.message)]
    assert not monitored, monitored


# ------------------------------------------------------------ validate / test next to their run
EVALUATION_DIRS = ("validate", "test", "predict")  # where evaluations of a run log, inside it


@pytest.mark.parametrize("subcommand", ["validate", "test"])
def test_evaluation_logs_next_to_its_run_without_warnings(kd_fit, tmp_path, subcommand, recwarn, capsys):
    """`validate` / `test --ckpt_path RUN/checkpoints/last.ckpt` write their metrics into RUN/<subcommand>/,
    say so, open no new run directory and do not warn that the checkpoint directory changed."""
    run = tmp_path / "runs" / "digits" / "kd" / "version_0"
    shutil.copytree(
        kd_fit.root / "runs" / "digits" / "kd" / "version_0", run, ignore=shutil.ignore_patterns(*EVALUATION_DIRS)
    )
    ckpt = Path("runs/digits/kd/version_0/checkpoints/last.ckpt")  # relative, as the fit printed it
    cli = _cli(tmp_path, subcommand, "--ckpt_path", str(ckpt))
    stage = {"validate": "val", "test": "test"}[subcommand]
    assert f"{stage}/acc" in cli.trainer.callback_metrics

    assert sorted(p.name for p in run.parent.iterdir()) == ["version_0"]
    logged = run / subcommand / "version_0"
    assert (logged / "metrics.csv").is_file() and (logged / "config.yaml").is_file()
    with open(logged / "metrics.csv", newline="") as f:
        assert f"{stage}/acc" in next(csv.DictReader(f))
    out = capsys.readouterr().out
    assert (
        f"Logged this {subcommand} run to {logged.relative_to(tmp_path)} (config.yaml, hparams.yaml, metrics.csv)"
        in out
    )
    changed = [str(w.message) for w in recwarn if "dirpath has changed" in str(w.message)]
    assert not changed, changed


# ------------------------------------------------------------- a teacher that was not trained yet
@pytest.mark.parametrize(
    "config, argument, missing, teacher_config",
    [
        (
            "cifar100/kd_resnet32x4_to_resnet8x4.yaml",
            "teacher_checkpoint",
            "runs/cifar100/teacher_resnet32x4/version_0/checkpoints/last.ckpt",
            "cifar100/teacher_resnet32x4.yaml",
        ),
        ("hf/minilm.yaml", "checkpoint", "runs/hf/teacher/version_0/checkpoints/last.ckpt", "hf/teacher.yaml"),
    ],
)
def test_missing_teacher_fails_in_one_line_naming_the_command_that_trains_it(
    tmp_path, config, argument, missing, teacher_config
):
    if config.startswith("hf/"):
        pytest.importorskip("transformers")
    proc = subprocess.run(
        [sys.executable, "-m", "lightning_distill", "fit", "--config", str(CONFIG_DIR / config)],
        cwd=tmp_path,  # a fresh directory: no runs/ yet
        capture_output=True,
        text=True,
        timeout=300,
        env=_subprocess_env(),
    )
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if line and not line.startswith("Seed set to")]
    # named from here: the teacher config next to the student config
    expected = (
        f"error: {argument} '{missing}' does not exist: train it first with  "
        f"lightning-distill fit --config {CONFIG_DIR / teacher_config}"
    )
    assert lines == [expected], proc.stderr[-3000:]
    assert not (tmp_path / "runs").exists()


def _configured_checkpoints(spec: dict) -> list[tuple[str, str]]:
    """``(argument, path)`` of every checkpoint a config reads that another run must write (not ``zoo:``)."""
    found = []

    def walk(value):
        if isinstance(value, dict):
            for key, item in value.items():
                if (
                    key in ("teacher_checkpoint", "checkpoint")
                    and isinstance(item, str)
                    and not item.startswith("zoo:")
                ):
                    found.append((key, item))
                walk(item)
        elif isinstance(value, list):
            for item in value:
                walk(item)

    walk(spec["model"])
    return found


NEEDS_A_TRAINED_TEACHER = [c for c in CONFIGS if _configured_checkpoints(resolved_spec(c))]


@pytest.mark.parametrize(
    "config", NEEDS_A_TRAINED_TEACHER, ids=[str(p.relative_to(CONFIG_DIR)) for p in NEEDS_A_TRAINED_TEACHER]
)
def test_configs_that_need_a_trained_teacher_name_its_command(config, monkeypatch):
    """A config that reads a checkpoint written by another config's run names that run's command in its
    header comment, so that the error for a missing checkpoint can name it (from the repository root)."""
    monkeypatch.chdir(REPO)
    for argument, path in _configured_checkpoints(resolved_spec(config)):
        err = MissingCheckpointError.for_path(argument, path, path)
        message = missing_checkpoint_message(err, [str(config.relative_to(REPO))])
        match = re.fullmatch(rf"{argument} '{re.escape(path)}' does not exist: train it first with  (.+)", message)
        assert match, message
        command = match.group(1).split()
        assert command[:3] == ["lightning-distill", "fit", "--config"], command
        trains = Path(command[3])
        assert trains.is_file() and trains.stem in Path(path).parts, (trains, path)


def test_text_kd_config_trains_from_a_fresh_checkout_on_the_shipped_teacher(tmp_path, monkeypatch):
    """configs/text/kd.yaml needs no earlier run: its teacher is ``zoo:pydoc_char_transformer``, loaded as shipped
    (bit-identical) and frozen, and a short fit from an empty directory trains the student."""
    monkeypatch.chdir(tmp_path)
    cli = DistillCLI(
        args=[
            "fit", "--config", str(CONFIG_DIR / "text" / "kd.yaml"), "--trainer.max_epochs", "1",
            "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1", "--trainer.limit_test_batches", "1",
            "--trainer.enable_progress_bar", "false", "--test_after_fit", "false",
        ]
    )  # fmt: skip
    shipped = torch.load(resolve("zoo:pydoc_char_transformer"), map_location="cpu", weights_only=True)
    teacher = cli.model.teacher.state_dict()
    assert set(teacher) == set(shipped) and all(torch.equal(teacher[k], shipped[k]) for k in shipped)
    assert cli.trainer.global_step == 2
    assert (tmp_path / "runs" / "text" / "kd" / "version_0" / "checkpoints" / "last.ckpt").is_file()
