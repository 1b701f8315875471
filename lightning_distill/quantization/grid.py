r"""The quantisation grids: k-bit symmetric / asymmetric, per tensor / per channel, ternary; error diffusion; STE.

A tensor ``w`` is viewed as rows ``[C, K]``: ``C`` = size of dimension ``ch_axis``, one row per
output channel; a tensor with fewer than 2 dimensions is one row. The options are a
:class:`~lightning_distill.quantization.options.QuantOptions`.

Grids:

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

**Idempotence**: ``fake_quantize(fake_quantize(w)) == fake_quantize(w)`` **exactly** (bit for bit,
tolerance 0) for float32 and float64 inputs, in every mode -- per-tensor / per-channel,
symmetric / asymmetric, ternary, with error diffusion -- whenever the inputs are finite and the
nonzero scales are not float32 subnormals (below :math:`2^{-126}`; asymmetric grids reach up to
half a step beyond the data range, so keep :math:`|w|` below half the dtype's maximum). For
float16 / bfloat16 inputs the grid values are rounded to the input dtype, and a second pass agrees
only within about one ulp of the tensor's largest magnitude. To make this hold, the elements equal
to the range extremes (the absmax element; the min and max in asymmetric mode) are *pinned* to the
extreme codes: rounding gives them those codes anyway, except at exact ties under error
diffusion, and pinning keeps the output's range -- and so its scale -- equal to the input's.

**Error diffusion** (in the manner of Floyd-Steinberg dithering), ``error_diffusion = s`` in
[0, 1]: each row is walked along its flattened input dimension in order; the quantisation error of
element ``j`` (its value plus the error carried into it, minus its quantised value) times ``s`` is
added to element ``j + 1`` before that one is quantised:

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

Gradients pass the rounding with the straight-through estimator (:func:`ste_fake_quantize`).

Every public function takes the options either as keywords (``bits=4, per_channel=True``) or as
one ``options`` object, plus ``ch_axis`` (the output-channel dimension, keyword only).
"""

from __future__ import annotations

import numbers
from typing import Any, Optional

import torch
from torch import Tensor

from lightning_distill.quantization.options import QuantOptions

__all__ = ["SCALE_BITS", "fake_quantize", "quantization_error", "ste_fake_quantize"]

#: Significant bits kept in every scale (see the module docstring).
SCALE_BITS = 16


# ---------------------------------------------------------------------------------- tensor checks
def _check_tensor(w: Any) -> Tensor:
    if not isinstance(w, Tensor):
        raise TypeError(f"`w` must be a torch.Tensor, got {type(w).__name__}.")
    if not w.is_floating_point():
        raise TypeError(f"`w` must be a floating-point tensor (the float weights to quantise), got dtype {w.dtype}.")
    return w


def check_ch_axis(ch_axis: Any, ndim: int) -> int:
    """``ch_axis`` as a non-negative dimension of an ``ndim``-d tensor (0 when ``ndim < 2``: one row)."""
    if isinstance(ch_axis, bool) or not isinstance(ch_axis, numbers.Integral):
        raise TypeError(f"`ch_axis` must be an int (the output-channel dimension), got {ch_axis!r}.")
    if ndim >= 2 and not -ndim <= int(ch_axis) < ndim:
        raise ValueError(
            f"`ch_axis` must index a dimension of the {ndim}-d tensor (-{ndim}..{ndim - 1}), got {ch_axis!r}. "
            "Use 0 for nn.Linear / nn.Conv weights (output channels first)."
        )
    return int(ch_axis) % ndim if ndim >= 2 else 0


# ---------------------------------------------------------------------------------- rows and grids
def _compute_dtype(w: Tensor) -> torch.dtype:
    return torch.float32 if w.device.type == "mps" else torch.float64  # mps has no float64


def _to_rows(w: Tensor, ch_axis: int, dtype: torch.dtype) -> Tensor:
    x = w.detach().to(dtype)
    if w.ndim >= 2:
        x = x.movedim(ch_axis, 0)
        return x.reshape(x.shape[0], -1)
    return x.reshape(1, -1)


def from_rows(rows: Tensor, like: Tensor, ch_axis: int) -> Tensor:
    """Rows ``[C, K]`` back to the shape of ``like`` (the inverse of the row view, channel axis restored)."""
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

    def __init__(self, x: Tensor, options: QuantOptions) -> None:
        bits = options.bits
        dims = (1,) if options.per_channel else (0, 1)
        absx = x.abs()
        one = torch.ones((), dtype=x.dtype, device=x.device)
        zero = torch.zeros((), dtype=x.dtype, device=x.device)
        if options.ternary:
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
        elif options.symmetric:
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


def quantize_rows(w: Tensor, options: QuantOptions, ch_axis: int) -> tuple[Tensor, _Grid, Tensor]:
    """``(codes [C, K], grid, values [C, K])`` of ``w`` in the compute dtype (``ch_axis`` already checked)."""
    x = _to_rows(w, ch_axis, _compute_dtype(w))
    grid = _Grid(x, options)
    strength = options.error_diffusion
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


def _prepare(
    w: Any, options: Optional[QuantOptions], keywords: dict[str, Any], ch_axis: Any
) -> tuple[Tensor, QuantOptions, int]:
    w = _check_tensor(w)
    opts = QuantOptions.resolve(options, **keywords)
    return w, opts, check_ch_axis(ch_axis, w.ndim)


# ---------------------------------------------------------------------------------- public functions
def fake_quantize(w: Tensor, options: Optional[QuantOptions] = None, *, ch_axis: int = 0, **keywords: Any) -> Tensor:
    """Quantise ``w`` to integer codes and dequantise it again (forward only, no gradient).

    The grids, the ternary scale, error diffusion and the exact idempotence guarantee are described
    in the module docstring (:mod:`lightning_distill.quantization.grid`). Use
    :func:`ste_fake_quantize` inside a network: this function runs under ``torch.no_grad()`` and
    returns a tensor without history.

    Args:
        w: float tensor of any shape; viewed as rows ``[w.shape[ch_axis], -1]`` (one row if 1-d).
        options: a :class:`~lightning_distill.quantization.options.QuantOptions`, or ``None`` to
            build one from ``keywords``.
        ch_axis: the output-channel dimension (0 for ``nn.Linear`` and ``nn.Conv*`` weights).
        **keywords: the fields of ``QuantOptions`` (when ``options`` is ``None``):
            ``bits`` (code width in [2, 8], default 8; ignored when ``ternary=True``),
            ``symmetric`` (default ``True``: absmax scale and signed codes; ``False``: min/max range
            with an integer zero point), ``per_channel`` (one scale per row instead of one per
            tensor), ``ternary`` (BitNet b1.58 absmean codes in {-1, 0, +1}, TWN least-squares
            scale), ``error_diffusion`` (share ``s`` in [0, 1] of each element's error carried to
            the next one of its row). ``activation_bits`` is accepted and ignored.

    Returns:
        a tensor of ``w``'s shape and dtype whose rows hold at most ``2^bits`` (ternary: 3) distinct
        values: ``{-a, 0, a}`` per tensor / row for ternary.

    Example::

        >>> import torch
        >>> fake_quantize(torch.tensor([-0.5, 0.0, 0.4, 1.0]), bits=2, symmetric=False)
        tensor([-0.5000,  0.0000,  0.5000,  1.0000])
        >>> fake_quantize(torch.tensor([[-1.0, 0.25], [0.5, 0.125]]), QuantOptions(bits=2, per_channel=True))
        tensor([[-1.0000,  0.0000],
                [ 0.5000,  0.0000]])
    """
    w, o, axis = _prepare(w, options, keywords, ch_axis)
    if w.numel() == 0:
        return w.detach().clone()
    with torch.no_grad():
        _, _, values = quantize_rows(w, o, axis)
        return from_rows(values, w, axis).to(w.dtype)


def quantization_error(
    w: Tensor, options: Optional[QuantOptions] = None, *, ch_axis: int = 0, **keywords: Any
) -> Tensor:
    r"""Mean squared quantisation error :math:`\frac{1}{n}\sum_i (w_i - \mathrm{fq}(w)_i)^2` (a scalar).

    Same arguments as :func:`fake_quantize`. Computed in float64 and returned in ``w``'s dtype
    (at least float32); it is >= 0, and exactly 0 for a tensor already on its grid (the output of
    :func:`fake_quantize` with the same options), 0 for an empty tensor.

    Example::

        >>> import torch
        >>> w = torch.tensor([-1.0, -0.375, 0.25, 0.625])  # 2 bits: grid {-1, 0, 1}
        >>> float(quantization_error(w, bits=2))  # (0.375^2 + 0.25^2 + 0.375^2) / 4
        0.0859375
    """
    w, o, axis = _prepare(w, options, keywords, ch_axis)
    out_dtype = torch.promote_types(w.dtype, torch.float32)
    if w.numel() == 0:
        return torch.zeros((), dtype=out_dtype, device=w.device)
    with torch.no_grad():
        _, _, values = quantize_rows(w, o, axis)
        rows = _to_rows(w, axis, values.dtype)
        return (rows - values.to(w.dtype).to(values.dtype)).pow(2).mean().to(out_dtype)


class _STEFakeQuantize(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w, options, ch_axis):  # type: ignore[override]
        return fake_quantize(w, options, ch_axis=ch_axis)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        return grad, None, None


def ste_fake_quantize(
    w: Tensor, options: Optional[QuantOptions] = None, *, ch_axis: int = 0, **keywords: Any
) -> Tensor:
    r""":func:`fake_quantize` in the forward, the identity in the backward (straight-through estimator).

    :math:`\partial L/\partial w = \partial L/\partial \mathrm{fq}(w)` everywhere: the plain
    identity STE of Bengio et al. (2013, arXiv:1308.3432) that BitNet b1.58 trains with. The
    clipped variant (zero gradient outside the quantisation range) is not used: scales come from
    the tensor itself (absmax, min/max), so for k-bit grids nothing lies outside the range; only
    ternary clips (values beyond ``1.5 * gamma`` map to the same code), and BitNet passes those
    gradients too. Same arguments as :func:`fake_quantize`.

    Example::

        >>> import torch
        >>> w = torch.tensor([0.3, -0.8, 1.0], requires_grad=True)
        >>> (ste_fake_quantize(w, bits=2) * torch.tensor([1.0, 2.0, 3.0])).sum().backward()
        >>> w.grad
        tensor([1., 2., 3.])
    """
    return _STEFakeQuantize.apply(w, QuantOptions.resolve(options, **keywords), ch_axis)
