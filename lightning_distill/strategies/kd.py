"""``KnowledgeDistillation``: Hinton et al. (2015), "Distilling the Knowledge in a Neural Network"."""

from __future__ import annotations

from typing import Any, Mapping, Optional, Union

from torch import nn

from lightning_distill.objectives import CrossEntropy, LogitKD, Objective
from lightning_distill.strategies.base import SingleTeacherDistillation, check_alpha
from lightning_distill.temperature import Temperature

__all__ = ["KDPreset", "KnowledgeDistillation"]


class KDPreset:
    """``alpha`` and ``kl`` of a preset whose objectives are ``task`` (weight ``1 - alpha``) and ``kd``
    (weight ``alpha``): read and written through the objectives, so a callback (a curriculum) that changes
    them changes the loss. (``temperature`` is :class:`~lightning_distill.distiller.DistillationModule`'s.)"""

    @property
    def alpha(self) -> float:
        """Weight of the distillation term; ``1 - alpha`` weighs the hard labels."""
        return self.objectives["kd"].weight

    @alpha.setter
    def alpha(self, value: float) -> None:
        value = check_alpha(value)
        self.objectives["kd"].weight = value
        self.objectives["task"].weight = 1.0 - value

    @property
    def kl(self) -> str:
        return self.objectives["kd"].kl


def kd_objectives(
    alpha: float, temperature: Union[float, Temperature], kl: str, skew: float = 0.1, standardize: bool = False
) -> dict[str, Any]:
    """``{"task": CrossEntropy(1 - alpha), "kd": LogitKD(alpha, ...)}``: Hinton's objective."""
    alpha = check_alpha(alpha)
    return {
        "task": CrossEntropy(1.0 - alpha),
        "kd": LogitKD(alpha, temperature, kl, skew, standardize),
    }


class KnowledgeDistillation(KDPreset, SingleTeacherDistillation):
    r"""Vanilla logit distillation from a frozen teacher (arXiv:1503.02531).

    .. math::

        \mathcal{L} = (1 - \alpha)\,\mathrm{CE}(z_S, y)
                      + \alpha\, T^2\, D\big(\mathrm{softmax}(z_T/T),\ \mathrm{softmax}(z_S/T)\big)

    with :math:`D` the divergence chosen by ``kl`` (forward KL by default; see
    :func:`lightning_distill.losses.kd_loss`): the objectives
    :class:`~lightning_distill.objectives.CrossEntropy` (``task``) and
    :class:`~lightning_distill.objectives.LogitKD` (``kd``). Logits ``[N, C]`` or token-level ``[N, L, C]``
    (then a batch ``mask`` selects the valid tokens and labels equal to ``ignore_index`` are skipped by the
    cross-entropy). Logs ``train/loss``, ``train/task_loss`` and ``train/kd_loss``.

    Args:
        student: the network being trained.
        teacher: the frozen teacher (same number of classes; checked before training).
        temperature: softmax temperature ``T > 0``, or a :class:`~lightning_distill.temperature.Temperature`
            (e.g. a ``TemperatureSchedule``). Mutable: callbacks such as a curriculum may change
            ``module.temperature`` between steps.
        alpha: weight of the distillation term in [0, 1]; ``1 - alpha`` weighs the hard labels.
            Defaults follow the CIFAR-100 benchmark setup of RepDistiller (T=4, alpha=0.9).
        kl: ``"forward"`` (Hinton), ``"reverse"``, ``"symmetric"``, ``"js"``, or DistiLLM's
            ``"skew_forward"`` / ``"skew_reverse"`` (see :func:`lightning_distill.losses.kd_loss`).
        skew: mixing share of the skew divergences, in [0, 1) (DistiLLM's default 0.1).
        standardize: logit standardisation (Sun et al. 2024, arXiv:2403.01427): z-score both models'
            logits before the temperature.
        objectives: more objectives added to the two (``{"feature": FeatureMatch(...)}``): the other
            presets are KD plus one term.
        **kwargs: ``teacher_checkpoint``, ``teacher_dtype``, ``teacher_cache``, ``pseudo_labels``,
            ``optimizer``, ``lr_scheduler``, ... of :class:`~lightning_distill.strategies.base.SingleTeacherDistillation`.

    Example::

        >>> import lightning as L
        >>> from lightning_distill import KnowledgeDistillation
        >>> from lightning_distill.data import DigitsDataModule
        >>> from lightning_distill.models import DigitsCNN, DigitsMLP
        >>> module = KnowledgeDistillation(DigitsMLP(), DigitsCNN(), teacher_checkpoint="zoo:digits_cnn",
        ...                                temperature=4.0, alpha=0.9)
        >>> list(module.objectives), module.alpha, module.temperature
        (['task', 'kd'], 0.9, 4.0)
        >>> trainer = L.Trainer(max_epochs=1, logger=False, enable_checkpointing=False,
        ...                     enable_progress_bar=False, enable_model_summary=False)
        >>> trainer.fit(module, datamodule=DigitsDataModule())  # doctest: +SKIP
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        temperature: Union[float, Temperature] = 4.0,
        alpha: float = 0.9,
        kl: str = "forward",
        skew: float = 0.1,
        standardize: bool = False,
        objectives: Optional[Mapping[str, Objective]] = None,
        **kwargs: Any,
    ) -> None:
        if teacher is None:
            raise ValueError(f"{type(self).__name__} needs a `teacher` module.")
        named = kd_objectives(alpha, temperature, kl, skew, standardize)
        for key, objective in dict(objectives or {}).items():
            if key in named:
                raise ValueError(f"`objectives`: {key!r} is the preset's own term; name the extra objective otherwise.")
            named[key] = objective
        super().__init__(student, teacher, objectives=named, **kwargs)
