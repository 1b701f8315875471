"""The priors DeepInversion optimises its inputs against: BatchNorm statistics, total variation, ℓ2.

DeepInversion (Yin et al. 2020, arXiv:1912.08795) asks a synthetic batch ``x̂`` to produce, at the
input of every BatchNorm layer of the frozen teacher, the per-channel mean and variance that the
layer stored while the teacher was trained (its ``running_mean`` / ``running_var``).
:class:`BNStatisticsHook` captures those batch statistics during a forward and
:func:`bn_statistics_loss` measures their distance to the stored ones (``R_feature``). Two image
priors keep the inputs natural-looking: :func:`total_variation_prior` (``R_TV``, smoothness) and
:func:`input_l2_prior` (``R_ℓ2``, small norm).
"""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import torch
from torch import Tensor, nn

__all__ = ["BNStatisticsHook", "bn_statistics_loss", "input_l2_prior", "total_variation_prior"]

_BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
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
            code multiplies the first layer by ``first_bn_multiplier=10``;
            :func:`~lightning_distill.data_free.deep_inversion` builds these weights for you.

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


def batchnorm_layers(model: nn.Module) -> tuple[list[str], list[nn.Module]]:
    """Names and modules of the BatchNorm layers with running statistics, in ``named_modules()`` order.

    Raises:
        TypeError: ``model`` is not a module.
        ValueError: ``model`` has no BatchNorm layer with running statistics.
    """
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
        self.names, self.layers = batchnorm_layers(model)
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

