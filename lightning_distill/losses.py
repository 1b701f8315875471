"""Distillation losses as pure tensor functions.

Every function here is stateless: tensors in, a tensor out. Strategies in
:mod:`lightning_distill.strategies` combine them; tests in ``tests/test_losses.py`` check
them against independently computed values.

Conventions shared by every function:

* divergences are computed in float32 and in log space, whatever the input dtype or an
  enclosing autocast region, so they stay finite for logits of magnitude 1e4 and under bf16;
* the KL term is scaled by ``T**2`` (Hinton et al. 2015) so its gradient magnitude does not
  shrink as the temperature grows;
* reduction ``"batchmean"`` sums over classes and averages over samples -- or over *valid*
  tokens when logits are ``[N, L, C]`` -- never over classes (``reduction="mean"`` in
  ``F.kl_div`` silently divides by the class count, a classic KD bug).
"""

from __future__ import annotations

import math
import numbers
from typing import Literal, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "KL_MODES",
    "check_skew",
    "attention_map",
    "attention_transfer_loss",
    "check_temperature",
    "confidence_weights",
    "cka_loss",
    "cosine_feature_loss",
    "cross_entropy_loss",
    "info_nce_loss",
    "kd_loss",
    "kl_per_position",
    "linear_cka",
    "mse_feature_loss",
    "multi_teacher_kd_loss",
    "mutual_loss",
    "rkd_angle_loss",
    "rkd_distance_loss",
    "self_distillation_loss",
    "similarity_preserving_loss",
    "teacher_mixture_log_probs",
]

#: Divergences accepted by :func:`kd_loss` (``kl=``).
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

    Terms with p_c == 0 contribute exactly 0 (even where log q_c is very negative).
    """
    p = log_p.exp()
    terms = torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p))
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
    flat_target = target.reshape(-1)
    total = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(), flat_target, ignore_index=ignore_index,
        label_smoothing=label_smoothing, reduction="sum",
    )
    return total / (flat_target != ignore_index).sum().clamp_min(1)


# ---------------------------------------------------------------------------------------------
# Feature losses. Inputs are one teacher layer and one student layer, already projected to a
# common shape where the loss needs it (mse, cosine, attention spatial size). All return float32
# scalars that are >= 0 and 0 for identical inputs (except where stated).
# ---------------------------------------------------------------------------------------------


def _flat(x: Tensor) -> Tensor:
    """[N, ...] -> [N, D] float32."""
    return x.float().reshape(x.shape[0], -1)


def _masked_mean(values: Tensor, mask: Optional[Tensor]) -> Tensor:
    """Mean of ``values`` ([N] or [N, L]) over positions where ``mask`` is True (0 if none)."""
    if mask is None:
        return values.mean()
    valid = mask.bool()
    total = torch.where(valid, values, torch.zeros_like(values)).sum()
    return total / valid.sum().clamp_min(1)


def mse_feature_loss(student: Tensor, teacher: Tensor, mask: Optional[Tensor] = None) -> Tensor:
    r"""FitNets hint loss (Romero et al. 2015, arXiv:1412.6550): mean squared error.

    :math:`\frac{1}{|V| D} \sum_{i \in V} \| r(u_i) - v_i \|^2` -- the mean over every element, as
    RepDistiller's ``HintLoss`` (so its weight beta = 100 carries over). ``student`` is the
    (projected) student feature, ``teacher`` the teacher feature, same shape: ``[N, D]``,
    ``[N, L, D]`` or ``[N, C, H, W]``. ``mask`` (``[N, L]``) restricts ``[N, L, D]`` features to
    valid tokens.
    """
    _same_shape(student, teacher, "mse")
    with torch.autocast(device_type=student.device.type, enabled=False):
        sq = (student.float() - teacher.float()).pow(2)
        if mask is None:
            return sq.mean()
        return _masked_mean(sq.mean(dim=-1), mask)


def cosine_feature_loss(student: Tensor, teacher: Tensor, mask: Optional[Tensor] = None) -> Tensor:
    r"""DistilBERT's cosine embedding term (Sanh et al. 2019): :math:`1 - \cos(h_S, h_T)`, averaged.

    The cosine is taken along the feature dimension: the last one for ``[N, D]`` / ``[N, L, D]``
    (per sample / token; ``mask`` selects valid tokens), the channel dimension for
    ``[N, C, H, W]`` (per spatial position). Range [0, 2].
    """
    _same_shape(student, teacher, "cosine")
    dim = 1 if student.ndim == 4 else -1
    with torch.autocast(device_type=student.device.type, enabled=False):
        cos = F.cosine_similarity(student.float(), teacher.float(), dim=dim, eps=1e-8)
        # float32 rounding can put cos a hair above 1: clamp so the loss is never negative
        return _masked_mean((1.0 - cos).clamp_min(0.0), mask if student.ndim == 3 else None)


def linear_cka(x: Tensor, y: Tensor) -> Tensor:
    r"""Linear centered kernel alignment (Kornblith et al. 2019, arXiv:1905.00414).

    With column-centred :math:`X \in \mathbb{R}^{N \times D_1}`, :math:`Y \in \mathbb{R}^{N \times D_2}`
    (features flattened per sample):

    .. math:: \mathrm{CKA}(X, Y) = \frac{\|Y^\top X\|_F^2}{\|X^\top X\|_F \, \|Y^\top Y\|_F}
              = \frac{\mathrm{tr}(K_X K_Y)}{\|K_X\|_F \|K_Y\|_F},\quad K = X X^\top \text{ (centred)}

    In [0, 1]; invariant to orthogonal transforms and isotropic scaling of either input; the
    feature dimensions may differ (no projector needed).
    """
    with torch.autocast(device_type=x.device.type, enabled=False):
        x, y = _flat(x).double(), _flat(y).double()
        x = x - x.mean(0, keepdim=True)
        y = y - y.mean(0, keepdim=True)
        # Gram (N x N) form: cheaper than D x D when features are wide
        kx, ky = x @ x.T, y @ y.T
        num = (kx * ky).sum()
        den = kx.norm() * ky.norm()
        # no absolute floor (it would break scale invariance for small features); 0 when a side is constant
        return torch.where(den > 0, num / torch.where(den > 0, den, torch.ones_like(den)), torch.zeros_like(den)).float()


def cka_loss(student: Tensor, teacher: Tensor) -> Tensor:
    """``1 - linear_cka(student, teacher)``: projector-free representation matching, in [0, 1]."""
    return (1.0 - linear_cka(student, teacher)).clamp_min(0.0)


def attention_map(feature: Tensor, p: float = 2.0) -> Tensor:
    r"""Spatial attention of a ``[N, C, H, W]`` feature: :math:`\mathrm{normalize}(\tfrac1C \sum_c |A_c|^p)`, ``[N, H*W]``."""
    if feature.ndim != 4:
        raise ValueError(f"attention transfer needs [N, C, H, W] features, got shape {tuple(feature.shape)}.")
    return F.normalize(feature.float().abs().pow(p).mean(1).flatten(1), dim=1)


def attention_transfer_loss(student: Tensor, teacher: Tensor, p: float = 2.0) -> Tensor:
    r"""Attention transfer (Zagoruyko & Komodakis 2017, arXiv:1612.03928).

    :math:`\frac{1}{N\,HW}\sum_i \| Q_S^{(i)} - Q_T^{(i)} \|_2^2` with :math:`Q` = :func:`attention_map`
    (as RepDistiller's ``Attention`` loss, so beta = 1000 carries over). Channel counts may differ;
    when spatial sizes differ the larger map is average-pooled to the smaller size first.
    """
    if student.shape[0] != teacher.shape[0]:
        raise ValueError(f"batch sizes differ: {student.shape[0]} vs {teacher.shape[0]}.")
    with torch.autocast(device_type=student.device.type, enabled=False):
        s, t = student.float(), teacher.float()
        if s.ndim == 4 and t.ndim == 4 and s.shape[-2:] != t.shape[-2:]:
            size = (min(s.shape[-2], t.shape[-2]), min(s.shape[-1], t.shape[-1]))
            s, t = F.adaptive_avg_pool2d(s, size), F.adaptive_avg_pool2d(t, size)
        return (attention_map(s, p) - attention_map(t, p)).pow(2).mean()


def _pairwise_distances(x: Tensor, eps: float = 1e-12) -> Tensor:
    sq = x.pow(2).sum(1)
    d2 = (sq.unsqueeze(0) + sq.unsqueeze(1) - 2.0 * x @ x.T).clamp_min(eps)
    d = d2.sqrt()
    return d * (1.0 - torch.eye(x.shape[0], device=x.device, dtype=x.dtype))


def rkd_distance_loss(student: Tensor, teacher: Tensor) -> Tensor:
    r"""RKD distance-wise loss (Park et al. 2019, arXiv:1904.05068).

    :math:`\psi_D(x_i, x_j) = \|x_i - x_j\|_2 / \mu`, :math:`\mu` the mean distance over pairs
    :math:`i \ne j` of the same batch; the loss is the Huber (smooth-L1) distance between student
    and teacher :math:`\psi_D`, averaged over the :math:`N^2` entries (as the reference code).
    Invariant to scaling either feature set; dims may differ. Needs N >= 2.
    """
    with torch.autocast(device_type=student.device.type, enabled=False):
        s, t = _flat(student), _flat(teacher)
        n = s.shape[0]
        if n < 2:
            return s.new_zeros(())
        off = n * (n - 1)
        with torch.no_grad():
            dt = _pairwise_distances(t)
            dt = dt / (dt.sum() / off).clamp_min(1e-12)
        ds = _pairwise_distances(s)
        ds = ds / (ds.sum() / off).clamp_min(1e-12)
        return F.smooth_l1_loss(ds, dt, reduction="mean")


def _angles(x: Tensor) -> Tensor:
    e = F.normalize(x.unsqueeze(0) - x.unsqueeze(1), p=2, dim=2)  # e[j, i] = (x_i - x_j) / |.|
    return torch.bmm(e, e.transpose(1, 2)).reshape(-1)  # cos of angle at vertex j between i and k


def rkd_angle_loss(student: Tensor, teacher: Tensor) -> Tensor:
    r"""RKD angle-wise loss (Park et al. 2019): Huber distance between the cosines of all triplet angles.

    :math:`\psi_A(x_i, x_j, x_k) = \langle e_{ij}, e_{kj} \rangle`, :math:`e_{ij} = (x_i - x_j)/\|x_i - x_j\|`;
    averaged over the :math:`N^3` triplets. Invariant to scaling, translation and rotation.
    """
    with torch.autocast(device_type=student.device.type, enabled=False):
        s, t = _flat(student), _flat(teacher)
        with torch.no_grad():
            at = _angles(t)
        return F.smooth_l1_loss(_angles(s), at, reduction="mean")


def similarity_preserving_loss(student: Tensor, teacher: Tensor) -> Tensor:
    r"""Similarity-preserving KD (Tung & Mori 2019, arXiv:1907.09682).

    :math:`G = Q Q^\top` with :math:`Q` the ``[N, D]`` flattened features, rows L2-normalised to
    :math:`\tilde G`; loss :math:`\frac{1}{N^2}\|\tilde G_T - \tilde G_S\|_F^2` (beta = 3000 in
    RepDistiller). Dims may differ.
    """
    with torch.autocast(device_type=student.device.type, enabled=False):
        s, t = _flat(student), _flat(teacher)
        gs = F.normalize(s @ s.T, p=2, dim=1)
        gt = F.normalize(t @ t.T, p=2, dim=1)
        return (gs - gt).pow(2).sum() / (s.shape[0] ** 2)


def info_nce_loss(anchor: Tensor, positive: Tensor, negatives: Tensor, temperature: float = 0.07) -> Tensor:
    r"""InfoNCE over one positive and K negatives per anchor (the CRD objective, Tian et al. 2020).

    ``anchor`` and ``positive`` are ``[N, D]``, ``negatives`` ``[N, K, D]``, all L2-normalised by
    this function. :math:`-\log \frac{e^{a\cdot p/\tau}}{e^{a\cdot p/\tau} + \sum_k e^{a\cdot n_k/\tau}}`,
    averaged over anchors. >= 0; it is :math:`\log(K+1)` when all similarities are equal.
    """
    with torch.autocast(device_type=anchor.device.type, enabled=False):
        a = F.normalize(anchor.float(), dim=-1)
        p = F.normalize(positive.float(), dim=-1)
        n = F.normalize(negatives.float(), dim=-1)
        pos = (a * p).sum(-1, keepdim=True)
        neg = torch.einsum("nd,nkd->nk", a, n)
        logits = torch.cat([pos, neg], dim=1) / temperature
        return F.cross_entropy(logits, torch.zeros(a.shape[0], dtype=torch.long, device=a.device))


def self_distillation_loss(
    head_logits: Sequence[Tensor],
    target: Optional[Tensor],
    head_features: Sequence[Tensor],
    final_feature: Tensor,
    temperature: float = 3.0,
    alpha: float = 0.3,
    feature_weight: float = 0.03,
    ignore_index: int = -100,
) -> dict[str, Tensor]:
    r"""Self-distillation loss of "Be Your Own Teacher" (Zhang et al. 2019, arXiv:1905.08094).

    With :math:`K` classifiers ordered shallow to deep (head :math:`K` is the network's own
    output), logits :math:`z_i`, :math:`q_i^T = \mathrm{softmax}(z_i / T)`, hint features
    :math:`F_i` of the shallow heads (already projected to the deepest feature's dimension) and
    the deepest feature :math:`F_K`:

    .. math::

        \mathcal{L} = \sum_{i=1}^{K} (1 - \alpha)\,\mathrm{CE}(z_i, y)
            + \alpha\, T^2 \sum_{i=1}^{K-1} \mathrm{KL}\big(\mathrm{sg}[q_K^T] \,\|\, q_i^T\big)
            + \lambda \sum_{i=1}^{K-1} \mathrm{MSE}\big(F_i, \mathrm{sg}[F_K]\big)

    where :math:`\mathrm{sg}` stops the gradient (the deepest head teaches, it is never pulled
    towards the shallow ones), KL is :func:`~lightning_distill.losses.kd_loss` (``batchmean``,
    float32) and MSE is :func:`~lightning_distill.losses.mse_feature_loss` (mean over every
    element). The deepest head has no KL / hint term with itself. Cross-entropies average over
    labelled samples (``target != ignore_index``) and are 0 when nothing is labelled.

    Args:
        head_logits: ``K`` tensors ``[N, C]``, shallow to deep; the last is the deepest head.
        target: ``[N]`` class indices, or ``None`` (then the CE terms are 0).
        head_features: ``K - 1`` tensors ``[N, D]``, the projected features of the shallow heads.
        final_feature: ``[N, D]``, the deepest head's feature (detached here).
        temperature: ``T > 0`` of the KL term.
        alpha: weight in [0, 1] of the KL term; ``1 - alpha`` weighs every cross-entropy.
        feature_weight: :math:`\lambda \ge 0`, weight of the hint term.
        ignore_index: target value of unlabelled samples.

    Returns:
        ``{"loss", "task_loss" (sum of the K CEs), "kd_loss" (sum of the K-1 T^2 KL),
        "feature_loss" (sum of the K-1 MSE), "head_ce" ([K], one CE per head)}``, float32;
        the sums are unweighted, ``loss`` is the weighted total above.

    Example::

        >>> import torch
        >>> z = [torch.tensor([[0.0, 1.0]]), torch.tensor([[2.0, -1.0]])]
        >>> terms = self_distillation_loss(z, torch.tensor([0]), [torch.zeros(1, 3)], torch.ones(1, 3),
        ...                                temperature=1.0, alpha=0.5, feature_weight=1.0)
        >>> [round(terms[k].item(), 4) for k in ("task_loss", "kd_loss", "feature_loss", "loss")]
        [1.3618, 1.075, 1.0, 2.2184]
    """
    if len(head_logits) < 1 or len(head_features) != len(head_logits) - 1:
        raise ValueError(
            f"expected K >= 1 head logits and K - 1 shallow features, got {len(head_logits)} logits and "
            f"{len(head_features)} features."
        )
    deepest = head_logits[-1]
    teacher = deepest.detach()
    target_feature = final_feature.detach()
    zero = deepest.new_zeros((), dtype=torch.float32)
    ces = []
    for logits in head_logits:
        if target is None:
            ces.append(zero)
            continue
        total = F.cross_entropy(logits.float(), target, ignore_index=ignore_index, reduction="sum")
        ces.append(total / (target != ignore_index).sum().clamp_min(1))
    head_ce = torch.stack(ces)
    task = head_ce.sum()
    kd, feature = zero, zero
    for logits, feat in zip(head_logits[:-1], head_features):
        kd = kd + kd_loss(logits, teacher, temperature)
        feature = feature + mse_feature_loss(feat, target_feature)
    loss = (1.0 - alpha) * task + alpha * kd + feature_weight * feature
    return {"loss": loss, "task_loss": task, "kd_loss": kd, "feature_loss": feature, "head_ce": head_ce}


def mutual_loss(
    logits: Sequence[Tensor],
    temperature: Union[float, Tensor] = 1.0,
    kl: str = "forward",
    teacher_logits: Optional[Tensor] = None,
    mask: Optional[Tensor] = None,
) -> Tensor:
    r"""Deep Mutual Learning's mimicry term for every student (Zhang et al. 2018, arXiv:1706.00384).

    For K students with logits :math:`z_1 .. z_K` and the peer set :math:`P_k = \{j \ne k\}`
    (plus the frozen teacher, when given, as one more peer):

    .. math::

        \mathcal{L}^{\mathrm{mut}}_k = \frac{1}{|P_k|} \sum_{j \in P_k}
            T^2\, D\big(\mathrm{softmax}(\mathrm{sg}(z_j)/T),\ \mathrm{softmax}(z_k/T)\big)

    with :math:`\mathrm{sg}` stop-gradient (peers' logits are **detached**: student k's term
    trains student k only) and :math:`D` forward KL by default -- DML's
    :math:`D_{KL}(p_j \| p_k)`; each pair term is :func:`lightning_distill.losses.kd_loss`
    (``batchmean``, float32, log space). DML averages over the K-1 peers for K > 2 (its eq. 10).

    Args:
        logits: K >= 1 tensors, each ``[N, C]`` or ``[N, L, C]`` (same shape), one per student.
        temperature: ``T > 0`` (DML uses 1).
        kl: divergence of :func:`~lightning_distill.losses.kd_loss`.
        teacher_logits: optional ``[N, C]`` / ``[N, L, C]`` logits of a frozen extra peer.
        mask: optional ``[N, L]`` valid-token mask for token-level logits.

    Returns:
        ``[K]`` float32: the mimicry term of each student.

    Example::

        >>> import torch
        >>> z1, z2 = torch.tensor([[2.0, 0.0, -1.0]]), torch.tensor([[1.0, 0.5, -1.0]])
        >>> [round(v, 4) for v in mutual_loss([z1, z2]).tolist()]
        [0.2149, 0.1718]
    """
    logits = list(logits)
    peers = [z.detach() for z in logits]
    if teacher_logits is not None:
        peers.append(teacher_logits.detach())
    if len(peers) < 2:
        raise ValueError("the mutual term needs at least two models: two students, or one student and a teacher.")
    terms = []
    for k, z_k in enumerate(logits):
        pair = [kd_loss(z_k, peer, temperature, kl, mask=mask) for j, peer in enumerate(peers) if j != k]
        terms.append(torch.stack(pair).mean())
    return torch.stack(terms)


def _stack_teachers(teacher_logits: Union[Tensor, Sequence[Tensor]]) -> Tensor:
    """``[M, *, C]`` from a stacked tensor or a sequence of M ``[*, C]`` tensors of the same shape."""
    if isinstance(teacher_logits, Tensor):
        return teacher_logits
    shapes = [tuple(t.shape) for t in teacher_logits]
    if not shapes or len(set(shapes)) != 1:
        raise ValueError(f"the teachers' logits must be one or more tensors of the same shape, got shapes {shapes}.")
    return torch.stack(list(teacher_logits))


def teacher_mixture_log_probs(
    teacher_logits: Union[Tensor, Sequence[Tensor]], weights: Tensor, temperature: float = 1.0
) -> Tensor:
    r"""Log of the per-sample mixture of softened teacher distributions.

    .. math:: \log p_i = \log \sum_{m=1}^{M} w_{i,m}\, \mathrm{softmax}(z_{i,m} / T)
              = \operatorname{logsumexp}_m \big(\log w_{i,m} + \log\mathrm{softmax}(z_{i,m}/T)\big)

    computed in log space, so it is finite for logits of any finite magnitude.

    Args:
        teacher_logits: ``[M, *, C]`` (M teachers stacked) or a sequence of M ``[*, C]`` tensors.
        weights: ``[*, M]``, non-negative, summing to 1 over the last dim (not checked: that
            would sync with an accelerator). A weight of exactly 0 drops its teacher; gradients
            with respect to ``weights`` stay finite.
        temperature: ``T > 0``.

    Returns:
        ``[*, C]`` log-probabilities (float32, or float64 for float64 logits).
    """
    stacked = _stack_teachers(teacher_logits)
    if tuple(weights.shape) != tuple(stacked.shape[1:-1]) + (stacked.shape[0],):
        raise ValueError(
            f"`weights` must have shape {tuple(stacked.shape[1:-1]) + (stacked.shape[0],)} (the logits' leading "
            f"dims, then one weight per teacher), got {tuple(weights.shape)}."
        )
    with torch.autocast(device_type=stacked.device.type, enabled=False):
        dtype = _acc_dtype(stacked)
        log_p = F.log_softmax(stacked.to(dtype) / temperature, dim=-1)  # [M, *, C]
        # clamp: log(0) = -inf would give a NaN gradient (0 * inf) for a weight of exactly 0
        log_w = weights.to(dtype).clamp_min(torch.finfo(dtype).tiny).log().movedim(-1, 0).unsqueeze(-1)  # [M, *, 1]
        return torch.logsumexp(log_w + log_p, dim=0)


def confidence_weights(
    teacher_logits: Union[Tensor, Sequence[Tensor]], temperature: float = 1.0, eps: float = 1e-6
) -> Tensor:
    r"""Per-sample teacher weights from each teacher's confidence: inverse entropy, normalised.

    .. math:: w_{i,m} = \frac{1 / (H_{i,m} + \epsilon)}{\sum_{k} 1 / (H_{i,k} + \epsilon)},\qquad
              H_{i,m} = -\sum_c p_{i,m,c} \log p_{i,m,c},\quad p_{i,m} = \mathrm{softmax}(z_{i,m} / T)

    A sharper (lower-entropy) teacher gets more weight on that sample; equal entropies give the
    plain mean. The normalisation is a softmax of :math:`-\log(H + \epsilon)` over teachers, exact
    and finite even when several teachers are one-hot (:math:`H = 0`).

    Args:
        teacher_logits: ``[M, *, C]`` or a sequence of M ``[*, C]`` tensors.
        temperature: ``T > 0`` at which the entropies are measured (the KD temperature).
        eps: :math:`\epsilon > 0`, bounds the weight of a one-hot teacher.

    Returns:
        ``[*, M]`` weights summing to 1 over the last dim (float32 / float64), no gradient path
        needed (teachers are frozen) but differentiable.
    """
    stacked = _stack_teachers(teacher_logits)
    with torch.autocast(device_type=stacked.device.type, enabled=False):
        dtype = _acc_dtype(stacked)
        log_p = F.log_softmax(stacked.to(dtype) / temperature, dim=-1)
        p = log_p.exp()
        entropy = (-torch.where(p > 0, p * log_p, torch.zeros_like(p)).sum(-1)).clamp_min(0.0)  # [M, *]
        return torch.softmax(-torch.log(entropy + eps), dim=0).movedim(0, -1)


def multi_teacher_kd_loss(
    student_logits: Tensor,
    teacher_logits: Union[Tensor, Sequence[Tensor]],
    weights: Tensor,
    temperature: float = 4.0,
    kl: str = "forward",
    mask: Optional[Tensor] = None,
) -> Tensor:
    r"""Multi-teacher KD: distill a per-sample weighted mixture of the teachers' softened outputs.

    .. math::

        \mathcal{L} = T^2\,\frac{1}{|V|}\sum_{i \in V} D\big(p_i,\ \mathrm{softmax}(z^S_i / T)\big),
        \qquad p_i = \sum_{m=1}^{M} w_{i,m}\,\mathrm{softmax}(z_{i,m} / T)

    with :math:`D` = KL(p || q) for ``kl="forward"`` (or the other divergences of
    :func:`lightning_distill.losses.kd_loss`) and batchmean reduction over the samples / valid
    tokens :math:`V`. Mean weights are the classic multi-teacher average (e.g. You et al. 2017,
    "Learning from Multiple Teacher Networks"); per-instance weights follow AMTML-KD (Liu et al.
    2020, arXiv:2103.04062). The mixture :math:`p` is formed in log space
    (:func:`teacher_mixture_log_probs`) and handed to :func:`~lightning_distill.losses.kd_loss` as the
    logits :math:`T \log p` (whose softmax at temperature :math:`T` is :math:`p`), so masking,
    float32 log-space accuracy and the ``T**2`` scaling are exactly kd_loss's.

    Args:
        student_logits: ``[N, C]`` or ``[N, L, C]``.
        teacher_logits: ``[M, N, C]`` / ``[M, N, L, C]`` or a sequence of M tensors shaped like
            ``student_logits`` (pass them detached / computed under ``no_grad``).
        weights: ``[N, M]`` / ``[N, L, M]``, rows summing to 1; may carry a gradient (a learned
            gate is trained through this loss).
        temperature: ``T > 0``.
        kl: one of :data:`lightning_distill.losses.KL_MODES`.
        mask: optional ``[N, L]`` validity mask for token-level logits (see ``kd_loss``); masked
            positions must hold finite teacher logits and weights (zero them).

    Returns:
        A float32 scalar (float64 for float64 logits); 0 for identical student and mixture.
    """
    log_p = teacher_mixture_log_probs(teacher_logits, weights, temperature)
    if tuple(log_p.shape) != tuple(student_logits.shape):
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher logits {tuple(log_p.shape)} differ in shape; "
            "check that every model predicts the same number of classes."
        )
    return kd_loss(student_logits, temperature * log_p, temperature, kl, mask=mask)


def _same_shape(student: Tensor, teacher: Tensor, loss: str) -> None:
    if student.shape != teacher.shape:
        raise ValueError(
            f"{loss} feature loss needs equal shapes, got student {tuple(student.shape)} and teacher "
            f"{tuple(teacher.shape)}; use a projection (student_to_teacher / teacher_to_student)."
        )
