"""``FeatureDistillation``: match intermediate representations (FitNets, AT, RKD, SP, CKA, cosine)."""

from __future__ import annotations

from typing import Any, Callable, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_distill import losses
from lightning_distill.features import FeatureCapture, check_layer_names, map_layers
from lightning_distill.module import Batch
from lightning_distill.strategies.kd import KnowledgeDistillation

__all__ = ["FEATURE_LOSSES", "PROJECTIONS", "FeatureDistillation"]

#: ``feature_loss`` name -> pure function in :mod:`lightning_distill.losses`, ``(student, teacher) -> scalar``.
FEATURE_LOSSES: dict[str, Callable[..., Tensor]] = {
    "mse": losses.mse_feature_loss,  # FitNets (Romero et al. 2015)
    "cosine": losses.cosine_feature_loss,  # DistilBERT (Sanh et al. 2019)
    "cka": losses.cka_loss,  # linear CKA (Kornblith et al. 2019), projector-free
    "attention": losses.attention_transfer_loss,  # AT (Zagoruyko & Komodakis 2017)
    "rkd_distance": losses.rkd_distance_loss,  # RKD-D (Park et al. 2019)
    "rkd_angle": losses.rkd_angle_loss,  # RKD-A (Park et al. 2019)
    "sp": losses.similarity_preserving_loss,  # SP (Tung & Mori 2019)
}
_MASKED = {"mse", "cosine"}  # losses that take a token mask for [N, L, D] features
_SAME_SHAPE = {"mse", "cosine"}  # losses that compare features element by element
_FEAT = "feat:"  # key prefix of cached teacher features
PROJECTIONS = ("auto", "student_to_teacher", "teacher_to_student", "none")


class _Projection(nn.Module):
    """Linear map of the feature dimension, plus a resize of the spatial size for maps.

    ``[N, D]`` / ``[N, L, D]``: ``nn.Linear(D_in, D_out)``. ``[N, C, H, W]``: 1x1 conv + BatchNorm
    (FitNets' regressor as in RepDistiller), then -- if the spatial size differs from the
    target's -- bilinear interpolation to the target size.
    """

    def __init__(self, in_shape: tuple[int, ...], out_shape: tuple[int, ...]) -> None:
        super().__init__()
        self.out_hw = tuple(out_shape[2:]) if len(out_shape) == 4 else None
        if len(in_shape) == 4:
            self.map = nn.Sequential(nn.Conv2d(in_shape[1], out_shape[1], 1, bias=False), nn.BatchNorm2d(out_shape[1]))
        else:
            self.map = nn.Linear(in_shape[-1], out_shape[-1])

    def forward(self, x: Tensor) -> Tensor:
        y = self.map(x)
        if self.out_hw is not None and tuple(y.shape[2:]) != self.out_hw:
            y = F.interpolate(y, size=self.out_hw, mode="bilinear", align_corners=False)
        return y


class FeatureDistillation(KnowledgeDistillation):
    r"""Distill intermediate features of named layers, plus the logit KD term.

    .. math::

        \mathcal{L} = (1-\alpha)\,\mathrm{CE} + \alpha\, T^2\, \mathrm{KL}
                      + \sum_{(t, s) \in \text{pairs}} \beta_{(t,s)}\, \ell\big(P(f_s), f_t\big)

    where :math:`\ell` is ``feature_loss`` and :math:`P` the projection. Layers are named as in
    ``model.named_modules()`` and captured with forward hooks (:mod:`lightning_distill.features`);
    a probe forward in ``setup`` finds their shapes and builds every projection before the
    optimizer exists, so projections are optimised and checkpointed.

    ``feature_loss`` (weights beta as RepDistiller uses them on CIFAR-100):

    * ``mse`` -- FitNets hints (Romero et al. 2015, arXiv:1412.6550), beta 100;
    * ``cosine`` -- DistilBERT's cosine embedding term (Sanh et al. 2019, arXiv:1910.01108);
    * ``cka`` -- 1 - linear CKA (Kornblith et al. 2019), projector-free, dims may differ;
    * ``attention`` -- attention transfer (Zagoruyko & Komodakis 2017, arXiv:1612.03928), beta 1000;
    * ``rkd_distance`` / ``rkd_angle`` -- relational KD (Park et al. 2019, arXiv:1904.05068), beta 25 / 50;
    * ``sp`` -- similarity-preserving (Tung & Mori 2019, arXiv:1907.09682), beta 3000.

    Projections (``projection``): ``student_to_teacher`` (FitNets' regressor on the student),
    ``teacher_to_student`` (seed 000's HiddenStateDistiller: the teacher feature is mapped to the
    student's dimension; the teacher feature stays detached, only the projection learns -- beware
    the trivial solution with MSE), ``none``, or ``auto`` (student_to_teacher for ``mse`` /
    ``cosine`` when shapes differ, otherwise none). Feature maps ``[N, C, H, W]`` use a 1x1 conv +
    BatchNorm; a different spatial size is handled by **bilinear interpolation** of the projected map
    to the target size. ``attention`` average-pools the larger feature map to the smaller spatial size instead (as RepDistiller), and the
    relational losses (``cka``, ``rkd_*``, ``sp``) compare samples with samples, so neither
    channels nor spatial sizes need to match.

    Args:
        student, teacher: the networks.
        layer_map: explicit pairs ``{teacher_layer: student_layer}``.
        teacher_layers, student_layers: candidate layers for a ``mapping`` (used when
            ``layer_map`` is not given); see :func:`lightning_distill.features.map_layers`.
        mapping: ``uniform`` | ``skip`` | ``last``.
        mapping_step: k of the ``skip`` mapping (default N // M).
        projection: see above.
        feature_loss: one of :data:`FEATURE_LOSSES`, or a mapping ``{name: beta}`` to combine several
            on every pair (RKD's distance + angle: ``{rkd_distance: 25, rkd_angle: 50}``).
        feature_weight: weight of each layer pair, one float for all pairs or a list with one per
            pair; it multiplies the loss weights (with a single ``feature_loss`` it *is* beta).
        teacher_select, student_select: ``{layer: index}`` picking the element of a layer that
            returns a tuple (e.g. a transformer block returning ``(hidden, attn)``); default 0.
        projection_lr: learning rate of the projections (own parameter group); default: the
            optimizer's.
        hint_epochs: FitNets' first stage: for this many epochs only the feature terms train the
            student (hint training), then the full objective applies.
        temperature, alpha, kl: the logit term, as in :class:`KnowledgeDistillation`; ``alpha=0``
            leaves cross-entropy + feature terms (RepDistiller's setting for FitNets).

    Example::

        >>> from lightning_distill import FeatureDistillation
        >>> from lightning_distill.models import DigitsCNN, DigitsStudentCNN
        >>> module = FeatureDistillation(DigitsStudentCNN(), DigitsCNN(), teacher_checkpoint="zoo:digits_cnn",
        ...                              layer_map={"block2": "block1"}, feature_loss="mse", feature_weight=10.0)
        >>> module.pairs
        [('block2', 'block1')]
    """

    #: whether at least one layer pair is required (subclasses that add to the logit term set False)
    requires_feature_layers = True

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
        feature_loss: Union[str, dict[str, float]] = "mse",
        feature_weight: Union[float, list[float]] = 1.0,
        teacher_select: Optional[dict[str, int]] = None,
        student_select: Optional[dict[str, int]] = None,
        projection_lr: Optional[float] = None,
        hint_epochs: int = 0,
        temperature: float = 4.0,
        alpha: float = 0.9,
        kl: str = "forward",
        **kwargs: Any,
    ) -> None:
        loss_weights = {feature_loss: 1.0} if isinstance(feature_loss, str) else dict(feature_loss or {})
        unknown = [name for name in loss_weights if name not in FEATURE_LOSSES]
        if not loss_weights or unknown:
            raise ValueError(
                f"`feature_loss` must be one of {tuple(FEATURE_LOSSES)} or a mapping of them to weights, "
                f"got {feature_loss!r}."
            )
        if any(not float(w) >= 0 for w in loss_weights.values()):
            raise ValueError(f"`feature_loss` weights must be >= 0, got {feature_loss!r}.")
        if projection not in PROJECTIONS:
            raise ValueError(f"`projection` must be one of {PROJECTIONS}, got {projection!r}.")
        if isinstance(hint_epochs, bool) or not isinstance(hint_epochs, int) or hint_epochs < 0:
            raise ValueError(f"`hint_epochs` must be an integer >= 0, got {hint_epochs!r}.")
        if projection_lr is not None and not projection_lr > 0:
            raise ValueError(f"`projection_lr` must be > 0 or None, got {projection_lr!r}.")
        super().__init__(student, teacher, temperature=temperature, alpha=alpha, kl=kl, **kwargs)
        if layer_map:
            pairs = [(str(t), str(s)) for t, s in dict(layer_map).items()]
        elif teacher_layers and student_layers:
            pairs = map_layers(teacher_layers, student_layers, mapping, mapping_step)
        elif not self.requires_feature_layers:
            pairs = []  # logit distillation only (subclasses such as CTKD)
        else:
            raise ValueError(
                "FeatureDistillation needs layers: pass `layer_map` ({teacher_layer: student_layer}) or "
                "`teacher_layers` and `student_layers` with a `mapping` (uniform | skip | last)."
            )
        argument = "layer_map" if layer_map else "teacher_layers / student_layers"
        check_layer_names(teacher, [t for t, _ in pairs], "the teacher", argument)
        check_layer_names(student, [s for _, s in pairs], "the student", argument)
        weights = list(feature_weight) if isinstance(feature_weight, (list, tuple)) else [float(feature_weight)] * len(pairs)
        if len(weights) != len(pairs):
            raise ValueError(
                f"`feature_weight` has {len(weights)} values for {len(pairs)} layer pairs {pairs}; "
                "give one float for all pairs or one per pair."
            )
        if any(not w >= 0 for w in weights):
            raise ValueError(f"`feature_weight` values must be >= 0, got {weights!r}.")
        self.pairs = pairs
        self.feature_loss = feature_loss
        self.loss_weights = {name: float(w) for name, w in loss_weights.items()}
        self.feature_weights = [float(w) for w in weights]
        self.projection = projection
        self.projection_lr = projection_lr
        self.hint_epochs = hint_epochs
        self.projections = nn.ModuleList()  # filled by the probe in setup() (one entry per pair)
        self._projection_sides: list[str] = []
        self._teacher_capture = FeatureCapture(teacher, [t for t, _ in pairs], teacher_select, "the teacher", argument)
        self._student_capture = FeatureCapture(student, [s for _, s in pairs], student_select, "the student", argument)
        self._features: Optional[tuple[dict[str, Tensor], dict[str, Tensor]]] = None
        self._probe_input_shape: Optional[tuple[int, ...]] = None

    # ------------------------------------------------------------------ building from a probe
    def probe_outputs(self, example: Any) -> tuple[Any, Any]:
        with self._teacher_capture:
            teacher_out = self.call_teacher(self.teacher, example)
        with self._student_capture:
            student_out = self.student(example)
        self._features = (self._student_capture.pop(), self._teacher_capture.pop())
        return student_out, teacher_out

    def on_probe(self, example: Any, output: Any, teacher_output: Any) -> int:
        num_classes = super().on_probe(example, output, teacher_output)
        if isinstance(example, Tensor):
            self._probe_input_shape = tuple(example.shape)
        student_feats, teacher_feats = self._features
        self._features = None
        if len(self.projections) == 0:
            self._build_projections(student_feats, teacher_feats)
        return num_classes

    def _side(self, s_shape: tuple[int, ...], t_shape: tuple[int, ...]) -> str:
        if self.projection != "auto":
            return self.projection
        if _SAME_SHAPE & set(self.loss_weights) and s_shape != t_shape:
            return "student_to_teacher"
        return "none"

    def _build_projections(self, student_feats: dict[str, Tensor], teacher_feats: dict[str, Tensor]) -> None:
        projections, sides = [], []
        for t_name, s_name in self.pairs:
            t_shape, s_shape = tuple(teacher_feats[t_name].shape), tuple(student_feats[s_name].shape)
            side = self._side(s_shape, t_shape)
            pair = f"teacher {t_name!r} {t_shape} -> student {s_name!r} {s_shape}"
            if "attention" in self.loss_weights and (len(t_shape) != 4 or len(s_shape) != 4):
                raise ValueError(f"feature_loss 'attention' needs [N, C, H, W] features on both sides; got {pair}.")
            if side != "none" and len(t_shape) != len(s_shape):
                raise ValueError(
                    f"cannot project between features of different rank: {pair}. Pick layers whose outputs "
                    "have the same layout ([N, D], [N, L, D] or [N, C, H, W])."
                )
            if side == "student_to_teacher":
                projections.append(_Projection(s_shape, t_shape))
            elif side == "teacher_to_student":
                projections.append(_Projection(t_shape, s_shape))
            else:
                if _SAME_SHAPE & set(self.loss_weights) and s_shape != t_shape:
                    raise ValueError(
                        f"feature_loss {self.feature_loss!r} with projection 'none' needs equal shapes, got {pair}. "
                        "Use projection: student_to_teacher (or auto)."
                    )
                projections.append(nn.Identity())
            sides.append(side)
        self.projections = nn.ModuleList(projections)
        self._projection_sides = sides

    def build(self, example_input: Any) -> None:
        """Probe on ``example_input`` now and create the projections (for use before ``load_state_dict``)."""
        self.on_probe(example_input, *self.probe(example_input))

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["feature_probe_input_shape"] = list(self._probe_input_shape) if self._probe_input_shape else None

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        shape = checkpoint.get("feature_probe_input_shape")
        if len(self.projections) == 0 and shape:
            self.build(torch.zeros(shape))  # rebuild the projections so their weights can load

    # ------------------------------------------------------------------ optimizer groups
    def parameter_groups(self) -> list[dict]:
        groups = super().parameter_groups()
        if self.projection_lr is None:
            return groups
        proj = {id(p) for p in self.projections.parameters()}
        rest = [p for p in groups[0]["params"] if id(p) not in proj]
        return [{"params": rest}, {"params": list(self.projections.parameters()), "lr": self.projection_lr}]

    # ------------------------------------------------------------------ training
    def forward_models(self, inputs: Any) -> tuple[Tensor, Optional[Tensor]]:
        cached = self._cached
        if cached is not None:  # teacher_cache: logits and features from the cache
            teacher_logits = cached["logits"]
            teacher_feats = {name: cached[_FEAT + name] for name in self._teacher_capture.layers}
        else:
            with self._teacher_capture:
                teacher_logits = self.teacher_forward(inputs)
            teacher_feats = self._teacher_capture.pop()
        with self._student_capture:
            student_logits = self.student(inputs)
        self._features = (self._student_capture.pop(), teacher_feats)
        return student_logits, teacher_logits

    def teacher_cache_outputs(self, inputs: Any) -> dict[str, Tensor]:
        """The teacher's logits and every captured teacher layer (``feat:<layer>``)."""
        with self._teacher_capture:
            logits = self.teacher_forward(self.to_memory_format(inputs))
        feats = self._teacher_capture.pop()
        return {"logits": logits, **{_FEAT + name: f for name, f in feats.items()}}

    def teacher_cache_tag(self) -> str:
        capture = self._teacher_capture
        return f"{super().teacher_cache_tag()}:{[(name, capture._index(name)) for name in capture.layers]}"

    def feature_terms(self, student_feats: dict[str, Tensor], teacher_feats: dict[str, Tensor], mask: Optional[Tensor]) -> Tensor:
        """``sum_pairs w_pair * sum_losses beta_loss * loss(P(f_s), f_t)`` (after projection)."""
        total = None
        for (t_name, s_name), proj, side, weight in zip(self.pairs, self.projections, self._projection_sides, self.feature_weights):
            f_s, f_t = student_feats[s_name], teacher_feats[t_name].detach().float()  # float32 even for a bf16 teacher
            if side == "student_to_teacher":
                f_s = proj(f_s)
            elif side == "teacher_to_student":
                f_t = proj(f_t)
            for name, beta in self.loss_weights.items():
                fn = FEATURE_LOSSES[name]
                use_mask = mask if (name in _MASKED and f_s.ndim == 3) else None
                term = (weight * beta) * (fn(f_s, f_t, mask=use_mask) if use_mask is not None else fn(f_s, f_t))
                total = term if total is None else total + term
        return total

    def distillation_losses(self, student_logits: Tensor, teacher_logits: Optional[Tensor], batch: Batch) -> dict[str, Tensor]:
        if self._features is None:
            raise RuntimeError("FeatureDistillation.distillation_losses needs forward_models() to run first.")
        student_feats, teacher_feats = self._features
        self._features = None
        terms = super().distillation_losses(student_logits, teacher_logits, batch)
        if not self.pairs:
            return terms
        feature = self.feature_terms(student_feats, teacher_feats, batch.mask)
        if self.current_epoch_or_zero < self.hint_epochs:
            # hint stage: only the feature terms train; the zero-weighted rest keeps every parameter
            # in the graph so DDP does not complain about unused parameters
            terms["loss"] = feature + 0.0 * terms["loss"]
        else:
            terms["loss"] = terms["loss"] + feature
        terms["feature_loss"] = feature
        return terms

    @property
    def current_epoch_or_zero(self) -> int:
        return self.current_epoch if self._trainer is not None else 0
