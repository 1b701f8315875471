"""Shared parts of the transformer objectives: reading hidden states / attention maps, width projections, the
attention-dropout warning, :class:`LayerMap` and the :class:`TransformerObjective` base class.
"""

from __future__ import annotations

import warnings
from typing import Any, Mapping, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from lightning_distill.losses.transformer import (
    LAYER_MAPS,
    resolve_layer_map,
)
from lightning_distill.objectives.base import Objective
from lightning_distill.outputs import ModelOutputs
from lightning_distill.probe import Probe
from lightning_distill.validation import check_choice, check_float, check_int

__all__ = ["MINILM_RELATIONS", "WIDTH_PROJECTIONS", "LayerMap", "TransformerObjective"]

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
