r"""Transformer objectives: TinyBERT, MiniLM / MiniLMv2, DistilBERT's triple loss, hidden-state dynamics.

=========================  ===========================================================================
objective                  method
=========================  ===========================================================================
``TinyBERTLoss``           embedding, hidden-state and attention-map MSE over a layer map
                           (Jiao et al. 2020, arXiv:1909.10351)
``MiniLMLoss``             last-layer attention distributions and value relations (Wang et al. 2020,
                           arXiv:2002.10957); Q-Q / K-K / V-V relations over relation heads, so head
                           counts may differ (MiniLMv2, Wang et al. 2021, arXiv:2012.15828)
``DistilBERTLoss``         MLM + soft-target KL + cosine of the last hidden states (Sanh et al. 2019,
                           arXiv:1910.01108)
``HiddenStateDynamics``    the layer-to-layer change of the hidden states, not only the states
=========================  ===========================================================================

They read what only transformers produce: ``hidden_states`` / ``attentions`` (Hugging Face models are
asked for them automatically, :attr:`~lightning_distill.objectives.base.Objective.model_outputs`) and
the outputs of named query / key / value projections (captured with forward hooks). Layers are compared
through one helper, :class:`LayerMap` (TinyBERT's uniform map, PKD's skip / last maps, an explicit dict or
a learned softmax gate over teacher layers). Trained parts -- projections between widths, the gate --
are created in :meth:`~lightning_distill.objectives.base.Objective.build` from the probed shapes, so they
are optimised and restored from checkpoints like every other objective's. The formulas are the pure
functions of :mod:`lightning_distill.losses.transformer`; all are computed in float32 with padding
(``batch.mask`` False) excluded.
"""

from __future__ import annotations

import warnings
from typing import Any, Mapping, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from lightning_distill.batch import Batch
from lightning_distill.losses import mse_feature_loss
from lightning_distill.losses.transformer import (
    DYNAMICS_LOSSES,
    KD_POSITIONS,
    LAYER_MAPS,
    attention_kl_loss,
    attention_mse_loss,
    distilbert_loss,
    hidden_state_dynamics_loss,
    relation_kl_loss,
    resolve_layer_map,
)
from lightning_distill.objectives.base import Objective, StepInfo
from lightning_distill.outputs import ModelOutputs
from lightning_distill.probe import Probe
from lightning_distill.validation import check_bool, check_choice, check_float, check_int

__all__ = ["MINILM_RELATIONS", "DistilBERTLoss", "HiddenStateDynamics", "LayerMap", "MiniLMLoss", "TinyBERTLoss"]

#: ``projection`` values: a learned linear map where the widths differ (``auto``), always, or never
WIDTH_PROJECTIONS = ("auto", "always", "none")
#: what :class:`MiniLMLoss` can compare: attention distributions and the Q-Q / K-K / V-V relations
MINILM_RELATIONS = ("attention", "query", "key", "value")
_QKV = ("query", "key", "value")


# ------------------------------------------------------------------------------------------- helpers
def _hidden_states(outputs: ModelOutputs, role: str, owner: str) -> tuple[Tensor, ...]:
    states = outputs.hidden_states
    if not states:
        raise ValueError(
            f"{owner} reads the {role}'s hidden_states, but the {role} returned none. Hugging Face models are asked "
            "for them automatically (config.output_hidden_states); other models must return them (a `hidden_states` "
            "entry of a dict / ModelOutput: one [N, L, D] tensor per layer, the embedding output first)."
        )
    return tuple(states)


def _attentions(outputs: ModelOutputs, role: str, owner: str) -> tuple[Tensor, ...]:
    maps = outputs.attentions
    if not maps:
        raise ValueError(
            f"{owner} reads the {role}'s attention maps, but the {role} returned none. Hugging Face models are asked "
            "for them automatically (config.output_attentions, eager attention); other models must return them (an "
            "`attentions` entry: one [N, heads, L, L] tensor of attention probabilities per layer)."
        )
    return tuple(maps)


def _width_projection(choice: str, d_in: int, d_out: int, bias: bool, what: str) -> nn.Module:
    """A learned ``nn.Linear(d_in, d_out)``, or ``nn.Identity`` where ``choice`` allows it."""
    if choice == "none" or (choice == "auto" and d_in == d_out):
        if d_in != d_out:
            raise ValueError(
                f"{what}: the student's width is {d_in} and the teacher's {d_out}, and projection='none' compares them "
                "as they are. Use projection='auto' (a learned linear map from the student's width to the teacher's)."
            )
        return nn.Identity()
    return nn.Linear(d_in, d_out, bias=bias)


#: config keys of the attention-probability dropout of Hugging Face models (BERT, DistilBERT / Llama-likes, GPT-2)
_ATTENTION_DROPOUT_KEYS = ("attention_probs_dropout_prob", "attention_dropout", "attn_pdrop")


def _warn_attention_dropout(model: Optional[nn.Module], owner: str, effect: str) -> None:
    """Warn when the student drops attention probabilities: Hugging Face returns them after dropout in train mode."""
    config = getattr(model, "config", None)
    for key in _ATTENTION_DROPOUT_KEYS:
        value = getattr(config, key, None) if config is not None else None
        if isinstance(value, (int, float)) and value > 0:
            warnings.warn(
                f"{owner} reads the student's attention maps, and the student applies attention dropout ({key}={value}): "
                "in train mode Hugging Face models return the attention probabilities after dropout (dropped entries "
                f"are 0, the others scaled by 1/(1 - p), rows no longer sum to 1), which {effect}. Build the student "
                f"with {key}=0 for this objective.",
                UserWarning,
                stacklevel=3,
            )
            return


def _device(*tensors: Tensor) -> torch.device:
    return tensors[0].device


class LayerMap(nn.Module):
    r"""Which teacher layer(s) each student layer is compared with, over ``hidden_states`` indices.

    Index 0 is the embedding output and :math:`i` the output of layer :math:`i`; the student has :math:`M`
    layers, the teacher :math:`N` (both read from the probe, :meth:`build`). ``mapping``:

    * ``"uniform"`` -- student layer :math:`m` with teacher layer :math:`\lfloor mN/M \rfloor` (TinyBERT,
      Jiao et al. 2020, arXiv:1909.10351);
    * ``"skip"`` -- every k-th teacher layer, :math:`k` = ``step`` (default :math:`\lfloor N/M \rfloor`), and
      ``"last"`` -- the last :math:`M` teacher layers (Patient KD, Sun et al. 2019, arXiv:1908.09355);
    * ``{student_index: teacher_index}`` -- explicit pairs (0 allowed on either side);
    * ``"learned"`` -- every student layer :math:`m = 1..M` is compared with a softmax-gated combination of the
      teacher layers :math:`1..N`,

      .. math:: \tilde h^T_m = \sum_{j=1}^{N} \mathrm{softmax}(w_m)_j\, h^T_j,

      with gate logits :math:`w \in \mathbb{R}^{M \times N}` trained with the student (``gate``, created by
      :meth:`build`, zero at the start: each student layer first sees the mean of the teacher layers). The
      weights are free parameters, shared by every input; ALP-KD (Passban et al. 2021, arXiv:2012.14022)
      computes such weights per input from student-teacher similarities instead. The gate minimises the
      same loss as the student, so it settles on the teacher layers the student can match best.

    :meth:`teacher_targets` gives the teacher side of every pair -- of hidden states, or of any per-layer
    sequence such as attention maps (``first=1``: the sequence starts at layer 1).

    Example::

        >>> import torch
        >>> fixed = LayerMap("uniform")
        >>> fixed.build(student_layers=2, teacher_layers=4)
        >>> fixed.pairs
        [(1, 2), (2, 4)]
        >>> learned = LayerMap("learned")
        >>> learned.build(student_layers=2, teacher_layers=4)
        >>> teacher = [torch.full((1, 3, 2), float(j)) for j in range(5)]   # hidden_states 0..4
        >>> [t[0, 0, 0].item() for t in learned.teacher_targets(teacher)]  # the mean of layers 1..4 at first
        [2.5, 2.5]
    """

    def __init__(self, mapping: Union[str, Mapping[Any, Any]] = "uniform", step: Optional[int] = None) -> None:
        super().__init__()
        if isinstance(mapping, Mapping):
            try:
                normalized = {int(s): int(t) for s, t in mapping.items()}
            except (TypeError, ValueError):
                normalized = {}
            if not normalized or any(s < 0 or t < 0 for s, t in normalized.items()):
                raise ValueError(
                    f"`layer_map` as a dict must map student hidden-state indices to teacher ones, non-negative "
                    f"integers {{student_index: teacher_index}} (0 = embeddings), got {dict(mapping)!r}."
                )
            self.mapping: Union[str, dict[int, int]] = normalized
        else:
            self.mapping = check_choice(
                "layer_map", mapping, LAYER_MAPS,
                hint=" Or pass a dict {student_index: teacher_index} over hidden_states indices (0 = embeddings).",
            )
        if step is not None:
            check_int("layer_step", step, minimum=1)
            if self.mapping != "skip":
                raise ValueError(f"`layer_step` only applies to layer_map='skip', got layer_map={self.mapping!r}.")
        self.step = step
        self.register_parameter("gate", None)
        #: ``[(student index, teacher index)]``; the teacher index is ``None`` for a learned map
        self.pairs: list[tuple[int, Optional[int]]] = []
        self.teacher_layers: Optional[int] = None

    def extra_repr(self) -> str:
        return f"mapping={self.mapping!r}" + (f", pairs={self.pairs}" if self.pairs else "")

    @property
    def learned(self) -> bool:
        return self.mapping == "learned"

    @property
    def built(self) -> bool:
        return bool(self.pairs)

    def build(self, student_layers: int, teacher_layers: int, device: Optional[torch.device] = None) -> None:
        """Resolve the pairs for ``student_layers`` (M) and ``teacher_layers`` (N); a learned map gets its gate."""
        m, n = int(student_layers), int(teacher_layers)
        if self.learned:
            if m < 1 or n < 1:
                raise ValueError(f"a learned layer map needs layers on both sides, got {m} student and {n} teacher.")
            if self.gate is None or tuple(self.gate.shape) != (m, n):
                self.gate = nn.Parameter(torch.zeros(m, n, device=device))
            self.pairs = [(s, None) for s in range(1, m + 1)]
        else:
            self.pairs = list(resolve_layer_map(self.mapping, m, n, self.step))
        self.teacher_layers = n

    @property
    def student_indices(self) -> list[int]:
        return [s for s, _ in self.pairs]

    def weights(self) -> Tensor:
        """``[M, N]`` softmax of the gate logits (learned maps only)."""
        if self.gate is None:
            raise RuntimeError("only a built learned layer map has gate weights.")
        return torch.softmax(self.gate.float(), dim=-1)

    def teacher_targets(
        self, teacher: Sequence[Tensor], first: int = 0, which: Optional[Sequence[int]] = None
    ) -> list[Tensor]:
        """The teacher side of the pairs numbered ``which`` (default: all), float32.

        ``teacher[k]`` is the teacher's layer ``k + first`` (``first=0`` for hidden states, 1 for attention maps).
        """
        if not self.built:
            raise RuntimeError("the layer map is not built yet: call build(student_layers, teacher_layers) first.")
        which = range(len(self.pairs)) if which is None else which
        if not self.learned:
            return [teacher[self.pairs[k][1] - first].float() for k in which]
        n = self.teacher_layers
        stacked = torch.stack([teacher[j - first].float() for j in range(1, n + 1)])  # [N, ...]
        w = self.weights()[[self.pairs[k][0] - 1 for k in which]]  # [K, N]
        mixed = torch.einsum("kj,j...->k...", w, stacked)
        return list(mixed.unbind(0))


class TransformerObjective(Objective):
    """Shared parts of the transformer objectives (not exported: not an objective by itself)."""

    #: reads what only transformer models produce (hidden states, attention maps, Q/K/V projections): the teacher
    #: contract test runs these objectives on a tiny Hugging Face pair instead of the digits CNNs
    requires_transformer = True
    model_outputs = ("hidden_states",)

    def __init__(self, weight: float = 1.0, projection_lr: Optional[float] = None) -> None:
        super().__init__(weight)
        if projection_lr is not None:
            check_float("projection_lr", projection_lr, 0.0, low_open=True, what="> 0 or None")
        self.projection_lr = projection_lr
        self._built = False

    @property
    def built(self) -> bool:
        return self._built

    @property
    def needs_probe(self) -> bool:
        return not self.built

    def parameter_groups(self) -> list[dict]:
        params = list(self.parameters())
        if self.projection_lr is None or not params:
            return []
        return [{"params": params, "lr": self.projection_lr}]

    def _require_built(self) -> None:
        if not self.built:
            raise RuntimeError(
                f"{type(self).__name__}'s parts do not exist yet: they are built by the probe in setup(); run the "
                "module through a Trainer or call module.build(example) first."
            )

    def _require_teacher(self, probe: Probe) -> None:
        if probe.teacher is None:
            raise ValueError(f"{type(self).__name__} compares the student with a teacher and needs one.")


def _projections(choice: str, shared: bool, widths: Sequence[tuple[int, int]], bias: bool, what: str) -> nn.ModuleList:
    """One width projection per pair of ``widths``, or a single shared one."""
    if shared and widths:
        if len(set(widths)) > 1:
            raise ValueError(f"{what}: shared_projection=True needs the same widths in every pair, got {sorted(set(widths))}.")
        return nn.ModuleList([_width_projection(choice, *widths[0], bias, what)])
    return nn.ModuleList([_width_projection(choice, d_in, d_out, bias, what) for d_in, d_out in widths])


# ------------------------------------------------------------------------------------------- TinyBERT
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
class DistilBERTLoss(TransformerObjective):
    r"""DistilBERT's triple loss (Sanh et al. 2019, "DistilBERT, a distilled version of BERT: smaller, faster,
    cheaper and lighter", arXiv:1910.01108).

    .. math::

        \mathcal{L} = w \big( \alpha_{ce}\, T^2\, \mathrm{KL}\big(\mathrm{softmax}(z^T/T) \,\|\,
            \mathrm{softmax}(z^S/T)\big) + \alpha_{mlm}\, \mathrm{CE}(z^S, y)
            + \alpha_{cos}\, \big(1 - \cos(P\,h^S_{last}, h^T_{last})\big) \big)

    (:func:`~lightning_distill.losses.distilbert_loss`): the soft-target KL per token position, the
    masked-LM cross-entropy on the batch's labels (``-100`` except at the masked positions; on a causal
    model's batch, the shifted next-token labels: the authors' ``alpha_clm``), and the cosine between the
    last hidden states of every real token. ``kd_positions`` chooses where the KL is taken: ``"tokens"``
    (every real token -- what the authors' code does by default) or ``"labelled"`` (the masked positions only,
    their ``--restrict_ce_to_mask``). :math:`P` is a learned linear map when the widths differ
    (``projection="auto"``; DistilBERT itself keeps the teacher's width, so there is none). Defaults are the
    authors' published training command: :math:`\alpha_{ce} = 5`, :math:`\alpha_{mlm} = 2`,
    :math:`\alpha_{cos} = 1`, :math:`T = 2`. Logged as ``train/distilbert_loss`` with ``distilbert_ce``,
    ``distilbert_mlm`` and ``distilbert_cos`` (before the alphas; ``distilbert_ce`` includes :math:`T^2`).
    Without a teacher it contributes 0. Use it instead of (not next to) a ``CrossEntropy`` task term.

    Args:
        alpha_ce, alpha_mlm, alpha_cos: the three weights (``>= 0``).
        temperature: :math:`T > 0`.
        kd_positions: ``tokens`` | ``labelled``.
        projection: ``auto`` | ``always`` | ``none`` (for the cosine term); ``projection_lr``: its learning rate.
        ignore_index: the label of unlabelled positions.
        weight: the objective's weight :math:`w`.

    Example::

        >>> import torch
        >>> from lightning_distill.batch import Batch
        >>> from lightning_distill.objectives import DistilBERTLoss
        >>> from lightning_distill.outputs import ModelOutputs
        >>> from lightning_distill.probe import Probe
        >>> z_s, z_t = torch.tensor([[[2.0, 0.0], [0.0, 1.0]]]), torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
        >>> h = (torch.ones(1, 2, 3),)
        >>> s, t = ModelOutputs(z_s, hidden_states=h), ModelOutputs(z_t, hidden_states=h)
        >>> distil = DistilBERTLoss(temperature=1.0)
        >>> distil.build(Probe(Batch(None), s, t))
        >>> terms = distil(s, t, Batch(None, torch.tensor([[0, -100]]), mask=torch.tensor([[True, True]])), None)
        >>> [round(terms[k].item(), 4) for k in ("distilbert_ce", "distilbert_mlm", "distilbert_cos")]  # KL: 0.0826 / 2 tokens
        [0.0413, 0.1269, 0.0]
    """

    name = "distilbert"

    def __init__(
        self,
        alpha_ce: float = 5.0,
        alpha_mlm: float = 2.0,
        alpha_cos: float = 1.0,
        temperature: float = 2.0,
        kd_positions: str = "tokens",
        projection: str = "auto",
        projection_lr: Optional[float] = None,
        ignore_index: int = -100,
        weight: float = 1.0,
    ) -> None:
        super().__init__(weight, projection_lr)
        self.alpha_ce = check_float("alpha_ce", alpha_ce, 0.0, hint=" It weighs the soft-target KL.")
        self.alpha_mlm = check_float("alpha_mlm", alpha_mlm, 0.0, hint=" It weighs the masked-LM cross-entropy.")
        self.alpha_cos = check_float("alpha_cos", alpha_cos, 0.0, hint=" It weighs the hidden-state cosine term.")
        if self.alpha_ce == self.alpha_mlm == self.alpha_cos == 0.0:
            raise ValueError("DistilBERTLoss: alpha_ce, alpha_mlm and alpha_cos are all 0; give at least one a weight > 0.")
        self.temperature = check_float("temperature", temperature, 0.0, low_open=True, what="a finite number > 0",
                                       hint=" DistilBERT uses 2.")
        self.kd_positions = check_choice("kd_positions", kd_positions, KD_POSITIONS)
        self.projection = check_choice("projection", projection, WIDTH_PROJECTIONS)
        self.ignore_index = int(ignore_index)
        self.model_outputs = ("hidden_states",) if self.alpha_cos > 0 else ()
        self.cos_projection: nn.Module = nn.Identity()
        self._built = self.alpha_cos == 0.0  # nothing shape-dependent without the cosine term

    def extra_repr(self) -> str:
        return (f"weight={self.weight}, alpha_ce={self.alpha_ce}, alpha_mlm={self.alpha_mlm}, "
                f"alpha_cos={self.alpha_cos}, temperature={self.temperature}, kd_positions={self.kd_positions!r}")

    def build(self, probe: Probe) -> None:
        self._require_teacher(probe)
        if self.alpha_cos > 0:
            owner = type(self).__name__
            h_s = _hidden_states(probe.student, "student", owner)[-1]
            h_t = _hidden_states(probe.teacher, "teacher", owner)[-1]
            self.cos_projection = _width_projection(
                self.projection, int(h_s.shape[-1]), int(h_t.shape[-1]), True, "DistilBERTLoss cosine term").to(h_s.device)
        self._built = True

    def forward(
        self, student: ModelOutputs, teacher: Optional[ModelOutputs], batch: Batch, step: StepInfo
    ) -> dict[str, Tensor]:
        keys = (f"{self.key}_ce", f"{self.key}_mlm", f"{self.key}_cos")
        if teacher is None:
            zero = self.zero(student.logits)
            return {**zero, **{k: zero[self._loss_name] for k in keys}}
        self._require_built()
        if student.logits is None or student.logits.ndim != 3:
            raise ValueError(
                "DistilBERTLoss compares token distributions: it needs token logits [N, L, V] (a language model), got "
                f"{None if student.logits is None else list(student.logits.shape)}."
            )
        h_s = h_t = None
        if self.alpha_cos > 0:
            owner = type(self).__name__
            h_s = self.cos_projection(_hidden_states(student, "student", owner)[-1])
            h_t = _hidden_states(teacher, "teacher", owner)[-1].detach()
        ce, mlm, cos = distilbert_loss(
            student.logits, teacher.logits.detach(), batch.target, h_s, h_t, batch.mask, self.temperature,
            self.kd_positions, self.ignore_index,
        )
        value = self.alpha_ce * ce + self.alpha_mlm * mlm + self.alpha_cos * cos
        return self.terms(value, **dict(zip(keys, (ce, mlm, cos))))


# ------------------------------------------------------------------------------------------- dynamics
class HiddenStateDynamics(TransformerObjective):
    r"""Distil the layer-to-layer change of the hidden states (feature dynamics), not only the states.

    A transformer's residual stream is a trajectory :math:`h_0 \to h_1 \to \dots \to h_L`: every layer adds
    an update :math:`\Delta h_l = h_{l+1} - h_l`. Matching the states layer by layer (TinyBERT, PKD) asks the
    student to be *where* the teacher is; this objective asks it to *move* as the teacher moves between
    mapped layers -- the first-order differences of the two trajectories are compared
    (:func:`~lightning_distill.losses.hidden_state_dynamics_loss`):

    .. math::

        \mathcal{L} = \frac{w}{K - 1} \sum_{k=1}^{K-1} \ell\big(P_k(s_{k+1} - s_k),\ t_{k+1} - t_k\big)

    where :math:`s_1..s_K` are the student's states at the mapped indices (with ``include_embeddings``, the
    embedding output first, paired with the teacher's) and :math:`t_k` the teacher states they map to
    (:class:`LayerMap`; with ``layer_map="learned"`` the gated mixtures of teacher layers, so the gate learns
    which teacher segment each student layer's update corresponds to). :math:`\ell` is the MSE over real tokens
    and features (``loss="mse"``) or :math:`1 - \cos` per real token (``"cosine"``, insensitive to the size of
    the update). :math:`P_k` is a learned linear map without bias (``projection="auto"``: where the widths
    differ), applied to the difference. A difference is invariant to a constant offset of the states, so this
    term cannot be satisfied by copying a position- or layer-independent bias. An idea in the spirit of
    FSP's "flow" between layers (Yim et al., CVPR 2017), for transformer hidden states; logged as
    ``train/dynamics_loss``.

    Args:
        layer_map, layer_step: see :class:`LayerMap`.
        loss: ``mse`` | ``cosine``.
        include_embeddings: start both trajectories at the embedding output (index 0).
        projection, shared_projection, projection_lr: as :class:`TinyBERTLoss`.
        weight: the objective's weight :math:`w`.

    Example::

        >>> import torch
        >>> from lightning_distill.batch import Batch
        >>> from lightning_distill.objectives import HiddenStateDynamics
        >>> from lightning_distill.outputs import ModelOutputs
        >>> from lightning_distill.probe import Probe
        >>> teacher = ModelOutputs(hidden_states=tuple(torch.full((1, 3, 4), float(j * j)) for j in range(5)))
        >>> student = ModelOutputs(hidden_states=tuple(torch.full((1, 3, 4), 10.0 + 4 * j * j) for j in range(3)))
        >>> dynamics = HiddenStateDynamics(layer_map="uniform")        # student 1, 2 <-> teacher 2, 4
        >>> dynamics.build(Probe(Batch(None), student, teacher))
        >>> dynamics(student, teacher, Batch(None), None)["dynamics_loss"].item()   # the same moves: 0 -> 4 -> 16
        0.0
    """

    name = "dynamics"

    def __init__(
        self,
        layer_map: Union[str, Mapping[Any, Any]] = "uniform",
        layer_step: Optional[int] = None,
        loss: str = "mse",
        include_embeddings: bool = True,
        projection: str = "auto",
        shared_projection: bool = False,
        projection_lr: Optional[float] = None,
        weight: float = 1.0,
    ) -> None:
        super().__init__(weight, projection_lr)
        self.loss = check_choice("loss", loss, DYNAMICS_LOSSES)
        self.include_embeddings = check_bool("include_embeddings", include_embeddings)
        self.projection = check_choice("projection", projection, WIDTH_PROJECTIONS)
        self.shared_projection = check_bool("shared_projection", shared_projection)
        self.layer_map = LayerMap(layer_map, layer_step)
        self.projections = nn.ModuleList()
        self._anchor = False

    def extra_repr(self) -> str:
        return f"weight={self.weight}, loss={self.loss!r}, include_embeddings={self.include_embeddings}"

    def build(self, probe: Probe) -> None:
        self._require_teacher(probe)
        owner = type(self).__name__
        hs_s = _hidden_states(probe.student, "student", owner)
        hs_t = _hidden_states(probe.teacher, "teacher", owner)
        self.layer_map.build(len(hs_s) - 1, len(hs_t) - 1, _device(*hs_s))
        self._anchor = self.include_embeddings and 0 not in self.layer_map.student_indices
        points = len(self.layer_map.pairs) + int(self._anchor)
        if points < 2:
            raise ValueError(
                f"HiddenStateDynamics compares differences between mapped layers, but the layer map "
                f"{self.layer_map.pairs} gives {points} point(s) of the trajectory: map at least two student layers "
                "or keep include_embeddings=True."
            )
        width_s, width_t = int(hs_s[-1].shape[-1]), int(hs_t[-1].shape[-1])
        self.projections = _projections(
            self.projection, self.shared_projection, [(width_s, width_t)] * (points - 1), False,
            "HiddenStateDynamics").to(_device(*hs_s))
        self._built = True

    def trajectories(self, student: ModelOutputs, teacher: ModelOutputs) -> tuple[list[Tensor], list[Tensor]]:
        """The student's states at the mapped indices and the teacher states (or mixtures) they map to."""
        owner = type(self).__name__
        hs_s = _hidden_states(student, "student", owner)
        hs_t = tuple(h.detach() for h in _hidden_states(teacher, "teacher", owner))
        s_points = [hs_s[s] for s in self.layer_map.student_indices]
        t_points = self.layer_map.teacher_targets(hs_t)
        if self._anchor:
            s_points, t_points = [hs_s[0], *s_points], [hs_t[0].float(), *t_points]
        return s_points, t_points

    def forward(
        self, student: ModelOutputs, teacher: Optional[ModelOutputs], batch: Batch, step: StepInfo
    ) -> dict[str, Tensor]:
        if teacher is None:
            return self.zero(student.logits)
        self._require_built()
        s_points, t_points = self.trajectories(student, teacher)
        project = [self.projections[0 if self.shared_projection else k] for k in range(len(s_points) - 1)]
        return self.terms(hidden_state_dynamics_loss(s_points, t_points, batch.mask, self.loss, project))
