"""``TemperatureMonitor``: log the distillation temperature a strategy actually used."""

from __future__ import annotations

import math
from typing import Any, Optional, Union

import lightning as L
import torch
from torch import Tensor

__all__ = ["TemperatureMonitor", "used_temperature"]


def _first_temperature(pl_module: Any) -> Any:
    found = pl_module.temperatures() if callable(getattr(pl_module, "temperatures", None)) else {}
    return next(iter(found.values()), None)


def used_temperature(pl_module: Any) -> Optional[Union[float, Tensor]]:
    """The temperature of the last training step, through the temperature interface of
    :mod:`lightning_distill.temperature`: the module's first temperature's ``last`` value (per sample for
    CTKD's instance mode) or its current ``value``; for other modules a numeric ``temperature`` attribute."""
    temperature = _first_temperature(pl_module)
    if temperature is not None:
        return temperature.last if temperature.last is not None else temperature.value
    value = getattr(pl_module, "temperature", None)
    return value if isinstance(value, (int, float, Tensor)) and not isinstance(value, bool) else None


def reversal_strength(pl_module: Any) -> Optional[float]:
    """The gradient-reversal strength of a learned temperature (``None`` for the others)."""
    temperature = _first_temperature(pl_module)
    value = getattr(temperature, "reversal", None)
    return float(value) if isinstance(value, (int, float)) else None


class TemperatureMonitor(L.Callback):
    r"""Log the temperature used by any strategy -- fixed, scheduled (a curriculum), learned (CTKD).

    Every ``logging_interval`` optimizer steps (after steps 1, 1 + interval, ...) it writes, directly to
    every attached logger at ``step = trainer.global_step`` (independent of ``log_every_n_steps``):

    * ``temperature/value`` -- a single temperature (fixed, scheduled or CTKD's global one);
    * ``temperature/mean``, ``/min``, ``/max``, ``/std`` -- per-sample temperatures (CTKD's instance
      mode), reduced over **all processes** (every rank gathers every rank's count, sum, sum of
      squares, min and max, so each rank logs the same numbers under the same keys: no deadlock,
      no rank-0-only values), plus a histogram (``temperature/histogram``) when a
      ``WandbLogger`` is attached;
    * ``temperature/lambda`` -- the gradient-reversal strength of a learned temperature (CTKD).

    The temperature is read through the interface of :mod:`lightning_distill.temperature`
    (``module.temperatures()``: ``last`` and ``reversal``), so fixed, scheduled and learned temperatures
    are logged alike. Checks in ``setup``: the trainer has a logger, and the module has a temperature.

    Args:
        logging_interval: log every this many optimizer steps (>= 1).
        log_histogram: send the per-sample histogram to W&B when a WandbLogger is attached.

    Example::

        >>> from lightning_distill.callbacks import TemperatureMonitor
        >>> monitor = TemperatureMonitor(logging_interval=10)
        >>> # Trainer(callbacks=[monitor], logger=CSVLogger("runs")).fit(CTKD(...), datamodule=...)
    """

    def __init__(self, logging_interval: int = 50, log_histogram: bool = True) -> None:
        if isinstance(logging_interval, bool) or not isinstance(logging_interval, int) or logging_interval < 1:
            raise ValueError(f"`logging_interval` must be an integer >= 1 (optimizer steps), got {logging_interval!r}.")
        self.logging_interval = logging_interval
        self.log_histogram = log_histogram
        self.last_logged: dict[str, float] = {}

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if not trainer.loggers:
            raise ValueError(
                "TemperatureMonitor needs a logger to write to, but the Trainer has none (logger=False). "
                "Attach one, e.g. Trainer(logger=CSVLogger('runs')), or remove the callback."
            )
        if used_temperature(pl_module) is None:
            raise ValueError(
                f"TemperatureMonitor: {type(pl_module).__name__} exposes no temperature (no "
                "lightning_distill.temperature.Temperature in its modules, no numeric `temperature` attribute). Use "
                "it with a strategy that distills at a temperature (KnowledgeDistillation, FeatureDistillation, CTKD, ...)."
            )

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        step = trainer.global_step  # already counts this batch's optimizer step
        if step == 0 or (step - 1) % self.logging_interval != 0:
            return
        value = used_temperature(pl_module)
        if value is None:
            return
        metrics = self._stats(trainer, pl_module, value)
        lam = reversal_strength(pl_module)
        if lam is not None:
            metrics["temperature/lambda"] = lam
        # written straight to every logger at this step (as Lightning's LearningRateMonitor does), so the
        # interval is honoured whatever the Trainer's log_every_n_steps; loggers write on rank 0 only,
        # but every rank computed the same values under the same keys
        self.last_logged = metrics
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)

    def _stats(self, trainer: L.Trainer, pl_module: L.LightningModule, value: Union[float, Tensor]) -> dict[str, float]:
        if not isinstance(value, Tensor) or value.numel() == 1:
            # a single temperature: identical on every rank (a float, or a parameter kept in sync by DDP)
            return {"temperature/value": float(value)}
        # per rank: count, mean, sum of squared deviations (M2), min, max -- in float64, combined across
        # ranks with Chan's parallel formula (no catastrophic cancellation when all values are equal)
        t = value.detach().double().reshape(-1)
        local_mean = t.mean()
        local = torch.stack([t.new_tensor(float(t.numel())), local_mean, (t - local_mean).pow(2).sum(), t.min(), t.max()])
        stats = pl_module.all_gather(local) if trainer.world_size > 1 else local.unsqueeze(0)
        stats = stats.reshape(-1, 5).double()
        counts, means, m2s = stats[:, 0], stats[:, 1], stats[:, 2]
        n = counts.sum()
        mean = (counts * means).sum() / n
        m2 = m2s.sum() + (counts * (means - mean).pow(2)).sum()
        var = m2 / (n - 1).clamp_min(1)
        result = {
            "temperature/mean": float(mean),
            "temperature/min": float(stats[:, 3].min()),
            "temperature/max": float(stats[:, 4].max()),
            "temperature/std": math.sqrt(max(float(var), 0.0)),
        }
        if self.log_histogram and trainer.is_global_zero:
            self._histogram(trainer, t)
        return result

    @staticmethod
    def _histogram(trainer: L.Trainer, values: Tensor) -> None:
        from lightning.pytorch.loggers import WandbLogger

        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                import wandb

                logger.experiment.log({"temperature/histogram": wandb.Histogram(values.cpu().numpy())}, step=trainer.global_step)
