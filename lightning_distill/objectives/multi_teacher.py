r"""``MultiTeacherKD``: distill a per-sample weighted mixture of several frozen teachers.

.. math::

    \mathcal{L} = w\,T^2\,D\Big(\sum_m w_{i,m}\,\mathrm{softmax}(z_{i,m}/T),\ \mathrm{softmax}(z_{S,i}/T)\Big)

(:func:`~lightning_distill.losses.multi_teacher_kd_loss`) over teacher logits stacked ``[M, N, C]`` (a
:class:`~lightning_distill.teachers.TeacherEnsemble`), with per-sample teacher weights summing to 1:

* ``mean`` -- :math:`1/M` (the average of the teachers' softmaxes);
* ``confidence`` -- inverse entropy of each teacher's prediction at :math:`T`, normalised over teachers
  (:func:`~lightning_distill.losses.confidence_weights`);
* ``learned`` -- AMTML-KD-style instance-level weights (Liu et al. 2020, arXiv:2103.04062), simplified: a
  small gating MLP on the concatenated softened teacher predictions (probabilities rather than raw
  logits, so extreme logits cannot saturate it), softmax over teachers, trained jointly with the student
  through the KD term. Built from the probe (number of teachers and classes). The gate minimises the
  same KL as the student, so it favours teachers that already agree with the student; use it with
  teachers of comparable quality.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_distill.batch import Batch
from lightning_distill.losses import KL_MODES, confidence_weights, multi_teacher_kd_loss
from lightning_distill.objectives.base import Objective, StepInfo
from lightning_distill.objectives.logit import standardize_logits
from lightning_distill.outputs import ModelOutputs
from lightning_distill.probe import Probe
from lightning_distill.temperature import FixedTemperature
from lightning_distill.validation import check_bool, check_choice, check_int

__all__ = ["WEIGHTINGS", "MultiTeacherKD"]

#: ``weighting`` values of :class:`MultiTeacherKD`.
WEIGHTINGS = ("mean", "confidence", "learned")


class TeacherGate(nn.Module):
    """Instance-level teacher weights: an MLP on the teachers' softened predictions.

    Input: the M teachers' ``softmax(z_m / T)`` concatenated (``M * C`` values in [0, 1] per sample);
    output: a softmax over the M teachers. The last layer starts at zero, so training starts from the
    plain mean.
    """

    def __init__(self, num_teachers: int, num_classes: int, hidden: int) -> None:
        super().__init__()
        self.num_teachers, self.num_classes = num_teachers, num_classes
        self.fc1 = nn.Linear(num_teachers * num_classes, hidden)
        self.fc2 = nn.Linear(hidden, num_teachers)
        nn.init.zeros_(self.fc2.weight)
        nn.init.zeros_(self.fc2.bias)

    def forward(self, teacher_logits: Tensor, temperature: float) -> Tensor:
        probs = F.softmax(teacher_logits.float() / temperature, dim=-1)  # [M, *, C]
        features = probs.movedim(0, -2).flatten(-2)  # [*, M * C]
        return F.softmax(self.fc2(F.relu(self.fc1(features))).float(), dim=-1)  # [*, M]


class MultiTeacherKD(Objective):
    """The multi-teacher KD term (see the module docstring); logged as ``train/kd_loss`` and
    ``train/teacher{m}_weight`` (the mean weight of teacher m in the batch).

    Args:
        weight: the term's weight (``alpha`` in the presets).
        weighting: ``"mean"``, ``"confidence"`` or ``"learned"``.
        temperature: softmax temperature ``T > 0``.
        kl: the divergence (see :func:`~lightning_distill.losses.kd_loss`).
        gate_hidden: hidden units of the ``learned`` gate.
        standardize: z-score the student's and every teacher's logits first (logit standardisation).
    """

    name = "kd"

    def __init__(
        self,
        weight: float = 1.0,
        weighting: str = "mean",
        temperature: float = 4.0,
        kl: str = "forward",
        gate_hidden: int = 32,
        standardize: bool = False,
    ) -> None:
        super().__init__(weight)
        self.weighting = check_choice("weighting", weighting, WEIGHTINGS)
        self.temperature = FixedTemperature(temperature)
        self.kl = check_choice("kl", kl, KL_MODES)
        self.gate_hidden = check_int("gate_hidden", gate_hidden, minimum=1)
        self.standardize = check_bool("standardize", standardize)
        self.gate: Optional[TeacherGate] = None

    @property
    def needs_probe(self) -> bool:
        return self.weighting == "learned" and self.gate is None

    def build(self, probe: Probe) -> None:
        if self.weighting == "learned" and probe.teacher is not None:
            self.build_gate(int(probe.teacher.logits.shape[0]), probe.num_classes)
            self.gate.to(probe.teacher.logits.device)

    def build_gate(self, num_teachers: int, num_classes: int) -> None:
        """Create the ``learned`` weighting's gate for ``num_teachers`` teachers of ``num_classes`` classes."""
        if self.gate is None:
            self.gate = TeacherGate(num_teachers, num_classes, self.gate_hidden).train(self.training)
        elif self.gate.num_classes != num_classes:
            raise ValueError(f"the learned gate was built for {self.gate.num_classes} classes, the models predict {num_classes}.")

    def teacher_weights(self, teacher_logits: Tensor) -> Tensor:
        """Per-sample teacher weights ``[*, M]`` (rows sum to 1) for stacked logits ``[M, *, C]``."""
        if self.weighting == "mean":
            shape = tuple(teacher_logits.shape[1:-1]) + (teacher_logits.shape[0],)
            return torch.full(shape, 1.0 / teacher_logits.shape[0], dtype=torch.float32, device=teacher_logits.device)
        if self.weighting == "confidence":
            return confidence_weights(teacher_logits, self.temperature.value)
        if self.gate is None:
            raise RuntimeError(
                "the `learned` gate is built from the number of classes, which is not known yet: pass "
                "`num_classes`, or let Trainer.fit / validate run setup() first."
            )
        return self.gate(teacher_logits, self.temperature.value)

    def forward(
        self, student: ModelOutputs, teacher: Optional[ModelOutputs], batch: Batch, step: StepInfo
    ) -> dict[str, Tensor]:
        s = student.logits
        if teacher is None:
            return self.zero(s)
        t = teacher.logits
        mask = batch.mask if s.ndim == 3 else None
        if mask is not None:  # masked positions may hold garbage: keep it out of the weights and the gate
            t = torch.where(mask.bool().unsqueeze(-1), t, torch.zeros_like(t))
        if self.standardize:  # first: the weights and the divergence see the standardised logits
            s, t = standardize_logits(s), standardize_logits(t)
        weights = self.teacher_weights(t)
        value = multi_teacher_kd_loss(s, t, weights, self.temperature.value, self.kl, mask=mask)
        terms = self.terms(value)
        flat = weights.detach().reshape(-1, weights.shape[-1])
        if mask is not None:
            valid = mask.reshape(-1, 1).to(flat.dtype)
            mean_weights = (flat * valid).sum(0) / valid.sum().clamp_min(1)
        else:
            mean_weights = flat.mean(0)
        for m in range(flat.shape[-1]):
            terms[f"teacher{m}_weight"] = mean_weights[m]
        return terms
