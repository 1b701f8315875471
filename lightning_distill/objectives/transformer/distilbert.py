"""DistilBERT's triple loss (Sanh et al. 2019, arXiv:1910.01108).
"""

from __future__ import annotations

from typing import Optional

from torch import Tensor, nn

from lightning_distill.batch import Batch
from lightning_distill.losses.transformer import (
    KD_POSITIONS,
    distilbert_loss,
)
from lightning_distill.objectives.base import StepInfo
from lightning_distill.objectives.transformer.common import (
    WIDTH_PROJECTIONS,
    TransformerObjective,
    _hidden_states,
    _width_projection,
)
from lightning_distill.outputs import ModelOutputs
from lightning_distill.probe import Probe
from lightning_distill.validation import check_choice, check_float

__all__ = ["DistilBERTLoss"]


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
    Under ``loss_normalization="tokens"`` the whole term is weighted by the batch's real tokens, although its
    masked-LM part is a mean over the masked positions only; for an exact per-part normalisation compose
    ``CrossEntropy`` + ``LogitKD`` + ``FeatureMatch(loss="cosine")`` instead.

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
