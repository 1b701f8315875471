"""``CrossEntropy``: the hard-label task term of a distillation objective."""

from __future__ import annotations

from typing import Optional

from torch import Tensor

from lightning_distill.batch import Batch
from lightning_distill.losses import cross_entropy_loss
from lightning_distill.objectives.base import Objective, StepInfo
from lightning_distill.outputs import ModelOutputs
from lightning_distill.validation import check_float

__all__ = ["CrossEntropy"]


class CrossEntropy(Objective):
    r"""Cross-entropy of the student's logits with the batch's hard labels: :math:`w\,\mathrm{CE}(z_S, y)`.

    Averages over labelled samples (or tokens) only: labels equal to ``ignore_index`` (and batches
    without labels) do not count, and a batch with none gives 0, never NaN. Logged as
    ``train/task_loss`` under its default name ``task``.

    Args:
        weight: the term's weight (``1 - alpha`` in the presets' convention).
        label_smoothing: in ``[0, 1)``.
        ignore_index: the label of unlabelled samples / padding tokens.

    Example::

        >>> import torch
        >>> from lightning_distill.batch import Batch
        >>> from lightning_distill.objectives import CrossEntropy
        >>> from lightning_distill.outputs import ModelOutputs
        >>> ce = CrossEntropy(weight=0.5)
        >>> terms = ce(ModelOutputs(torch.tensor([[2.0, 0.0]])), None, Batch(None, torch.tensor([0])), None)
        >>> round(terms["task_loss"].item(), 4), round(terms["loss"].item(), 4)
        (0.1269, 0.0635)
    """

    name = "task"
    needs_teacher = False
    averages_over = "labels"

    def __init__(self, weight: float = 1.0, label_smoothing: float = 0.0, ignore_index: int = -100) -> None:
        super().__init__(weight)
        self.label_smoothing = check_float("label_smoothing", label_smoothing, 0.0, 1.0, high_open=True)
        self.ignore_index = int(ignore_index)

    def forward(
        self, student: ModelOutputs, teacher: Optional[ModelOutputs], batch: Batch, step: StepInfo
    ) -> dict[str, Tensor]:
        value = cross_entropy_loss(student.logits, batch.target, self.ignore_index, self.label_smoothing)
        return {"loss": self.weight * value, "task_loss": value}
