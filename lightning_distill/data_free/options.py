"""The options of one DeepInversion run, checked and normalised before the teacher is touched.

:func:`~lightning_distill.data_free.deep_inversion` hands its arguments to
:class:`InversionOptions`, which refuses a bad value with a message that names the argument and says
what is valid, converts the rest (``input_shape`` to a tuple, numbers to ``int`` / ``float``, the
targets to a CPU ``LongTensor``) and derives what the optimisation needs from the teacher: the
device and dtype to work in and the weight of every BatchNorm layer in the feature prior. The
optimisation steps then read one object instead of twenty arguments.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import InitVar, dataclass, field
from typing import Any, Literal, Optional, Sequence, Union, get_args

import torch
from torch import Tensor, nn

from lightning_distill.data_free.priors import batchnorm_layers
from lightning_distill.validation import check_bool, check_choice, check_float, check_int

__all__ = ["ADAM_BETAS", "InversionOptions", "LRSchedule"]

#: how the Adam learning rate evolves over the steps of one batch
LRSchedule = Literal["cosine", "constant"]
_LR_SCHEDULES = get_args(LRSchedule)
#: Adam's betas, as in the official DeepInversion code
ADAM_BETAS = (0.5, 0.9)


@dataclass
class InversionOptions:
    """The checked arguments of :func:`~lightning_distill.data_free.deep_inversion` (see it for their meaning).

    Build it with the call's arguments, ``teacher`` included; every field is validated and
    normalised in place, in the order of the signature, so the first bad argument is the one
    reported. ``dtype`` and ``layer_weights`` are derived from the teacher: the dtype of its
    floating-point parameters, and the weight of each BatchNorm layer in ``R_feature`` with
    ``first_bn_multiplier`` already applied to the first (``None`` when ``bn_weight == 0``).

    Raises:
        TypeError: ``teacher`` is not a module, or an argument has the wrong type.
        ValueError: an argument out of range, or a teacher without BatchNorm statistics while
            ``bn_weight > 0``.
    """

    teacher: InitVar[nn.Module]
    num_samples: int
    input_shape: tuple[int, ...]
    num_classes: int
    batch_size: int
    steps: int
    lr: float
    lr_schedule: str
    bn_weight: float
    first_bn_multiplier: float
    bn_layer_weights: Optional[Sequence[float]]
    tv_weight: float
    l2_weight: float
    ce_weight: float
    jitter: int
    flip: bool
    input_range: Optional[tuple[float, float]]
    targets: Tensor
    seed: int
    progress: bool
    device: torch.device
    dtype: torch.dtype = field(init=False)
    layer_weights: Optional[list[float]] = field(init=False)

    def __post_init__(self, teacher: nn.Module) -> None:
        if not isinstance(teacher, nn.Module):
            raise TypeError(f"`teacher` must be a torch.nn.Module, got {type(teacher).__name__}: {teacher!r}.")
        n = self.num_samples
        if isinstance(n, numbers.Integral) and not isinstance(n, bool) and n < 1:  # callers match this wording
            raise ValueError(f"`num_samples` must be an int >= 1, got {n!r}.")
        self.num_samples = check_int("num_samples", n, 1, type_error=True)
        self.input_shape = _check_input_shape(self.input_shape)
        self.num_classes = check_int(
            "num_classes", self.num_classes, 2, hint=" The teacher must be a classifier with >= 2 classes.",
            type_error=True,
        )  # fmt: skip
        self.batch_size = check_int("batch_size", self.batch_size, 1, type_error=True)
        self.steps = check_int("steps", self.steps, 1, type_error=True)
        self.lr = check_float("lr", self.lr, 0, low_open=True, hint=" Try 0.1 for inputs in [0, 1].", type_error=True)
        self.lr_schedule = check_choice("lr_schedule", self.lr_schedule, _LR_SCHEDULES)
        self._check_weights()
        self._check_augmentation()
        self.input_range = _check_input_range(self.input_range)
        self.targets = _check_targets(self.targets, self.num_samples, self.num_classes)
        self.seed = check_int("seed", self.seed, 0, type_error=True)
        self.progress = check_bool("progress", self.progress)
        self.device = _teacher_device(teacher, self.device)
        floating = [t for t in teacher.parameters() if t.is_floating_point()]
        self.dtype = floating[0].dtype if floating else torch.float32
        self.layer_weights = self._bn_layer_weights(teacher) if self.bn_weight > 0 else None

    def _check_weights(self) -> None:
        for name in ("bn_weight", "first_bn_multiplier", "tv_weight", "l2_weight", "ce_weight"):
            setattr(self, name, check_float(name, getattr(self, name), 0, type_error=True))
        if self.bn_weight == self.tv_weight == self.l2_weight == self.ce_weight == 0:
            raise ValueError(
                "`bn_weight`, `tv_weight`, `l2_weight` and `ce_weight` are all 0: there is nothing to optimise. "
                "DeepInversion uses ce_weight=1 and bn_weight > 0."
            )

    def _check_augmentation(self) -> None:
        """``jitter``, ``flip`` and the TV prior need spatial dimensions to work on."""
        self.jitter = check_int("jitter", self.jitter, 0, type_error=True)
        spatial = self.input_shape[1:]
        if self.jitter and (not spatial or self.jitter >= min(spatial)):
            raise ValueError(
                f"`jitter`={self.jitter!r} needs spatial dimensions larger than the shift, but "
                f"`input_shape`={self.input_shape!r} has spatial size {spatial!r}; use jitter=0 for inputs without "
                "spatial dimensions, or a smaller jitter."
            )
        if not isinstance(self.flip, bool):  # worded as before: callers match "must be a bool"
            raise TypeError(f"`flip` must be a bool, got {type(self.flip).__name__}: {self.flip!r}.")
        if self.flip and not spatial:
            raise ValueError(
                f"`flip`=True needs a spatial dimension to mirror, but `input_shape`={self.input_shape!r}."
            )
        if self.tv_weight and not spatial:
            raise ValueError(
                f"`tv_weight`={self.tv_weight!r} needs spatial dimensions (total variation compares neighbouring "
                f"pixels), but `input_shape`={self.input_shape!r}; set tv_weight=0."
            )

    def _bn_layer_weights(self, teacher: nn.Module) -> list[float]:
        """One weight per BatchNorm layer of ``teacher``, the first multiplied by ``first_bn_multiplier``."""
        bn_names, _ = batchnorm_layers(teacher)
        given = self.bn_layer_weights
        if given is None:
            weights = [1.0] * len(bn_names)
        else:
            if isinstance(given, (str, bytes)) or not isinstance(given, Sequence):
                raise TypeError(
                    f"`bn_layer_weights` must be None or a sequence of numbers, one per BatchNorm layer, got "
                    f"{type(given).__name__}: {given!r}."
                )
            if len(given) != len(bn_names):
                raise ValueError(
                    f"`bn_layer_weights` has {len(given)} entries but the teacher has {len(bn_names)} "
                    f"BatchNorm layers {bn_names!r}: pass one weight per layer, or None."
                )
            weights = [check_float(f"bn_layer_weights[{i}]", w, 0, type_error=True) for i, w in enumerate(given)]
        weights[0] *= self.first_bn_multiplier
        return weights

    @property
    def num_batches(self) -> int:
        """Batches of ``batch_size`` optimised one after another (the last may be smaller)."""
        return math.ceil(self.num_samples / self.batch_size)

    def lr_at(self, step: int) -> float:
        """The learning rate of ``step``: ``lr`` decayed to 0 over ``steps`` by a half cosine, or constant."""
        if self.lr_schedule == "cosine":
            return 0.5 * self.lr * (1.0 + math.cos(math.pi * step / self.steps))
        return self.lr


def _check_input_shape(input_shape: Any) -> tuple[int, ...]:
    if isinstance(input_shape, (str, bytes)) or not isinstance(input_shape, Sequence) or isinstance(
        input_shape, Tensor
    ):
        raise TypeError(
            f"`input_shape` must be a tuple of ints without the batch dimension, e.g. (1, 8, 8) for digits, "
            f"got {type(input_shape).__name__}: {input_shape!r}."
        )
    if not input_shape or any(isinstance(d, bool) or not isinstance(d, numbers.Integral) or d < 1 for d in input_shape):
        raise ValueError(
            f"`input_shape` must be a non-empty tuple of positive ints without the batch dimension, e.g. (1, 8, 8) "
            f"for digits or (3, 32, 32) for CIFAR, got {tuple(input_shape)!r}."
        )
    return tuple(int(d) for d in input_shape)


def _check_input_range(input_range: Any) -> Optional[tuple[float, float]]:
    if input_range is None:
        return None
    ok = (
        isinstance(input_range, Sequence)
        and not isinstance(input_range, (str, bytes))
        and len(input_range) == 2
        and all(isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v) for v in input_range)
    )
    if not ok or not input_range[0] < input_range[1]:
        raise ValueError(
            f"`input_range` must be None (no clamping) or (low, high) with finite low < high, e.g. (0.0, 1.0) for "
            f"digits, got {input_range!r}."
        )
    return float(input_range[0]), float(input_range[1])


def _check_targets(targets: Optional[Tensor], num_samples: int, num_classes: int) -> Tensor:
    if targets is None:
        return torch.arange(num_samples) % num_classes  # balanced round-robin: 0, 1, ..., C-1, 0, 1, ...
    if not isinstance(targets, Tensor):
        raise TypeError(
            f"`targets` must be None (balanced round-robin classes) or an integer tensor of shape [num_samples], "
            f"got {type(targets).__name__}: {targets!r}."
        )
    if targets.dtype.is_floating_point or targets.dtype.is_complex or targets.dtype == torch.bool:
        raise TypeError(f"`targets` must hold integer class indices, got dtype {targets.dtype}; use targets.long().")
    if tuple(targets.shape) != (num_samples,):
        raise ValueError(
            f"`targets` must have shape [num_samples]=({num_samples},), got {tuple(targets.shape)!r}; pass one class "
            "index per sample, or None for balanced classes."
        )
    if targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= num_classes):
        raise ValueError(
            f"`targets` must be class indices in [0, num_classes={num_classes}), got values from "
            f"{int(targets.min())} to {int(targets.max())}."
        )
    return targets.detach().to("cpu", torch.long).clone()


def _teacher_device(teacher: nn.Module, device: Optional[Union[str, torch.device]]) -> torch.device:
    tensors = [*teacher.parameters(), *teacher.buffers()]
    own = tensors[0].device if tensors else None
    if device is None:
        return own if own is not None else torch.device("cpu")
    try:
        wanted = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"`device`={device!r} is not a torch device ('cpu', 'cuda', 'cuda:0', ...): {err}") from None
    if own is not None and (own.type != wanted.type or (wanted.index is not None and own.index != wanted.index)):
        raise ValueError(
            f"`device`={device!r} but the teacher's tensors are on {own}: deep_inversion never moves the teacher. "
            "Move it first (teacher.to(device)) or leave device=None to use the teacher's device."
        )
    return own if own is not None else wanted
