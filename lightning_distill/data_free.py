"""Data-free distillation: synthesise a transfer set from the teacher alone (DeepInversion).

DeepInversion (Yin et al., CVPR 2020, "Dreaming to Distill: Data-free Knowledge Transfer via
DeepInversion", arXiv:1912.08795) optimises a batch of random inputs ``x̂`` so that a frozen
teacher ``f`` (in eval mode) classifies them as chosen targets ``y`` *and* so that the
activations they produce have the statistics stored in the teacher's BatchNorm layers::

    min_x̂  ce_weight · CE(f(x̂), y)
         + bn_weight · R_feature(x̂)
         + tv_weight · R_TV(x̂) + l2_weight · R_ℓ2(x̂)

    R_feature(x̂) = Σ_l w_l ( ||μ_l(x̂) − μ_l^BN||₂ + ||σ²_l(x̂) − σ²_l^BN||₂ )

where ``μ_l(x̂)`` / ``σ²_l(x̂)`` are the per-channel batch mean and (biased) variance of the
*input* of BatchNorm layer ``l`` and ``μ_l^BN`` / ``σ²_l^BN`` its ``running_mean`` /
``running_var``. The saved inputs are then a transfer set: train a student on them with any
strategy (e.g. :class:`~lightning_distill.KnowledgeDistillation`), which only needs inputs.

From the command line (defaults tuned for the shipped digits teacher: 2,000 samples in about
40 s on a busy 2-core CPU, all 2,000 classified by the teacher as their target)::

    python -m lightning_distill.data_free --teacher-model digits_cnn --teacher zoo:digits_cnn \\
        --num-classes 10 --input-shape 1 8 8 --num-samples 2000 --out data/digits_deepinversion.pt

The command line runs torch with one intra-op thread (``--num-threads``): the tensors of one
step are tiny and extra threads made each step 10-30x slower on a shared 2-core machine. From
Python, call ``torch.set_num_threads(1)`` yourself for small CPU teachers.

The file is a ``torch.save`` dict of plain tensors and Python values -- ``"inputs"``
(``[num_samples, *input_shape]``), ``"targets"``, ``"teacher_acc"``, ``"loss_history"``,
``"meta"`` -- readable with ``torch.load(path, weights_only=True)`` (see
:func:`load_transfer_set`); code that reads unlabeled arrays uses its ``"inputs"`` key.
"""

from __future__ import annotations

import argparse
import inspect
import math
import numbers
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "BNStatisticsHook",
    "bn_statistics_loss",
    "deep_inversion",
    "input_l2_prior",
    "load_transfer_set",
    "main",
    "save_transfer_set",
    "total_variation_prior",
]

_BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
_LR_SCHEDULES = ("cosine", "constant")
_NO_BN_HINT = (
    "DeepInversion needs BN statistics: its feature prior matches the running_mean / running_var "
    "of the teacher's BatchNorm layers (nn.BatchNorm1d/2d/3d with track_running_stats=True)"
)


# --------------------------------------------------------------------------------------------
# the BatchNorm statistics prior
# --------------------------------------------------------------------------------------------


def bn_statistics_loss(
    batch_means: Sequence[Tensor],
    batch_vars: Sequence[Tensor],
    running_means: Sequence[Tensor],
    running_vars: Sequence[Tensor],
    layer_weights: Optional[Sequence[float]] = None,
) -> Tensor:
    """DeepInversion's feature-distribution prior R_feature (Yin et al. 2020, eq. 4).

    .. math::

        R_{feature} = \\sum_l w_l \\left( \\lVert \\mu_l(x) - \\mu_l^{BN} \\rVert_2
                      + \\lVert \\sigma^2_l(x) - \\sigma^{2,BN}_l \\rVert_2 \\right)

    The norms are plain Euclidean norms over channels, **not squared** -- the paper's form and
    the official code's (``torch.norm(running_var - var, 2) + torch.norm(running_mean - mean, 2)``).
    Computed in float32.

    Args:
        batch_means: per layer, the batch mean of the layer's input per channel, shape ``[C_l]``.
        batch_vars: per layer, the biased batch variance per channel, shape ``[C_l]``.
        running_means: per layer, the BatchNorm's ``running_mean``, shape ``[C_l]``.
        running_vars: per layer, the BatchNorm's ``running_var``, shape ``[C_l]``.
        layer_weights: ``w_l`` per layer (>= 0); ``None`` weighs every layer 1. The official
            code multiplies the first layer by ``first_bn_multiplier=10``; :func:`deep_inversion`
            builds these weights for you.

    Returns:
        A scalar tensor.

    Raises:
        ValueError: sequences of different lengths, no layer at all, a shape mismatch within
            a layer, or a negative weight.

    Example::

        >>> import torch
        >>> loss = bn_statistics_loss(
        ...     [torch.tensor([3.0, 4.0])], [torch.tensor([1.0, 1.0])],   # batch statistics
        ...     [torch.zeros(2)], [torch.ones(2)],                         # running statistics
        ... )
        >>> float(loss)  # ||(3, 4)||₂ + ||(0, 0)||₂
        5.0
        >>> float(bn_statistics_loss([torch.tensor([3.0, 4.0])], [torch.ones(2)], [torch.zeros(2)],
        ...                          [torch.ones(2)], layer_weights=[10.0]))
        50.0
    """
    n = len(batch_means)
    lengths = {"batch_vars": len(batch_vars), "running_means": len(running_means), "running_vars": len(running_vars)}
    if layer_weights is not None:
        lengths["layer_weights"] = len(layer_weights)
    wrong = {k: v for k, v in lengths.items() if v != n}
    if wrong:
        raise ValueError(
            f"`batch_means` has {n} layers but {wrong!r}: pass one entry per BatchNorm layer in every argument."
        )
    if n == 0:
        raise ValueError("`batch_means` is empty: " + _NO_BN_HINT + ".")
    weights = [1.0] * n if layer_weights is None else [float(w) for w in layer_weights]
    if any(not math.isfinite(w) or w < 0 for w in weights):
        raise ValueError(f"`layer_weights` must be finite and >= 0, got {list(layer_weights)!r}.")
    total = None
    for i, (mu, var, rmu, rvar, w) in enumerate(zip(batch_means, batch_vars, running_means, running_vars, weights)):
        if not (mu.shape == var.shape == rmu.shape == rvar.shape):
            raise ValueError(
                f"layer {i}: shapes differ -- batch mean {tuple(mu.shape)}, batch var {tuple(var.shape)}, "
                f"running mean {tuple(rmu.shape)}, running var {tuple(rvar.shape)}; all must be [channels]."
            )
        mu, var = mu.float(), var.float()
        rmu, rvar = rmu.to(mu.device, torch.float32), rvar.to(mu.device, torch.float32)
        term = w * (torch.linalg.vector_norm(mu - rmu) + torch.linalg.vector_norm(var - rvar))
        total = term if total is None else total + term
    return total


def _batchnorm_layers(model: nn.Module) -> tuple[list[str], list[nn.Module]]:
    """Names and modules of the BatchNorm layers with running statistics, in ``named_modules()`` order."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"`model` must be a torch.nn.Module, got {type(model).__name__}: {model!r}.")
    names: list[str] = []
    layers: list[nn.Module] = []
    without_stats: list[str] = []
    for name, module in model.named_modules():
        if isinstance(module, _BN_TYPES):
            if module.running_mean is None or module.running_var is None:
                without_stats.append(name)
            else:
                names.append(name)
                layers.append(module)
    if not layers:
        extra = (
            f" Its BatchNorm layers {without_stats!r} were built with track_running_stats=False and store none."
            if without_stats
            else ""
        )
        raise ValueError(
            f"{type(model).__name__} has no BatchNorm layer to invert. {_NO_BN_HINT}.{extra} Without BatchNorm, "
            "pass bn_weight=0 to synthesise from the cross-entropy and the image priors alone (much weaker)."
        )
    return names, layers


class BNStatisticsHook:
    """Capture the per-channel batch statistics of every BatchNorm layer's *input*.

    Registers a forward pre-hook on every ``nn.BatchNorm1d/2d/3d`` (and ``SyncBatchNorm``) of
    ``model`` that keeps running statistics. After each forward, ``means[l]`` and ``variances[l]``
    hold the mean and the **biased** variance (``unbiased=False``, as the official code) of the
    layer's input over every dimension except the channel dimension 1 -- ``[N, C]``,
    ``[N, C, L]``, ``[N, C, H, W]`` or ``[N, C, D, H, W]`` -- with gradients to the input.
    Layers are ordered as ``model.named_modules()`` lists them (the "first" layer of
    ``first_bn_multiplier`` is the first one there, as in the official code). The hooks never
    change the model's outputs, weights or buffers. Use as a context manager or call
    :meth:`remove`.

    Args:
        model: the network (usually the teacher).

    Raises:
        ValueError: if ``model`` has no BatchNorm layer with running statistics.

    Example::

        >>> import torch
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2)).eval()
        >>> with BNStatisticsHook(net) as hook:
        ...     _ = net(torch.randn(4, 1, 5, 5))
        ...     print(hook.names, tuple(hook.means[0].shape), float(hook.loss().detach()) > 0)
        ['1'] (2,) True
    """

    def __init__(self, model: nn.Module) -> None:
        self.names, self.layers = _batchnorm_layers(model)
        self.means: list[Optional[Tensor]] = [None] * len(self.layers)
        self.variances: list[Optional[Tensor]] = [None] * len(self.layers)
        self._handles = [layer.register_forward_pre_hook(self._make_hook(i)) for i, layer in enumerate(self.layers)]

    def _make_hook(self, index: int):
        def hook(module: nn.Module, args: tuple) -> None:
            x = args[0].float()
            dims = [0, *range(2, x.dim())]
            mean = x.mean(dim=dims, keepdim=True)
            self.means[index] = mean.flatten()
            # two-pass biased variance: exact like x.var(unbiased=False), but ~1.6x faster on CPU with its backward
            self.variances[index] = (x - mean).square().mean(dim=dims)

        return hook

    def __len__(self) -> int:
        return len(self.layers)

    def clear(self) -> None:
        """Forget the captured statistics (call before a forward to detect layers that did not run)."""
        self.means = [None] * len(self.layers)
        self.variances = [None] * len(self.layers)

    def loss(self, layer_weights: Optional[Sequence[float]] = None) -> Tensor:
        """:func:`bn_statistics_loss` of the last forward against the layers' running statistics."""
        missing = [name for name, mu in zip(self.names, self.means) if mu is None]
        if missing:
            raise RuntimeError(
                f"BatchNorm layers {missing!r} did not run since the last clear(); run a forward through the "
                "model before asking for the loss."
            )
        return bn_statistics_loss(
            self.means,  # type: ignore[arg-type]
            self.variances,  # type: ignore[arg-type]
            [layer.running_mean for layer in self.layers],
            [layer.running_var for layer in self.layers],
            layer_weights,
        )

    def remove(self) -> None:
        """Unregister every hook (idempotent)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __enter__(self) -> "BNStatisticsHook":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()


# --------------------------------------------------------------------------------------------
# image priors
# --------------------------------------------------------------------------------------------


def total_variation_prior(x: Tensor) -> Tensor:
    """ℓ2 total variation R_TV of a batch: the official DeepInversion ``loss_var_l2``, per sample.

    Differences between neighbouring pixels along every spatial dimension (``x[..., i+1] −
    x[..., i]``); for images ``[N, C, H, W]`` also along both diagonals -- the four directions
    of the official ``get_image_prior_losses``. Each direction contributes the (not squared)
    Euclidean norm of its differences over channels and pixels of one sample; the sum over
    directions is averaged over the batch:

    .. math::

        R_{TV}(x) = \\frac{1}{N} \\sum_n \\sum_{d} \\lVert \\Delta_d x_n \\rVert_2

    The official code takes each norm over the whole batch instead, which ties the weight to
    the batch size: its ``var_scale_l2`` corresponds to ``tv_weight = var_scale_l2 · sqrt(N)`` here.

    Args:
        x: ``[N, C, *spatial]`` with at least one spatial dimension.

    Example::

        >>> import torch
        >>> x = torch.zeros(2, 1, 3, 3)
        >>> float(total_variation_prior(x))
        0.0
        >>> x[:, :, :, 2] = 1.0  # a vertical edge: 3 horizontal and 2 + 2 diagonal jumps of 1
        >>> round(float(total_variation_prior(x)), 4)  # sqrt(3) + sqrt(2) + sqrt(2)
        4.5605
    """
    if not isinstance(x, Tensor) or x.dim() < 3:
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(
            f"`x` must be [N, C, *spatial] with at least one spatial dimension, got {shape!r}; "
            "total variation is undefined without neighbouring pixels (use tv_weight=0)."
        )
    n = x.shape[0]
    diffs = [x.narrow(d, 1, x.shape[d] - 1) - x.narrow(d, 0, x.shape[d] - 1) for d in range(2, x.dim())]
    if x.dim() == 4:
        diffs.append(x[:, :, 1:, :-1] - x[:, :, :-1, 1:])
        diffs.append(x[:, :, 1:, 1:] - x[:, :, :-1, :-1])
    total = x.new_zeros(n, dtype=torch.float32)
    for diff in diffs:
        if diff.numel():
            total = total + torch.linalg.vector_norm(diff.float().reshape(n, -1), dim=1)
    return total.mean()


def input_l2_prior(x: Tensor) -> Tensor:
    """ℓ2 prior R_ℓ2 of a batch: the Euclidean norm of each sample, averaged over the batch.

    ``R_ℓ2(x) = (1/N) Σ_n ||x_n||₂`` (not squared), as the official code's
    ``torch.norm(inputs.view(N, -1), dim=1).mean()``.

    Example::

        >>> import torch
        >>> float(input_l2_prior(torch.tensor([[3.0, 4.0], [0.0, 0.0]])))
        2.5
    """
    if not isinstance(x, Tensor) or x.dim() < 1:
        raise ValueError(f"`x` must be a batch tensor [N, ...], got {x!r}.")
    return torch.linalg.vector_norm(x.float().reshape(x.shape[0], -1), dim=1).mean()


# --------------------------------------------------------------------------------------------
# DeepInversion
# --------------------------------------------------------------------------------------------


def _check_int(name: str, value: Any, minimum: int, hint: str = "") -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"`{name}` must be an int >= {minimum}, got {type(value).__name__}: {value!r}.{hint}")
    if value < minimum:
        raise ValueError(f"`{name}` must be an int >= {minimum}, got {value!r}.{hint}")
    return int(value)


def _check_float(name: str, value: Any, *, positive: bool = False, hint: str = "") -> float:
    bound = "> 0" if positive else ">= 0"
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"`{name}` must be a finite number {bound}, got {type(value).__name__}: {value!r}.{hint}")
    value = float(value)
    if not math.isfinite(value) or value < 0 or (positive and value == 0):
        raise ValueError(f"`{name}` must be a finite number {bound}, got {value!r}.{hint}")
    return value


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


def _teacher_device(teacher: nn.Module, device: Any) -> torch.device:
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


def _jitter_flip(x: Tensor, jitter: int, flip: bool, generator: torch.Generator) -> Tensor:
    if jitter:
        shifts = torch.randint(-jitter, jitter + 1, (x.dim() - 2,), generator=generator).tolist()
        if any(shifts):
            x = torch.roll(x, shifts=shifts, dims=tuple(range(2, x.dim())))
    if flip and bool(torch.rand((), generator=generator) < 0.5):
        x = torch.flip(x, dims=(x.dim() - 1,))
    return x


def deep_inversion(
    teacher: nn.Module,
    num_samples: int,
    input_shape: Sequence[int],
    num_classes: int,
    *,
    batch_size: int = 256,
    steps: int = 200,
    lr: float = 0.2,
    lr_schedule: str = "cosine",
    bn_weight: float = 3.0,
    first_bn_multiplier: float = 10.0,
    bn_layer_weights: Optional[Sequence[float]] = None,
    tv_weight: float = 0.0,
    l2_weight: float = 0.0,
    ce_weight: float = 1.0,
    jitter: int = 0,
    flip: bool = False,
    input_range: Optional[tuple[float, float]] = (0.0, 1.0),
    targets: Optional[Tensor] = None,
    seed: int = 0,
    progress: bool = True,
    device: Optional[Union[str, torch.device]] = None,
) -> dict[str, Any]:
    """Synthesise a transfer set from a frozen teacher by DeepInversion (Yin et al. 2020).

    Paper: "Dreaming to Distill: Data-free Knowledge Transfer via DeepInversion", CVPR 2020,
    arXiv:1912.08795. Random inputs ``x̂`` (the only tensors with a gradient) are optimised with
    Adam so that

    .. math::

        \\mathcal{L}(\\hat x) = w_{ce}\\,\\mathrm{CE}(f(\\hat x), y) + w_{bn} R_{feature}(\\hat x)
            + w_{tv} R_{TV}(\\hat x) + w_{\\ell_2} R_{\\ell_2}(\\hat x)

    decreases, where ``R_feature`` is :func:`bn_statistics_loss` over every BatchNorm layer of
    the teacher (:class:`BNStatisticsHook`), ``R_TV`` is :func:`total_variation_prior` and
    ``R_ℓ2`` :func:`input_l2_prior`. Each step the teacher sees a randomly rolled (``jitter``)
    and possibly mirrored (``flip``) copy of ``x̂``, as in the official code; the priors are
    computed on ``x̂`` itself (the official code uses the jittered copy, whose TV then includes
    the wrap-around seam of ``torch.roll``). Batches of ``batch_size`` samples are optimised one after another,
    each for ``steps`` Adam steps (betas ``(0.5, 0.9)`` as the official code) with a cosine
    learning-rate decay to 0 (the official ``lr_cosine_policy``) or a constant rate.

    Inputs start as ``U(low, high)`` noise when ``input_range=(low, high)`` and are **clamped**
    into that range after every step (the official code's ``clip``; a hard bound keeps Adam's
    steps simple and lets pixels sit exactly at 0 like a real background); with
    ``input_range=None`` they start as ``N(0, 1)`` and are unconstrained.

    The teacher is frozen and in eval mode throughout: it runs with its BatchNorm *running*
    statistics (which are never updated), its parameters get no ``.grad``, and its per-module
    train/eval flags and ``requires_grad`` flags are restored afterwards -- every tensor of
    its ``state_dict`` is bit-identical after the call.

    The defaults are tuned for the shipped digits teacher (``zoo:digits_cnn``, inputs
    ``[1, 8, 8]`` in ``[0, 1]``): 2,000 samples take about 36 s on one CPU thread (busy 2-core
    machine) and the teacher classifies 100% of them as their target; a ``DigitsMLP`` trained
    by KD (T=4) on them alone reaches about 83% on the real digits test split (95% when
    distilled on the 1,079 real training images, 51% with ``bn_weight=0``, 12% on uniform
    noise). On digits, ``jitter=1`` cost 5-10 points (a roll wraps strokes around an 8x8
    image) and TV or ℓ2 priors (weight 0.05) moved it by a point at most, so they are off;
    300-400 steps gave no gain over 200. The official ImageNet script (224 px ResNet-50) uses ``lr=0.2`` with 100 warm-up
    steps, ``bn_weight`` (``r_feature``) 0.01-0.05, ``first_bn_multiplier=10``, ``tv_l2=1e-4``
    on batch-wide norms (``tv_weight ≈ 1e-4·sqrt(batch_size)`` here), ``l2=1e-5``,
    ``jitter=30``, ``flip=True`` and 2,000 steps per resolution -- start there for large images.

    Args:
        teacher: the trained classifier; must contain BatchNorm layers unless ``bn_weight=0``.
        num_samples: how many inputs to synthesise.
        input_shape: one input's shape without the batch dimension, e.g. ``(1, 8, 8)``.
        num_classes: the teacher's number of classes (its output is ``[N, num_classes]``).
        batch_size: samples optimised together (BatchNorm statistics are batch statistics, so
            larger batches match them better; the last batch may be smaller).
        steps: Adam steps per batch.
        lr: Adam learning rate (start of the cosine decay).
        lr_schedule: ``"cosine"`` (decay to 0 over ``steps``) or ``"constant"``.
        bn_weight: weight of ``R_feature``; 0 turns the BatchNorm prior off (then the teacher
            needs no BatchNorm).
        first_bn_multiplier: extra factor on the first BatchNorm layer (the official code uses
            10: the first layer sees the image almost directly).
        bn_layer_weights: per-layer weights, one per BatchNorm layer in ``named_modules()``
            order; ``None`` means all 1. The first one is still multiplied by
            ``first_bn_multiplier`` (pass ``first_bn_multiplier=1`` to use them as given).
        tv_weight: weight of the ℓ2 total-variation prior.
        l2_weight: weight of the ℓ2-norm prior.
        ce_weight: weight of the cross-entropy towards ``targets``.
        jitter: each step the inputs are rolled (``torch.roll``, wrapping around) by a random
            shift in ``[-jitter, jitter]`` along every spatial dimension; 0 turns it off.
        flip: mirror the inputs along the last dimension with probability 1/2 each step (for
            data with mirror symmetry only -- not for digits).
        input_range: ``(low, high)`` to start in and clamp to after every step, or ``None``.
        targets: ``LongTensor[num_samples]`` of class indices; ``None`` takes balanced
            round-robin classes ``0, 1, ..., C-1, 0, 1, ...`` (every batch is balanced too).
        seed: seeds a private generator for the initial noise and the jitter/flip draws; the
            global RNG is not touched, so a seed gives the same set on the same device.
        progress: show a tqdm progress bar over all steps of all batches.
        device: where to optimise; ``None`` uses the teacher's device. Never moves the teacher.

    Returns:
        ``{"inputs": Tensor[num_samples, *input_shape], "targets": LongTensor[num_samples],
        "teacher_acc": float, "loss_history": list[float], "loss_terms": dict[str, list[float]],
        "meta": dict}`` on the CPU. ``teacher_acc`` is the share of the final inputs that the
        teacher classifies as their target (no jitter); ``loss_history`` is the total objective
        of the first batch at each step (before that step's update) and ``loss_terms`` holds
        its parts before the ``*_weight`` factors, ``"ce"``, ``"bn"`` (R_feature with its
        per-layer weights), ``"tv"``, ``"l2"`` (0 where a weight is 0); ``meta`` records every
        option, the BatchNorm layer names, the teacher's class and the time taken.

    Raises:
        TypeError: ``teacher`` is not a module, or an argument has the wrong type.
        ValueError: an argument out of range, a teacher without BatchNorm statistics while
            ``bn_weight > 0``, or an ``input_shape`` / ``num_classes`` that does not fit the teacher.

    Example::

        >>> import torch
        >>> from torch import nn
        >>> _ = torch.manual_seed(0)
        >>> teacher = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
        ...                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)).eval()
        >>> out = deep_inversion(teacher, num_samples=6, input_shape=(1, 8, 8), num_classes=3,
        ...                      steps=20, progress=False)
        >>> tuple(out["inputs"].shape), out["targets"].tolist()
        ((6, 1, 8, 8), [0, 1, 2, 0, 1, 2])
        >>> out["loss_history"][-1] < out["loss_history"][0]
        True
    """
    if not isinstance(teacher, nn.Module):
        raise TypeError(f"`teacher` must be a torch.nn.Module, got {type(teacher).__name__}: {teacher!r}.")
    num_samples = _check_int("num_samples", num_samples, 1)
    input_shape = _check_input_shape(input_shape)
    num_classes = _check_int("num_classes", num_classes, 2, " The teacher must be a classifier with >= 2 classes.")
    batch_size = _check_int("batch_size", batch_size, 1)
    steps = _check_int("steps", steps, 1)
    lr = _check_float("lr", lr, positive=True, hint=" Try 0.1 for inputs in [0, 1].")
    if lr_schedule not in _LR_SCHEDULES:
        raise ValueError(f"`lr_schedule` must be one of {list(_LR_SCHEDULES)!r}, got {lr_schedule!r}.")
    bn_weight = _check_float("bn_weight", bn_weight)
    first_bn_multiplier = _check_float("first_bn_multiplier", first_bn_multiplier)
    tv_weight = _check_float("tv_weight", tv_weight)
    l2_weight = _check_float("l2_weight", l2_weight)
    ce_weight = _check_float("ce_weight", ce_weight)
    if bn_weight == tv_weight == l2_weight == ce_weight == 0:
        raise ValueError(
            "`bn_weight`, `tv_weight`, `l2_weight` and `ce_weight` are all 0: there is nothing to optimise. "
            "DeepInversion uses ce_weight=1 and bn_weight > 0."
        )
    jitter = _check_int("jitter", jitter, 0)
    spatial = input_shape[1:]
    if jitter and (not spatial or jitter >= min(spatial)):
        raise ValueError(
            f"`jitter`={jitter!r} needs spatial dimensions larger than the shift, but `input_shape`={input_shape!r} "
            f"has spatial size {spatial!r}; use jitter=0 for inputs without spatial dimensions, or a smaller jitter."
        )
    if not isinstance(flip, bool):
        raise TypeError(f"`flip` must be a bool, got {type(flip).__name__}: {flip!r}.")
    if flip and not spatial:
        raise ValueError(f"`flip`=True needs a spatial dimension to mirror, but `input_shape`={input_shape!r}.")
    if tv_weight and not spatial:
        raise ValueError(
            f"`tv_weight`={tv_weight!r} needs spatial dimensions (total variation compares neighbouring pixels), but "
            f"`input_shape`={input_shape!r}; set tv_weight=0."
        )
    input_range = _check_input_range(input_range)
    targets = _check_targets(targets, num_samples, num_classes)
    seed = _check_int("seed", seed, 0)
    if not isinstance(progress, bool):
        raise TypeError(f"`progress` must be a bool, got {type(progress).__name__}: {progress!r}.")
    device = _teacher_device(teacher, device)
    floating = [t for t in teacher.parameters() if t.is_floating_point()]
    dtype = floating[0].dtype if floating else torch.float32

    layer_weights: Optional[list[float]] = None
    if bn_weight > 0:
        bn_names, _ = _batchnorm_layers(teacher)
        if bn_layer_weights is None:
            layer_weights = [1.0] * len(bn_names)
        else:
            if isinstance(bn_layer_weights, (str, bytes)) or not isinstance(bn_layer_weights, Sequence):
                raise TypeError(
                    f"`bn_layer_weights` must be None or a sequence of numbers, one per BatchNorm layer, got "
                    f"{type(bn_layer_weights).__name__}: {bn_layer_weights!r}."
                )
            if len(bn_layer_weights) != len(bn_names):
                raise ValueError(
                    f"`bn_layer_weights` has {len(bn_layer_weights)} entries but the teacher has {len(bn_names)} "
                    f"BatchNorm layers {bn_names!r}: pass one weight per layer, or None."
                )
            layer_weights = [_check_float(f"bn_layer_weights[{i}]", w) for i, w in enumerate(bn_layer_weights)]
        layer_weights[0] *= first_bn_multiplier

    # freeze: eval mode and no parameter gradients; restored (flags only) in `finally`
    modes = [(m, m.training) for m in teacher.modules()]
    grad_flags = [(p, p.requires_grad) for p in teacher.parameters()]
    generator = torch.Generator().manual_seed(seed)
    num_batches = math.ceil(num_samples / batch_size)
    all_inputs: list[Tensor] = []
    correct = 0
    history: list[float] = []
    terms: dict[str, list[float]] = {"ce": [], "bn": [], "tv": [], "l2": []}
    start = time.perf_counter()
    from tqdm.auto import tqdm

    bar = tqdm(total=num_batches * steps, desc="DeepInversion", unit="step", disable=not progress, leave=progress)
    hook: Optional[BNStatisticsHook] = None
    try:
        teacher.eval()
        teacher.requires_grad_(False)
        if bn_weight > 0:
            hook = BNStatisticsHook(teacher)
        for b in range(num_batches):
            y = targets[b * batch_size : (b + 1) * batch_size].to(device)
            n = len(y)
            if input_range is None:
                init = torch.randn((n, *input_shape), generator=generator)
            else:
                low, high = input_range
                init = torch.rand((n, *input_shape), generator=generator) * (high - low) + low
            x = init.to(device=device, dtype=dtype).requires_grad_(True)
            optimizer = torch.optim.Adam([x], lr=lr, betas=(0.5, 0.9), eps=1e-8)
            for step in range(steps):
                if lr_schedule == "cosine":
                    for group in optimizer.param_groups:
                        group["lr"] = 0.5 * lr * (1.0 + math.cos(math.pi * step / steps))
                x_in = _jitter_flip(x, jitter, flip, generator)
                if hook is not None:
                    hook.clear()
                try:
                    logits = teacher(x_in)
                except RuntimeError as err:
                    if b == 0 and step == 0:
                        raise ValueError(
                            f"`input_shape`={input_shape!r} does not fit {type(teacher).__name__}: the forward of a "
                            f"batch {tuple(x_in.shape)} failed with: {err}"
                        ) from None
                    raise
                if b == 0 and step == 0 and (logits.dim() != 2 or logits.shape[1] != num_classes):
                    raise ValueError(
                        f"`num_classes`={num_classes!r} does not fit {type(teacher).__name__}: its output for a batch "
                        f"{tuple(x_in.shape)} has shape {tuple(logits.shape)}, expected [{n}, {num_classes}]."
                    )
                ce = F.cross_entropy(logits.float(), y)
                bn = hook.loss(layer_weights) if hook is not None else ce.new_zeros(())
                tv = total_variation_prior(x) if tv_weight else ce.new_zeros(())
                l2 = input_l2_prior(x) if l2_weight else ce.new_zeros(())
                loss = ce_weight * ce + bn_weight * bn + tv_weight * tv + l2_weight * l2
                (grad,) = torch.autograd.grad(loss, [x])
                x.grad = grad
                optimizer.step()
                if input_range is not None:
                    with torch.no_grad():
                        x.clamp_(*input_range)
                if b == 0:
                    history.append(float(loss.detach()))
                    for key, value in (("ce", ce), ("bn", bn), ("tv", tv), ("l2", l2)):
                        terms[key].append(float(value.detach()))
                bar.update(1)
                if progress and (step % 50 == 0 or step == steps - 1):
                    bar.set_postfix(batch=f"{b + 1}/{num_batches}", loss=f"{float(loss.detach()):.4g}")
            with torch.no_grad():
                x = x.detach()
                correct += int((teacher(x).argmax(dim=1) == y).sum())
            all_inputs.append(x.to("cpu", torch.float32))
    finally:
        bar.close()
        if hook is not None:
            hook.remove()
        for module, mode in modes:
            module.training = mode
        for param, flag in grad_flags:
            param.requires_grad_(flag)
    elapsed = time.perf_counter() - start
    teacher_acc = correct / num_samples
    meta = {
        "method": "deep_inversion",
        "paper": "Yin et al. 2020, Dreaming to Distill, arXiv:1912.08795",
        "teacher": type(teacher).__name__,
        "num_samples": num_samples,
        "input_shape": list(input_shape),
        "num_classes": num_classes,
        "batch_size": batch_size,
        "steps": steps,
        "lr": lr,
        "lr_schedule": lr_schedule,
        "betas": [0.5, 0.9],
        "bn_weight": bn_weight,
        "first_bn_multiplier": first_bn_multiplier,
        "bn_layer_weights": layer_weights,
        "bn_layers": list(hook.names) if hook is not None else [],
        "tv_weight": tv_weight,
        "l2_weight": l2_weight,
        "ce_weight": ce_weight,
        "jitter": jitter,
        "flip": flip,
        "input_range": list(input_range) if input_range is not None else None,
        "seed": seed,
        "teacher_acc": teacher_acc,
        "time_s": elapsed,
        "torch": str(torch.__version__),
    }
    return {
        "inputs": torch.cat(all_inputs).contiguous(),
        "targets": targets,
        "teacher_acc": teacher_acc,
        "loss_history": history,
        "loss_terms": terms,
        "meta": meta,
    }


# --------------------------------------------------------------------------------------------
# files
# --------------------------------------------------------------------------------------------


def save_transfer_set(result: dict[str, Any], path: Union[str, os.PathLike], *, overwrite: bool = True) -> Path:
    """Save a :func:`deep_inversion` result with ``torch.save``, atomically.

    The file is a dict of plain tensors and Python values -- ``"inputs"`` (float32
    ``[N, *input_shape]``), ``"targets"`` (int64 ``[N]``, if present), ``"teacher_acc"``,
    ``"loss_history"``, ``"loss_terms"`` and ``"meta"`` (whatever of them the result has) --
    so it loads with ``torch.load(path, weights_only=True)``; code that reads unlabeled
    arrays uses its ``"inputs"`` key. It is written to a temporary file in the same folder
    and then renamed, so an interrupted save never leaves a half-written file at ``path``.

    Args:
        result: a dict with at least ``"inputs"`` (a tensor), e.g. :func:`deep_inversion`'s.
        path: the output file (``.pt``); parent folders are created.
        overwrite: replace an existing file (``False`` raises ``FileExistsError`` instead).

    Returns:
        The path written.

    Example::

        >>> import os, tempfile, torch
        >>> folder = tempfile.mkdtemp()
        >>> path = save_transfer_set({"inputs": torch.zeros(4, 1, 8, 8), "targets": torch.arange(4)},
        ...                          os.path.join(folder, "set.pt"))
        >>> sorted(torch.load(path, weights_only=True))
        ['inputs', 'targets']
    """
    if not isinstance(result, dict) or not isinstance(result.get("inputs"), Tensor):
        raise ValueError(
            f"`result` must be a dict with an 'inputs' tensor (what deep_inversion returns), got "
            f"{type(result).__name__} with keys {sorted(result) if isinstance(result, dict) else None!r}."
        )
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"`path`={str(path)!r} exists; pass overwrite=True (CLI: --overwrite) to replace it.")
    payload: dict[str, Any] = {"inputs": result["inputs"].detach().to("cpu", torch.float32).contiguous()}
    if result.get("targets") is not None:
        targets = result["targets"]
        if not isinstance(targets, Tensor) or tuple(targets.shape) != (len(payload["inputs"]),):
            raise ValueError(
                f"`result['targets']` must be a tensor of shape [{len(payload['inputs'])}] (one class per input), "
                f"got {targets!r}."
            )
        payload["targets"] = targets.detach().to("cpu", torch.long).contiguous()
    for key in ("teacher_acc", "loss_history", "loss_terms", "meta"):
        if key in result:
            payload[key] = result[key]
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(payload, handle)
        if not overwrite and path.exists():
            raise FileExistsError(f"`path`={str(path)!r} appeared while saving; pass overwrite=True to replace it.")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def load_transfer_set(path: Union[str, os.PathLike]) -> dict[str, Any]:
    """Load a file written by :func:`save_transfer_set` (``torch.load(..., weights_only=True)``).

    Returns the saved dict: ``"inputs"`` always, and ``"targets"``, ``"teacher_acc"``,
    ``"loss_history"``, ``"loss_terms"``, ``"meta"`` when the file has them.

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: the file cannot be loaded safely or has no ``"inputs"`` tensor.

    Example::

        >>> import os, tempfile, torch
        >>> path = os.path.join(tempfile.mkdtemp(), "set.pt")
        >>> _ = save_transfer_set({"inputs": torch.ones(2, 3)}, path)
        >>> load_transfer_set(path)["inputs"].shape
        torch.Size([2, 3])
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"`path`={str(path)!r}: no such file. Create one with python -m lightning_distill.data_free.")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle refusal, truncated file, other format
        lines = [line for line in str(err).splitlines() if line.strip()]
        first = next((line for line in lines if "WeightsUnpickler error" in line), lines[0] if lines else repr(err))
        raise ValueError(
            f"`path`={str(path)!r} is not a transfer set readable with torch.load(weights_only=True): {first}"
        ) from None
    if not isinstance(obj, dict) or not isinstance(obj.get("inputs"), Tensor):
        found = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
        raise ValueError(
            f"`path`={str(path)!r} holds {found!r}, expected a dict with an 'inputs' tensor (see save_transfer_set)."
        )
    return obj


# --------------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m lightning_distill.data_free",
        description="Synthesise a transfer set from a teacher alone with DeepInversion (Yin et al. 2020, "
        "arXiv:1912.08795) and save it as a .pt file with an 'inputs' key.",
    )
    p.add_argument("--teacher-model", required=True, help="model name for lightning_distill.models.get_model")
    p.add_argument("--teacher", required=True, help="teacher weights: a file or zoo:NAME (e.g. zoo:digits_cnn)")
    p.add_argument("--num-classes", type=int, required=True)
    p.add_argument("--input-shape", type=int, nargs="+", required=True, metavar="DIM", help="e.g. 1 8 8")
    p.add_argument("--num-samples", type=int, required=True)
    p.add_argument("--out", required=True, help="output .pt file")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    defaults = {k: v.default for k, v in inspect.signature(deep_inversion).parameters.items()}
    for name, kind in (
        ("seed", int), ("batch_size", int), ("steps", int), ("lr", float), ("bn_weight", float),
        ("first_bn_multiplier", float), ("tv_weight", float), ("l2_weight", float), ("ce_weight", float),
        ("jitter", int),
    ):  # fmt: skip
        flag = "--" + name.replace("_", "-")
        p.add_argument(flag, type=kind, default=defaults[name], help=f"default: {defaults[name]!r} (see deep_inversion)")
    p.add_argument("--lr-schedule", choices=_LR_SCHEDULES, default=defaults["lr_schedule"])
    p.add_argument("--flip", action="store_true", help="random horizontal flips (not for digits)")
    p.add_argument(
        "--input-range", type=float, nargs=2, default=defaults["input_range"], metavar=("LOW", "HIGH"),
        help="clamp inputs into [LOW, HIGH] after every step (default: %(default)s)",
    )  # fmt: skip
    p.add_argument("--no-clamp", action="store_true", help="do not clamp inputs (input_range=None)")
    p.add_argument("--device", default=None, help="e.g. cuda; default: cpu (the teacher is moved there)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "--num-threads", type=int, default=1,
        help="torch intra-op CPU threads (default 1: the per-step tensors are tiny, and on a busy machine extra "
        "threads make each step many times slower); 0 keeps torch's default",
    )  # fmt: skip
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command-line entry point (``python -m lightning_distill.data_free --help``)."""
    args = _parser().parse_args(argv)
    out = Path(args.out)
    if out.exists() and not args.overwrite:
        print(f"error: --out {str(out)!r} exists; pass --overwrite to replace it.", file=sys.stderr)
        return 2
    try:
        return _run_cli(args, out)
    except (ValueError, TypeError, FileNotFoundError, FileExistsError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


def _run_cli(args: argparse.Namespace, out: Path) -> int:
    from lightning_distill.checkpoint import load_weights
    from lightning_distill.models import get_model

    if args.num_threads < 0:
        raise ValueError(f"`--num-threads` must be >= 0 (0 keeps torch's default), got {args.num_threads!r}.")
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    teacher = get_model(args.teacher_model, args.num_classes)
    load_weights(teacher, args.teacher, argument="--teacher")
    if args.device is not None:
        teacher = teacher.to(args.device)
    teacher.eval()
    result = deep_inversion(
        teacher,
        args.num_samples,
        tuple(args.input_shape),
        args.num_classes,
        batch_size=args.batch_size,
        steps=args.steps,
        lr=args.lr,
        lr_schedule=args.lr_schedule,
        bn_weight=args.bn_weight,
        first_bn_multiplier=args.first_bn_multiplier,
        tv_weight=args.tv_weight,
        l2_weight=args.l2_weight,
        ce_weight=args.ce_weight,
        jitter=args.jitter,
        flip=args.flip,
        input_range=None if args.no_clamp else tuple(args.input_range),
        seed=args.seed,
        progress=not args.no_progress,
        device=args.device,
    )
    result["meta"]["teacher_model"] = args.teacher_model
    result["meta"]["teacher_weights"] = str(args.teacher)
    save_transfer_set(result, out, overwrite=args.overwrite)
    n = len(result["targets"])
    print(
        f"teacher accuracy on the synthetic set: {100 * result['teacher_acc']:.1f}% "
        f"({round(result['teacher_acc'] * n)}/{n})"
    )
    print(f"time: {result['meta']['time_s']:.1f} s")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
