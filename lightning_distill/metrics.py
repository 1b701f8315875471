"""Validation / test metrics shared by every module (torchmetrics).

Per stage (``val``, ``test``): ``acc``, ``ece`` (15-bin expected calibration error), ``loss`` (the
student's cross-entropy with the labels, comparable across strategies and with the no-KD baseline),
``acc_top5`` with more than 5 classes; ``perplexity`` for token-level logits ``[N, L, V]`` (then
accuracy and agreement are per valid token); with a teacher ``teacher_acc``, ``agreement`` (share of
samples where the student's top-1 equals the teacher's), ``kl`` (mean KL(p_T || p_S) at T = 1) and,
for token-level logits, ``teacher_perplexity``.
"""

from __future__ import annotations

import torchmetrics
from torch import Tensor, nn

__all__ = ["Perplexity", "build_eval_metrics"]


class Perplexity(torchmetrics.MeanMetric):
    """exp of the mean token cross-entropy: update with per-token losses (``reduction="none"``).

    Unlike ``torchmetrics.text.Perplexity`` (which takes ``log(softmax(logits))`` and so returns
    ``inf`` for the whole epoch once one target's probability underflows float32), the per-token
    losses come from ``log_softmax`` and stay finite.
    """

    def compute(self) -> Tensor:
        return super().compute().exp()


def _accuracy(num_classes: int, top_k: int = 1) -> torchmetrics.Metric:
    return torchmetrics.classification.MulticlassAccuracy(num_classes, top_k=top_k, average="micro")


def build_eval_metrics(num_classes: int, token_level: bool, with_teacher: bool) -> nn.ModuleDict:
    """One metric collection per evaluation stage (``val``, ``test``); see the module docstring."""

    def collection() -> nn.ModuleDict:
        metrics: dict[str, torchmetrics.Metric] = {
            "acc": _accuracy(num_classes),
            "ece": torchmetrics.classification.MulticlassCalibrationError(num_classes, n_bins=15, norm="l1"),
            "loss": torchmetrics.MeanMetric(),
        }
        if token_level:
            metrics["perplexity"] = Perplexity()
        if num_classes > 5:
            metrics["acc_top5"] = _accuracy(num_classes, top_k=5)
        if with_teacher and token_level:
            metrics["teacher_perplexity"] = Perplexity()
        if with_teacher:
            metrics["agreement"] = _accuracy(num_classes)
            metrics["kl"] = torchmetrics.MeanMetric()
            metrics["teacher_acc"] = _accuracy(num_classes)
        return nn.ModuleDict(metrics)

    return nn.ModuleDict({"val": collection(), "test": collection()})
