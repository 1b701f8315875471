r"""``FeatureMatch``: match intermediate representations of named layers (FitNets, AT, RKD, SP, CKA, cosine).

.. math::

    \mathcal{L}_{feat} = w \sum_{(t, s) \in \text{pairs}} w_{(t,s)} \sum_{\ell} \beta_\ell\,
        \ell\big(P(f_s),\ f_t\big)

over layer pairs (teacher layer ``t``, student layer ``s``), with :math:`\ell` the feature losses of
:data:`FEATURE_LOSSES` and :math:`P` a learned projection where the shapes differ. Layers are named as in
``model.named_modules()`` and captured with forward hooks; the projections are built from the probe's
shapes (:mod:`lightning_distill.probe`), so they are optimised and checkpointed like any submodule.
"""

from __future__ import annotations

import warnings
from typing import Callable, Optional, Sequence, Union

import torch.nn.functional as F
from torch import Tensor, nn

from lightning_distill import losses
from lightning_distill.batch import Batch
from lightning_distill.features import map_layers
from lightning_distill.objectives.base import Objective, StepInfo
from lightning_distill.outputs import ModelOutputs
from lightning_distill.probe import Probe
from lightning_distill.validation import check_choice, check_float, check_int

__all__ = ["FEATURE_LOSSES", "PROJECTIONS", "PROJECTORS", "FeatureMatch", "Projection"]

#: ``loss`` name -> pure function in :mod:`lightning_distill.losses`, ``(student, teacher) -> scalar``.
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
#: losses that compare the samples of a batch with each other: a batch needs two samples or more
_RELATIONAL = {"cka", "rkd_distance", "rkd_angle", "sp"}
_SAME_SHAPE = {"mse", "cosine"}  # losses that compare features element by element
#: where a projection goes
PROJECTIONS = ("auto", "student_to_teacher", "teacher_to_student", "none")
#: what a projection is
PROJECTORS = ("linear", "mlp")


class Projection(nn.Module):
    """A learned map of the feature dimension, plus a resize of the spatial size for maps.

    * ``projector="linear"``: ``[N, D]`` / ``[N, L, D]`` -> ``nn.Linear(D_in, D_out)``; ``[N, C, H, W]`` ->
      1x1 conv + BatchNorm (FitNets' regressor as in RepDistiller);
    * ``projector="mlp"``: two layers with a ReLU between, ``hidden`` units (default ``max(D_in, D_out)``):
      ``Linear-ReLU-Linear``, or for maps ``conv1x1-BN-ReLU-conv1x1-BN``.

    A feature map whose spatial size differs from the target's is then resized bilinearly.
    """

    def __init__(
        self, in_shape: tuple[int, ...], out_shape: tuple[int, ...], projector: str = "linear",
        hidden: Optional[int] = None,
    ) -> None:
        super().__init__()
        self.out_hw = tuple(out_shape[2:]) if len(out_shape) == 4 else None
        d_in, d_out = (in_shape[1], out_shape[1]) if len(in_shape) == 4 else (in_shape[-1], out_shape[-1])
        h = hidden or max(d_in, d_out)
        if len(in_shape) == 4:
            if projector == "mlp":
                self.map = nn.Sequential(
                    nn.Conv2d(d_in, h, 1, bias=False), nn.BatchNorm2d(h), nn.ReLU(inplace=True),
                    nn.Conv2d(h, d_out, 1, bias=False), nn.BatchNorm2d(d_out),
                )
            else:
                self.map = nn.Sequential(nn.Conv2d(d_in, d_out, 1, bias=False), nn.BatchNorm2d(d_out))
        elif projector == "mlp":
            self.map = nn.Sequential(nn.Linear(d_in, h), nn.ReLU(inplace=True), nn.Linear(h, d_out))
        else:
            self.map = nn.Linear(d_in, d_out)

    def forward(self, x: Tensor) -> Tensor:
        y = self.map(x)
        if self.out_hw is not None and tuple(y.shape[2:]) != self.out_hw:
            y = F.interpolate(y, size=self.out_hw, mode="bilinear", align_corners=False)
        return y


def _select_map(select: Union[int, dict[str, int], None]) -> dict[str, int]:
    """``{layer: element}``; one int selects that element of every layer (key ``""``)."""
    if select is None or isinstance(select, int):
        return {"": int(select or 0)}
    return {str(k): int(v) for k, v in dict(select).items()}


class FeatureMatch(Objective):
    r"""Distill intermediate features of named layers (see the module docstring for the formula).

    ``loss`` (weights :math:`\beta` as RepDistiller uses them on CIFAR-100):

    * ``mse`` -- FitNets hints (Romero et al. 2015, arXiv:1412.6550), beta 100;
    * ``cosine`` -- DistilBERT's cosine embedding term (Sanh et al. 2019, arXiv:1910.01108);
    * ``cka`` -- 1 - linear CKA (Kornblith et al. 2019), projector-free, dims may differ;
    * ``attention`` -- attention transfer (Zagoruyko & Komodakis 2017, arXiv:1612.03928), beta 1000;
    * ``rkd_distance`` / ``rkd_angle`` -- relational KD (Park et al. 2019, arXiv:1904.05068), beta 25 / 50;
    * ``sp`` -- similarity-preserving (Tung & Mori 2019, arXiv:1907.09682), beta 3000.

    Projections (``projection``): ``student_to_teacher`` (FitNets' regressor on the student),
    ``teacher_to_student`` (the teacher feature is mapped to the student's width; it stays detached and
    only the projection learns -- beware the trivial solution with MSE), ``none``, or ``auto``
    (student_to_teacher for ``mse`` / ``cosine`` when shapes differ, otherwise none); ``projector``
    chooses a linear map or a small MLP (:class:`Projection`). ``attention`` average-pools the larger map
    to the smaller spatial size instead (as RepDistiller), and the relational losses (``cka``, ``rkd_*``,
    ``sp``) compare samples with samples, so neither channels nor spatial sizes need to match.

    Args:
        layer_map: explicit pairs ``{teacher_layer: student_layer}``.
        teacher_layers, student_layers: candidate layers for a ``mapping`` (used when ``layer_map`` is
            not given); see :func:`lightning_distill.features.map_layers`.
        mapping: ``uniform`` | ``skip`` | ``last``; ``mapping_step``: k of the ``skip`` mapping.
        loss: one of :data:`FEATURE_LOSSES`, or a mapping ``{name: beta}`` to combine several on every pair.
        pair_weights: weight of each pair, one float for all or a list with one per pair.
        weight: the objective's weight in the total loss.
        projection, projector, projector_hidden: see above.
        teacher_select, student_select: ``{layer: index}`` picking the element of a layer that returns a
            tuple (e.g. a transformer block returning ``(hidden, attn)``); default 0.
        projection_lr: learning rate of the projections (own optimizer group); default: the optimizer's.

    Logged as ``train/feature_loss`` (the pair- and beta-weighted sum, before ``weight``).
    """

    name = "feature"

    def __init__(
        self,
        layer_map: Optional[dict[str, str]] = None,
        teacher_layers: Optional[list[str]] = None,
        student_layers: Optional[list[str]] = None,
        mapping: str = "uniform",
        mapping_step: Optional[int] = None,
        loss: Union[str, dict[str, float]] = "mse",
        pair_weights: Union[float, Sequence[float]] = 1.0,
        weight: float = 1.0,
        projection: str = "auto",
        projector: str = "linear",
        projector_hidden: Optional[int] = None,
        teacher_select: Union[int, dict[str, int], None] = None,
        student_select: Union[int, dict[str, int], None] = None,
        projection_lr: Optional[float] = None,
    ) -> None:
        super().__init__(weight)
        betas = {loss: 1.0} if isinstance(loss, str) else dict(loss or {})
        if not betas or any(name not in FEATURE_LOSSES for name in betas):
            raise ValueError(
                f"`feature_loss` must be one of {tuple(FEATURE_LOSSES)} or a mapping of them to weights, got {loss!r}."
            )
        if any(not float(w) >= 0 for w in betas.values()):
            raise ValueError(f"`feature_loss` weights must be >= 0, got {loss!r}.")
        check_choice("projection", projection, PROJECTIONS)
        check_choice("projector", projector, PROJECTORS)
        if projector_hidden is not None:
            check_int("projector_hidden", projector_hidden, minimum=1)
        if projection_lr is not None:
            check_float("projection_lr", projection_lr, 0.0, low_open=True, what="> 0 or None")
        if layer_map:
            pairs = [(str(t), str(s)) for t, s in dict(layer_map).items()]
            argument = "layer_map"
        elif teacher_layers and student_layers:
            pairs = map_layers(teacher_layers, student_layers, mapping, mapping_step)
            argument = "teacher_layers / student_layers"
        else:
            raise ValueError(
                "FeatureMatch needs layers: pass `layer_map` ({teacher_layer: student_layer}) or "
                "`teacher_layers` and `student_layers` with a `mapping` (uniform | skip | last)."
            )
        weights = list(pair_weights) if isinstance(pair_weights, (list, tuple)) else [float(pair_weights)] * len(pairs)
        if len(weights) != len(pairs):
            raise ValueError(
                f"`feature_weight` has {len(weights)} values for {len(pairs)} layer pairs {pairs}; "
                "give one float for all pairs or one per pair."
            )
        if any(not w >= 0 for w in weights):
            raise ValueError(f"`feature_weight` values must be >= 0, got {weights!r}.")
        self.pairs = pairs
        self.student_layer_argument = self.teacher_layer_argument = argument
        self.loss = loss
        self.loss_weights = {name: float(w) for name, w in betas.items()}
        self.pair_weights = [float(w) for w in weights]
        self.projection = projection
        self.projector = projector
        self.projector_hidden = projector_hidden
        self.projection_lr = projection_lr
        self._teacher_select = _select_map(teacher_select)
        self._student_select = _select_map(student_select)
        self.projections = nn.ModuleList()  # built from the probe, one per pair
        self._sides: list[str] = []

    def student_layers(self) -> dict[str, int]:
        return {s: self._student_select.get(s, self._student_select.get("", 0)) for _, s in self.pairs}

    def teacher_layers(self) -> dict[str, int]:
        return {t: self._teacher_select.get(t, self._teacher_select.get("", 0)) for t, _ in self.pairs}

    # ------------------------------------------------------------------ projections
    def _side(self, s_shape: tuple[int, ...], t_shape: tuple[int, ...]) -> str:
        if self.projection != "auto":
            return self.projection
        if _SAME_SHAPE & set(self.loss_weights) and s_shape != t_shape:
            return "student_to_teacher"
        return "none"

    def build(self, probe: Probe) -> None:
        if probe.teacher is None:
            raise ValueError("FeatureMatch compares teacher and student features and needs a teacher.")
        projections, sides = [], []
        for t_name, s_name in self.pairs:
            t_shape = tuple(probe.teacher.features[t_name].shape)
            s_shape = tuple(probe.student.features[s_name].shape)
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
                projections.append(Projection(s_shape, t_shape, self.projector, self.projector_hidden))
            elif side == "teacher_to_student":
                projections.append(Projection(t_shape, s_shape, self.projector, self.projector_hidden))
            else:
                if _SAME_SHAPE & set(self.loss_weights) and s_shape != t_shape:
                    raise ValueError(
                        f"feature_loss {self.loss!r} with projection 'none' needs equal shapes, got {pair}. "
                        "Use projection: student_to_teacher (or auto)."
                    )
                projections.append(nn.Identity())
            sides.append(side)
        device = next(iter(probe.student.features.values())).device
        self.projections = nn.ModuleList(projections).to(device).train(self.training)
        self._sides = sides
        if "cka" in self.loss_weights and probe.stage != "load":
            self._warn_constant_features(probe)

    def _warn_constant_features(self, probe: Probe) -> None:
        """CKA against a layer that gives every probe sample the same features is undefined (the term is 1 and
        never trains): say so before training rather than let the logs show a flat feature_loss."""
        for side, outputs, names in (("teacher", probe.teacher, [t for t, _ in self.pairs]),
                                     ("student", probe.student, [s for _, s in self.pairs])):
            for name in names:
                f = outputs.features[name].detach().float()
                flat = f.reshape(f.shape[0], -1)
                if flat.shape[0] >= 2 and bool((flat == flat[:1]).all()):
                    warnings.warn(
                        f"FeatureMatch: the {side}'s layer {name!r} gives the same features for every sample of the "
                        f"shape probe's example batch ({flat.shape[0]} samples), so linear CKA against it is undefined: "
                        "feature_loss 'cka' is 1 there and gives no gradient. Pick a layer whose output depends on "
                        "the input (not one after a dead ReLU or a constant head).",
                        stacklevel=2,
                    )

    def check_batch(self, batch: Batch) -> None:
        """Relational losses compare the samples of a batch with each other: refuse a first batch of one."""
        relational = sorted(_RELATIONAL & set(self.loss_weights))
        inp = batch.input if isinstance(batch.input, Tensor) else None
        if relational and inp is not None and inp.ndim > 0 and inp.shape[0] < 2:
            raise ValueError(
                f"feature_loss {relational} compares the samples of a batch with each other and needs at least 2 per "
                f"batch, but the first training batch has {inp.shape[0]}: the term would be undefined on every step "
                "(it is 1 for 'cka' and 0 for the others, with no gradient). Use batch_size >= 2, and drop_last=True "
                "in the training DataLoader if the last batch could hold a single sample."
            )

    @property
    def built(self) -> bool:
        return len(self.projections) == len(self.pairs)

    @property
    def needs_probe(self) -> bool:
        return not self.built

    def parameter_groups(self) -> list[dict]:
        if self.projection_lr is None:
            return []
        return [{"params": list(self.projections.parameters()), "lr": self.projection_lr}]

    # ------------------------------------------------------------------ the term
    def match(self, student_feats: dict[str, Tensor], teacher_feats: dict[str, Tensor], mask: Optional[Tensor]) -> Tensor:
        """``sum_pairs w_pair * sum_losses beta * loss(P(f_s), f_t)`` (after projection)."""
        total = None
        for (t_name, s_name), proj, side, w in zip(self.pairs, self.projections, self._sides, self.pair_weights):
            f_s, f_t = student_feats[s_name], teacher_feats[t_name].detach().float()  # float32 even for a bf16 teacher
            if side == "student_to_teacher":
                f_s = proj(f_s)
            elif side == "teacher_to_student":
                f_t = proj(f_t)
            for name, beta in self.loss_weights.items():
                fn = FEATURE_LOSSES[name]
                use_mask = mask if (name in _MASKED and f_s.ndim == 3) else None
                term = (w * beta) * (fn(f_s, f_t, mask=use_mask) if use_mask is not None else fn(f_s, f_t))
                total = term if total is None else total + term
        return total

    def forward(
        self, student: ModelOutputs, teacher: Optional[ModelOutputs], batch: Batch, step: StepInfo
    ) -> dict[str, Tensor]:
        if teacher is None:
            return self.zero(student.logits)
        missing = [s for _, s in self.pairs if s not in student.features] + [
            t for t, _ in self.pairs if t not in teacher.features
        ]
        if missing:
            raise RuntimeError(
                f"FeatureMatch needs forward_models() to run first: it reads the captured features of layers "
                f"{missing}; pass the outputs of the module's forward_models(), not bare logits."
            )
        if not self.built:
            raise RuntimeError(
                "FeatureMatch's projections do not exist yet: they are built by the probe in setup(); run the module "
                "through a Trainer or call module.build(example) first."
            )
        return self.terms(self.match(student.features, teacher.features, batch.mask))
