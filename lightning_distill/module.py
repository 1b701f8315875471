"""``TrainingModule``: what :class:`Classifier` and every distillation module share.

* batches read through :func:`lightning_distill.batch.unpack_batch` (tuples, dicts, tensors);
* the hard-label task loss (cross-entropy with an ignore index, for ``[N, C]`` and ``[N, L, C]``);
* optimizer and LR-scheduler configuration injected as callables, so they work from YAML::

      model:
        init_args:
          optimizer:
            class_path: torch.optim.SGD
            init_args: {lr: 0.05, momentum: 0.9, weight_decay: 5.0e-4}
          lr_scheduler:
            class_path: torch.optim.lr_scheduler.CosineAnnealingLR
            init_args: {T_max: 240}

  and from Python: ``optimizer=functools.partial(torch.optim.SGD, lr=0.05)``;
* a shape probe before training (:mod:`lightning_distill.probe`) that checks the models against each
  other and against the data, and builds whatever depends on their shapes -- from
  ``example_input_array``, the datamodule, or the first batch of dataloaders passed to ``fit``;
* validation / test metrics (:mod:`lightning_distill.metrics`);
* checks of the first batches of every stage (:mod:`lightning_distill.data_checks`: NaN / Inf inputs, labels
  out of range, a dtype the model cannot take, no samples) and a guard that stops training at the first
  non-finite loss, naming the step and the objective (``check_batches``, ``check_finite_loss``).
"""

from __future__ import annotations

import math
import random
from contextlib import contextmanager
from typing import Any, Callable, Iterable, Iterator, Mapping, Optional, Union

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler, ReduceLROnPlateau

from lightning_distill.batch import (
    LABEL_SHIFTS,
    Batch,
    batch_size_of,
    labels_repeat_inputs,
    next_token_targets,
    unpack_batch,
)
from lightning_distill.data_checks import (
    BadDataError,
    NonFiniteLossError,
    check_inputs,
    check_targets,
    nonfinite_loss_message,
)
from lightning_distill.losses import cross_entropy_loss
from lightning_distill.metrics import Perplexity, build_eval_metrics
from lightning_distill.outputs import ModelOutputs, as_outputs
from lightning_distill.probe import Probe, batch_from_spec, batch_spec
from lightning_distill.validation import check_bool, check_choice, check_int

__all__ = ["Batch", "OptimizerFactory", "Perplexity", "SchedulerFactory", "TrainingModule", "unpack_batch"]

OptimizerFactory = Callable[[Iterable], Optimizer]
SchedulerFactory = Callable[[Optimizer], Union[LRScheduler, ReduceLROnPlateau]]

_INTERVALS = ("epoch", "step")
LOSS_NORMALIZATIONS = ("batch", "tokens")
#: this package's entry in a Lightning checkpoint
CKPT_KEY = "lightning_distill"


_OPTIMIZER_SETTINGS = {"lr", "learning_rate", "weight_decay", "momentum", "betas", "eps"}


def _unexpected_arguments(cls: type, unexpected: Mapping[str, Any]) -> str:
    """``TypeError`` text for keyword arguments no ``__init__`` along ``cls``'s MRO accepts: it names the class the
    user called (not an internal base class) and the closest valid names."""
    import difflib
    import inspect

    valid: list[str] = []
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None or klass.__module__.startswith(("lightning.", "torch.")):
            continue
        for name, p in inspect.signature(init).parameters.items():
            if name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD) and name not in valid:
                valid.append(name)
    lines = []
    for name in unexpected:
        close = difflib.get_close_matches(name, valid, n=2, cutoff=0.6)
        hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
        if name in _OPTIMIZER_SETTINGS:
            hint += (f" Optimizer settings go in `optimizer`: functools.partial(torch.optim.Adam, {name}=...) in Python, "
                     f"or optimizer: {{class_path: torch.optim.Adam, init_args: {{{name}: ...}}}} in YAML.")
        lines.append(f"{cls.__name__}() got an unexpected keyword argument {name!r}.{hint}")
    return " ".join(lines) + f" Valid arguments: {', '.join(valid)}."


class TrainingModule(L.LightningModule):
    """Base of :class:`Classifier` and :class:`DistillationModule` (not used directly).

    Args:
        optimizer: a callable taking parameter groups and returning an optimizer;
            ``None`` means ``torch.optim.Adam(lr=1e-3)``.
        lr_scheduler: a callable taking the optimizer and returning a scheduler, or ``None``.
        lr_scheduler_interval: ``"epoch"`` or ``"step"`` -- when the scheduler steps.
        lr_scheduler_monitor: metric a ``ReduceLROnPlateau`` scheduler watches.
        num_classes: optional; found by the probe when not given, and checked against the probe and
            the datamodule's ``num_classes`` when it has one.
        ignore_index: target value that marks a sample / token without a label.
        label_shift: how token targets line up with the logits. ``"none"``: ``target[t]`` is what the
            logits at position ``t`` predict (this package's text data). ``"next_token"``: Hugging Face's
            causal-LM convention, ``labels == input_ids`` and the logits at ``t`` predict token ``t + 1``;
            the targets are shifted once, for the task loss, the metrics and pseudo-labels alike
            (:func:`~lightning_distill.batch.next_token_targets`). ``"auto"`` (default): ``"next_token"``
            when the first labelled training or evaluation batch has token labels equal to its input
            tokens (a model asked to repeat its input is never what is meant), ``"none"`` otherwise.
        loss_normalization: how token-level losses are averaged. ``"batch"`` (default): each term is a
            mean over its positions in the micro-batch (Lightning then averages micro-batches and
            ranks), so sequences of different lengths weigh differently depending on how they were
            batched. ``"tokens"``: each term is summed over its positions and the optimizer step divides
            by the number of labelled tokens of the whole step -- every micro-batch of the gradient
            accumulation, on every rank (the real, unpadded tokens when nothing is labelled) -- so
            batch 8, batch 2 x ``accumulate_grad_batches=4`` and 2-process DDP give the same gradients.
            Only token-level steps (logits ``[N, L, V]``) are affected.
        check_batches: how many batches of each stage (training, validation -- the sanity check's count --
            and test) are checked before the models see them (:mod:`lightning_distill.data_checks`): no
            samples, NaN / Inf in any floating input, a floating dtype the model cannot take (``float64`` data
            for a ``float32`` model is refused with the fix, not cast), labels outside ``[0, num_classes)``
            other than ``ignore_index`` (token targets against the vocabulary). The shape probe's example
            batch is checked too. ``0`` turns the checks off. After these batches a step does no checking
            work (one integer test per batch).
        check_finite_loss: stop training with a
            :class:`~lightning_distill.data_checks.NonFiniteLossError` at the first NaN / Inf loss, naming the
            global step and the objectives whose terms are non-finite, and never write a checkpoint after it.
            On the CPU every step is checked before its backward pass (the optimizer never applies it). On
            an accelerator a check is a device sync, so each step only folds ``isfinite(loss)`` into a flag on
            the device (no sync); the flag is read on the steps Lightning logs (``log_every_n_steps``, which
            sync anyway), at the end of each epoch and of training, and before every checkpoint is written.
            ``log_every_n_steps=1`` checks every step there too.
    """

    def __init__(
        self,
        optimizer: Optional[OptimizerFactory] = None,
        lr_scheduler: Optional[SchedulerFactory] = None,
        lr_scheduler_interval: str = "epoch",
        lr_scheduler_monitor: str = "val/loss",
        num_classes: Optional[int] = None,
        ignore_index: int = -100,
        label_shift: str = "auto",
        loss_normalization: str = "batch",
        check_batches: int = 2,
        check_finite_loss: bool = True,
        **unexpected: Any,
    ) -> None:
        if unexpected:
            raise TypeError(_unexpected_arguments(type(self), unexpected))
        super().__init__()
        check_choice("lr_scheduler_interval", lr_scheduler_interval, _INTERVALS)
        check_choice("label_shift", label_shift, LABEL_SHIFTS)
        check_choice("loss_normalization", loss_normalization, LOSS_NORMALIZATIONS)
        if num_classes is not None and (isinstance(num_classes, bool) or int(num_classes) < 2):
            raise ValueError(f"`num_classes` must be an integer >= 2 or None, got {num_classes!r}.")
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler
        self.lr_scheduler_interval = lr_scheduler_interval
        self.lr_scheduler_monitor = lr_scheduler_monitor
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.label_shift = label_shift
        #: the shift in use: ``label_shift`` itself, or what ``"auto"`` decided (``None``: not yet decided)
        self.resolved_label_shift: Optional[str] = None if label_shift == "auto" else label_shift
        self.loss_normalization = loss_normalization
        self.check_batches = check_int("check_batches", check_batches, minimum=0, hint=" Use 0 to turn the checks off.")
        self.check_finite_loss = check_bool("check_finite_loss", check_finite_loss)
        # batches still to check, per stage (set in setup; a plain int test per batch once they reach 0)
        self._train_checks = self._val_checks = self._test_checks = 0
        #: accelerators: ``isfinite(loss)`` of the steps since the last check, on the device (no sync per step)
        self._finite_pending: Optional[Tensor] = None
        self._finite_checked_step = -1
        self._step_terms: Optional[Mapping[str, Tensor]] = None  # this step's terms (named in a NaN-loss error)
        self._step_tokens: Optional[Tensor] = None  # [labelled, real] tokens of the optimizer step so far
        self.eval_metrics: Optional[nn.ModuleDict] = None
        self.token_level = False  # set by the probe: logits [N, L, V] (language models)
        self._probe_spec: Optional[dict[str, Any]] = None  # what the probe ran on (saved in checkpoints)
        self._probe_pending = False  # no example before training: probe the first batch

    # ------------------------------------------------------------------ batches and losses
    unpack_batch = staticmethod(unpack_batch)
    batch_size_of = staticmethod(batch_size_of)

    def task_loss(self, logits: Tensor, target: Optional[Tensor]) -> Tensor:
        """Cross-entropy with hard labels, averaged over labelled samples / tokens only (0 when none)."""
        return cross_entropy_loss(logits, target, self.ignore_index)

    def read_batch(self, batch: Any) -> Batch:
        """A dataloader batch as a :class:`~lightning_distill.batch.Batch` whose targets line up with the
        logits (``label_shift``). Every training, evaluation and scoring step reads its batch here."""
        b = unpack_batch(batch)
        shift = self.resolved_label_shift
        if shift is None:
            shift = self._decide_label_shift(b)
        return next_token_targets(b, self.ignore_index) if shift == "next_token" else b

    def _decide_label_shift(self, batch: Batch) -> str:
        repeats = labels_repeat_inputs(batch, self.ignore_index)
        if repeats is None:  # no labelled tokens to tell from: decide on a later batch
            return "none"
        self.resolved_label_shift = "next_token" if repeats else "none"
        if repeats:
            rank_zero_info(
                f"{type(self).__name__}: the token labels equal the input tokens (Hugging Face's causal-LM "
                "convention), so the logits at position t are scored against token t + 1 (label_shift='auto' -> "
                "'next_token'; set label_shift explicitly to silence this)."
            )
        return self.resolved_label_shift

    # ------------------------------------------------------------------ token-normalised losses
    @property
    def normalizes_tokens(self) -> bool:
        """Whether training steps use ``loss_normalization="tokens"`` (set, and the logits are per token)."""
        return self.loss_normalization == "tokens" and self.token_level

    def token_counts(self, batch: Batch, positions: Optional[int] = None) -> dict[str, Tensor]:
        """``{"labels": labelled tokens, "tokens": real tokens}`` of a token-level training batch, counted on its
        device (no host sync) and added to the optimizer step's count; ``positions`` is ``N * L`` for batches
        without a mask or target."""
        target, mask = batch.target, batch.mask
        if mask is not None:
            real = mask.bool().sum()
        elif target is not None:
            real = torch.tensor(target.numel(), device=target.device)
        else:
            real = torch.tensor(int(positions or 0))
        labelled = (target != self.ignore_index).sum() if target is not None else torch.zeros_like(real)
        counts = {"labels": labelled, "tokens": real}
        step = torch.stack([labelled, real]).float()
        self._step_tokens = step if self._step_tokens is None else self._step_tokens + step.to(self._step_tokens.device)
        return counts

    def on_before_optimizer_step(self, optimizer: Optimizer) -> None:
        """Under ``loss_normalization="tokens"``: every micro-batch returned a *sum* over its tokens; Lightning
        divided each by ``accumulate_grad_batches`` (N) and DDP averaged over the W ranks, so multiplying the
        gradients by ``N * W / T`` (T: labelled tokens of the step over all micro-batches and ranks) leaves
        sum / T. Runs before gradient clipping."""
        counts, self._step_tokens = self._step_tokens, None
        if counts is None or not self.normalizes_tokens:
            return
        trainer = self.trainer
        total = trainer.strategy.reduce(counts.to(self.device), reduce_op="sum")
        denominator = torch.where(total[0] > 0, total[0], total[1]).clamp_min(1.0)
        scale = (float(trainer.accumulate_grad_batches) * float(trainer.world_size)) / denominator
        for group in optimizer.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.grad.mul_(scale.to(p.grad.dtype))

    @property
    def attached_trainer(self) -> Optional[L.Trainer]:
        """The trainer running this module, or ``None`` outside one (``self.trainer`` raises then)."""
        try:
            return self.trainer
        except RuntimeError:
            return None

    # ------------------------------------------------------------------ logging training terms
    def should_log_step(self) -> bool:
        """Whether this training step's terms go to ``self.log``.

        Lightning writes step metrics to the loggers only every ``log_every_n_steps`` optimizer steps,
        and each ``self.log`` call costs about 0.4 ms on the CPU (more than a small student's forward).
        The terms are therefore handed to Lightning on exactly the steps it writes
        (``(global_step + 1) % log_every_n_steps == 0``), plus the first and the last batch of every epoch
        and the last step of a ``max_steps`` run, so the progress bar and ``trainer.callback_metrics``
        hold current values at those points (between them, callbacks reading ``train/*`` see the last
        logged step: set ``log_every_n_steps=1`` for every step). Without a trainer it always logs.
        """
        trainer = self.attached_trainer
        if trainer is None:
            return True
        n = max(int(trainer.log_every_n_steps), 1)
        max_steps = int(trainer.max_steps or -1)
        return (
            (trainer.global_step + 1) % n == 0
            or trainer.fit_loop.epoch_loop.batch_progress.current.ready <= 1
            or bool(trainer.is_last_batch)
            or bool(trainer.should_stop)
            or (max_steps > 0 and trainer.global_step + 1 >= max_steps)
        )

    def log_terms(self, stage: str, terms: Mapping[str, Tensor], batch_size: int) -> None:
        """Log every loss term as ``{stage}/{name}`` (``loss`` also on the progress bar, when there is one).

        Lightning turns progress-bar values into Python numbers after every batch (a device sync on a
        GPU), so ``loss`` is marked for the bar only when the trainer shows one.
        """
        if stage == "train":
            if self.__dict__.get("_step_terms") is None:  # what a non-finite loss is explained with
                self.__dict__["_step_terms"] = terms
            if not self.should_log_step():
                return
        self.log_dict(
            {f"{stage}/{name}": value.detach() for name, value in terms.items() if name != "loss"},
            on_step=True,
            on_epoch=False,
            batch_size=batch_size,
        )
        trainer = self.attached_trainer
        prog_bar = trainer is None or trainer.progress_bar_callback is not None
        self.log(f"{stage}/loss", terms["loss"].detach(), prog_bar=prog_bar, on_step=True, on_epoch=False,
                 batch_size=batch_size)

    # ------------------------------------------------------------------ optimizers
    def parameter_groups(self) -> list[dict]:
        """Parameter groups handed to the optimizer: every trainable parameter by default.

        Modules with their own learning rates (projections, temperatures) return several groups;
        frozen modules never appear (``requires_grad=False``, and :meth:`frozen_parameters` filters them).
        """
        frozen = {id(p) for p in self.frozen_parameters()}
        params = [p for p in self.parameters() if p.requires_grad and id(p) not in frozen]
        return [{"params": params}]

    def frozen_parameters(self) -> Iterable[nn.Parameter]:
        """Parameters that must never be optimised (a teacher's). None in the base class."""
        return ()

    def configure_optimizers(self) -> Any:
        groups = [g for g in self.parameter_groups() if len(g["params"]) > 0]
        frozen = {id(p) for p in self.frozen_parameters()}
        leaked = [n for n, p in self.named_parameters() if id(p) in frozen and any(p is q for g in groups for q in g["params"])]
        if leaked:
            raise RuntimeError(f"frozen parameters were put in an optimizer group: {leaked[:5]}")
        if not groups:
            raise ValueError("the module has no trainable parameters: nothing to optimise.")
        factory = self.optimizer_factory or (lambda params: torch.optim.Adam(params, lr=1e-3))
        optimizer = factory(groups)
        if self.lr_scheduler_factory is None:
            return optimizer
        scheduler = self.lr_scheduler_factory(optimizer)
        config = {"scheduler": scheduler, "interval": self.lr_scheduler_interval}
        if isinstance(scheduler, ReduceLROnPlateau):
            config["monitor"] = self.lr_scheduler_monitor
        return {"optimizer": optimizer, "lr_scheduler": config}

    # ------------------------------------------------------------------ probing
    @property
    def probed(self) -> bool:
        """Whether the probe has run (the metrics and every shape-dependent part exist)."""
        return self.eval_metrics is not None

    def _datamodule(self) -> Any:
        trainer = self.attached_trainer
        return getattr(trainer, "datamodule", None) if trainer is not None else None

    def example_batch(self) -> Optional[Batch]:
        """A small real batch for the probe: ``example_input_array`` or the datamodule's; ``None`` if neither.

        Raises:
            ValueError: the datamodule's training loader yields no batch (an empty training set).
        """
        if self.example_input_array is not None:
            example = self.example_input_array
            return Batch(None, inputs=dict(example)) if isinstance(example, dict) else Batch(example)
        dm = self._datamodule()
        if dm is None:
            return None
        if callable(getattr(dm, "example_input", None)):
            return unpack_batch(dm.example_input())
        try:
            loader = dm.train_dataloader()
        except Exception:  # noqa: BLE001 - a datamodule without a train loader (test-only use)
            return None
        try:
            return unpack_batch(next(iter(loader)))
        except StopIteration:
            raise BadDataError(self._empty_training_set_message(loader)) from None

    @staticmethod
    def _empty_training_set_message(loader: Any) -> str:
        dataset = getattr(loader, "dataset", None)
        try:
            size = len(dataset) if dataset is not None else "?"
        except TypeError:
            size = "?"
        return (
            f"the training set is empty: its DataLoader yields no batch (dataset of {size} samples). Check the data "
            "path / split, or that drop_last=True does not drop the only (incomplete) batch."
        )

    def _empty_probe_message(self, stage: str) -> str:
        """Why the shape probe got an example without samples: an empty training set, most of the time."""
        if self.example_input_array is not None:
            return "`example_input_array` holds no samples (0 rows): set it to a batch of at least one real input."
        dm = self._datamodule()
        if dm is not None:
            dataset = getattr(dm, "train_dataset", None)
            try:
                size = len(dataset) if dataset is not None else None
            except TypeError:
                size = None
            if size == 0 or stage == "fit":
                return (
                    f"the training set of {type(dm).__name__} is empty (its example_input() / first training batch, "
                    "which the shape probe runs on before training, has no samples). Check the data path / split, "
                    "or that drop_last=True does not drop the only (incomplete) batch."
                )
        return f"the example batch of the shape probe ({stage}) holds no samples: check that the dataset is not empty."

    def training_set_size(self) -> Optional[int]:
        """Number of training samples, when the datamodule or the training DataLoader tells it."""
        dm = self._datamodule()
        dataset = getattr(dm, "train_dataset", None)
        trainer = self.attached_trainer
        if dataset is None and trainer is not None:
            loader = trainer.train_dataloader
            dataset = getattr(loader, "dataset", None)
        try:
            return len(dataset) if dataset is not None else None
        except TypeError:
            return None

    def setup(self, stage: str) -> None:
        """Probe the models on a real batch before anything runs, then build the metrics.

        Rejects a class-count mismatch (model vs teacher vs datamodule) before any step. Without an
        example (dataloaders passed straight to ``trainer.fit``), the probe runs on the first batch
        instead (:meth:`on_train_batch_start`), still before the first optimizer step.
        """
        n = self.check_batches
        if stage == "fit":
            self._train_checks, self._val_checks = n, n
            self._finite_pending, self._finite_checked_step = None, -1
        elif stage == "validate":
            self._val_checks = n
        elif stage == "test":
            self._test_checks = n
        if self.probed:
            return
        batch = self.example_batch()
        if batch is None:
            if self.num_classes is not None and not self.needs_probe():
                # nothing to build from shapes and the class count is given: no probe (and no extra forward)
                self.eval_metrics = self.build_metrics(int(self.num_classes), self.has_teacher).to(self.device)
                return
            self._probe_pending = True
            return
        self.run_probe(batch, stage)

    def needs_probe(self) -> bool:
        """Whether parts still wait for the probe (see :meth:`DistillationModule.needs_probe`)."""
        return False

    def build(self, example: Any, stage: str = "build") -> None:
        """Run the probe on ``example`` now (an input or a batch): what ``setup`` does, e.g. before
        ``load_state_dict`` of a module that was never fitted."""
        self.run_probe(example if isinstance(example, Batch) else Batch(example), stage)

    def run_probe(self, batch: Batch, stage: str = "fit", num_samples: Optional[int] = None) -> None:
        """Probe on ``batch``, then build every shape-dependent part (:meth:`on_probe`) and the metrics -- all in
        eval mode under ``no_grad``. The checkpoint keeps the spec of its first samples (:func:`batch_spec`)."""
        if stage != "load":
            self._check_probe_batch(batch, stage)
        if num_samples is None and stage != "load":
            num_samples = self.training_set_size()
        with self._probing():
            student, teacher = self.probe_outputs(batch)
            probe = Probe(batch, student, teacher, num_samples, getattr(self, "student", None), stage,
                          getattr(self, "student_routing", None))
            num_classes = self.on_probe(probe)
        self._probe_spec = {"batch": batch_spec(batch), "num_samples": num_samples}
        self.eval_metrics = self.build_metrics(num_classes, self.has_teacher).to(self.device)
        self._probe_pending = False

    def _check_probe_batch(self, batch: Batch, stage: str) -> None:
        """No samples (always refused: an empty training set gets its own message), then -- with
        ``check_batches`` -- the input checks, before the models run on the example."""
        inp = batch.input if batch.input is not None else next(iter((batch.inputs or {}).values()), None)
        if isinstance(inp, Tensor) and inp.ndim > 0 and inp.shape[0] == 0:
            raise BadDataError(self._empty_probe_message(stage))
        if self.check_batches:
            check_inputs(batch, "the example batch of the shape probe (run before training)",
                         model_dtype=self._model_dtype(), model_name=self._model_name())

    def _model_dtype(self) -> Optional[torch.dtype]:
        """The floating dtype of the trained model's parameters (``None`` without any)."""
        try:
            model = self.trained_model
        except AttributeError:
            return None
        return next((p.dtype for p in model.parameters() if p.is_floating_point()), None)

    def _model_name(self) -> str:
        try:
            return f"the {'student' if getattr(self, 'student', None) is not None else 'model'} " \
                   f"({type(self.trained_model).__name__})"
        except AttributeError:
            return "the model"

    # -------------------------------------------------- the first batches' data checks
    def _batch_dtype_to_check(self) -> Optional[torch.dtype]:
        """The dtype inputs must have at a training / evaluation step, or ``None`` where Lightning's precision
        converts (``"64-true"``, ``"bf16-true"``) or autocasts (mixed precisions) them itself."""
        trainer = self.attached_trainer
        if trainer is not None and str(trainer.precision) not in ("32-true", "32"):
            return None
        return self._model_dtype()

    def _check_first_batch(self, batch: Any, stage: str, where: str) -> None:
        """The data checks of one of the first batches: inputs before anything runs on them (the probe of the
        first batch included), labels once the probe has found the number of classes."""
        b = unpack_batch(batch)
        check_inputs(b, where, model_dtype=self._batch_dtype_to_check(), model_name=self._model_name())
        self._probe_first_batch(batch, stage)
        check_targets(b, where, self.num_classes, self.ignore_index)

    @staticmethod
    def _eval_where(kind: str, batch_idx: int, dataloader_idx: int, trainer: Optional[L.Trainer]) -> str:
        where = f"{kind} batch {batch_idx}"
        if dataloader_idx:
            where += f" of dataloader {dataloader_idx}"
        if trainer is not None and trainer.sanity_checking:
            where += " (sanity check before training)"
        return where

    # -------------------------------------------------- the non-finite loss guard
    def on_before_backward(self, loss: Tensor) -> None:
        """Stop at a NaN / Inf loss (``check_finite_loss``): on the CPU every step, before its backward pass;
        on accelerators the step's ``isfinite`` joins a flag on the device, read every ``log_every_n_steps``."""
        if not self.check_finite_loss or not isinstance(loss, Tensor):
            return
        if self._loss_reads_without_sync(loss):
            value = loss.detach()
            if value.numel() == 1 and not math.isfinite(float(value)):
                self._raise_nonfinite_loss(float(value))
            elif value.numel() != 1 and not bool(torch.isfinite(value).all()):
                self._raise_nonfinite_loss(float("nan"))
            self.__dict__["_step_terms"] = None
            return
        finite = torch.isfinite(loss.detach()).all()
        pending = self.__dict__.get("_finite_pending")
        self.__dict__["_finite_pending"] = finite if pending is None else pending.logical_and(finite)
        if self.should_log_step():
            self._check_finite_pending(through=self.trainer.global_step)
        self.__dict__["_step_terms"] = None

    @staticmethod
    def _loss_reads_without_sync(loss: Tensor) -> bool:
        """Whether reading the loss on the host is free (a CPU tensor) rather than a device sync."""
        return loss.device.type == "cpu"

    def _check_finite_pending(self, through: Optional[int] = None) -> None:
        """Read the device flag of the steps since the last check (a device sync) and raise if one of their losses
        was non-finite. Called on logged steps (``through``: this step), at epoch / training end and before a
        checkpoint is written (then every finished step: ``global_step - 1``)."""
        pending = self.__dict__.get("_finite_pending")
        trainer = self.attached_trainer
        if pending is None or trainer is None:
            return
        self.__dict__["_finite_pending"] = None
        first = self._finite_checked_step + 1
        self._finite_checked_step = through = trainer.global_step - 1 if through is None else through
        if not bool(pending):
            self._raise_nonfinite_loss(float("nan"), step=through, first_step=first)

    def _raise_nonfinite_loss(self, value: float, step: Optional[int] = None, first_step: Optional[int] = None) -> None:
        trainer = self.attached_trainer
        if step is None:
            step = trainer.global_step if trainer is not None else 0
        epoch = trainer.current_epoch if trainer is not None else 0
        terms = self.__dict__.get("_step_terms") or {}
        self.__dict__["_finite_pending"] = None
        raise NonFiniteLossError(nonfinite_loss_message(value, step, epoch, terms, first_step))

    def on_train_epoch_end(self) -> None:
        self._check_finite_pending()

    def on_train_end(self) -> None:
        self._check_finite_pending()

    @contextmanager
    def _probing(self) -> Iterator[None]:
        """Eval mode and ``no_grad`` (no BatchNorm update, no dropout); afterwards every submodule gets its
        train / eval flag back, and modules created meanwhile get the module's own flag."""
        modes = {id(m): m.training for m in self.modules()}
        was_training = self.training
        nn.Module.train(self, False)
        try:
            with torch.no_grad():
                yield
        finally:
            for module in self.modules():
                module.training = modes.get(id(module), was_training)

    def probe(self, batch: Any) -> tuple[ModelOutputs, Optional[ModelOutputs]]:
        """:meth:`probe_outputs` of ``batch`` (a batch or an input) in eval mode under ``no_grad``."""
        with self._probing():
            return self.probe_outputs(batch if isinstance(batch, Batch) else Batch(batch))

    def probe_outputs(self, batch: Batch) -> tuple[ModelOutputs, Optional[ModelOutputs]]:
        """``(trained model outputs, teacher outputs or None)`` for the probe ``batch``."""
        raise NotImplementedError

    @property
    def trained_model(self) -> nn.Module:
        """The network whose accuracy ``val/acc`` reports."""
        return getattr(self, "student", None) or self.model

    def on_probe(self, probe: Probe) -> int:
        """Check the probed output shapes; return the number of classes. Extend to build parts."""
        output = probe.student.logits
        n_out = int(output.shape[-1])
        trained = self.trained_model
        self.token_level = output.ndim == 3
        self.check_teacher_outputs(probe, n_out)
        self._check_num_classes(n_out, f"the model ({type(trained).__name__})")
        self.num_classes = n_out
        return n_out

    def check_teacher_outputs(self, probe: Probe, num_classes: int) -> None:
        """Check the probed teacher outputs against the student's ``num_classes`` (modules with a teacher)."""

    def datamodule_num_classes(self) -> Optional[int]:
        value = getattr(self._datamodule(), "num_classes", None)
        return int(value) if isinstance(value, int) else None

    def _check_num_classes(self, found: int, source: str) -> None:
        for name, expected in (("num_classes", self.num_classes), ("the datamodule's num_classes", self.datamodule_num_classes())):
            if expected is not None and expected != found:
                raise ValueError(
                    f"{source} predicts {found} classes but {name} is {expected}. Build the model with "
                    f"num_classes={expected} (init_args.num_classes in YAML) or use matching data."
                )

    @property
    def has_teacher(self) -> bool:
        return getattr(self, "teacher", None) is not None

    # -------------------------------------------------- the first batch's probe (dataloaders passed to fit)
    def _probe_first_batch(self, batch: Any, stage: str) -> None:
        if not self._probe_pending:
            return
        trainer = self.attached_trainer
        before = {id(p) for p in self.parameters()}
        modules_before = {id(m) for m in self.modules()}
        self.run_probe(unpack_batch(batch), stage)
        created = [p for p in self.parameters() if id(p) not in before and p.requires_grad]
        fitting = trainer is not None and trainer.state.fn == "fit"
        if fitting:  # parts built during the sanity check's validation will train: Lightning restores the
            # train / eval flags it saw before validation, and these did not exist then
            for module in self.modules():
                if id(module) not in modules_before:
                    module.training = True
        if created and fitting:
            if trainer.world_size > 1:
                raise ValueError(
                    f"{type(self).__name__} builds trained parts from a probe of the models, and found no example "
                    "before the distributed model was set up (dataloaders passed straight to trainer.fit): their "
                    "gradients would not be synchronised across processes. Set `module.example_input_array` to "
                    "one input batch, or pass the data as a LightningDataModule."
                )
            # the optimizer (configured before any batch was seen) must hold the new parts: configure it again,
            # now (a sanity-check validation batch) or before the first step reads it (the first training batch)
            trainer.strategy.setup_optimizers(trainer)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> Optional[int]:
        self.__dict__["_step_terms"] = None
        if self._train_checks:
            self._train_checks -= 1
            self._check_first_batch(batch, "fit", f"training batch {batch_idx} (epoch {self.current_epoch})")
        else:
            self._probe_first_batch(batch, "fit")
        return None

    def on_validation_batch_start(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        if self._val_checks:
            self._val_checks -= 1
            where = self._eval_where("validation", batch_idx, dataloader_idx, self.attached_trainer)
            self._check_first_batch(batch, "validate", where)
        else:
            self._probe_first_batch(batch, "validate")

    def on_test_batch_start(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        if self._test_checks:
            self._test_checks -= 1
            self._check_first_batch(batch, "test", self._eval_where("test", batch_idx, dataloader_idx, None))
        else:
            self._probe_first_batch(batch, "test")

    def on_predict_batch_start(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._probe_first_batch(batch, "predict")

    def on_fit_end(self) -> None:
        trainer = self.trainer
        loader = trainer.train_dataloader
        if trainer.global_step == 0 and trainer.limit_train_batches != 0 and loader is not None:
            try:
                empty = len(loader) == 0
            except TypeError:
                empty = False
            if empty:
                raise BadDataError(self._empty_training_set_message(loader))

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse to save weights after a non-finite loss (``check_finite_loss``: a checkpoint is never written
        from them); record the probe spec and the module's class (named when another class resumes it)."""
        self._check_finite_pending()
        entry = checkpoint.setdefault(CKPT_KEY, {})
        entry["probe"] = self._probe_spec
        entry["module"] = f"{type(self).__module__}.{type(self).__qualname__}"
        trainer = self.attached_trainer
        if trainer is not None and trainer.world_size == 1:
            entry["rng"] = _rng_states()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse a checkpoint another module class wrote whose weights do not fit this one (naming both classes),
        then rebuild every shape-dependent part from the saved probe spec, so that its weights can load."""
        from lightning_distill.checkpoint import check_checkpoint_class

        trainer = self.attached_trainer
        path = getattr(trainer, "ckpt_path", None) if trainer is not None else None
        spec = checkpoint.get(CKPT_KEY, {}).get("probe")
        try:
            if spec is not None and not self.probed:
                self.run_probe(batch_from_spec(spec["batch"]), "load", spec.get("num_samples"))
        except Exception:
            check_checkpoint_class(checkpoint, self, path, "ckpt_path", fits=False)  # another class: say so
            raise
        check_checkpoint_class(checkpoint, self, path, "ckpt_path")  # once the probe has built every part
        rng = checkpoint.get(CKPT_KEY, {}).get("rng")
        if rng is not None and trainer is not None and trainer.world_size == 1 and path is not None:
            _set_rng_states(rng)  # resuming a fit: dropout masks and random augmentations continue as uninterrupted

    # ------------------------------------------------------------------ evaluation
    def eval_logits(self, batch: Batch) -> tuple[Tensor, Optional[Tensor]]:
        """``(logits of the evaluated model, teacher logits or None)`` of an evaluation batch."""
        raise NotImplementedError

    def _eval_step(self, stage: str, batch: Any) -> None:
        b = self.read_batch(batch)
        logits, teacher_logits = self.eval_logits(b)
        self.update_eval_metrics(stage, logits, b.target, teacher_logits)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._eval_step("val", batch)

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._eval_step("test", batch)

    # ------------------------------------------------------------------ metrics
    def build_metrics(self, num_classes: int, with_teacher: bool) -> nn.ModuleDict:
        """One metric collection per evaluation stage (``val``, ``test``): :mod:`lightning_distill.metrics`."""
        return build_eval_metrics(num_classes, self.token_level, with_teacher)

    def update_eval_metrics(
        self, stage: str, logits: Tensor, target: Optional[Tensor], teacher_logits: Optional[Tensor] = None
    ) -> None:
        """Update and log ``{stage}/acc``, ``/acc_top5``, ``/ece``, ``/loss`` (+ teacher metrics)."""
        from lightning_distill.losses import kl_per_position

        metrics = self.eval_metrics[stage]
        flat = logits.reshape(-1, logits.shape[-1]).float()
        flat_teacher = teacher_logits.reshape(-1, teacher_logits.shape[-1]).float() if teacher_logits is not None else None
        n = flat.shape[0]
        if target is not None:
            flat_target = target.reshape(-1)
            valid = flat_target != self.ignore_index
            if not bool(valid.all()):
                flat, flat_target = flat[valid], flat_target[valid]
                flat_teacher = flat_teacher[valid] if flat_teacher is not None else None
            if flat.shape[0] > 0:
                metrics["acc"].update(flat, flat_target)
                metrics["ece"].update(flat.softmax(-1), flat_target)
                token_ce = F.cross_entropy(flat, flat_target, reduction="none")
                metrics["loss"].update(token_ce.mean(), weight=flat.shape[0])
                if "perplexity" in metrics:
                    metrics["perplexity"].update(token_ce)
                if "acc_top5" in metrics:
                    metrics["acc_top5"].update(flat, flat_target)
                if flat_teacher is not None and "teacher_acc" in metrics:
                    metrics["teacher_acc"].update(flat_teacher, flat_target)
                if flat_teacher is not None and "teacher_perplexity" in metrics:
                    metrics["teacher_perplexity"].update(F.cross_entropy(flat_teacher, flat_target, reduction="none"))
        if flat_teacher is not None and "agreement" in metrics and flat.shape[0] > 0:
            metrics["agreement"].update(flat, flat_teacher.argmax(-1))
            metrics["kl"].update(kl_per_position(flat, flat_teacher, 1.0, "forward"))
        # only metrics that have seen a sample: an epoch whose targets are all ignore_index (unlabelled data, or
        # a sanity check on padding) has nothing for the label metrics, and computing them would fail or show 0
        updated = {f"{stage}/{name}": m for name, m in metrics.items() if name != "acc" and m.update_count}
        if updated:
            self.log_dict(updated, on_step=False, on_epoch=True, batch_size=n, prog_bar=False)
        if metrics["acc"].update_count:
            self.log(f"{stage}/acc", metrics["acc"], on_step=False, on_epoch=True, batch_size=n, prog_bar=True)

    @staticmethod
    def logits_of(output: Any) -> Tensor:
        """The logits of any model output (:func:`lightning_distill.outputs.as_outputs`)."""
        return output if isinstance(output, Tensor) else as_outputs(output).logits


def _rng_states() -> dict[str, Any]:
    """The global random states (torch CPU and CUDA, NumPy, Python) in types ``torch.load(weights_only=True)``
    reads: Lightning's checkpoints do not hold them, so without them a resumed run draws other dropout masks and
    augmentations than the uninterrupted run."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    states: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss),
                  "gauss": float(gauss)},
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def _set_rng_states(states: Mapping[str, Any]) -> None:
    """Restore what :func:`_rng_states` saved (entries a checkpoint lacks are left alone)."""
    if "torch" in states:
        torch.set_rng_state(states["torch"])
    numpy_state = states.get("numpy")
    if numpy_state is not None:
        keys = numpy_state["keys"].numpy().astype(np.uint32)
        np.random.set_state(("MT19937", keys, numpy_state["pos"], numpy_state["has_gauss"], numpy_state["gauss"]))
    if "python" in states:
        version, internal, gauss_next = states["python"]
        random.setstate((version, tuple(internal), gauss_next))
    if "cuda" in states and torch.cuda.is_available() and len(states["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(states["cuda"])
