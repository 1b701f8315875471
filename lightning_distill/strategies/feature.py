"""``FeatureDistillation``: match intermediate representations (FitNets, AT, RKD, SP, CKA, cosine)."""

from __future__ import annotations

from typing import Any, Optional, Union

from torch import Tensor, nn

from lightning_distill.objectives import FEATURE_LOSSES, PROJECTIONS, FeatureMatch
from lightning_distill.objectives.base import StepInfo
from lightning_distill.strategies.kd import KnowledgeDistillation
from lightning_distill.validation import check_int

__all__ = ["FEATURE_LOSSES", "PROJECTIONS", "FeatureDistillation"]


class FeatureDistillation(KnowledgeDistillation):
    r"""Distill intermediate features of named layers, plus the logit KD term.

    .. math::

        \mathcal{L} = (1-\alpha)\,\mathrm{CE} + \alpha\, T^2\, \mathrm{KL}
                      + \sum_{(t, s) \in \text{pairs}} \beta_{(t,s)}\, \ell\big(P(f_s), f_t\big)

    :class:`KnowledgeDistillation` (objectives ``task`` and ``kd``) plus the objective ``feature``
    (:class:`~lightning_distill.objectives.FeatureMatch`, where the feature losses, the layer mappings and
    the projections are documented). Layers are named as in ``model.named_modules()``; a probe before
    training finds their shapes and builds every projection before the optimizer exists, so projections
    are optimised and checkpointed.

    Args:
        student, teacher: the networks.
        layer_map: explicit pairs ``{teacher_layer: student_layer}``.
        teacher_layers, student_layers: candidate layers for a ``mapping`` (used when ``layer_map`` is not
            given); see :func:`lightning_distill.features.map_layers`.
        mapping: ``uniform`` | ``skip`` | ``last``; ``mapping_step``: k of the ``skip`` mapping.
        projection: ``auto`` | ``student_to_teacher`` | ``teacher_to_student`` | ``none``.
        projector: ``linear`` (FitNets' regressor) or ``mlp`` (two layers with a ReLU).
        feature_loss: one of :data:`FEATURE_LOSSES`, or a mapping ``{name: beta}`` to combine several on
            every pair (RKD's distance + angle: ``{rkd_distance: 25, rkd_angle: 50}``).
        feature_weight: weight of each layer pair, one float for all pairs or a list with one per pair; it
            multiplies the loss weights (with a single ``feature_loss`` it *is* beta).
        teacher_select, student_select: ``{layer: index}`` picking the element of a layer that returns a
            tuple (e.g. a transformer block returning ``(hidden, attn)``); default 0.
        projection_lr: learning rate of the projections (own parameter group); default: the optimizer's.
        hint_epochs: FitNets' first stage: for this many epochs only the feature terms train the student
            (hint training), then the full objective applies.
        **kwargs: the logit term (``temperature``, ``alpha``, ``kl``, ...; ``alpha=0`` leaves cross-entropy
            + feature terms, RepDistiller's setting for FitNets) and the teacher options of
            :class:`KnowledgeDistillation`.

    Example::

        >>> from lightning_distill import FeatureDistillation
        >>> from lightning_distill.models import DigitsCNN, DigitsStudentCNN
        >>> module = FeatureDistillation(DigitsStudentCNN(), DigitsCNN(), teacher_checkpoint="zoo:digits_cnn",
        ...                              layer_map={"block2": "block1"}, feature_loss="mse", feature_weight=10.0)
        >>> module.pairs, list(module.objectives)
        ([('block2', 'block1')], ['task', 'kd', 'feature'])
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        layer_map: Optional[dict[str, str]] = None,
        teacher_layers: Optional[list[str]] = None,
        student_layers: Optional[list[str]] = None,
        mapping: str = "uniform",
        mapping_step: Optional[int] = None,
        projection: str = "auto",
        projector: str = "linear",
        feature_loss: Union[str, dict[str, float]] = "mse",
        feature_weight: Union[float, list[float]] = 1.0,
        teacher_select: Union[int, dict[str, int], None] = None,
        student_select: Union[int, dict[str, int], None] = None,
        projection_lr: Optional[float] = None,
        hint_epochs: int = 0,
        **kwargs: Any,
    ) -> None:
        check_int("hint_epochs", hint_epochs, minimum=0)
        if not layer_map and not (teacher_layers and student_layers):
            raise ValueError(
                f"{type(self).__name__} needs layers: pass `layer_map` ({{teacher_layer: student_layer}}) or "
                "`teacher_layers` and `student_layers` with a `mapping` (uniform | skip | last)."
            )
        feature = FeatureMatch(
            layer_map, teacher_layers, student_layers, mapping, mapping_step, feature_loss, feature_weight,
            projection=projection, projector=projector, teacher_select=teacher_select,
            student_select=student_select, projection_lr=projection_lr,
        )
        super().__init__(student, teacher, objectives={"feature": feature}, **kwargs)
        self.hint_epochs = hint_epochs

    @property
    def pairs(self) -> list[tuple[str, str]]:
        """The ``(teacher_layer, student_layer)`` pairs."""
        return self.objectives["feature"].pairs

    @property
    def projections(self) -> nn.ModuleList:
        """One projection per pair (``nn.Identity`` where none is needed), built by the probe."""
        return self.objectives["feature"].projections

    @property
    def feature_weights(self) -> list[float]:
        """The weight of each layer pair."""
        return self.objectives["feature"].pair_weights

    @feature_weights.setter
    def feature_weights(self, value: list[float]) -> None:
        self.objectives["feature"].pair_weights = [float(w) for w in value]

    def combine(self, contributions: dict[str, Tensor], step: StepInfo) -> Tensor:
        total = super().combine(contributions, step)
        if step.epoch < self.hint_epochs:
            # hint stage: only the feature terms train; the zero-weighted rest keeps every parameter in the
            # graph so DDP does not complain about unused parameters
            return contributions["feature"] + 0.0 * (total - contributions["feature"])
        return total
