"""``Objective``: one loss term of a distillation run, with its hyperparameters and trained parts.

A :class:`~lightning_distill.distiller.DistillationModule` holds its objectives by name
(``module.objectives["kd"]``). At every training step each objective receives the student's and the
teacher's :class:`~lightning_distill.outputs.ModelOutputs`, the :class:`~lightning_distill.batch.Batch`
and a :class:`StepInfo`, and returns its named terms:

* ``"loss"`` -- its contribution to the total loss, already weighted (``weight * value`` plus any
  penalty it owns, e.g. a learned temperature's anchor);
* ``"<name>_loss"`` -- its value before weighting (logged as ``train/<name>_loss``);
* anything else worth logging (``temperature``, ``lambda``, ...).

The module sums the contributions. An objective declares the layers it reads
(:meth:`Objective.student_layers` / :meth:`Objective.teacher_layers`, captured by forward hooks into
``ModelOutputs.features``), builds trained parts from a :class:`~lightning_distill.probe.Probe` in
:meth:`Objective.build` (the module calls it before the optimizer exists and again, from the saved
probe spec, when a checkpoint loads), and may give its parameters their own optimizer groups.

Writing one::

    class MyLoss(Objective):
        name = "my"                      # default key: logged as train/my_loss

        def forward(self, student, teacher, batch, step):
            value = (student.logits - teacher.logits).pow(2).mean()
            return self.terms(value)     # {"loss": weight * value, "my_loss": value}
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

import torch
from torch import Tensor, nn

from lightning_distill.batch import Batch
from lightning_distill.outputs import ModelOutputs
from lightning_distill.probe import Probe
from lightning_distill.validation import check_float

__all__ = ["Objective", "StepInfo", "named_objectives"]


class StepInfo:
    """Where training stands at this step: ``epoch`` (0-based) and ``progress`` (fractional epochs).

    ``progress`` is read from the trainer only when an objective asks for it.
    """

    __slots__ = ("epoch", "_module", "_progress")

    def __init__(self, epoch: int = 0, module: Any = None, progress: Optional[float] = None) -> None:
        self.epoch = epoch
        self._module = module
        self._progress = progress

    @property
    def progress(self) -> float:
        if self._progress is None:
            self._progress = _fractional_epoch(self._module, self.epoch)
        return self._progress


def _fractional_epoch(module: Any, epoch: int) -> float:
    trainer = getattr(module, "attached_trainer", None)
    if trainer is None:
        return float(epoch)
    batches = trainer.num_training_batches
    if isinstance(batches, (int, float)) and 0 < batches < float("inf"):
        done = trainer.fit_loop.epoch_loop.batch_progress.current.ready - 1
        return float(epoch) + max(done, 0) / batches
    return float(epoch)


class Objective(nn.Module):
    """Base class of every objective (see the module docstring).

    Args:
        weight: the objective's weight in the total loss (``>= 0``; 0 keeps it in the graph and in
            the logs without training on it).
    """

    #: default key in ``DistillationModule.objectives`` (and prefix of the logged ``<name>_loss``)
    name: str = "objective"
    #: whether the objective reads teacher outputs; without a teacher it contributes 0
    needs_teacher: bool = True
    #: the positions its value is a mean over on token-level data: ``"tokens"`` (the real, unpadded tokens) or
    #: ``"labels"`` (the labelled ones); ``loss_normalization="tokens"`` turns the mean back into a sum with it
    averages_over: str = "tokens"
    #: model outputs beyond the logits it reads from both models: ``"hidden_states"``, ``"attentions"``
    #: (Hugging Face models are asked for them, :func:`lightning_distill.hf.request_outputs`)
    model_outputs: tuple[str, ...] = ()

    def __init__(self, weight: float = 1.0) -> None:
        super().__init__()
        self.weight = check_float("weight", weight, 0.0)
        self.key = self.name

    @property
    def key(self) -> str:
        """The objective's key in ``DistillationModule.objectives`` (the prefix of its logged ``<key>_loss``)."""
        return self._key

    @key.setter
    def key(self, value: str) -> None:
        self._key = value
        self._loss_name = f"{value}_loss"  # built once, not on every step

    def extra_repr(self) -> str:
        return f"weight={self.weight}"

    # ------------------------------------------------------------------ what the objective reads
    def student_layers(self) -> dict[str, int]:
        """``{layer name: tuple element}`` of the student to capture (outputs of named submodules)."""
        return {}

    def teacher_layers(self) -> dict[str, int]:
        """``{layer name: tuple element}`` of the teacher to capture."""
        return {}

    #: the arguments that named the student's / the teacher's layers (for error messages)
    student_layer_argument: str = "layers"
    teacher_layer_argument: str = "layers"

    # ------------------------------------------------------------------ trained parts
    def build(self, probe: Probe) -> None:
        """Create parts whose sizes depend on the models (called with the probe, before the optimizer exists)."""

    @property
    def needs_probe(self) -> bool:
        """Whether :meth:`build` still has parts to create (then training cannot start without a probe)."""
        return False

    def parameter_groups(self) -> list[dict]:
        """Optimizer groups with their own settings (``lr``, ``weight_decay``); parameters not listed here
        join the optimizer's default group."""
        return []

    def extra_state(self) -> dict[str, Any]:
        """State saved in checkpoints besides parameters and buffers (e.g. a random generator)."""
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        """Restore :meth:`extra_state`."""

    def check_batch(self, batch: Batch) -> None:
        """Refuse a training batch the objective cannot use (called on the first batch, before any forward)."""

    def on_train_start(self, module: Any) -> None:
        """Called when training starts (``module`` is the LightningModule): per-sample state that needs the
        training set can be created here."""

    # ------------------------------------------------------------------ the term
    def terms(self, value: Tensor, penalty: Optional[Tensor] = None, **logs: Tensor) -> dict[str, Tensor]:
        """``{"loss": weight * value (+ penalty), "<key>_loss": value, **logs}``."""
        loss = self.weight * value if penalty is None else self.weight * value + penalty
        return {"loss": loss, self._loss_name: value, **logs}

    def zero(self, like: Optional[Tensor]) -> dict[str, Tensor]:
        """The terms of a step where the objective has nothing to compare (no teacher): zeros."""
        device = like.device if like is not None else None
        return self.terms(torch.zeros((), device=device))

    def forward(
        self, student: ModelOutputs, teacher: Optional[ModelOutputs], batch: Batch, step: StepInfo
    ) -> dict[str, Tensor]:
        raise NotImplementedError(f"{type(self).__name__} must implement forward()")


def named_objectives(objectives: Any) -> dict[str, Objective]:
    """``{name: objective}`` from a mapping or a list (named by each objective's ``name``); every objective
    learns its key (the prefix of its logged ``<key>_loss``)."""
    if objectives is None:
        return {}
    items = list(objectives.items()) if isinstance(objectives, Mapping) else [(None, o) for o in objectives]
    named: dict[str, Objective] = {}
    for key, objective in items:
        if not isinstance(objective, Objective):
            raise TypeError(
                f"`objectives` must hold lightning_distill.objectives.Objective instances, got "
                f"{type(objective).__name__}{f' under {key!r}' if key else ''}."
            )
        key = key or objective.name
        if key in named:
            raise ValueError(
                f"`objectives` has two objectives named {key!r}; give them distinct names with a mapping "
                "({name: objective}), e.g. {kd: ..., kd_late: ...}."
            )
        objective.key = str(key)
        named[str(key)] = objective
    return named
