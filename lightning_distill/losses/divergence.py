"""Divergences between softened distributions (Hinton's KD term and its variants) and the hard-label task loss."""

from __future__ import annotations

import math
import numbers
from typing import Literal, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["KL_MODES", "check_skew", "check_temperature", "cross_entropy_loss", "kd_loss", "kl_per_position"]

KL_MODES = ("forward", "reverse", "symmetric", "js", "skew_forward", "skew_reverse")

Reduction = Literal["batchmean", "sum", "none"]
_REDUCTIONS = ("batchmean", "sum", "none")


def check_temperature(value: Union[float, Tensor], name: str = "temperature") -> Union[float, Tensor]:
    """Validate a temperature: finite and > 0 (a number, or a scalar / per-sample tensor).

    Tensors on the CPU are checked at once (``ValueError``); on an accelerator the check is an
    asynchronous device assert, so it never forces a host sync on the training hot path.
    """
    if isinstance(value, Tensor):
        if value.device.type == "cpu":
            if value.numel() and not bool(torch.isfinite(value).all() and (value > 0).all()):
                raise ValueError(f"`{name}` must be finite and > 0 everywhere, got {value!r}.")
        else:
            torch._assert_async(torch.isfinite(value).all() & (value > 0).all(), f"`{name}` must be finite and > 0")
        return value
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 < float(value) < math.inf:
        raise ValueError(
            f"`{name}` must be a finite number > 0, got {value!r}. "
            "Hinton et al. use 1-20 (T=1 is the plain softmax); 4 is a common start."
        )
    return float(value)


def _acc_dtype(x: Tensor) -> torch.dtype:
    """Accumulation dtype: float32, or float64 when the input already is float64."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _temperature_tensor(temperature: Union[float, Tensor], logits: Tensor) -> Tensor:
    """Temperature as a float32 tensor broadcastable against ``logits`` ([N, C] or [N, L, C]).

    A scalar stays a scalar; a per-sample temperature of shape ``[N]`` (or ``[N, 1]``) is
    reshaped to ``[N, 1]`` / ``[N, 1, 1]``.
    """
    t = torch.as_tensor(temperature, dtype=torch.float32, device=logits.device)
    if t.ndim == 0:
        return t
    t = t.reshape(t.shape[0], *([1] * (logits.ndim - 1)))
    if t.shape[0] != logits.shape[0]:
        raise ValueError(
            f"a per-sample `temperature` must have one value per sample: got shape "
            f"{tuple(torch.as_tensor(temperature).shape)} for logits of shape {tuple(logits.shape)}."
        )
    return t


def check_skew(value: float) -> float:
    """Validate the skew coefficient of ``kl="skew_forward"`` / ``"skew_reverse"``: in [0, 1)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 <= float(value) < 1.0:
        raise ValueError(
            f"`skew` must be in [0, 1) (the share of the target distribution mixed into the other one; "
            f"0 gives the plain KL, DistiLLM uses 0.1), got {value!r}."
        )
    return float(value)


def kl_per_position(
    student_logits: Tensor,
    teacher_logits: Tensor,
    temperature: Union[float, Tensor] = 1.0,
    kl: str = "forward",
    skew: float = 0.1,
) -> Tensor:
    """Divergence between softened teacher and student distributions at every position.

    No ``T**2`` scaling and no reduction: the result has the logits' shape without the class
    dimension (``[N]`` or ``[N, L]``), float32. See :func:`kd_loss` for the formulas.
    """
    if kl not in KL_MODES:
        raise ValueError(f"`kl` must be one of {KL_MODES}, got {kl!r}.")
    check_skew(skew)
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            "student and teacher logits must have the same shape, got "
            f"{tuple(student_logits.shape)} (student) and {tuple(teacher_logits.shape)} (teacher). "
            "Check that both models predict the same number of classes / vocabulary size."
        )
    device_type = student_logits.device.type
    with torch.autocast(device_type=device_type, enabled=False):
        dtype = _acc_dtype(student_logits)
        t = _temperature_tensor(temperature, student_logits).to(dtype)
        log_p_s = F.log_softmax(student_logits.to(dtype) / t, dim=-1)
        log_p_t = F.log_softmax(teacher_logits.to(dtype) / t, dim=-1)
        if kl == "forward":  # KL(p_T || p_S): mean-seeking, Hinton's choice
            return _kl_logspace(log_p_t, log_p_s)
        if kl == "reverse":  # KL(p_S || p_T): mode-seeking
            return _kl_logspace(log_p_s, log_p_t)
        if kl == "symmetric":  # mean of both directions, same scale as either one
            return 0.5 * (_kl_logspace(log_p_t, log_p_s) + _kl_logspace(log_p_s, log_p_t))
        if kl in ("skew_forward", "skew_reverse"):  # DistiLLM: KL(p || a p + (1 - a) q)
            p, q = (log_p_t, log_p_s) if kl == "skew_forward" else (log_p_s, log_p_t)
            if skew == 0.0:
                return _kl_logspace(p, q)
            log_mix = torch.logaddexp(p + math.log(skew), q + math.log1p(-skew))
            return _kl_logspace(p, log_mix)
        # Jensen-Shannon: 1/2 KL(p_T || m) + 1/2 KL(p_S || m), m = (p_T + p_S) / 2
        log_m = torch.logaddexp(log_p_t, log_p_s) - math.log(2.0)
        return 0.5 * (_kl_logspace(log_p_t, log_m) + _kl_logspace(log_p_s, log_m))


def _kl_logspace(log_p: Tensor, log_q: Tensor) -> Tensor:
    """KL(p || q) = sum_c p_c (log p_c - log q_c) over the last dim, from log-probabilities.

    Terms with p_c == 0 contribute exactly 0 (even where log q_c is very negative); a NaN probability (a teacher
    with NaN weights) gives a NaN term -- ``p != 0``, not ``p > 0``, so the loss shows it instead of a silent 0
    whose gradient is NaN.
    """
    p = log_p.exp()
    terms = torch.where(p != 0, p * (log_p - log_q), torch.zeros_like(p))
    # KL >= 0 mathematically; clamp the tiny negative values float rounding can produce
    return terms.sum(dim=-1).clamp_min(0.0)


def kd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    temperature: Union[float, Tensor] = 4.0,
    kl: str = "forward",
    mask: Optional[Tensor] = None,
    reduction: Reduction = "batchmean",
    skew: float = 0.1,
) -> Tensor:
    r"""Hinton et al. (2015) knowledge-distillation loss, "Distilling the Knowledge in a Neural Network".

    With :math:`p_T = \mathrm{softmax}(z_T / T)` and :math:`p_S = \mathrm{softmax}(z_S / T)`:

    .. math::

        \mathcal{L}_{KD} = T^2 \cdot \frac{1}{|V|} \sum_{i \in V} D(p_T^{(i)}, p_S^{(i)})

    where :math:`V` is the set of samples (``[N, C]`` logits) or of valid tokens (``[N, L, C]``
    logits, ``mask`` True where valid) and :math:`D` is chosen by ``kl``:

    * ``"forward"``: :math:`KL(p_T \| p_S) = \sum_c p_T \log(p_T / p_S)` (Hinton; mean-seeking)
    * ``"reverse"``: :math:`KL(p_S \| p_T)` (mode-seeking, as in MiniLLM)
    * ``"symmetric"``: :math:`\tfrac12 [KL(p_T \| p_S) + KL(p_S \| p_T)]` -- the *mean* of both
      directions (half of Jeffreys' divergence), so it lives on the same scale as either one
    * ``"js"``: Jensen-Shannon, :math:`\tfrac12 KL(p_T \| m) + \tfrac12 KL(p_S \| m)`,
      :math:`m = \tfrac12 (p_T + p_S)` (bounded by :math:`\log 2`)
    * ``"skew_forward"``: skew KL :math:`KL(p_T \| a\, p_T + (1-a)\, p_S)` and
      ``"skew_reverse"``: skew reverse KL :math:`KL(p_S \| a\, p_S + (1-a)\, p_T)`, with
      :math:`a` = ``skew`` (DistiLLM, Ko et al. 2024, arXiv:2402.03898; their default
      :math:`a = 0.1`). Mixing a share of the first distribution into the second keeps the
      divergence bounded by :math:`-\log a` where the student puts almost no mass (stable
      gradients for large vocabularies); ``skew=0`` gives back the plain direction.

    Args:
        student_logits: ``[N, C]`` or ``[N, L, C]`` raw student scores (any float dtype).
        teacher_logits: same shape as ``student_logits``; pass them detached / computed under
            ``no_grad`` (the loss does not detach them, so a learnable teacher also works).
        temperature: ``T > 0``; a float, a scalar tensor (learnable, CTKD) or one value per
            sample, shape ``[N]``.
        kl: one of :data:`KL_MODES`.
        mask: optional ``[N]`` or ``[N, L]`` boolean (or 0/1) tensor, True where a position
            counts. The loss averages over valid positions only; if none is valid it is 0
            (never NaN), and masked positions may hold any values, even ``inf``.
        reduction: ``"batchmean"`` (default, see above), ``"sum"`` (sum over valid positions)
            or ``"none"`` (per-position values ``[N]`` / ``[N, L]``, already scaled by ``T**2``,
            masked positions set to 0).
        skew: the mixing share :math:`a \in [0, 1)` of the skew divergences (ignored by the others).

    Returns:
        A float32 tensor (float64 for float64 logits): scalar, or per-position for
        ``reduction="none"``. An empty batch gives 0.

    Example::

        >>> import torch
        >>> from lightning_distill.losses import kd_loss
        >>> s, t = torch.tensor([[2.0, 0.0, -1.0]]), torch.tensor([[1.0, 0.5, -1.0]])
        >>> round(kd_loss(s, t, temperature=2.0).item(), 4)
        0.2329
        >>> kd_loss(t, t).item()
        0.0
    """
    check_temperature(temperature)
    if reduction not in _REDUCTIONS:
        raise ValueError(f"`reduction` must be one of {_REDUCTIONS}, got {reduction!r}.")
    if student_logits.ndim not in (2, 3):
        raise ValueError(
            "logits must be [N, C] (classification) or [N, L, C] (token-level), got shape "
            f"{tuple(student_logits.shape)}."
        )
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            "student and teacher logits must have the same shape, got "
            f"{tuple(student_logits.shape)} (student) and {tuple(teacher_logits.shape)} (teacher). "
            "Check that both models predict the same number of classes / vocabulary size."
        )
    valid = None
    s_logits, t_logits = student_logits, teacher_logits
    if mask is not None:
        if tuple(mask.shape) != tuple(student_logits.shape[:-1]):
            raise ValueError(
                f"`mask` must have shape {tuple(student_logits.shape[:-1])} (the logits without the "
                f"class dimension), got {tuple(mask.shape)}."
            )
        valid = mask.bool()
        # masked positions may hold garbage (inf, nan): replace them before the softmax so
        # that neither the value nor the gradient can turn into NaN
        keep = valid.unsqueeze(-1)
        s_logits = torch.where(keep, s_logits, torch.zeros((), dtype=s_logits.dtype, device=s_logits.device))
        t_logits = torch.where(keep, t_logits, torch.zeros((), dtype=t_logits.dtype, device=t_logits.device))

    per_pos = kl_per_position(s_logits, t_logits, temperature, kl, skew)
    t = _temperature_tensor(temperature, s_logits).to(per_pos.dtype)
    per_pos = per_pos * t.squeeze(-1) ** 2 if t.ndim else per_pos * t**2
    if valid is not None:
        per_pos = torch.where(valid, per_pos, torch.zeros_like(per_pos))

    if reduction == "none":
        return per_pos
    total = per_pos.sum()
    if reduction == "sum":
        return total
    if valid is not None:
        return total / valid.sum().clamp_min(1)
    return total / max(per_pos.numel(), 1)


def cross_entropy_loss(
    logits: Tensor, target: Optional[Tensor], ignore_index: int = -100, label_smoothing: float = 0.0
) -> Tensor:
    """Hard-label cross-entropy averaged over labelled samples / tokens only (the task term).

    ``[N, C]`` logits with ``[N]`` targets or ``[N, L, C]`` with ``[N, L]``; entries equal to
    ``ignore_index`` do not count, so a half-labelled batch averages over its labelled half. Returns
    0 (not NaN) when nothing is labelled or ``target`` is ``None``. Float32, whatever the logits' dtype.

    Example::

        >>> import torch
        >>> z = torch.tensor([[2.0, 0.0], [0.0, 2.0]])
        >>> round(cross_entropy_loss(z, torch.tensor([0, -100])).item(), 4)  # the first sample only
        0.1269
        >>> cross_entropy_loss(z, None).item()
        0.0
    """
    if target is None:
        return logits.new_zeros((), dtype=torch.float32)
    # [N, C] logits go in as they are (a reshape would add an autograd node and backward time)
    flat_logits = (logits if logits.ndim == 2 else logits.reshape(-1, logits.shape[-1])).float()
    flat_target = target if target.ndim == 1 else target.reshape(-1)
    if flat_target.is_cpu:
        # on the CPU the check costs no sync: the built-in mean (one autograd node, half the backward time of
        # sum / count) when anything is labelled, an exact 0 that keeps the graph when nothing is
        if bool((flat_target != ignore_index).any()):
            return F.cross_entropy(flat_logits, flat_target, ignore_index=ignore_index, label_smoothing=label_smoothing)
        return flat_logits.sum() * 0.0
    total = F.cross_entropy(
        flat_logits, flat_target, ignore_index=ignore_index, label_smoothing=label_smoothing, reduction="sum"
    )
    return total / (flat_target != ignore_index).sum().clamp_min(1)
