"""TemperatureMonitor: what it logs (fixed, learned global, per-sample), when, to which loggers, and its errors.

Logged values are compared with the temperatures the module really used, recorded by a callback at
``on_train_batch_end`` of the same step. ``trainer.global_step`` already counts the step's optimizer
step there; the monitor writes at ``step = trainer.global_step``, so with ``logging_interval=2`` it logs
after optimizer steps 1, 3, 5, ... at logger steps 1, 3, 5, ... and nowhere else.
"""

from __future__ import annotations

import csv
import functools
import glob
import math
from pathlib import Path

import lightning as L
import pytest
import torch
from _wandb import finish_wandb
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger, WandbLogger

from lightning_distill import CTKD, Classifier, KnowledgeDistillation
from lightning_distill.callbacks import TemperatureMonitor
from lightning_distill.callbacks.temperature import used_temperature
from lightning_distill.models import DigitsCNN, DigitsMLP

pytestmark = pytest.mark.usefixtures("single_thread", "seeded")


class _Recorder(L.Callback):
    """The temperature / lambda each step really used, keyed by ``trainer.global_step`` after its optimizer step."""

    def __init__(self) -> None:
        self.temperature: dict[int, torch.Tensor] = {}
        self.lam: dict[int, float] = {}
        self.batches = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.batches += 1

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        value = used_temperature(pl_module)
        self.temperature[step] = value.detach().clone().double() if isinstance(value, torch.Tensor) else torch.tensor(float(value), dtype=torch.float64)
        if hasattr(pl_module, "current_lambda"):
            self.lam[step] = float(pl_module.current_lambda)


def _csv(logger: CSVLogger) -> list[dict[str, str]]:
    with open(Path(logger.log_dir) / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def _column(rows: list[dict[str, str]], key: str) -> dict[int, float]:
    return {int(r["step"]): float(r[key]) for r in rows if r.get(key)}


def _kd() -> KnowledgeDistillation:
    return KnowledgeDistillation(DigitsMLP(), DigitsCNN(), teacher_checkpoint="zoo:digits_cnn", temperature=3.0)


def _ctkd(mode: str, **kwargs) -> CTKD:
    kwargs.setdefault("optimizer", functools.partial(torch.optim.SGD, lr=0.05))
    return CTKD(
        DigitsMLP(), DigitsCNN(), teacher_checkpoint="zoo:digits_cnn", temperature_mode=mode,
        lambda_epochs=1, lambda_per_step=True, temperature_lr=0.5, **kwargs,
    )


def _fit(module, make_trainer, digits_dm, loggers, batches=5, interval=2, extra=()):
    recorder = _Recorder()
    trainer = make_trainer(
        logger=loggers, log_every_n_steps=1, limit_train_batches=batches, limit_val_batches=0,
        callbacks=[TemperatureMonitor(logging_interval=interval), recorder, *extra],
    )
    trainer.fit(module, datamodule=digits_dm)
    return recorder


MONITOR_STEPS = {1, 3, 5}  # optimizer steps 1, 3, 5 of 5 batches with interval 2


# ---------------------------------------------------------------------------------------------
# what is logged, and when
# ---------------------------------------------------------------------------------------------


def test_fixed_temperature_logged_every_second_step(digits_dm, make_trainer, tmp_path):
    logger = CSVLogger(tmp_path)
    recorder = _fit(_kd(), make_trainer, digits_dm, logger)
    assert recorder.batches == 5
    logged = _column(_csv(logger), "temperature/value")
    assert set(logged) == MONITOR_STEPS  # every second optimizer step, nowhere else
    for step in MONITOR_STEPS:
        assert logged[step] == 3.0
    assert not any(k.startswith("temperature/") and k != "temperature/value" for k in _csv(logger)[0])


def test_ctkd_global_logs_the_tau_and_lambda_used(digits_dm, make_trainer, tmp_path):
    logger = CSVLogger(tmp_path)
    module = _ctkd("global", init_temperature=6.0)
    recorder = _fit(module, make_trainer, digits_dm, logger)
    rows = _csv(logger)
    values, lambdas = _column(rows, "temperature/value"), _column(rows, "temperature/lambda")
    assert MONITOR_STEPS <= set(values) and MONITOR_STEPS <= set(lambdas)
    used = [recorder.temperature[s].item() for s in sorted(MONITOR_STEPS)]
    assert used[0] == pytest.approx(6.0, rel=1e-6)
    assert len(set(used)) == 3  # the learned tau really changes between the logged steps
    for step in MONITOR_STEPS:
        assert recorder.temperature[step].numel() == 1
        assert values[step] == pytest.approx(recorder.temperature[step].item(), rel=1e-6)
        assert lambdas[step] == pytest.approx(recorder.lam[step], rel=1e-6, abs=1e-9)
    # lambda ramps per step over one epoch of 5 batches: 0, 1/2 (1 - cos(pi 2/5)), 1/2 (1 - cos(pi 4/5))
    for step in MONITOR_STEPS:
        batch_idx = step - 1
        assert lambdas[step] == pytest.approx(0.5 * (1 - math.cos(math.pi * batch_idx / 5)), abs=1e-6)


@pytest.mark.parametrize("log_every_n_steps", [1, 50])
def test_nothing_logged_at_skipped_steps(log_every_n_steps, digits_dm, make_trainer, tmp_path):
    # regression: logging through pl_module.log(on_step=True) re-sent the last value at every later
    # step of the epoch (a stale tau at steps the monitor skipped) and depended on log_every_n_steps
    logger = CSVLogger(tmp_path)
    recorder = _Recorder()
    trainer = make_trainer(
        logger=logger, log_every_n_steps=log_every_n_steps, limit_train_batches=5, limit_val_batches=0,
        callbacks=[TemperatureMonitor(logging_interval=2), recorder],
    )
    trainer.fit(_ctkd("global", init_temperature=6.0), datamodule=digits_dm)
    rows = _csv(logger)
    for key in ("temperature/value", "temperature/lambda"):
        assert set(_column(rows, key)) == MONITOR_STEPS, key
    for step, value in _column(rows, "temperature/value").items():  # the tau used at that step
        assert value == pytest.approx(recorder.temperature[step].item(), rel=1e-6), step


def _independent_stats(tau: torch.Tensor) -> dict[str, float]:
    values = [float(v) for v in tau.reshape(-1).tolist()]
    n = len(values)
    mean = math.fsum(values) / n
    var = math.fsum((v - mean) ** 2 for v in values) / (n - 1)  # two-pass, sample variance
    return {"mean": mean, "min": min(values), "max": max(values), "std": math.sqrt(var)}


def test_ctkd_instance_logs_per_sample_statistics(digits_dm, make_trainer, tmp_path):
    logger = CSVLogger(tmp_path)
    recorder = _fit(_ctkd("instance"), make_trainer, digits_dm, logger)
    rows = _csv(logger)
    assert not _column(rows, "temperature/value")
    spread_steps = 0
    for step in MONITOR_STEPS:
        tau = recorder.temperature[step]
        assert tau.shape == (64,)
        expected = _independent_stats(tau)
        for key in ("mean", "min", "max"):
            assert _column(rows, f"temperature/{key}")[step] == pytest.approx(expected[key], rel=1e-6), (step, key)
        if expected["std"] > 0.05:
            spread_steps += 1
            assert _column(rows, "temperature/std")[step] == pytest.approx(expected["std"], rel=1e-3), step
        assert _column(rows, "temperature/lambda")[step] == pytest.approx(recorder.lam[step], rel=1e-6, abs=1e-9)
    assert spread_steps >= 1  # the MLP learned per-sample temperatures after the first step


def test_instance_std_is_zero_when_all_temperatures_are_equal(digits_dm, make_trainer, tmp_path):
    logger = CSVLogger(tmp_path)
    recorder = _fit(_ctkd("instance"), make_trainer, digits_dm, logger, batches=1, interval=1)
    tau = recorder.temperature[1]
    assert torch.equal(tau, tau[0].expand_as(tau))  # zero-initialised last layer: all samples equal
    assert _column(_csv(logger), "temperature/std")[1] == pytest.approx(0.0, abs=1e-4)


# ---------------------------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------------------------


def test_no_logger_fails_at_fit_start(digits_dm, make_trainer):
    module = _kd()
    before = {k: v.clone() for k, v in module.student.state_dict().items()}
    recorder = _Recorder()
    trainer = make_trainer(logger=False, callbacks=[TemperatureMonitor(logging_interval=1), recorder])
    with pytest.raises(ValueError, match=r"TemperatureMonitor needs a logger to write to.*logger=False"):
        trainer.fit(module, datamodule=digits_dm)
    assert recorder.batches == 0
    assert all(torch.equal(v, before[k]) for k, v in module.student.state_dict().items())


def test_module_without_temperature_is_rejected(digits_dm, make_trainer, tmp_path):
    recorder = _Recorder()
    trainer = make_trainer(logger=CSVLogger(tmp_path), callbacks=[TemperatureMonitor(), recorder])
    with pytest.raises(ValueError, match=r"TemperatureMonitor: Classifier exposes no temperature"):
        trainer.fit(Classifier(DigitsMLP()), datamodule=digits_dm)
    assert recorder.batches == 0


@pytest.mark.parametrize("bad", [0, -1, True, False, 2.0, "10", None])
def test_bad_logging_interval(bad):
    with pytest.raises(ValueError, match=r"`logging_interval` must be an integer >= 1"):
        TemperatureMonitor(logging_interval=bad)


# ---------------------------------------------------------------------------------------------
# every attached logger
# ---------------------------------------------------------------------------------------------


def _tensorboard_scalars(log_dir: str, tag: str) -> dict[int, float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (events,) = glob.glob(str(Path(log_dir) / "events.out.tfevents.*"))
    accumulator = EventAccumulator(events)
    accumulator.Reload()
    assert tag in accumulator.Tags()["scalars"], accumulator.Tags()["scalars"]
    return {e.step: e.value for e in accumulator.Scalars(tag)}


def test_csv_and_tensorboard_both_receive_the_temperature(digits_dm, make_trainer, tmp_path):
    csv_logger, tb_logger = CSVLogger(tmp_path / "csv"), TensorBoardLogger(tmp_path / "tb")
    _fit(_kd(), make_trainer, digits_dm, [csv_logger, tb_logger])
    tb = _tensorboard_scalars(tb_logger.log_dir, "temperature/value")
    assert set(tb) == MONITOR_STEPS
    assert all(tb[s] == 3.0 for s in MONITOR_STEPS)
    assert MONITOR_STEPS <= set(_column(_csv(csv_logger), "temperature/value"))


def test_wandb_offline_gets_statistics_and_histogram(digits_dm, make_trainer, tmp_path, monkeypatch):
    for name, value in (
        ("WANDB_MODE", "offline"), ("WANDB_SILENT", "true"), ("WANDB_DIR", str(tmp_path)),
        ("WANDB_CONFIG_DIR", str(tmp_path / "wandb_config")), ("WANDB_CACHE_DIR", str(tmp_path / "wandb_cache")),
        ("WANDB_DATA_DIR", str(tmp_path / "wandb_data")),
    ):
        monkeypatch.setenv(name, value)
    import wandb

    histograms = []
    real_histogram = wandb.Histogram

    def recording_histogram(values, *args, **kwargs):
        histograms.append(len(values))
        return real_histogram(values, *args, **kwargs)

    monkeypatch.setattr(wandb, "Histogram", recording_histogram)
    csv_logger, tb_logger = CSVLogger(tmp_path / "csv"), TensorBoardLogger(tmp_path / "tb")
    wandb_logger = WandbLogger(save_dir=str(tmp_path), offline=True, project="lightning-distill-tests")
    try:
        _fit(_ctkd("instance"), make_trainer, digits_dm, [csv_logger, tb_logger, wandb_logger], batches=3)
    finally:
        finish_wandb()  # waits until W&B's service has written the run file
    assert histograms == [64, 64]  # optimizer steps 1 and 3, one value per sample
    runs = glob.glob(str(tmp_path / "wandb" / "offline-run-*"))
    assert len(runs) == 1
    (run_file,) = glob.glob(str(Path(runs[0]) / "*.wandb"))
    content = Path(run_file).read_bytes()
    for key in (b"temperature/histogram", b"temperature/mean", b"temperature/std", b"temperature/lambda"):
        assert key in content, key
    tb = _tensorboard_scalars(tb_logger.log_dir, "temperature/mean")
    assert set(tb) == {1, 3}
    assert set(_column(_csv(csv_logger), "temperature/mean")) == {1, 3}
