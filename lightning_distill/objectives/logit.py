r"""Logit objectives: Hinton's KD, Decoupled KD, and logit standardisation for both.

* :class:`LogitKD` -- :math:`T^2 D(\mathrm{softmax}(z_T/T) \| \mathrm{softmax}(z_S/T))` with any
  divergence of :func:`~lightning_distill.losses.kd_loss` (Hinton et al. 2015, arXiv:1503.02531);
* :class:`DKD` -- Decoupled KD's target-class and non-target-class terms (Zhao et al., CVPR 2022,
  arXiv:2203.08679), :func:`dkd_loss`;
* ``standardize=True`` on either -- logit standardisation (Sun et al., CVPR 2024, arXiv:2403.01427):
  both models' logits are z-scored per sample before the temperature, :func:`standardize_logits`.

The temperature of each is a :mod:`lightning_distill.temperature` object (a float becomes a
:class:`~lightning_distill.temperature.FixedTemperature`; a
:class:`~lightning_distill.temperature.LearnedTemperature` gives CTKD).
"""

from __future__ import annotations

import math
from typing import Any, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_distill.batch import Batch
from lightning_distill.losses import KL_MODES, check_skew, kd_loss
from lightning_distill.objectives.base import Objective, StepInfo
from lightning_distill.outputs import ModelOutputs
from lightning_distill.temperature import Temperature, as_temperature
from lightning_distill.validation import check_bool, check_choice, check_float, check_int

__all__ = ["DKD", "LogitKD", "dkd_loss", "standardize_logits"]


def standardize_logits(logits: Tensor, eps: float = 1e-7) -> Tensor:
    r"""Z-score every sample's logits over the classes: :math:`(z - \bar z) / (\sigma(z) + \epsilon)`.

    Logit standardisation (Sun et al., CVPR 2024, arXiv:2403.01427): teacher and student then only
    have to agree on the *shape* of their logit vectors, not on their scale and shift; the
    temperature applies to the standardised logits. :math:`\sigma` is the unbiased standard deviation
    and :math:`\epsilon = 10^{-7}`, as in the authors' ``normalize``. Computed in float32.

    Example::

        >>> import torch
        >>> z = standardize_logits(torch.tensor([[1.0, 2.0, 3.0]]))
        >>> [round(v, 4) for v in z[0].tolist()]
        [-1.0, 0.0, 1.0]
    """
    z = logits.float()
    return (z - z.mean(dim=-1, keepdim=True)) / (z.std(dim=-1, keepdim=True) + eps)


class LogitKD(Objective):
    r"""Logit distillation: :math:`w\,T^2\,D\big(\mathrm{softmax}(z_T/T),\ \mathrm{softmax}(z_S/T)\big)`.

    :math:`D` is ``kl`` (forward KL, Hinton et al. 2015, by default; see
    :func:`~lightning_distill.losses.kd_loss` for every mode), reduced ``batchmean`` over samples, or
    over the valid tokens of ``[N, L, V]`` logits (the batch's ``mask``). Logged as ``train/kd_loss``
    (before the weight); a learned temperature also logs ``temperature``, ``lambda`` and, with an
    anchor, ``anchor_loss`` (added to the loss unweighted).

    Args:
        weight: the term's weight (``alpha`` in the presets).
        temperature: ``T > 0`` as a float, or a :class:`~lightning_distill.temperature.Temperature`
            (scheduled or learned).
        kl: one of ``forward``, ``reverse``, ``symmetric``, ``js``, ``skew_forward``, ``skew_reverse``.
        skew: mixing share of the skew divergences, in ``[0, 1)`` (DistiLLM's default 0.1).
        standardize: z-score both models' logits first (:func:`standardize_logits`).

    Example::

        >>> import torch
        >>> from lightning_distill.objectives import LogitKD
        >>> from lightning_distill.outputs import ModelOutputs
        >>> from lightning_distill.batch import Batch
        >>> kd = LogitKD(weight=0.9, temperature=2.0)
        >>> s, t = ModelOutputs(torch.tensor([[2.0, 0.0, -1.0]])), ModelOutputs(torch.tensor([[1.0, 0.5, -1.0]]))
        >>> round(kd(s, t, Batch(None), None)["kd_loss"].item(), 4)
        0.2329
    """

    name = "kd"

    def __init__(
        self,
        weight: float = 1.0,
        temperature: Union[float, Temperature] = 4.0,
        kl: str = "forward",
        skew: float = 0.1,
        standardize: bool = False,
    ) -> None:
        super().__init__(weight)
        self.temperature = as_temperature(temperature)
        self.kl = check_choice("kl", kl, KL_MODES)
        self.skew = check_skew(skew)
        self.standardize = check_bool("standardize", standardize)

    def extra_repr(self) -> str:
        return f"weight={self.weight}, kl={self.kl!r}, standardize={self.standardize}"

    @property
    def needs_probe(self) -> bool:
        return self.temperature.needs_probe

    def build(self, probe: Any) -> None:
        self.temperature.build(probe.num_classes)

    def parameter_groups(self) -> list[dict]:
        return self.temperature.parameter_groups()

    def forward(
        self, student: ModelOutputs, teacher: Optional[ModelOutputs], batch: Batch, step: StepInfo
    ) -> dict[str, Tensor]:
        s = student.logits
        if teacher is None:
            return self.zero(s)
        t = teacher.logits
        if self.standardize:
            s, t = standardize_logits(s), standardize_logits(t)
        temp = self.temperature(s, t, step)
        mask = batch.mask if s.ndim == 3 else None
        value = kd_loss(s, t, temp.value, self.kl, mask=mask, skew=self.skew)
        logs: dict[str, Tensor] = dict(temp.logs) if temp.logs else {}
        if temp.penalty is not None:
            logs["anchor_loss"] = temp.penalty
        return self.terms(value, temp.penalty, **logs)


def _binary(log_p: Tensor, gt: Tensor) -> Tensor:
    """``log [p_gt, 1 - p_gt]`` per row from log-probabilities (the rest summed in log space)."""
    log_target = log_p.gather(-1, gt.unsqueeze(-1))
    log_rest = torch.logsumexp(log_p.masked_fill(F.one_hot(gt, log_p.shape[-1]).bool(), -math.inf), -1, keepdim=True)
    return torch.cat([log_target, log_rest], dim=-1)


def _kl_rows(log_p: Tensor, log_q: Tensor, excluded: Optional[Tensor] = None) -> Tensor:
    """Row-wise KL(p || q) from log-probabilities; entries with p = 0 (or ``excluded``) contribute 0."""
    p = log_p.exp() if excluded is None else log_p.exp().masked_fill(excluded, 0.0)
    # p != 0 (not p > 0): a NaN probability keeps its NaN term, so the loss shows it (check_finite_loss)
    return torch.where(p != 0, p * (log_p - log_q), torch.zeros_like(p)).sum(-1).clamp_min(0.0)


def dkd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    target: Tensor,
    alpha: float = 1.0,
    beta: float = 8.0,
    temperature: float = 4.0,
) -> tuple[Tensor, Tensor]:
    r"""Decoupled KD (Zhao et al., CVPR 2022, arXiv:2203.08679): ``(TCKD, NCKD)``, each :math:`\times T^2`.

    With :math:`p = \mathrm{softmax}(z / T)` and :math:`t` the target class of each sample:

    .. math::

        \mathrm{TCKD} = T^2\,\overline{KL\big(b^T \| b^S\big)}, \qquad b = [p_t,\ 1 - p_t]

        \mathrm{NCKD} = T^2\,\overline{KL\big(\hat p^T \| \hat p^S\big)}, \qquad
            \hat p_c = \frac{p_c}{1 - p_t}\ (c \ne t) = \mathrm{softmax}_{c \ne t}(z_c / T)

    averaged over samples; the DKD term is :math:`\alpha\,\mathrm{TCKD} + \beta\,\mathrm{NCKD}`
    (returned as ``alpha * tckd`` and ``beta * nckd``). The official code (mdistiller's ``dkd_loss``)
    builds :math:`\hat p` by subtracting 1000 from the target logit before a softmax; here the target
    class is excluded exactly, in log space and float32, so the loss stays finite for any logits.

    Args:
        student_logits, teacher_logits: ``[N, C]``.
        target: ``[N]`` class indices (every sample needs one: the split is around the target class).
        alpha, beta: weights of TCKD and NCKD (paper / CIFAR-100: 1 and 8).
        temperature: ``T > 0``.

    Returns:
        ``(alpha * TCKD, beta * NCKD)``, float32 scalars.

    Example::

        >>> import torch
        >>> s, t = torch.tensor([[2.0, 0.5, -1.0]]), torch.tensor([[3.0, 0.0, -2.0]])
        >>> tckd, nckd = dkd_loss(s, t, torch.tensor([0]), alpha=1.0, beta=8.0, temperature=1.0)
        >>> round(tckd.item(), 4), round(nckd.item(), 4)
        (0.1021, 0.1191)
    """
    if student_logits.ndim != 2 or student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"DKD needs [N, C] student and teacher logits of the same shape, got {tuple(student_logits.shape)} and "
            f"{tuple(teacher_logits.shape)}."
        )
    with torch.autocast(device_type=student_logits.device.type, enabled=False):
        t = float(temperature)
        gt = target.reshape(-1).long()
        log_s = F.log_softmax(student_logits.float() / t, dim=-1)
        log_t = F.log_softmax(teacher_logits.float() / t, dim=-1)
        tckd = _kl_rows(_binary(log_t, gt), _binary(log_s, gt)).mean() * t**2
        target_mask = F.one_hot(gt, log_s.shape[-1]).bool()
        log_s_nt = F.log_softmax((student_logits.float() / t).masked_fill(target_mask, -math.inf), dim=-1)
        log_t_nt = F.log_softmax((teacher_logits.float() / t).masked_fill(target_mask, -math.inf), dim=-1)
        # the target class has p = 0 on both sides: its log-probabilities (-inf) are set to 0 before the
        # product, so neither the value nor any gradient meets -inf - -inf
        nckd = _kl_rows(log_t_nt.masked_fill(target_mask, 0.0), log_s_nt.masked_fill(target_mask, 0.0), target_mask)
        nckd = nckd.mean()
        return alpha * tckd, beta * nckd * t**2


class DKD(Objective):
    r"""Decoupled knowledge distillation (Zhao et al., CVPR 2022, arXiv:2203.08679).

    Classic KD mixes two effects: how well the student matches the teacher's confidence in the
    *target* class (TCKD) and how it matches the teacher's distribution over the *other* classes
    (NCKD, "dark knowledge"), the latter suppressed by the teacher's target confidence. DKD weighs
    them separately (:func:`dkd_loss`):

    .. math::

        \mathcal{L}_{DKD} = w\,\min\big(\tfrac{e + 1}{E_w}, 1\big)\,
            \big(\alpha\,\mathrm{TCKD} + \beta\,\mathrm{NCKD}\big)

    where :math:`e` is the 0-based epoch and :math:`E_w` = ``warmup_epochs`` (the official code's
    linear warm-up over 1-based epochs: the first epoch already has :math:`1/E_w`). Logged as
    ``train/dkd_loss`` (the bracket, before warm-up and weight), ``train/tckd`` and ``train/nckd``
    (weighted by alpha / beta).

    **Labels.** The decomposition is around each sample's target class, so DKD needs a label for
    every sample of ``[N, C]`` logits: a batch with unlabelled samples is refused with a clear error
    (give them the teacher's class with the module's ``pseudo_labels=0.0``, or use
    :class:`LogitKD`). For token logits ``[N, L, V]`` the valid tokens are those whose label is not
    ``ignore_index`` (padding).

    Args:
        weight: the term's weight (the official CIFAR-100 setting uses 1 with a cross-entropy of weight 1).
        alpha, beta: weights of TCKD and NCKD (paper: 1 and 8 on CIFAR-100).
        temperature: ``T > 0`` (paper: 4).
        warmup_epochs: epochs of the linear warm-up (paper: 20; 0 turns it off).
        standardize: z-score both models' logits first (:func:`standardize_logits`).
        ignore_index: the label value of unlabelled samples / padding tokens.

    Example::

        >>> import torch
        >>> from lightning_distill.batch import Batch
        >>> from lightning_distill.objectives import DKD, StepInfo
        >>> from lightning_distill.outputs import ModelOutputs
        >>> dkd = DKD(alpha=1.0, beta=8.0, temperature=1.0, warmup_epochs=0)
        >>> s, t = ModelOutputs(torch.tensor([[2.0, 0.5, -1.0]])), ModelOutputs(torch.tensor([[3.0, 0.0, -2.0]]))
        >>> round(dkd(s, t, Batch(None, torch.tensor([0])), StepInfo(0))["dkd_loss"].item(), 4)
        0.2212
    """

    name = "dkd"
    averages_over = "labels"  # every position needs its target class

    def __init__(
        self,
        weight: float = 1.0,
        alpha: float = 1.0,
        beta: float = 8.0,
        temperature: float = 4.0,
        warmup_epochs: int = 20,
        standardize: bool = False,
        ignore_index: int = -100,
    ) -> None:
        super().__init__(weight)
        self.alpha = check_float("alpha", alpha, 0.0, hint=" It weighs the target-class term TCKD.")
        self.beta = check_float("beta", beta, 0.0, hint=" It weighs the non-target-class term NCKD.")
        self.temperature = check_float("temperature", temperature, 0.0, low_open=True, what="a finite number > 0")
        self.warmup_epochs = check_int("warmup_epochs", warmup_epochs, minimum=0)
        self.standardize = check_bool("standardize", standardize)
        self.ignore_index = int(ignore_index)

    def extra_repr(self) -> str:
        return (f"weight={self.weight}, alpha={self.alpha}, beta={self.beta}, temperature={self.temperature}, "
                f"warmup_epochs={self.warmup_epochs}, standardize={self.standardize}")

    def warmup(self, epoch: int) -> float:
        """The warm-up factor of 0-based ``epoch``: ``min((epoch + 1) / warmup_epochs, 1)``."""
        return 1.0 if self.warmup_epochs == 0 else min((epoch + 1) / self.warmup_epochs, 1.0)

    def forward(
        self, student: ModelOutputs, teacher: Optional[ModelOutputs], batch: Batch, step: StepInfo
    ) -> dict[str, Tensor]:
        s = student.logits
        if teacher is None:
            zero = s.new_zeros((), dtype=torch.float32)
            return {**self.zero(s), "tckd": zero, "nckd": zero}
        t = teacher.logits
        target = batch.target
        if s.ndim == 3:  # tokens: the labelled positions
            if target is None:
                raise ValueError("DKD on token logits [N, L, V] needs the batch's labels (target) for every token.")
            valid = target.reshape(-1) != self.ignore_index
            s, t, target = s.reshape(-1, s.shape[-1])[valid], t.reshape(-1, t.shape[-1])[valid], target.reshape(-1)[valid]
        else:
            missing = s.shape[0] if target is None else int((target == self.ignore_index).sum())
            if missing:
                raise ValueError(
                    f"DKD needs the target class of every sample (it splits the teacher's distribution into the "
                    f"target class and the others), but {missing} of {s.shape[0]} samples in this batch have no "
                    f"label. Give them the teacher's class with pseudo_labels=0.0, or use LogitKD for unlabelled data."
                )
        if self.standardize:
            s, t = standardize_logits(s), standardize_logits(t)
        if s.shape[0] == 0:
            tckd = nckd = s.new_zeros((), dtype=torch.float32) + 0.0 * s.sum()
        else:
            tckd, nckd = dkd_loss(s, t, target, self.alpha, self.beta, self.temperature)
        value = tckd + nckd
        factor = self.warmup(step.epoch if step is not None else 0)
        return {"loss": (self.weight * factor) * value, "dkd_loss": value, "tckd": tckd, "nckd": nckd}
