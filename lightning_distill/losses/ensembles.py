"""Losses over several models: self-distillation's heads, mutual learning's peers, several teachers' mixture."""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_distill.losses.divergence import _acc_dtype, kd_loss
from lightning_distill.losses.feature import mse_feature_loss

__all__ = [
    "confidence_weights",
    "multi_teacher_kd_loss",
    "mutual_loss",
    "self_distillation_loss",
    "teacher_mixture_log_probs",
]

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
        entropy = (-torch.where(p != 0, p * log_p, torch.zeros_like(p)).sum(-1)).clamp_min(0.0)  # [M, *]; NaN stays NaN
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
