"""MiniLM's attention distributions and value relations (Wang et al. 2020, arXiv:2002.10957) and MiniLMv2's
relation heads (Wang et al. 2021, arXiv:2012.15828).
"""

from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence, Union

from torch import Tensor

from lightning_distill.batch import Batch
from lightning_distill.losses.transformer import (
    attention_kl_loss,
    relation_kl_loss,
)
from lightning_distill.objectives.base import StepInfo
from lightning_distill.objectives.transformer.common import (
    _QKV,
    MINILM_RELATIONS,
    TransformerObjective,
    _attentions,
    _warn_attention_dropout,
)
from lightning_distill.outputs import ModelOutputs
from lightning_distill.probe import Probe
from lightning_distill.validation import check_bool, check_float, check_int

__all__ = ["MiniLMLoss"]


def _qkv_names(qkv: Any, argument: str) -> tuple[Optional[str], dict[str, str]]:
    """``(fused layer or None, {part: layer})`` from a name, three names or a dict."""
    if qkv is None:
        return None, {}
    if isinstance(qkv, str):
        return qkv, {}
    if isinstance(qkv, Mapping):
        unknown = [k for k in qkv if k not in _QKV]
        if unknown:
            raise ValueError(f"`{argument}` keys must be among {_QKV}, got {unknown} in {dict(qkv)!r}.")
        return None, {str(k): str(v) for k, v in qkv.items()}
    if isinstance(qkv, (list, tuple)) and len(qkv) == 3 and all(isinstance(v, str) for v in qkv):
        return None, dict(zip(_QKV, qkv))
    raise ValueError(
        f"`{argument}` must name the layers whose outputs are the queries, keys and values: a dict "
        "{'query': ..., 'key': ..., 'value': ...} (e.g. BERT's 'bert.encoder.layer.11.attention.self.query'), three "
        "names (query, key, value), or one fused projection whose output is [queries | keys | values] "
        f"(GPT-2's 'transformer.h.11.attn.c_attn'); got {qkv!r}."
    )


class MiniLMLoss(TransformerObjective):
    r"""MiniLM's deep self-attention distillation and MiniLMv2's multi-head self-attention relations.

    With :math:`\mathrm{KL}` averaged over heads and real query positions (each row a distribution over the
    real keys; :func:`~lightning_distill.losses.attention_kl_loss`,
    :func:`~lightning_distill.losses.relation_kl_loss`):

    .. math::

        \mathcal{L} = w \sum_{r \in \text{relations}} \lambda_r\,
            \mathrm{KL}\big(R^T_r \,\|\, R^S_r\big), \qquad
        R_{\text{attention}} = A, \quad R_{x} = \mathrm{softmax}\big(X_h X_h^\top / \sqrt{d_h}\big),\ x \in \{q, k, v\}

    * MiniLM (Wang et al. 2020, arXiv:2002.10957), the default ``relations=("attention", "value")``: the
      last layer's attention distributions :math:`A` (the probabilities Hugging Face models return as
      ``attentions``, layers chosen by ``student_attention_layer`` / ``teacher_attention_layer``) and the
      value relation, both per attention head -- the head counts must be equal. The student's maps are
      those its forward returns, in train mode *after* attention dropout, which ruins a KL: build the student
      with attention dropout 0 (``build`` warns otherwise);
    * MiniLMv2 (Wang et al. 2021, arXiv:2012.15828): ``relations=("query", "key", "value")`` with
      ``relation_heads`` :math:`H_r`: the concatenated queries (keys, values) of all heads of each model are
      re-split into :math:`H_r` relation heads of equal size, so the models' head counts and widths may
      differ (the paper also distils an upper-middle teacher layer of large teachers rather than the last:
      name that layer's projections).

    Queries, keys and values are the outputs of named projection layers of each model (``student_qkv``,
    ``teacher_qkv``), captured with forward hooks: a dict ``{"query": ..., "key": ..., "value": ...}`` (only
    the parts the relations need), three names, or one fused layer whose output is ``[queries | keys |
    values]`` (GPT-2's ``c_attn``). Name the layers of the same transformer layer as the attention maps.
    ``causal=True`` limits the relations of a causal model to the keys a query may attend to (the attention
    maps of such a model already are). Padded queries and keys are excluded. Nothing is trained here: the
    relations are :math:`L \times L` on both sides, whatever the widths. Logged as ``train/minilm_loss`` with
    every relation's KL as ``minilm_<relation>``.

    Args:
        student_qkv, teacher_qkv: the projection layers (see above); may be omitted with
            ``relations=("attention",)``.
        relations: a subset of :data:`MINILM_RELATIONS`, or a mapping ``{relation: weight}``.
        relation_heads: :math:`H_r` (MiniLMv2); ``None`` uses the models' own attention heads (MiniLM).
        student_attention_layer, teacher_attention_layer: index into ``attentions`` of the maps to compare (and
            whose head counts ``relation_heads=None`` uses); default the last layer.
        causal: exclude keys after the query from the relations.
        weight: the objective's weight :math:`w`.

    Example::

        >>> import torch
        >>> from lightning_distill.batch import Batch
        >>> from lightning_distill.objectives import MiniLMLoss
        >>> from lightning_distill.outputs import ModelOutputs
        >>> from lightning_distill.probe import Probe
        >>> _ = torch.manual_seed(0)
        >>> names = {"query": "attn.q", "key": "attn.k", "value": "attn.v"}
        >>> minilm = MiniLMLoss(names, names, relations=("query", "key", "value"), relation_heads=4)
        >>> minilm.student_layers()
        {'attn.q': 0, 'attn.k': 0, 'attn.v': 0}
        >>> student = ModelOutputs(features={n: torch.randn(2, 5, 8) for n in names.values()})    # width 8
        >>> teacher = ModelOutputs(features={n: torch.randn(2, 5, 24) for n in names.values()})   # width 24
        >>> minilm.build(Probe(Batch(None), student, teacher))
        >>> terms = minilm(student, teacher, Batch(None, mask=torch.ones(2, 5, dtype=torch.bool)), None)
        >>> sorted(terms), bool(terms["minilm_loss"] > 0)
        (['loss', 'minilm_key', 'minilm_loss', 'minilm_query', 'minilm_value'], True)
    """

    name = "minilm"
    student_layer_argument = "student_qkv"
    teacher_layer_argument = "teacher_qkv"

    def __init__(
        self,
        student_qkv: Union[str, Sequence[str], Mapping[str, str], None] = None,
        teacher_qkv: Union[str, Sequence[str], Mapping[str, str], None] = None,
        relations: Union[Sequence[str], Mapping[str, float]] = ("attention", "value"),
        relation_heads: Optional[int] = None,
        student_attention_layer: int = -1,
        teacher_attention_layer: int = -1,
        causal: bool = False,
        weight: float = 1.0,
    ) -> None:
        super().__init__(weight)
        items = dict(relations) if isinstance(relations, Mapping) else (
            {relations: 1.0} if isinstance(relations, str) else {r: 1.0 for r in (relations or ())})
        if not items or any(r not in MINILM_RELATIONS for r in items):
            raise ValueError(
                f"`relations` must be a non-empty subset of {MINILM_RELATIONS} (or a mapping of them to weights), got "
                f"{relations!r}. MiniLM: ('attention', 'value'); MiniLMv2: ('query', 'key', 'value')."
            )
        self.relations = {r: check_float(f"relations[{r!r}]", w, 0.0) for r, w in items.items()}
        if relation_heads is not None:
            check_int("relation_heads", relation_heads, minimum=1)
        self.relation_heads = relation_heads
        self.student_attention_layer = check_int("student_attention_layer", student_attention_layer)
        self.teacher_attention_layer = check_int("teacher_attention_layer", teacher_attention_layer)
        self.causal = check_bool("causal", causal)
        self._student_fused, self._student_parts = _qkv_names(student_qkv, "student_qkv")
        self._teacher_fused, self._teacher_parts = _qkv_names(teacher_qkv, "teacher_qkv")
        needed = [r for r in self.relations if r in _QKV]
        for argument, fused, parts in (("student_qkv", self._student_fused, self._student_parts),
                                       ("teacher_qkv", self._teacher_fused, self._teacher_parts)):
            missing = [r for r in needed if fused is None and r not in parts]
            if missing:
                raise ValueError(
                    f"MiniLMLoss relations {needed} read the {missing} projection(s), but `{argument}` does not name "
                    f"them (got {parts or None!r}): give {{'query': ..., 'key': ..., 'value': ...}} layer names, three "
                    "names, or one fused q/k/v projection."
                )
        self._needed = needed
        self.model_outputs = ("attentions",) if ("attention" in self.relations or relation_heads is None) else ()
        self._heads: Optional[int] = relation_heads

    def extra_repr(self) -> str:
        return f"weight={self.weight}, relations={self.relations}, relation_heads={self.relation_heads}"

    @staticmethod
    def _layers(fused: Optional[str], parts: dict[str, str], needed: list[str]) -> dict[str, int]:
        if not needed:
            return {}
        if fused is not None:
            return {fused: 0}
        return {parts[r]: 0 for r in needed}

    def student_layers(self) -> dict[str, int]:
        return self._layers(self._student_fused, self._student_parts, self._needed)

    def teacher_layers(self) -> dict[str, int]:
        return self._layers(self._teacher_fused, self._teacher_parts, self._needed)

    def _part(self, features: dict[str, Tensor], role: str, relation: str) -> Tensor:
        fused, parts = (self._student_fused, self._student_parts) if role == "student" else (
            self._teacher_fused, self._teacher_parts)
        name = fused if fused is not None else parts[relation]
        if name not in features:
            raise RuntimeError(
                f"MiniLMLoss reads the {role}'s captured layer {name!r}: pass the outputs of the module's "
                "forward_models() (which captures it), not bare logits."
            )
        x = features[name]
        if fused is None:
            return x
        if x.shape[-1] % 3:
            raise ValueError(f"the {role}'s fused q/k/v layer {name!r} outputs width {x.shape[-1]}, not a multiple of 3.")
        return x.chunk(3, dim=-1)[_QKV.index(relation)]

    def _attention_map(self, outputs: ModelOutputs, role: str) -> Tensor:
        maps = _attentions(outputs, role, type(self).__name__)
        index = self.student_attention_layer if role == "student" else self.teacher_attention_layer
        if not -len(maps) <= index < len(maps):
            raise ValueError(
                f"`{role}_attention_layer`={index} is out of range: the {role} returns {len(maps)} attention maps "
                f"(valid: {-len(maps)}..{len(maps) - 1})."
            )
        return maps[index]

    def build(self, probe: Probe) -> None:
        self._require_teacher(probe)
        heads = self.relation_heads
        if "attention" in self.relations or heads is None:
            a_s, a_t = self._attention_map(probe.student, "student"), self._attention_map(probe.teacher, "teacher")
            heads_s, heads_t = int(a_s.shape[1]), int(a_t.shape[1])
            if heads_s != heads_t and ("attention" in self.relations or heads is None):
                raise ValueError(
                    f"MiniLMLoss compares {'attention distributions' if 'attention' in self.relations else 'relations'} "
                    f"per attention head, but the student has {heads_s} heads and the teacher {heads_t}. Use MiniLMv2's "
                    "relation heads: relations=('query', 'key', 'value') with relation_heads=H (a divisor of both "
                    "models' widths), which re-split the concatenated heads of both models into H heads."
                )
            heads = heads if heads is not None else heads_s
        if "attention" in self.relations:
            _warn_attention_dropout(probe.student_model, "MiniLMLoss",
                                    "makes the KL of the attention distributions large and meaningless")
        for relation in self._needed:
            for role, outputs in (("student", probe.student), ("teacher", probe.teacher)):
                x = self._part(outputs.features, role, relation)
                if x.ndim != 3 or x.shape[-1] % heads:
                    raise ValueError(
                        f"MiniLMLoss: the {role}'s {relation} projection has shape {list(x.shape)}; the {relation} "
                        f"relation needs [N, L, D] with D divisible by {heads} heads"
                        + (" (relation_heads)." if self.relation_heads is not None else " (the model's heads).")
                    )
        self._heads = heads
        self._built = True

    def forward(
        self, student: ModelOutputs, teacher: Optional[ModelOutputs], batch: Batch, step: StepInfo
    ) -> dict[str, Tensor]:
        if teacher is None:
            zero = self.zero(student.logits)
            return {**zero, **{f"{self.key}_{r}": zero[self._loss_name] for r in self.relations}}
        self._require_built()
        mask = batch.mask
        parts: dict[str, Tensor] = {}
        for relation in self.relations:
            if relation == "attention":
                parts[relation] = attention_kl_loss(
                    self._attention_map(student, "student"), self._attention_map(teacher, "teacher").detach(), mask)
            else:
                parts[relation] = relation_kl_loss(
                    self._part(student.features, "student", relation),
                    self._part(teacher.features, "teacher", relation).detach(), self._heads, mask, self.causal)
        value = None
        for relation, term in parts.items():
            weighted = self.relations[relation] * term
            value = weighted if value is None else value + weighted
        return self.terms(value, **{f"{self.key}_{r}": v for r, v in parts.items()})


# ------------------------------------------------------------------------------------------- DistilBERT
