"""``CRD``: Tian, Krishnan & Isola (ICLR 2020), "Contrastive Representation Distillation"."""

from __future__ import annotations

from typing import Any, Optional

from torch import nn

from lightning_distill.objectives import CRDLoss
from lightning_distill.objectives.contrastive import _nce_loss
from lightning_distill.strategies.kd import KnowledgeDistillation

__all__ = ["CRD", "_nce_loss"]


class CRD(KnowledgeDistillation):
    r"""Contrastive representation distillation (Tian, Krishnan & Isola, ICLR 2020, arXiv:1910.10699).

    .. math::

        \mathcal{L} = (1-\alpha)\,\mathrm{CE}(z_S, y) + \alpha\,T^2\,\mathrm{KL}
                      + \beta\,\big(\ell(x^t) + \ell(x^s)\big)

    :class:`~lightning_distill.strategies.kd.KnowledgeDistillation` (objectives ``task`` and ``kd``) plus
    ``crd`` (:class:`~lightning_distill.objectives.CRDLoss`, where the
    memory banks, the NCE criterion and their numerics are documented). Needs batches
    ``(input, target, index)`` with ``index`` the sample's position in the training set.

    Args:
        student, teacher: the networks (the teacher is frozen).
        student_layer, teacher_layer: module names whose outputs, flattened per sample, are the
            representations, e.g. ``block2`` of ``DigitsStudentCNN`` ([N, 8]) and ``block3`` of
            ``DigitsCNN`` ([N, 64]).
        feat_dim: embedding size of both heads.
        num_negatives: K, negatives drawn per anchor from the bank (smaller than ``num_samples - 1``).
        nce_temperature: :math:`\tau > 0` of the scores.
        nce_momentum: :math:`m \in [0, 1)` of the memory update.
        crd_weight: :math:`\beta \ge 0`, the weight of the CRD term.
        num_samples: rows of each bank = training-set size; ``None`` takes it from the training data.
        alpha: weight of the logit KD term. The default gives RepDistiller's CIFAR-100 setting: CE weight 1,
            KD weight 0 (``alpha=0``), CRD weight 0.8.
        **kwargs: ``temperature``, ``kl``, ``teacher_checkpoint``, ``optimizer``, ... of
            :class:`~lightning_distill.strategies.kd.KnowledgeDistillation`.

    Example::

        >>> import torch
        >>> from lightning_distill.strategies.crd import CRD
        >>> from lightning_distill.models import DigitsCNN, DigitsStudentCNN
        >>> module = CRD(DigitsStudentCNN(), DigitsCNN(), teacher_checkpoint="zoo:digits_cnn",
        ...              student_layer="block2", teacher_layer="block3", feat_dim=64, num_negatives=512)
        >>> module.build(torch.zeros(2, 1, 8, 8))  # what setup() does with a real input
        >>> module.embed_student.linear, module.embed_teacher.linear
        (Linear(in_features=8, out_features=64, bias=True), Linear(in_features=64, out_features=64, bias=True))
        >>> module.memory_student is None  # allocated from the training-set size when fitting
        True
        >>> module.z_student.item()  # estimated on the first training batch
        -1.0
    """

    supports_teacher_cache = False  # its memory banks are updated from live teacher embeddings of its own capture
    #: the CRD objective's parts by their familiar names: ``embed_student``, ``memory_student``, ``z_student``, ...
    exposes = ("crd",)

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        student_layer: str,
        teacher_layer: str,
        feat_dim: int = 128,
        num_negatives: int = 4096,
        nce_temperature: float = 0.07,
        nce_momentum: float = 0.5,
        crd_weight: float = 0.8,
        num_samples: Optional[int] = None,
        alpha: float = 0.0,
        **kwargs: Any,
    ) -> None:
        crd = CRDLoss(student_layer, teacher_layer, feat_dim, num_negatives, nce_temperature, nce_momentum, crd_weight,
                      num_samples)
        super().__init__(student, teacher, alpha=alpha, objectives={"crd": crd}, **kwargs)
