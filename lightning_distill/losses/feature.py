"""Feature losses: one teacher layer against one student layer (FitNets, AT, RKD, SP, CKA, cosine, InfoNCE)."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "attention_map",
    "attention_transfer_loss",
    "cka_loss",
    "cosine_feature_loss",
    "info_nce_loss",
    "linear_cka",
    "mse_feature_loss",
    "rkd_angle_loss",
    "rkd_distance_loss",
    "similarity_preserving_loss",
]

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

    CKA compares how the samples of a batch relate to each other, so it is undefined (0 / 0) when either
    side does not vary across the batch: a batch of one sample (centring leaves zeros), or constant
    features (dead ReLUs, a layer that ignores its input). This function then returns **0** -- "no shared
    structure" -- with a zero gradient, never NaN, so a transient dead layer or a last batch of one sample
    does not stop a run. :class:`~lightning_distill.objectives.FeatureMatch` refuses a first training batch
    of one sample, and warns when a probed layer is constant, because then the term would never train.

    Example::

        >>> import torch
        >>> x = torch.randn(8, 5)
        >>> round(linear_cka(x, 3 * x).item(), 4)             # invariant to scaling
        1.0
        >>> linear_cka(x[:1], x[:1]).item(), linear_cka(torch.ones(8, 5), x).item()  # undefined: 0
        (0.0, 0.0)
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
    """``1 - linear_cka(student, teacher)``: projector-free representation matching, in [0, 1].

    Where CKA is undefined -- a batch of one sample, or features constant across the batch on either side --
    the loss is 1 with a zero gradient (see :func:`linear_cka`): defined, finite, and visibly "not aligned"
    in the logs.

    Example::

        >>> import torch
        >>> s = torch.randn(4, 6, requires_grad=True)
        >>> loss = cka_loss(s, torch.zeros(4, 3))              # a constant (dead) teacher layer
        >>> loss.item()
        1.0
        >>> loss.backward(); s.grad.abs().sum().item()
        0.0
    """
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


def _same_shape(student: Tensor, teacher: Tensor, loss: str) -> None:
    if student.shape != teacher.shape:
        raise ValueError(
            f"{loss} feature loss needs equal shapes, got student {tuple(student.shape)} and teacher "
            f"{tuple(teacher.shape)}; use a projection (student_to_teacher / teacher_to_student)."
        )
