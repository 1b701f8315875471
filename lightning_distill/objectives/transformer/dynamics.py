"""Distilling the layer-to-layer change of transformer hidden states.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional, Union

from torch import Tensor, nn

from lightning_distill.batch import Batch
from lightning_distill.losses.transformer import (
    DYNAMICS_LOSSES,
    hidden_state_dynamics_loss,
)
from lightning_distill.objectives.base import StepInfo
from lightning_distill.objectives.transformer.common import (
    WIDTH_PROJECTIONS,
    LayerMap,
    TransformerObjective,
    _device,
    _hidden_states,
    _projections,
)
from lightning_distill.outputs import ModelOutputs
from lightning_distill.probe import Probe
from lightning_distill.validation import check_bool, check_choice

__all__ = ["HiddenStateDynamics"]


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
