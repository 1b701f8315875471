"""TinyBERT's embedding, hidden-state and attention-map terms (Jiao et al. 2020, arXiv:1909.10351).
"""

from __future__ import annotations

from typing import Any, Mapping, Optional, Union

import torch
from torch import Tensor, nn

from lightning_distill.batch import Batch
from lightning_distill.losses import mse_feature_loss
from lightning_distill.losses.transformer import (
    attention_mse_loss,
)
from lightning_distill.objectives.base import StepInfo
from lightning_distill.objectives.transformer.common import (
    WIDTH_PROJECTIONS,
    LayerMap,
    TransformerObjective,
    _attentions,
    _device,
    _hidden_states,
    _projections,
    _warn_attention_dropout,
    _width_projection,
)
from lightning_distill.outputs import ModelOutputs
from lightning_distill.probe import Probe
from lightning_distill.validation import check_bool, check_choice, check_float

__all__ = ["TinyBERTLoss"]


class TinyBERTLoss(TransformerObjective):
    r"""TinyBERT's transformer-layer distillation (Jiao et al. 2020, "TinyBERT: Distilling BERT for Natural
    Language Understanding", arXiv:1909.10351).

    .. math::

        \mathcal{L} = w \Big( \beta_e\, \mathrm{MSE}(E^S W_e,\ E^T)
            + \beta_h \sum_{m} \mathrm{MSE}(H^S_m W_{h,m},\ H^T_{g(m)})
            + \beta_a \sum_{m \ge 1} \frac{1}{H} \sum_{h=1}^{H} \mathrm{MSE}(A^S_{m,h},\ A^T_{g(m),h}) \Big)

    * embeddings: ``hidden_states[0]`` of both models, through a learned linear :math:`W_e` (student width to
      teacher width; ``projection="auto"`` leaves equal widths unprojected);
    * hidden states: every pair :math:`(m, g(m))` of the :class:`LayerMap` (``layer_map``), each student state
      through its own learned :math:`W_{h,m}` (``shared_projection=True``: one :math:`W_h` for all layers, as
      in the paper's formula; the authors' code also shares it with the embeddings);
    * attention maps: the same pairs (layers :math:`\ge 1`), averaged over heads
      (:func:`~lightning_distill.losses.attention_mse_loss`), which must be equally many on both sides.
      **Probabilities, not scores:** the paper fits the unnormalised scores :math:`QK^\top/\sqrt{d_k}`; here the
      post-softmax probabilities Hugging Face models return as ``attentions`` are compared (values in [0, 1],
      so this term is much smaller than the paper's -- raise ``attention_weight`` accordingly). In train mode
      Hugging Face models return these probabilities *after* attention dropout: build the student with
      attention dropout 0 (``build`` warns otherwise).

    MSE is the mean over real tokens (and features; for attention over real query-key pairs) -- padding is
    excluded -- and the per-layer terms are summed over layers, as in the authors' code. With a learned layer
    map the teacher side of every term is the gated mixture of teacher layers. Logged as
    ``train/tinybert_loss`` (the bracket) with its parts ``tinybert_embedding``, ``tinybert_hidden`` and
    ``tinybert_attention`` (before the betas).

    Args:
        layer_map: ``uniform`` | ``skip`` | ``last`` | ``learned`` | ``{student_index: teacher_index}``
            (see :class:`LayerMap`); ``layer_step``: k of ``skip``.
        embedding_weight, hidden_weight, attention_weight: :math:`\beta_e, \beta_h, \beta_a` (``>= 0``; a
            part with weight 0 is not computed, and no projection is built for it).
        projection: ``auto`` (learned linear maps where the widths differ), ``always`` or ``none``.
        shared_projection: one hidden-state projection for every layer.
        projection_lr: learning rate of the projections and the gate (own optimizer group).
        weight: the objective's weight :math:`w`.

    Example::

        >>> import torch
        >>> from lightning_distill.batch import Batch
        >>> from lightning_distill.objectives import TinyBERTLoss
        >>> from lightning_distill.outputs import ModelOutputs
        >>> from lightning_distill.probe import Probe
        >>> _ = torch.manual_seed(0)
        >>> def outputs(layers, width):  # [N, L, D] per layer (embeddings first), [N, heads, L, L] per layer
        ...     return ModelOutputs(hidden_states=tuple(torch.randn(2, 5, width) for _ in range(layers + 1)),
        ...                         attentions=tuple(torch.rand(2, 2, 5, 5).softmax(-1) for _ in range(layers)))
        >>> student, teacher = outputs(2, 8), outputs(4, 16)
        >>> tinybert = TinyBERTLoss(layer_map="uniform")
        >>> tinybert.build(Probe(Batch(None), student, teacher))   # projections 8 -> 16 from the probed widths
        >>> tinybert.layer_map.pairs, tinybert.embedding_projection
        ([(1, 2), (2, 4)], Linear(in_features=8, out_features=16, bias=True))
        >>> mask = torch.tensor([[True] * 5, [True] * 3 + [False] * 2])
        >>> terms = tinybert(student, teacher, Batch(None, mask=mask), None)
        >>> sorted(terms), bool(terms["loss"] > 0)
        (['loss', 'tinybert_attention', 'tinybert_embedding', 'tinybert_hidden', 'tinybert_loss'], True)
    """

    name = "tinybert"

    def __init__(
        self,
        layer_map: Union[str, Mapping[Any, Any]] = "uniform",
        layer_step: Optional[int] = None,
        embedding_weight: float = 1.0,
        hidden_weight: float = 1.0,
        attention_weight: float = 1.0,
        projection: str = "auto",
        shared_projection: bool = False,
        projection_lr: Optional[float] = None,
        weight: float = 1.0,
    ) -> None:
        super().__init__(weight, projection_lr)
        self.embedding_weight = check_float("embedding_weight", embedding_weight, 0.0)
        self.hidden_weight = check_float("hidden_weight", hidden_weight, 0.0)
        self.attention_weight = check_float("attention_weight", attention_weight, 0.0)
        if self.embedding_weight == self.hidden_weight == self.attention_weight == 0.0:
            raise ValueError(
                "TinyBERTLoss has nothing to compare: embedding_weight, hidden_weight and attention_weight are all 0; "
                "give at least one a weight > 0."
            )
        self.projection = check_choice("projection", projection, WIDTH_PROJECTIONS)
        self.shared_projection = check_bool("shared_projection", shared_projection)
        self.layer_map = LayerMap(layer_map, layer_step)
        self.model_outputs = ("hidden_states", "attentions") if self.attention_weight > 0 else ("hidden_states",)
        self.embedding_projection: nn.Module = nn.Identity()
        self.hidden_projections = nn.ModuleList()

    def extra_repr(self) -> str:
        return (f"weight={self.weight}, embedding_weight={self.embedding_weight}, hidden_weight={self.hidden_weight}, "
                f"attention_weight={self.attention_weight}, projection={self.projection!r}")

    def _attention_pairs(self) -> list[int]:
        """Pair numbers that have attention maps on both sides (no embeddings index)."""
        return [k for k, (s, t) in enumerate(self.layer_map.pairs) if s >= 1 and (t is None or t >= 1)]

    def build(self, probe: Probe) -> None:
        self._require_teacher(probe)
        owner = type(self).__name__
        hs_s = _hidden_states(probe.student, "student", owner)
        hs_t = _hidden_states(probe.teacher, "teacher", owner)
        device = _device(*hs_s)
        self.layer_map.build(len(hs_s) - 1, len(hs_t) - 1, device)
        if self.attention_weight > 0:
            att_s = _attentions(probe.student, "student", owner)
            att_t = _attentions(probe.teacher, "teacher", owner)
            heads_s, heads_t = int(att_s[0].shape[1]), int(att_t[0].shape[1])
            if heads_s != heads_t:
                raise ValueError(
                    f"TinyBERTLoss compares attention maps head by head, but the student has {heads_s} attention heads "
                    f"and the teacher {heads_t}. Set attention_weight=0, or distil the attention with "
                    "MiniLMLoss(relations=('query', 'key', 'value'), relation_heads=...): MiniLMv2's relation heads "
                    "re-split both models' concatenated heads into the same number, so head counts may differ."
                )
            _warn_attention_dropout(probe.student_model, "TinyBERTLoss", "adds noise to the attention term")
            if not self._attention_pairs():
                raise ValueError(f"TinyBERTLoss: the layer map {self.layer_map.pairs} has no pair of transformer "
                                 "layers (index >= 1 on both sides) whose attention maps could be compared.")
        width_t = hs_t[-1].shape[-1]
        if self.embedding_weight > 0:
            self.embedding_projection = _width_projection(
                self.projection, hs_s[0].shape[-1], hs_t[0].shape[-1], True, "TinyBERTLoss embeddings")
        if self.hidden_weight > 0:
            widths = [(int(hs_s[s].shape[-1]), int(hs_t[t].shape[-1] if t is not None else width_t))
                      for s, t in self.layer_map.pairs]
            self.hidden_projections = _projections(
                self.projection, self.shared_projection, widths, True, "TinyBERTLoss hidden states")
        self.to(device)
        self._built = True

    def _hidden_projection(self, k: int) -> nn.Module:
        return self.hidden_projections[0 if self.shared_projection else k]

    def forward(
        self, student: ModelOutputs, teacher: Optional[ModelOutputs], batch: Batch, step: StepInfo
    ) -> dict[str, Tensor]:
        if teacher is None:
            zero = self.zero(student.logits)
            z = zero[self._loss_name]
            return {**zero, f"{self.key}_embedding": z, f"{self.key}_hidden": z, f"{self.key}_attention": z}
        self._require_built()
        owner = type(self).__name__
        hs_s = _hidden_states(student, "student", owner)
        hs_t = tuple(h.detach() for h in _hidden_states(teacher, "teacher", owner))
        mask = batch.mask
        zero = hs_s[0].new_zeros((), dtype=torch.float32)
        embedding = hidden = attention = zero
        if self.embedding_weight > 0:
            embedding = mse_feature_loss(self.embedding_projection(hs_s[0]), hs_t[0], mask)
        if self.hidden_weight > 0:
            for k, (s, target) in enumerate(zip(self.layer_map.student_indices, self.layer_map.teacher_targets(hs_t))):
                hidden = hidden + mse_feature_loss(self._hidden_projection(k)(hs_s[s]), target, mask)
        if self.attention_weight > 0:
            att_s = _attentions(student, "student", owner)
            att_t = tuple(a.detach() for a in _attentions(teacher, "teacher", owner))
            which = self._attention_pairs()
            targets = self.layer_map.teacher_targets(att_t, first=1, which=which)
            for k, target in zip(which, targets):
                attention = attention + attention_mse_loss(att_s[self.layer_map.pairs[k][0] - 1], target, mask)
        value = self.embedding_weight * embedding + self.hidden_weight * hidden + self.attention_weight * attention
        return self.terms(value, **{f"{self.key}_embedding": embedding, f"{self.key}_hidden": hidden,
                                    f"{self.key}_attention": attention})


# ------------------------------------------------------------------------------------------- MiniLM
