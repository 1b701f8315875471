"""``ProgressiveCurriculum``: POCL's progressive-overload curriculum (arXiv:2506.05695) as a callback."""

from __future__ import annotations

import math
from typing import Any, Callable, Optional, Sequence, Union

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Subset

from lightning_distill.data.common import EpochShuffleSampler
from lightning_distill.module import unpack_batch

__all__ = ["ProgressiveCurriculum", "reciprocal_rank_fusion"]

TRIGGERS = ("time", "loss_plateau", "val_metric")
SIGNALS = ("teacher_loss", "student_loss", "teacher_entropy")
Signal = Union[str, Callable[[Any, Optional[Tensor], Optional[Tensor]], Tensor]]


def reciprocal_rank_fusion(signals: Sequence[Tensor], k: int = 60) -> Tensor:
    r"""RRF difficulty score: :math:`\mathrm{score}(x) = \sum_m 1 / (k + \mathrm{rank}_m(x))`.

    Each signal is ``[N]``, **lower = easier** (a loss, an entropy); ``rank_m`` is 1 for the
    sample with the lowest value of signal m (ties broken by sample index). A higher score means
    an easier sample. Example::

        >>> reciprocal_rank_fusion([torch.tensor([0.1, 0.5, 0.3])], k=0).tolist()
        [1.0, 0.3333333333333333, 0.5]
    """
    if not signals:
        raise ValueError("reciprocal_rank_fusion needs at least one signal.")
    n = signals[0].numel()
    score = torch.zeros(n, dtype=torch.float64)
    for values in signals:
        values = values.detach().double().reshape(-1).cpu()
        if values.numel() != n:
            raise ValueError(f"all signals must have {n} values, got {values.numel()}.")
        order = torch.from_numpy(values.numpy().argsort(kind="stable"))
        rank = torch.empty(n, dtype=torch.float64)
        rank[order] = torch.arange(1, n + 1, dtype=torch.float64)
        score += 1.0 / (k + rank)
    return score


class ProgressiveCurriculum(L.Callback):
    r"""Train on a growing, easy-first subset of the data with per-stage temperature and alpha (POCL).

    **Difficulty measurer** (once, before training, with a progress bar): every training sample is
    scored with reciprocal rank fusion (:func:`reciprocal_rank_fusion`, ``k = rrf_k``) over
    ``signals`` -- ``"teacher_loss"`` (the teacher's cross-entropy; token-averaged for ``[N, L, C]``
    logits), ``"student_loss"`` (the student's loss at initialisation), ``"teacher_entropy"``, or a
    callable ``(batch, teacher_logits, student_logits) -> [N]`` (lower = easier; e.g. an inverse
    ROUGE for language models). Samples are sorted easy -> hard.

    **Baby steps**: stage s trains on the easiest ``fractions[s]`` of the data (cumulative,
    default 1/3, 2/3, 1), reshuffled every epoch. The subset grows without touching the model:
    the train dataloader is rebuilt from the datamodule's at each epoch
    (``trainer.reload_dataloaders_every_n_epochs`` is set to 1), so under DDP Lightning gives every
    stage a fresh distributed sampler. Batches keep their original sample ``index``.

    **Intensity**: per-stage ``temperatures`` and ``alphas`` are written to the module's
    ``temperature`` / ``alpha``; or ``temperature_schedule=(t_min, t_max)`` rises linearly with the
    training progress, :math:`\tau(t) = \tau_{min} + (\tau_{max} - \tau_{min})\, t / T` with t / T the
    fraction of ``max_epochs`` done (counted per batch).

    **Stage transitions** (checked at the end of every epoch, same decision on every rank):

    * ``"time"`` -- stage s ends after ``stage_ends[s]`` of ``max_epochs`` (default: equal parts;
      e.g. ``[0.4, 0.7]`` ends stages 1 and 2 after 40 % and 70 % of the epochs);
    * ``"loss_plateau"`` -- when the epoch-mean training loss (averaged over processes) fell by less
      than ``plateau_epsilon`` per epoch over the last ``plateau_window`` epochs of the stage;
    * ``"val_metric"`` -- when ``monitor`` has not improved by ``min_delta`` for ``patience`` epochs.

    The stage, the order, the scores and the trigger's history are in the callback's state, so a
    run resumed mid-stage continues the same curriculum. Logs ``curriculum/stage`` (1-based),
    ``curriculum/fraction``, ``curriculum/temperature`` and ``curriculum/alpha`` every epoch.
    Works with any strategy that has ``temperature`` / ``alpha`` attributes (only those it sets
    must be writable; CTKD's learned temperature is not, so give it no temperatures).

    Args:
        fractions: cumulative data fractions per stage, increasing, the last one 1.
        temperatures, alphas: optional per-stage values (one per stage).
        temperature_schedule: optional ``(t_min, t_max)`` for the rising schedule (exclusive with
            ``temperatures``).
        trigger: ``"time"``, ``"loss_plateau"`` or ``"val_metric"``.
        stage_ends: time trigger: fractions of training at which stages 1..S-1 end.
        plateau_window, plateau_epsilon: loss-plateau trigger.
        monitor, mode, patience, min_delta: validation trigger.
        signals: difficulty signals (names or callables), at least one.
        rrf_k: the RRF constant (60, as in the RRF paper and POCL).
        shuffle_seed: seed of the within-stage shuffle (None: the global seed at setup).
        progress_bar: show a progress bar while scoring.

    Example::

        >>> from lightning_distill.callbacks import ProgressiveCurriculum
        >>> pocl = ProgressiveCurriculum(temperatures=[1.0, 1.5, 2.0], alphas=[0.9, 0.7, 0.5], stage_ends=[0.4, 0.7])
        >>> pocl.fractions
        [0.3333333333333333, 0.6666666666666666, 1.0]
    """

    def __init__(
        self,
        fractions: Sequence[float] = (1 / 3, 2 / 3, 1.0),
        temperatures: Optional[Sequence[float]] = None,
        alphas: Optional[Sequence[float]] = None,
        temperature_schedule: Optional[Sequence[float]] = None,
        trigger: str = "time",
        stage_ends: Optional[Sequence[float]] = None,
        plateau_window: int = 2,
        plateau_epsilon: float = 1e-3,
        monitor: str = "val/acc",
        mode: str = "max",
        patience: int = 1,
        min_delta: float = 0.0,
        signals: Sequence[Signal] = ("teacher_loss", "student_loss"),
        rrf_k: int = 60,
        shuffle_seed: Optional[int] = None,
        progress_bar: bool = True,
    ) -> None:
        fractions = [float(f) for f in fractions]
        n = len(fractions)
        if n == 0 or any(not 0 < f <= 1 for f in fractions) or any(b <= a for a, b in zip(fractions, fractions[1:])):
            raise ValueError(f"`fractions` must increase strictly within (0, 1], got {fractions!r}.")
        if fractions[-1] != 1.0:
            raise ValueError(f"the last of `fractions` must be 1.0 (the full data), got {fractions!r}.")
        for name, values in (("temperatures", temperatures), ("alphas", alphas)):
            if values is not None and len(values) != n:
                raise ValueError(f"`{name}` needs one value per stage ({n}), got {list(values)!r}.")
        if temperatures is not None and any(not t > 0 for t in temperatures):
            raise ValueError(f"`temperatures` must all be > 0, got {list(temperatures)!r}.")
        if alphas is not None and any(not 0 <= a <= 1 for a in alphas):
            raise ValueError(f"`alphas` must all be in [0, 1], got {list(alphas)!r}.")
        if temperature_schedule is not None:
            if temperatures is not None:
                raise ValueError("give either `temperatures` (per stage) or `temperature_schedule` (rising), not both.")
            if len(temperature_schedule) != 2 or not 0 < temperature_schedule[0] <= temperature_schedule[1]:
                raise ValueError(f"`temperature_schedule` must be (t_min, t_max) with 0 < t_min <= t_max, got {temperature_schedule!r}.")
        if trigger not in TRIGGERS:
            raise ValueError(f"`trigger` must be one of {TRIGGERS}, got {trigger!r}.")
        if stage_ends is None:
            stage_ends = [i / n for i in range(1, n)]
        stage_ends = [float(e) for e in stage_ends]
        if len(stage_ends) != n - 1 or any(not 0 < e < 1 for e in stage_ends) or any(b <= a for a, b in zip(stage_ends, stage_ends[1:])):
            raise ValueError(f"`stage_ends` needs {n - 1} increasing values in (0, 1) (one per stage but the last), got {stage_ends!r}.")
        if mode not in ("min", "max"):
            raise ValueError(f"`mode` must be 'min' or 'max', got {mode!r}.")
        if plateau_window < 1 or patience < 1:
            raise ValueError(f"`plateau_window` and `patience` must be >= 1, got {plateau_window!r} and {patience!r}.")
        if not signals:
            raise ValueError("`signals` needs at least one difficulty signal.")
        for sig in signals:
            if not callable(sig) and sig not in SIGNALS:
                raise ValueError(f"unknown signal {sig!r}: use one of {SIGNALS} or a callable (batch, teacher, student) -> [N].")
        if rrf_k < 0:
            raise ValueError(f"`rrf_k` must be >= 0, got {rrf_k!r}.")
        self.fractions = fractions
        self.temperatures = None if temperatures is None else [float(t) for t in temperatures]
        self.alphas = None if alphas is None else [float(a) for a in alphas]
        self.temperature_schedule = None if temperature_schedule is None else tuple(float(t) for t in temperature_schedule)
        self.trigger, self.stage_ends = trigger, stage_ends
        self.plateau_window, self.plateau_epsilon = plateau_window, plateau_epsilon
        self.monitor, self.mode, self.patience, self.min_delta = monitor, mode, patience, min_delta
        self.signals, self.rrf_k = list(signals), rrf_k
        self.shuffle_seed, self.progress_bar = shuffle_seed, progress_bar
        # state (saved in checkpoints)
        self.stage = 0
        self.order: Optional[list[int]] = None
        self.scores: Optional[list[float]] = None
        self.loss_history: list[float] = []
        self.best: Optional[float] = None
        self.bad_epochs = 0
        # per-run
        self._source: Any = None
        self._original_loader: Optional[Callable[[], Any]] = None
        self._subset: Optional[Subset] = None  # the current stage's training subset
        self._loss_sum: Optional[Tensor] = None
        self._loss_count = 0

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {
            "stage": self.stage,
            "order": self.order,
            "scores": self.scores,
            "loss_history": list(self.loss_history),
            "best": self.best,
            "bad_epochs": self.bad_epochs,
            "shuffle_seed": self.shuffle_seed,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.stage = int(state_dict["stage"])
        self.order = state_dict["order"]
        self.scores = state_dict["scores"]
        self.loss_history = list(state_dict["loss_history"])
        self.best = state_dict["best"]
        self.bad_epochs = int(state_dict["bad_epochs"])
        self.shuffle_seed = state_dict["shuffle_seed"]

    # ------------------------------------------------------------------ setup
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        # temperatures are set through the module's temperature interface (every Temperature of a
        # DistillationModule: fixed, or a global learned one, whose value the curriculum then moves)
        for name, values in (("temperature", self.temperatures or self.temperature_schedule), ("alpha", self.alphas)):
            if values is None:
                continue
            if not hasattr(pl_module, name):
                raise ValueError(f"ProgressiveCurriculum sets `{name}` but {type(pl_module).__name__} has no such attribute.")
            try:
                setattr(pl_module, name, getattr(pl_module, name))
            except (AttributeError, ValueError) as err:
                raise ValueError(f"ProgressiveCurriculum cannot set {type(pl_module).__name__}.{name}: {err}") from None
        from lightning.pytorch.utilities.model_helpers import is_overridden

        source = trainer.datamodule if trainer.datamodule is not None else pl_module
        original = getattr(source, "train_dataloader", None)
        if not callable(original) or not is_overridden("train_dataloader", source):
            raise ValueError(
                "ProgressiveCurriculum needs a LightningDataModule (or LightningModule) with `train_dataloader()`; "
                "dataloaders passed directly to `fit` cannot be re-subset between stages."
            )
        if self.shuffle_seed is None:
            self.shuffle_seed = torch.initial_seed() % (2**31)
        self._source, self._original_loader = source, original
        source.train_dataloader = self._curriculum_loader  # instance attribute: the class method stays intact
        trainer.reload_dataloaders_every_n_epochs = 1

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self._source is not None and self._original_loader is not None:
            try:
                del self._source.train_dataloader
            except AttributeError:
                pass
        self._source, self._original_loader = None, None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # dataloaders passed to `fit` win over a module's own train_dataloader(): the stages would not apply
        loader = trainer.train_dataloader
        if self._subset is not None and getattr(loader, "dataset", self._subset) is not self._subset:
            raise ValueError(
                "ProgressiveCurriculum needs a LightningDataModule (or LightningModule) with `train_dataloader()`; "
                "dataloaders passed directly to `fit` cannot be re-subset between stages."
            )

    # ------------------------------------------------------------------ scoring
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.order is None:
            scores = self.score(pl_module, self._original_loader(), show=self.progress_bar and trainer.is_global_zero)
            scores = trainer.strategy.broadcast(scores, src=0)
            self.scores = scores.tolist()
            self.order = torch.from_numpy((-scores).numpy().argsort(kind="stable")).tolist()
        self._apply_stage_values(pl_module, trainer)

    @torch.no_grad()
    def score(self, pl_module: Any, loader: DataLoader, show: bool = False) -> Tensor:
        """RRF difficulty scores of every sample of ``loader.dataset`` (in dataset order)."""
        from tqdm.auto import tqdm

        plain = DataLoader(loader.dataset, batch_size=loader.batch_size or 64, shuffle=False, collate_fn=loader.collate_fn)
        teacher = getattr(pl_module, "teacher", None)
        student = getattr(pl_module, "student", None) or getattr(pl_module, "model", None)
        modes = [(m, m.training) for m in pl_module.modules()]
        pl_module.eval()
        columns: list[list[Tensor]] = [[] for _ in self.signals]
        try:
            for raw in tqdm(plain, desc="curriculum: scoring difficulty", disable=not show, leave=False):
                raw = pl_module.transfer_batch_to_device(raw, pl_module.device, 0)
                batch = pl_module.read_batch(raw) if callable(getattr(pl_module, "read_batch", None)) else unpack_batch(raw)
                if callable(getattr(pl_module, "eval_logits", None)):  # the module's own input routing and teacher
                    s_logits, t_logits = pl_module.eval_logits(batch)
                else:
                    t_logits = teacher(batch.input) if teacher is not None else None
                    s_logits = student(batch.input) if student is not None else None
                for column, signal in zip(columns, self.signals):
                    column.append(self._signal(signal, raw, batch, t_logits, s_logits, pl_module).float().cpu())
        finally:
            for module, training in modes:
                module.training = training
        return reciprocal_rank_fusion([torch.cat(c) for c in columns], k=self.rrf_k)

    @staticmethod
    def _per_sample_ce(logits: Tensor, target: Tensor, ignore_index: int) -> Tensor:
        if logits.ndim == 2:
            return F.cross_entropy(logits.float(), target, reduction="none", ignore_index=ignore_index)
        ce = F.cross_entropy(logits.float().transpose(1, 2), target, reduction="none", ignore_index=ignore_index)
        valid = (target != ignore_index).float()
        return (ce * valid).sum(1) / valid.sum(1).clamp_min(1)

    def _signal(self, signal: Signal, raw: Any, batch: Any, t_logits: Optional[Tensor], s_logits: Optional[Tensor], pl_module: Any) -> Tensor:
        if callable(signal):
            return signal(raw, t_logits, s_logits)
        ignore = getattr(pl_module, "ignore_index", -100)
        logits = t_logits if signal.startswith("teacher") else s_logits
        if logits is None:
            raise ValueError(f"signal {signal!r} needs a {signal.split('_')[0]}, but {type(pl_module).__name__} has none.")
        if signal == "teacher_entropy":
            logp = logits.float().log_softmax(-1)
            entropy = -(logp.exp() * logp).sum(-1)
            return entropy if entropy.ndim == 1 else entropy.mean(-1)
        if batch.target is None:
            raise ValueError(f"signal {signal!r} needs labels; use 'teacher_entropy' for unlabeled data.")
        return self._per_sample_ce(logits, batch.target, ignore)

    # ------------------------------------------------------------------ the growing subset
    @property
    def fraction(self) -> float:
        return self.fractions[self.stage]

    def _curriculum_loader(self) -> DataLoader:
        loader = self._original_loader()
        if self.order is None:
            return loader
        if loader.batch_size is None:
            raise ValueError("ProgressiveCurriculum needs a train DataLoader built with `batch_size` (not a batch_sampler).")
        n = max(1, math.ceil(self.fraction * len(self.order)))
        subset = self._subset = Subset(loader.dataset, self.order[:n])
        return DataLoader(
            subset,
            batch_size=loader.batch_size,
            sampler=EpochShuffleSampler(subset, seed=self.shuffle_seed),
            collate_fn=loader.collate_fn,
            num_workers=loader.num_workers,
            pin_memory=loader.pin_memory,
            drop_last=loader.drop_last,
        )

    # ------------------------------------------------------------------ intensity
    def _apply_stage_values(self, pl_module: Any, trainer: L.Trainer) -> None:
        if self.temperatures is not None:
            pl_module.temperature = self.temperatures[self.stage]
        if self.alphas is not None:
            pl_module.alpha = self.alphas[self.stage]
        if self.temperature_schedule is not None:
            pl_module.temperature = self._scheduled_temperature(trainer)

    def _scheduled_temperature(self, trainer: L.Trainer, batch_idx: int = 0) -> float:
        """Rising temperature over training progress, counted in epochs: the stages' loaders differ
        in length, so a step count (``estimated_stepping_batches``) would jump back at each stage."""
        t_min, t_max = self.temperature_schedule
        batches = trainer.num_training_batches
        within = batch_idx / batches if isinstance(batches, (int, float)) and math.isfinite(batches) and batches > 0 else 0.0
        max_epochs = trainer.max_epochs if trainer.max_epochs and trainer.max_epochs > 0 else None
        progress = (trainer.current_epoch + within) / max_epochs if max_epochs else 0.0
        return t_min + (t_max - t_min) * min(max(progress, 0.0), 1.0)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        if self.temperature_schedule is not None:
            pl_module.temperature = self._scheduled_temperature(trainer, batch_idx)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.trigger != "loss_plateau":
            return
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        if isinstance(loss, Tensor):
            loss = loss.detach().float()
            self._loss_sum = loss if self._loss_sum is None else self._loss_sum + loss
            self._loss_count += 1

    # ------------------------------------------------------------------ transitions
    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        last_stage = len(self.fractions) - 1
        temperature = getattr(pl_module, "temperature", float("nan"))
        alpha = getattr(pl_module, "alpha", float("nan"))
        pl_module.log_dict(
            {
                "curriculum/stage": float(self.stage + 1),
                "curriculum/fraction": float(self.fraction),
                "curriculum/temperature": float(temperature) if isinstance(temperature, (int, float)) else float("nan"),
                "curriculum/alpha": float(alpha) if isinstance(alpha, (int, float)) else float("nan"),
            },
            on_step=False,
            on_epoch=True,
            sync_dist=False,
        )
        advance = self._should_advance(trainer)
        if advance and self.stage < last_stage:
            self.stage += 1
            self.loss_history, self.best, self.bad_epochs = [], None, 0
            self._apply_stage_values(pl_module, trainer)

    def _should_advance(self, trainer: L.Trainer) -> bool:
        if self.trigger == "time":
            if self.stage >= len(self.stage_ends):
                return False
            end_epoch = max(1, round(self.stage_ends[self.stage] * trainer.max_epochs))
            return trainer.current_epoch + 1 >= end_epoch
        if self.trigger == "loss_plateau":
            if self._loss_sum is None:
                return False
            mean = self._loss_sum / max(self._loss_count, 1)
            mean = float(trainer.strategy.reduce(mean, reduce_op="mean"))
            self._loss_sum, self._loss_count = None, 0
            self.loss_history.append(mean)
            w = self.plateau_window
            if len(self.loss_history) <= w:
                return False
            slope = (self.loss_history[-1 - w] - self.loss_history[-1]) / w  # decrease per epoch
            return slope < self.plateau_epsilon
        value = trainer.callback_metrics.get(self.monitor)
        if value is None:
            raise ValueError(
                f"ProgressiveCurriculum(trigger='val_metric') monitors {self.monitor!r}, which was not logged; "
                f"available: {sorted(trainer.callback_metrics)}."
            )
        value = float(value)
        improved = self.best is None or (value > self.best + self.min_delta if self.mode == "max" else value < self.best - self.min_delta)
        if improved:
            self.best, self.bad_epochs = value, 0
            return False
        self.bad_epochs += 1
        return self.bad_epochs >= self.patience
