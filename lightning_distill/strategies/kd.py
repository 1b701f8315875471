"""``KnowledgeDistillation``: Hinton et al. (2015), "Distilling the Knowledge in a Neural Network"."""

from __future__ import annotations

from typing import Any, Optional, Union

from torch import Tensor, nn

from lightning_distill.losses import KL_MODES, check_skew, kd_loss
from lightning_distill.module import Batch
from lightning_distill.strategies.base import DistillationModule, check_alpha, check_temperature

__all__ = ["KnowledgeDistillation"]


class KnowledgeDistillation(DistillationModule):
    r"""Vanilla logit distillation from a frozen teacher (arXiv:1503.02531).

    .. math::

        \mathcal{L} = (1 - \alpha)\,\mathrm{CE}(z_S, y)
                      + \alpha\, T^2\, D\big(\mathrm{softmax}(z_T/T),\ \mathrm{softmax}(z_S/T)\big)

    with :math:`D` the divergence chosen by ``kl`` (forward KL by default; see
    :func:`lightning_distill.losses.kd_loss`). Logits ``[N, C]`` or token-level ``[N, L, C]``
    (then a batch ``mask`` selects the valid tokens and labels equal to ``ignore_index`` are
    skipped by the cross-entropy). Logs ``train/loss``, ``train/task_loss`` and ``train/kd_loss``.

    Args:
        student: the network being trained.
        teacher: the frozen teacher (same number of classes; checked before training).
        temperature: softmax temperature ``T > 0``. Mutable: callbacks such as a curriculum may
            change ``module.temperature`` between steps.
        alpha: weight of the distillation term in [0, 1]; ``1 - alpha`` weighs the hard labels.
            Defaults follow the CIFAR-100 benchmark setup of RepDistiller (T=4, alpha=0.9).
        kl: ``"forward"`` (Hinton), ``"reverse"``, ``"symmetric"``, ``"js"``, or DistiLLM's
            ``"skew_forward"`` / ``"skew_reverse"`` (see :func:`lightning_distill.losses.kd_loss`).
        skew: mixing share of the skew divergences, in [0, 1) (DistiLLM's default 0.1).
        **kwargs: ``teacher_checkpoint``, ``optimizer``, ``lr_scheduler``, ... of
            :class:`DistillationModule`.

    Example::

        >>> import lightning as L
        >>> from lightning_distill import KnowledgeDistillation
        >>> from lightning_distill.data import DigitsDataModule
        >>> from lightning_distill.models import DigitsCNN, DigitsMLP
        >>> module = KnowledgeDistillation(DigitsMLP(), DigitsCNN(), teacher_checkpoint="zoo:digits_cnn",
        ...                                temperature=4.0, alpha=0.9)
        >>> trainer = L.Trainer(max_epochs=1, logger=False, enable_checkpointing=False,
        ...                     enable_progress_bar=False, enable_model_summary=False)
        >>> trainer.fit(module, datamodule=DigitsDataModule())  # doctest: +SKIP
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        temperature: float = 4.0,
        alpha: float = 0.9,
        kl: str = "forward",
        skew: float = 0.1,
        **kwargs: Any,
    ) -> None:
        if teacher is None:
            raise ValueError("KnowledgeDistillation needs a `teacher` module.")
        self_temperature = check_temperature(temperature)
        self_alpha = check_alpha(alpha)
        if kl not in KL_MODES:
            raise ValueError(f"`kl` must be one of {KL_MODES}, got {kl!r}.")
        self_skew = check_skew(skew)
        super().__init__(student, teacher, **kwargs)
        self.temperature = self_temperature
        self.alpha = self_alpha
        self.kl = kl
        self.skew = self_skew

    def distillation_temperature(self, student_logits: Tensor, teacher_logits: Tensor) -> Union[float, Tensor]:
        """The temperature of this step's KD term: ``self.temperature`` (learned in :class:`CTKD`)."""
        return self.temperature

    def distillation_losses(self, student_logits: Tensor, teacher_logits: Optional[Tensor], batch: Batch) -> dict[str, Tensor]:
        mask = batch.mask if student_logits.ndim == 3 else None
        task = self.task_loss(student_logits, batch.target)
        temperature = self.distillation_temperature(student_logits, teacher_logits)
        kd = kd_loss(student_logits, teacher_logits, temperature, self.kl, mask=mask, skew=self.skew)
        loss = (1.0 - self.alpha) * task + self.alpha * kd
        return {"loss": loss, "task_loss": task, "kd_loss": kd}
