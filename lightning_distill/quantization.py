r"""Fake quantisation for quantisation-aware training and distillation.

A weight is *fake-quantised* when it is mapped to a small integer grid and straight back to floats
(quantise, then dequantise): the network computes in float but only ever sees values a k-bit or
ternary deployment can represent, and learns to be robust to that rounding
(Jacob et al. 2018, arXiv:1712.05877). Gradients pass the rounding with the straight-through
estimator (Bengio et al. 2013, arXiv:1308.3432), so the optimizer updates float *latent* weights.

Grids (``w`` viewed as rows ``[C, K]``: ``C`` = size of dimension ``ch_axis``, one row per output
channel; a tensor with fewer than 2 dimensions is one row):

* **symmetric** (default): :math:`q = \mathrm{clip}(\mathrm{round}(w/s), -Q, Q)`,
  :math:`Q = 2^{b-1}-1`, :math:`s = \max|w| / Q`, value :math:`q s`. Zero is on the grid.
* **asymmetric** (``symmetric=False``): the range :math:`[lo, hi] = [\min(\min w, 0), \max(\max w, 0)]`
  (it always contains 0, as in PyTorch's observers), :math:`s = (hi - lo)/(2^b - 1)`, integer zero
  point :math:`z = \mathrm{round}(-lo/s)`, :math:`q = \mathrm{clip}(\mathrm{round}(w/s) + z, 0, 2^b-1)`,
  value :math:`(q - z) s`.
* **ternary** (``ternary=True``, BitNet b1.58, Ma et al. 2024, arXiv:2402.17764): codes
  :math:`q = \mathrm{clip}(\mathrm{round}(w/\gamma), -1, 1)` with :math:`\gamma = \mathrm{mean}|w|`
  (BitNet's absmean), value :math:`q\,\alpha` with :math:`\alpha` the **least-squares scale of the
  codes**, :math:`\alpha = \mathrm{mean}\{|w_i| : q_i \ne 0\}` (TWN, Li et al. 2016, arXiv:1605.04711).
  BitNet dequantises with :math:`\gamma` itself; that is not idempotent: on its own output the
  mean :math:`|w|` shrinks by the share of nonzero codes, so a second pass returns a smaller tensor.
  :math:`\alpha` is recovered exactly from the output (it is the magnitude of every nonzero value),
  and it is also the scale that minimises :math:`\|w - \alpha q\|^2` for the chosen codes.
  BitNet adds :math:`\epsilon` to :math:`\gamma`; here :math:`\gamma = 0` (an all-zero tensor or
  channel) is replaced by 1 instead, which keeps the codes scale-invariant for tiny weights.
* ``per_channel=True``: one scale (and zero point, threshold) per row instead of one per tensor.

Scales keep 16 significant bits (the float mantissa is truncated toward zero, a relative change
below :math:`2^{-15}`): an 8-bit code times such a scale has at most 24 significant bits, so every
grid value ``code * scale`` is exact in float32, and a scale is recovered bit-exactly from the
grid values it produced. Computation runs in float64 (float32 on Apple ``mps``).

**Idempotence** (seed 000, FALSIFY-DISTILL-QA-001): ``fake_quantize(fake_quantize(w)) ==
fake_quantize(w)`` **exactly** (bit for bit, tolerance 0) for float32 and float64 inputs, in every
mode -- per-tensor / per-channel, symmetric / asymmetric, ternary, with error diffusion -- whenever
the inputs are finite and the nonzero scales are not float32 subnormals (below :math:`2^{-126}`;
asymmetric grids reach up to half a step beyond the data range, so keep :math:`|w|` below half the
dtype's maximum). For float16 / bfloat16 inputs the grid values are rounded to the input dtype, and
a second pass agrees only within about one ulp of the tensor's largest magnitude. To make this
hold, the elements equal to the range extremes (the absmax element; the min and max in asymmetric
mode) are *pinned* to the extreme codes: rounding gives them those codes anyway, except at exact
ties under error diffusion, and pinning keeps the output's range -- and so its scale -- equal to
the input's.

**Error diffusion** (seed 000, Floyd-Steinberg style), ``error_diffusion = s`` in [0, 1]: each row
is walked along its flattened input dimension in order; the quantisation error of element ``j``
(its value plus the error carried into it, minus its quantised value) times ``s`` is added to
element ``j + 1`` before that one is quantised:

.. math::

    v_j = w_j + s\,e_{j-1}, \qquad \hat w_j = Q(v_j), \qquad e_j = v_j - \hat w_j, \qquad e_{-1} = 0.

Scales, zero points and the ternary threshold are computed from the original (undiffused) weights,
so the diffused output lies on the same grid (an on-grid input has zero error everywhere, which is
what keeps diffusion idempotent). With ``s = 1`` the errors telescope: a row's sum is preserved up to
the last carried error, :math:`|\sum_j \hat w_j - \sum_j w_j| = |e_{K-1}|`, at most half a grid step
in symmetric mode (plus :math:`2^{-15}\max|w|` per element for the truncated scale), instead of
growing like :math:`\sqrt{K}` steps; values clipped at the grid's ends (the asymmetric zero point's
half step, ternary weights far above :math:`\alpha`) add their clipping error to the carry. The
walk is a Python loop over the ``K`` inputs of a row (vectorised over rows), so it costs ``K``
small tensor operations per forward.

Example::

    >>> import torch
    >>> from lightning_distill.quantization import fake_quantize, quantization_error
    >>> w = torch.tensor([[-1.0, -0.4, 0.2, 0.6]])
    >>> fake_quantize(w, bits=2)  # grid {-1, 0, 1} * max|w|
    tensor([[-1.,  0.,  0.,  1.]])
    >>> fake_quantize(torch.tensor([0.125, -0.5, 1.0, 0.0]), ternary=True)  # alpha = mean(0.5, 1.0)
    tensor([ 0.0000, -0.7500,  0.7500,  0.0000])
    >>> q = fake_quantize(torch.randn(8, 16), bits=4, per_channel=True, error_diffusion=0.5)
    >>> torch.equal(fake_quantize(q, bits=4, per_channel=True, error_diffusion=0.5), q)
    True
    >>> float(quantization_error(q, bits=4, per_channel=True))
    0.0
"""

from __future__ import annotations

import math
import numbers
import os
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

__all__ = [
    "FORMAT",
    "QUANTIZABLE_LAYERS",
    "ActivationFakeQuantize",
    "QuantizedModel",
    "WeightFakeQuantize",
    "check_quant_options",
    "export_quantized",
    "fake_quantize",
    "load_quantized",
    "pack_ternary",
    "quantization_error",
    "quantize_model",
    "quantized_layers",
    "save_quantized",
    "ste_fake_quantize",
    "unpack_ternary",
]

#: Layer types whose ``weight`` :func:`quantize_model` fake-quantises (output channels on dim 0).
QUANTIZABLE_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)

#: ``format`` entry of :func:`export_quantized` dictionaries.
FORMAT = "lightning_distill.quantized/1"

#: Significant bits kept in every scale (see the module docstring).
SCALE_BITS = 16

_MIN_BITS, _MAX_BITS = 2, 8
_TERNARY_LAYOUT = (
    "2-bit fields code+1 in {0,1,2}, 4 per byte, element 4i+k in bits 2k..2k+1 (LSB first), padded with code 0"
)


# ---------------------------------------------------------------------------------- validation
def _check_bits(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not _MIN_BITS <= int(value) <= _MAX_BITS:
        raise ValueError(
            f"`{name}` must be an integer in [{_MIN_BITS}, {_MAX_BITS}] (the width of the integer codes), got "
            f"{value!r}. Use 8 or 4 for k-bit codes, or ternary=True for 1.58-bit {{-1, 0, +1}} weights."
        )
    return int(value)


def _check_flag(value: Any, name: str) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"`{name}` must be True or False, got {value!r}.")
    return value


def _check_strength(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 <= float(value) <= 1.0:
        raise ValueError(
            f"`error_diffusion` must be a number in [0, 1] (the share of each element's quantisation error "
            f"carried to the next element of its row; 0 turns diffusion off, 1 is full Floyd-Steinberg), "
            f"got {value!r}."
        )
    return float(value)


def check_quant_options(
    bits: Any = 8,
    symmetric: Any = True,
    per_channel: Any = False,
    ternary: Any = False,
    error_diffusion: Any = 0.0,
    activation_bits: Any = None,
) -> dict[str, Any]:
    """Validate quantisation options; returns them normalised (``bits`` int, ``error_diffusion`` float).

    ``bits`` is validated even when ``ternary=True``, where it is ignored (ternary wins).
    """
    options = {
        "bits": _check_bits(bits, "bits"),
        "symmetric": _check_flag(symmetric, "symmetric"),
        "per_channel": _check_flag(per_channel, "per_channel"),
        "ternary": _check_flag(ternary, "ternary"),
        "error_diffusion": _check_strength(error_diffusion),
    }
    options["activation_bits"] = None if activation_bits is None else _check_bits(activation_bits, "activation_bits")
    return options


def _check_tensor(w: Any) -> Tensor:
    if not isinstance(w, Tensor):
        raise TypeError(f"`w` must be a torch.Tensor, got {type(w).__name__}.")
    if not w.is_floating_point():
        raise TypeError(f"`w` must be a floating-point tensor (the float weights to quantise), got dtype {w.dtype}.")
    return w


def _check_ch_axis(ch_axis: Any, ndim: int) -> int:
    if isinstance(ch_axis, bool) or not isinstance(ch_axis, numbers.Integral):
        raise TypeError(f"`ch_axis` must be an int (the output-channel dimension), got {ch_axis!r}.")
    if ndim >= 2 and not -ndim <= int(ch_axis) < ndim:
        raise ValueError(
            f"`ch_axis` must index a dimension of the {ndim}-d tensor (-{ndim}..{ndim - 1}), got {ch_axis!r}. "
            "Use 0 for nn.Linear / nn.Conv weights (output channels first)."
        )
    return int(ch_axis) % ndim if ndim >= 2 else 0


# ---------------------------------------------------------------------------------- core
def _compute_dtype(w: Tensor) -> torch.dtype:
    return torch.float32 if w.device.type == "mps" else torch.float64  # mps has no float64


def _to_rows(w: Tensor, ch_axis: int, dtype: torch.dtype) -> Tensor:
    x = w.detach().to(dtype)
    if w.ndim >= 2:
        x = x.movedim(ch_axis, 0)
        return x.reshape(x.shape[0], -1)
    return x.reshape(1, -1)


def _from_rows(rows: Tensor, like: Tensor, ch_axis: int) -> Tensor:
    if like.ndim >= 2:
        moved = list(like.shape)
        moved.insert(0, moved.pop(ch_axis))
        return rows.reshape(moved).movedim(0, ch_axis)
    return rows.reshape(like.shape)


def _snap(scale: Tensor) -> Tensor:
    """Truncate positive scales to ``SCALE_BITS`` significant bits (exact bit manipulation)."""
    scale = scale.contiguous()
    if scale.dtype == torch.float64:
        drop = 52 - (SCALE_BITS - 1)
        return (scale.view(torch.int64) & ~((1 << drop) - 1)).view(torch.float64)
    drop = 23 - (SCALE_BITS - 1)
    return (scale.view(torch.int32) & ~((1 << drop) - 1)).view(torch.float32)


class _Grid:
    """Grid parameters of rows ``x`` ``[C, K]`` (per row ``[C, 1]`` or per tensor ``[1, 1]``)."""

    def __init__(self, x: Tensor, bits: int, symmetric: bool, per_channel: bool, ternary: bool) -> None:
        dims = (1,) if per_channel else (0, 1)
        absx = x.abs()
        one = torch.ones((), dtype=x.dtype, device=x.device)
        zero = torch.zeros((), dtype=x.dtype, device=x.device)
        if ternary:
            gamma = absx.mean(dims, keepdim=True)
            self.step = torch.where(gamma > 0, gamma, one)  # BitNet's absmean: sets the codes
            nonzero = torch.round(x / self.step).clamp(-1, 1) != 0
            count = nonzero.sum(dims, keepdim=True)
            alpha = (absx * nonzero).sum(dims, keepdim=True) / count.clamp_min(1)
            self.scale = _snap(torch.where(count > 0, alpha, one))  # least-squares scale of the codes
            self.zero_point = torch.zeros_like(self.scale)
            self.qmin, self.qmax = -1, 1
            amax = absx.amax(dims, keepdim=True)
            self.pin_mask = (absx == amax) & (amax > 0)
            self.pin_code = torch.sign(x)
        elif symmetric:
            qmax = 2 ** (bits - 1) - 1
            amax = absx.amax(dims, keepdim=True)
            self.scale = _snap(torch.where(amax > 0, amax / qmax, one))
            self.step = self.scale
            self.zero_point = torch.zeros_like(self.scale)
            self.qmin, self.qmax = -qmax, qmax
            self.pin_mask = (absx == amax) & (amax > 0)
            self.pin_code = torch.sign(x) * qmax
        else:
            levels = 2**bits - 1
            lo = x.amin(dims, keepdim=True).clamp_max(0)
            hi = x.amax(dims, keepdim=True).clamp_min(0)
            span = hi - lo
            self.scale = _snap(torch.where(span > 0, span / levels, one))
            self.step = self.scale
            self.zero_point = torch.round(-lo / self.scale).clamp(0, levels)
            self.qmin, self.qmax = 0, levels
            at_lo, at_hi = (x == lo) & (lo < 0), (x == hi) & (hi > 0)
            self.pin_mask = at_lo | at_hi
            self.pin_code = torch.where(at_hi, levels * one, zero).expand_as(x)

    def codes(self, v: Tensor, cols: slice) -> Tensor:
        code = (torch.round(v / self.step) + self.zero_point).clamp(self.qmin, self.qmax)
        return torch.where(self.pin_mask[:, cols], self.pin_code[:, cols], code)

    def values(self, code: Tensor) -> Tensor:
        return (code - self.zero_point) * self.scale


def _quantize_rows(w: Tensor, opts: dict[str, Any], ch_axis: int) -> tuple[Tensor, _Grid, Tensor]:
    """``(codes [C, K], grid, values [C, K])`` in the compute dtype, for validated options ``opts``."""
    x = _to_rows(w, ch_axis, _compute_dtype(w))
    grid = _Grid(x, opts["bits"], opts["symmetric"], opts["per_channel"], opts["ternary"])
    strength = opts["error_diffusion"]
    if strength == 0.0 or x.shape[1] < 2:
        codes = grid.codes(x, slice(None))
        return codes, grid, grid.values(codes)
    codes = torch.empty_like(x)
    carry = torch.zeros_like(x[:, :1])
    for j in range(x.shape[1]):
        cols = slice(j, j + 1)
        v = x[:, cols] + carry
        code = grid.codes(v, cols)
        codes[:, cols] = code
        carry = strength * (v - grid.values(code))
    return codes, grid, grid.values(codes)


def _prepare(w, bits, symmetric, per_channel, ternary, error_diffusion, ch_axis):
    w = _check_tensor(w)
    opts = check_quant_options(bits, symmetric, per_channel, ternary, error_diffusion)
    axis = _check_ch_axis(ch_axis, w.ndim)
    return w, opts, axis


def fake_quantize(
    w: Tensor,
    bits: int = 8,
    symmetric: bool = True,
    per_channel: bool = False,
    ternary: bool = False,
    error_diffusion: float = 0.0,
    ch_axis: int = 0,
) -> Tensor:
    """Quantise ``w`` to integer codes and dequantise it again (forward only, no gradient).

    The grids, the ternary scale, error diffusion and the exact idempotence guarantee are described
    in the module docstring (:mod:`lightning_distill.quantization`). Use :func:`ste_fake_quantize`
    inside a network: this function runs under ``torch.no_grad()`` and returns a tensor without
    history.

    Args:
        w: float tensor of any shape; viewed as rows ``[w.shape[ch_axis], -1]`` (one row if 1-d).
        bits: code width in [2, 8]; ignored when ``ternary=True``.
        symmetric: absmax scale and signed codes ``-(2^(b-1)-1)..2^(b-1)-1``; ``False``: min/max range
            with an integer zero point and codes ``0..2^b-1``.
        per_channel: one scale per row (output channel) instead of one per tensor.
        ternary: BitNet b1.58 absmean codes in {-1, 0, +1}, TWN least-squares scale.
        error_diffusion: share ``s`` in [0, 1] of each element's error carried to the next one of its row.
        ch_axis: the output-channel dimension (0 for ``nn.Linear`` and ``nn.Conv*`` weights).

    Returns:
        a tensor of ``w``'s shape and dtype whose rows hold at most ``2^bits`` (ternary: 3) distinct
        values: ``{-a, 0, a}`` per tensor / row for ternary.

    Example::

        >>> import torch
        >>> fake_quantize(torch.tensor([-0.5, 0.0, 0.4, 1.0]), bits=2, symmetric=False)
        tensor([-0.5000,  0.0000,  0.5000,  1.0000])
    """
    w, o, axis = _prepare(w, bits, symmetric, per_channel, ternary, error_diffusion, ch_axis)
    if w.numel() == 0:
        return w.detach().clone()
    with torch.no_grad():
        _, _, values = _quantize_rows(w, o, axis)
        return _from_rows(values, w, axis).to(w.dtype)


def quantization_error(
    w: Tensor,
    bits: int = 8,
    symmetric: bool = True,
    per_channel: bool = False,
    ternary: bool = False,
    error_diffusion: float = 0.0,
    ch_axis: int = 0,
) -> Tensor:
    r"""Mean squared quantisation error :math:`\frac{1}{n}\sum_i (w_i - \mathrm{fq}(w)_i)^2` (a scalar).

    Same options as :func:`fake_quantize`. Computed in float64 and returned in ``w``'s dtype
    (at least float32); it is >= 0, and exactly 0 for a tensor already on its grid (the output of
    :func:`fake_quantize` with the same options), 0 for an empty tensor.

    Example::

        >>> import torch
        >>> w = torch.tensor([-1.0, -0.375, 0.25, 0.625])  # 2 bits: grid {-1, 0, 1}
        >>> float(quantization_error(w, bits=2))  # (0.375^2 + 0.25^2 + 0.375^2) / 4
        0.0859375
    """
    w, o, axis = _prepare(w, bits, symmetric, per_channel, ternary, error_diffusion, ch_axis)
    out_dtype = torch.promote_types(w.dtype, torch.float32)
    if w.numel() == 0:
        return torch.zeros((), dtype=out_dtype, device=w.device)
    with torch.no_grad():
        _, _, values = _quantize_rows(w, o, axis)
        rows = _to_rows(w, axis, values.dtype)
        return (rows - values.to(w.dtype).to(values.dtype)).pow(2).mean().to(out_dtype)


class _STEFakeQuantize(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w, bits, symmetric, per_channel, ternary, error_diffusion, ch_axis):  # type: ignore[override]
        return fake_quantize(w, bits, symmetric, per_channel, ternary, error_diffusion, ch_axis)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        return grad, None, None, None, None, None, None


def ste_fake_quantize(
    w: Tensor,
    bits: int = 8,
    symmetric: bool = True,
    per_channel: bool = False,
    ternary: bool = False,
    error_diffusion: float = 0.0,
    ch_axis: int = 0,
) -> Tensor:
    r""":func:`fake_quantize` in the forward, the identity in the backward (straight-through estimator).

    :math:`\partial L/\partial w = \partial L/\partial \mathrm{fq}(w)` everywhere: the plain
    identity STE of Bengio et al. (2013) that BitNet b1.58 trains with. The clipped variant (zero
    gradient outside the quantisation range) is not used: scales come from the tensor itself
    (absmax, min/max), so for k-bit grids nothing lies outside the range; only ternary clips
    (values beyond ``1.5 * gamma`` map to the same code), and BitNet passes those gradients too.

    Example::

        >>> import torch
        >>> w = torch.tensor([0.3, -0.8, 1.0], requires_grad=True)
        >>> (ste_fake_quantize(w, bits=2) * torch.tensor([1.0, 2.0, 3.0])).sum().backward()
        >>> w.grad
        tensor([1., 2., 3.])
    """
    return _STEFakeQuantize.apply(w, bits, symmetric, per_channel, ternary, error_diffusion, ch_axis)


# ---------------------------------------------------------------------------------- modules
class WeightFakeQuantize(nn.Module):
    """Parametrization (``torch.nn.utils.parametrize``) that fake-quantises a weight with the STE.

    Registered on a layer's ``weight`` by :func:`quantize_model`: the layer's float *latent* weight
    lives in ``layer.parametrizations.weight.original`` (what the optimizer updates and the
    checkpoint stores); reading ``layer.weight`` returns :func:`ste_fake_quantize` of it. The mean
    squared quantisation error of the last forward is kept in :attr:`last_error` (detached).
    """

    def __init__(
        self,
        bits: int = 8,
        symmetric: bool = True,
        per_channel: bool = False,
        ternary: bool = False,
        error_diffusion: float = 0.0,
        ch_axis: int = 0,
    ) -> None:
        super().__init__()
        o = check_quant_options(bits, symmetric, per_channel, ternary, error_diffusion)
        self.bits, self.symmetric, self.per_channel = o["bits"], o["symmetric"], o["per_channel"]
        self.ternary, self.error_diffusion = o["ternary"], o["error_diffusion"]
        _check_ch_axis(ch_axis, 1)  # the type; the value is checked against the weight in the forward
        self.ch_axis = int(ch_axis)
        self.last_error: Optional[Tensor] = None

    def options(self) -> dict[str, Any]:
        return {
            "bits": self.bits,
            "symmetric": self.symmetric,
            "per_channel": self.per_channel,
            "ternary": self.ternary,
            "error_diffusion": self.error_diffusion,
            "ch_axis": self.ch_axis,
        }

    def forward(self, w: Tensor) -> Tensor:
        q = ste_fake_quantize(w, **self.options())
        with torch.no_grad():
            self.last_error = (w.detach().float() - q.detach().float()).pow(2).mean()
        return q

    def extra_repr(self) -> str:
        if self.ternary:
            head = "ternary"
        else:
            head = f"bits={self.bits}, {'symmetric' if self.symmetric else 'asymmetric'}"
        return f"{head}, per_channel={self.per_channel}, error_diffusion={self.error_diffusion}"


class ActivationFakeQuantize:
    """Forward pre-hook fake-quantising a layer's input: per tensor, dynamic, asymmetric, with the STE.

    The range ``[min(x, 0), max(x, 0)]`` is the current batch's (so a sample's output depends a
    little on the rest of its batch, as in dynamic per-tensor quantisation engines); post-ReLU inputs
    use all ``2^bits`` codes. Registered by :func:`quantize_model` when ``activation_bits`` is set.
    """

    def __init__(self, bits: int) -> None:
        self.bits = _check_bits(bits, "activation_bits")

    def __call__(self, module: nn.Module, args: tuple) -> Optional[tuple]:
        if not args or not isinstance(args[0], Tensor) or not args[0].is_floating_point():
            return None
        return (ste_fake_quantize(args[0], bits=self.bits, symmetric=False),) + tuple(args[1:])

    def __repr__(self) -> str:
        return f"ActivationFakeQuantize(bits={self.bits})"


def _weight_quantizer(module: nn.Module) -> Optional[WeightFakeQuantize]:
    if not parametrize.is_parametrized(module, "weight"):
        return None
    found = [p for p in module.parametrizations.weight if isinstance(p, WeightFakeQuantize)]
    return found[0] if found else None


def _activation_hooks(module: nn.Module) -> list[int]:
    return [key for key, hook in module._forward_pre_hooks.items() if isinstance(hook, ActivationFakeQuantize)]


def quantized_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The layers of ``model`` whose weight is fake-quantised, by module name (``""`` for the root)."""
    root = model.model if isinstance(model, QuantizedModel) else model
    return {name: m for name, m in root.named_modules() if _weight_quantizer(m) is not None}


def _normalise_skip(skip: Any) -> tuple[str, ...]:
    if skip is None:
        return ()
    if isinstance(skip, str):
        return (skip,)
    if not isinstance(skip, (list, tuple, set, frozenset)) or not all(isinstance(s, str) for s in skip):
        raise TypeError(f"`skip` must be a sequence of module names (str), got {skip!r}.")
    return tuple(skip)


def quantize_model(
    model: nn.Module,
    bits: int = 8,
    ternary: bool = False,
    symmetric: bool = True,
    per_channel: bool = False,
    error_diffusion: float = 0.0,
    activation_bits: Optional[int] = None,
    skip: Sequence[str] = (),
) -> nn.Module:
    """Fake-quantise the weights of ``model``'s ``nn.Linear`` / ``nn.Conv1d/2d/3d`` layers, **in place**.

    Each such layer's ``weight`` gets a :class:`WeightFakeQuantize` parametrization
    (``torch.nn.utils.parametrize.register_parametrization``): the float latent weight becomes
    ``layer.parametrizations.weight.original`` -- the parameter the optimizer updates and the
    checkpoint stores -- and every forward uses its fake-quantised value, with the straight-through
    estimator in the backward. Biases, BatchNorm / LayerNorm parameters, embeddings and every other
    layer stay float. With ``activation_bits``, each quantised layer's *input* is fake-quantised
    too (:class:`ActivationFakeQuantize`, a forward pre-hook: per tensor, dynamic, STE).

    Module objects with parametrizations cannot be pickled (``torch.save(model)``, ``ddp_spawn``):
    save state dicts (what Lightning checkpoints do) or use :func:`save_quantized`.

    Args:
        model: the network; modified in place and returned.
        bits, ternary, symmetric, per_channel, error_diffusion: see :func:`fake_quantize`
            (``ternary=True`` wins over ``bits``).
        activation_bits: code width in [2, 8] for the layers' inputs, or ``None`` (float inputs).
        skip: names (as in ``model.named_modules()``) of layers to keep in float -- commonly the
            first and / or last layer, e.g. ``("block1.1", "head")``.

    Example::

        >>> import torch
        >>> from lightning_distill.models import DigitsMLP
        >>> model = quantize_model(DigitsMLP(), ternary=True, skip=["head"])
        >>> sorted(quantized_layers(model))
        ['block1.1']
        >>> model.block1[1].weight.unique().numel() <= 3
        True
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"`model` must be a torch.nn.Module, got {type(model).__name__}.")
    o = check_quant_options(bits, symmetric, per_channel, ternary, error_diffusion, activation_bits)
    skip = _normalise_skip(skip)
    if quantized_layers(model):
        raise ValueError(
            f"`model` ({type(model).__name__}) is already fake-quantised (layers {sorted(quantized_layers(model))}); "
            "pass the plain float model (or load_quantized() to get one back)."
        )
    candidates = {name: m for name, m in model.named_modules() if isinstance(m, QUANTIZABLE_LAYERS)}
    unknown = [name for name in skip if name not in candidates]
    if unknown:
        raise ValueError(
            f"`skip` names layers that are not quantisable layers of {type(model).__name__}: {unknown!r}. "
            f"Valid names: {sorted(candidates)!r}."
        )
    targets = {name: m for name, m in candidates.items() if name not in skip}
    if not targets:
        raise ValueError(
            f"nothing to quantise in {type(model).__name__}: it has no nn.Linear / nn.Conv1d/2d/3d layer outside "
            f"`skip`={list(skip)!r}. Quantisable layers: {sorted(candidates)!r}."
        )
    for name, layer in targets.items():
        if parametrize.is_parametrized(layer, "weight"):
            raise ValueError(
                f"layer {name!r} already has a parametrization on its weight (weight_norm, spectral_norm, ...); "
                "fake quantisation does not stack on other parametrizations: remove them or add the layer to `skip`."
            )
    weight_opts = {k: o[k] for k in ("bits", "symmetric", "per_channel", "ternary", "error_diffusion")}
    for layer in targets.values():
        parametrize.register_parametrization(layer, "weight", WeightFakeQuantize(**weight_opts, ch_axis=0))
        if o["activation_bits"] is not None:
            layer.register_forward_pre_hook(ActivationFakeQuantize(o["activation_bits"]))
    return model


def _unquantize(model: nn.Module) -> nn.Module:
    """Remove fake quantisation in place (weights back to the latent floats, activation hooks gone)."""
    for layer in quantized_layers(model).values():
        parametrize.remove_parametrizations(layer, "weight", leave_parametrized=False)
    for layer in model.modules():
        for key in _activation_hooks(layer):
            del layer._forward_pre_hooks[key]
    return model


class QuantizedModel(nn.Module):
    """A network whose ``nn.Linear`` / ``nn.Conv`` weights are fake-quantised: usable as a model in YAML.

    ``Classifier(model=QuantizedModel(DigitsMLP(), ternary=True))`` is the "ternary student without
    KD" baseline of :class:`~lightning_distill.strategies.quant_aware.QuantAwareDistillation`. The
    wrapped network is quantised in place by :func:`quantize_model` (same arguments, same defaults:
    every Linear / Conv weight, biases and BatchNorm stay float, ``skip`` keeps named layers float)
    and stored as ``self.model``; the forward is the wrapped network's.

    Example::

        >>> import torch
        >>> from lightning_distill import Classifier
        >>> from lightning_distill.models import DigitsMLP
        >>> net = QuantizedModel(DigitsMLP(), ternary=True)
        >>> net(torch.zeros(2, 1, 8, 8)).shape
        torch.Size([2, 10])
        >>> module = Classifier(net)
    """

    def __init__(
        self,
        model: nn.Module,
        bits: int = 8,
        ternary: bool = False,
        symmetric: bool = True,
        per_channel: bool = False,
        error_diffusion: float = 0.0,
        activation_bits: Optional[int] = None,
        skip: Sequence[str] = (),
    ) -> None:
        super().__init__()
        self.model = quantize_model(
            model, bits=bits, ternary=ternary, symmetric=symmetric, per_channel=per_channel,
            error_diffusion=error_diffusion, activation_bits=activation_bits, skip=skip,
        )

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs)

    def export(self, compact: bool = False) -> dict[str, Any]:
        """:func:`export_quantized` of the wrapped network."""
        return export_quantized(self, compact=compact)


# ---------------------------------------------------------------------------------- export
def pack_ternary(codes: Tensor) -> Tensor:
    """Pack ternary codes (values in {-1, 0, 1}, any shape) 4 per byte into a flat ``uint8`` tensor.

    Layout: the codes are flattened in row-major order; element ``4i + k`` is stored as ``code + 1``
    (0, 1 or 2) in bits ``2k .. 2k+1`` of byte ``i`` (least significant first); the last byte is
    padded with code 0. ``n`` codes take ``ceil(n / 4)`` bytes (a quarter of ``int8`` codes).

    Example::

        >>> import torch
        >>> packed = pack_ternary(torch.tensor([-1, 0, 1, 1, -1], dtype=torch.int8))
        >>> packed  # 0 | 1<<2 | 2<<4 | 2<<6, then 0 | 1<<2 | 1<<4 | 1<<6 (padding)
        tensor([164,  84], dtype=torch.uint8)
        >>> unpack_ternary(packed, 5)
        tensor([-1,  0,  1,  1, -1], dtype=torch.int8)
    """
    flat = codes.detach().reshape(-1).to(torch.int16)
    if flat.numel() and not bool(((flat >= -1) & (flat <= 1)).all()):
        raise ValueError("`codes` must hold ternary values in {-1, 0, 1} only (the codes of a ternary layer).")
    fields = (flat + 1).to(torch.uint8)
    pad = (-fields.numel()) % 4
    fields = torch.cat([fields, torch.ones(pad, dtype=torch.uint8, device=fields.device)]).reshape(-1, 4)
    return fields[:, 0] | (fields[:, 1] << 2) | (fields[:, 2] << 4) | (fields[:, 3] << 6)


def unpack_ternary(packed: Tensor, numel: int) -> Tensor:
    """Inverse of :func:`pack_ternary`: the first ``numel`` codes as a flat ``int8`` tensor."""
    if packed.dtype != torch.uint8 or packed.ndim != 1:
        raise ValueError(
            f"`packed` must be a 1-d uint8 tensor from pack_ternary, got {packed.dtype} of shape {tuple(packed.shape)}."
        )
    if not 0 <= numel <= 4 * packed.numel():
        raise ValueError(
            f"`numel`={numel!r} does not fit {packed.numel()} packed bytes (at most {4 * packed.numel()} codes)."
        )
    fields = torch.stack([(packed >> (2 * k)) & 3 for k in range(4)], dim=1).reshape(-1)[:numel]
    if bool((fields == 3).any()):
        raise ValueError("`packed` holds the invalid 2-bit field 3: not a pack_ternary payload.")
    return fields.to(torch.int8) - 1


def _original_key(name: str) -> str:
    return f"{name}.parametrizations.weight.original" if name else "parametrizations.weight.original"


def _weight_key(name: str) -> str:
    return f"{name}.weight" if name else "weight"


def export_quantized(model: nn.Module, compact: bool = False) -> dict[str, Any]:
    """Integer codes and scales of every fake-quantised layer, plus the float state of the rest.

    Returns a dict of tensors, strings, numbers and lists only (``torch.load(..., weights_only=True)``
    reads it back)::

        {"format": "lightning_distill.quantized/1",
         "layers": {name: {"codes": int8 (symmetric, ternary) or uint8 (asymmetric, 0..2^b-1), weight shape,
                           "packed": uint8, ternary only (see pack_ternary), "layout": str (ternary only),
                           "scale": float32, [C] per channel or [] per tensor,
                           "zero_point": int32 like scale (asymmetric only),
                           "shape": list[int], "dtype": str, "options": dict, "activation_bits": int | None}},
         "state_dict": the model's float state without the quantised weights (biases, BatchNorm, float layers)}

    ``weight = (codes - zero_point) * scale`` (scale broadcast along dim 0) reproduces the
    fake-quantised weight exactly (scales keep 16 significant bits). ``compact=True`` leaves out
    the ``int8`` codes of ternary layers, keeping only the packed bytes (what :func:`save_quantized` writes).

    Args:
        model: a network prepared by :func:`quantize_model` or a :class:`QuantizedModel`.
        compact: drop the redundant ``int8`` codes of ternary layers.
    """
    root = model.model if isinstance(model, QuantizedModel) else model
    layers = quantized_layers(root)
    if not layers:
        raise ValueError(
            f"{type(root).__name__} has no fake-quantised layer to export: build it with quantize_model() "
            "or QuantizedModel() (a QuantAwareDistillation student is one)."
        )
    skip_keys = {_original_key(name) for name in layers}
    state = {k: v.detach().cpu().clone() for k, v in root.state_dict().items() if k not in skip_keys}
    exported: dict[str, Any] = {}
    for name, layer in layers.items():
        quantizer = _weight_quantizer(layer)
        opts = quantizer.options()
        latent = layer.parametrizations.weight.original.detach()
        axis = _check_ch_axis(opts["ch_axis"], latent.ndim)
        codes_rows, grid, _ = _quantize_rows(latent, opts, axis)
        codes = _from_rows(codes_rows, latent, axis).cpu()
        asymmetric = not opts["ternary"] and not opts["symmetric"]
        scale = grid.scale.reshape(-1) if opts["per_channel"] else grid.scale.reshape(())
        entry: dict[str, Any] = {
            "codes": codes.to(torch.uint8 if asymmetric else torch.int8),
            "scale": scale.cpu().to(torch.float32),
            "shape": list(latent.shape),
            "dtype": str(latent.dtype).replace("torch.", ""),
            "options": opts,
            "activation_bits": next(
                (h.bits for h in layer._forward_pre_hooks.values() if isinstance(h, ActivationFakeQuantize)), None
            ),
        }
        if asymmetric:
            zp = grid.zero_point.reshape(-1) if opts["per_channel"] else grid.zero_point.reshape(())
            entry["zero_point"] = zp.cpu().to(torch.int32)
        if opts["ternary"]:
            entry["packed"] = pack_ternary(entry["codes"])
            entry["layout"] = _TERNARY_LAYOUT
            if compact:
                del entry["codes"]
        exported[name] = entry
    return {"format": FORMAT, "layers": exported, "state_dict": state}


def save_quantized(model: nn.Module, path: Union[str, os.PathLike]) -> Path:
    """Write :func:`export_quantized` (``compact=True``: ternary layers as packed bytes) to ``path``."""
    path = Path(path)
    torch.save(export_quantized(model, compact=True), path)
    return path


def _dequantize(entry: dict[str, Any], name: str) -> Tensor:
    shape = [int(s) for s in entry["shape"]]
    numel = math.prod(shape)
    if "codes" in entry:
        codes = entry["codes"]
    elif "packed" in entry:
        codes = unpack_ternary(entry["packed"], numel)
    else:
        raise ValueError(f"layer {name!r} of the quantised export has neither 'codes' nor 'packed' entries.")
    codes = codes.reshape(shape).to(torch.float64)
    view = [1] * len(shape)  # per-channel parameters broadcast along the channel axis
    if len(shape) >= 2:
        view[int(entry["options"].get("ch_axis", 0))] = -1

    def broadcast(t: Tensor) -> Tensor:
        return t.to(torch.float64).reshape(view if t.numel() > 1 else [])

    if entry.get("zero_point") is not None:
        codes = codes - broadcast(entry["zero_point"])
    return codes * broadcast(entry["scale"])


def load_quantized(path_or_dict: Union[str, os.PathLike, dict], model: nn.Module) -> nn.Module:
    """Rebuild a plain float network from :func:`export_quantized` / :func:`save_quantized` output.

    ``model`` is the architecture (a fresh instance such as ``DigitsMLP()``; a fake-quantised one or
    a :class:`QuantizedModel` is unwrapped in place first). Its quantised layers get the dequantised
    codes as ordinary float weights, everything else the exported float state (strict: every key
    must fit). Layers exported with ``activation_bits`` get their input fake-quantiser back (a
    parameter-free forward pre-hook) so the outputs stay equal to the fake-quantised network's.
    Files are read with ``torch.load(..., weights_only=True)``.

    Returns:
        the plain network (``model`` itself, or the network inside a :class:`QuantizedModel`).

    Example::

        >>> import torch
        >>> from lightning_distill.models import DigitsMLP
        >>> student = quantize_model(DigitsMLP(), ternary=True)
        >>> plain = load_quantized(export_quantized(student), DigitsMLP())
        >>> x = torch.rand(4, 1, 8, 8)
        >>> torch.equal(plain(x), student(x))
        True
    """
    from lightning_distill.checkpoint import read_checkpoint

    if isinstance(path_or_dict, dict):
        export = path_or_dict
    elif isinstance(path_or_dict, (str, os.PathLike)):
        export = read_checkpoint(path_or_dict, argument="path_or_dict")
    else:
        raise TypeError(
            f"`path_or_dict` must be a path or the dict of export_quantized(), got {type(path_or_dict).__name__}."
        )
    if export.get("format") != FORMAT or not isinstance(export.get("layers"), dict):
        raise ValueError(
            f"`path_or_dict` is not a lightning_distill quantised export (format {export.get('format')!r}, expected "
            f"{FORMAT!r}): write it with save_quantized() or export_quantized()."
        )
    if not isinstance(model, nn.Module):
        raise TypeError(f"`model` must be a torch.nn.Module (the architecture to fill), got {type(model).__name__}.")
    root = _unquantize(model.model if isinstance(model, QuantizedModel) else model)
    state = dict(export.get("state_dict", {}))
    for name, entry in export["layers"].items():
        try:
            layer = root.get_submodule(name)
        except AttributeError:
            raise ValueError(
                f"the quantised export has layer {name!r}, which {type(root).__name__} does not have: pass the "
                "architecture the export was made from."
            ) from None
        if tuple(layer.weight.shape) != tuple(entry["shape"]):
            raise ValueError(
                f"layer {name!r}: the export's weight has shape {tuple(entry['shape'])}, {type(root).__name__}'s has "
                f"{tuple(layer.weight.shape)}; build the model with the same sizes."
            )
        state[_weight_key(name)] = _dequantize(entry, name).to(layer.weight.dtype)
    try:
        root.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise ValueError(f"the quantised export does not fit {type(root).__name__}: {err}") from None
    for name, entry in export["layers"].items():
        if entry.get("activation_bits") is not None:
            root.get_submodule(name).register_forward_pre_hook(ActivationFakeQuantize(entry["activation_bits"]))
    return root
