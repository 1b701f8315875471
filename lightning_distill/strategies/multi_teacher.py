"""``MultiTeacherDistillation``: several frozen teachers mixed per sample (mean, confidence, learned gate)."""

from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F
import torchmetrics
from torch import Tensor, nn

from lightning_distill.checkpoint import load_weights
from lightning_distill.losses import (
    KL_MODES,
    confidence_weights,
    multi_teacher_kd_loss,
    teacher_mixture_log_probs,
)
from lightning_distill.module import Batch
from lightning_distill.strategies.base import DistillationModule, check_alpha, check_temperature

__all__ = ["WEIGHTINGS", "MultiTeacherDistillation", "TeacherEnsemble"]

#: ``weighting`` values of :class:`MultiTeacherDistillation`.
WEIGHTINGS = ("mean", "confidence", "learned")


# =============================================================================================
# Modules
# =============================================================================================


class TeacherEnsemble(nn.ModuleList):
    """The teachers of :class:`MultiTeacherDistillation` as *one* frozen module.

    A ``ModuleList`` (``ensemble[m]`` is teacher m, state-dict keys ``0.*``, ``1.*``, ...) whose
    ``forward`` returns the teachers' logits stacked, ``[M, N, C]``. Being a single module, it is
    the ``teacher`` of :class:`DistillationModule`, which then applies the whole frozen-teacher
    contract to every member at once.

    Example::

        >>> import torch
        >>> from lightning_distill.models import DigitsCNN
        >>> TeacherEnsemble([DigitsCNN(), DigitsCNN()])(torch.zeros(3, 1, 8, 8)).shape
        torch.Size([2, 3, 10])
    """

    def forward(self, inputs: Any) -> Tensor:
        outputs = [teacher(inputs) for teacher in self]
        shapes = [tuple(o.shape) for o in outputs]
        if len(set(shapes)) != 1:
            listing = ", ".join(f"teacher {m} ({type(t).__name__}): {s}" for m, (t, s) in enumerate(zip(self, shapes)))
            raise ValueError(f"the teachers' outputs differ in shape: {listing}; they must predict the same classes.")
        return torch.stack(outputs)


class _TeacherGate(nn.Module):
    """Instance-level teacher weights (AMTML-KD style): an MLP on the teachers' softened predictions.

    Input: the M teachers' ``softmax(z_m / T)`` concatenated (``M * C`` values in [0, 1] per sample);
    output: a softmax over the M teachers. The last layer starts at zero, so training starts from
    the plain mean.
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


class MultiTeacherDistillation(DistillationModule):
    r"""Distill several frozen teachers into one student through a per-sample weighted mixture.

    .. math::

        \mathcal{L} = (1 - \alpha)\,\mathrm{CE}(z_S, y)
                      + \alpha\, T^2\, D\Big(\sum_m w_{i,m}\,\mathrm{softmax}(z_{i,m}/T),\
                      \mathrm{softmax}(z_{S,i}/T)\Big)

    (:func:`multi_teacher_kd_loss`), with per-sample weights :math:`w_{i,\cdot}` summing to 1:

    * ``mean`` -- :math:`1/M` (the average of the teachers' softmaxes);
    * ``confidence`` -- inverse entropy of each teacher's prediction at :math:`T`, normalised
      over teachers: :math:`w \propto 1/(H + \epsilon)` (:func:`confidence_weights`);
    * ``learned`` -- AMTML-KD-style instance-level weights (Liu et al. 2020, arXiv:2103.04062),
      simplified: a small gating MLP on the concatenated softened teacher predictions
      :math:`\mathrm{softmax}(z_m/T)` (probabilities rather than raw logits, so extreme logits cannot
      saturate it), softmax over teachers, trained jointly with the student through the KD term;
      its parameters are optimised and checkpointed. Built from a shape probe in ``setup`` (or at
      construction when ``num_classes`` is given). The gate minimises the same KL as the
      student, so it favours teachers that already agree with the student; use it with teachers
      of comparable quality.

    **Teachers.** The M teachers are held by one :class:`TeacherEnsemble` (an ``nn.ModuleList``
    whose forward stacks their logits to ``[M, N, C]``), registered as the base class's
    ``teacher``: every member therefore obeys the frozen-teacher contract of
    :class:`DistillationModule` with no code repeated here -- frozen, never in an optimizer,
    always in eval mode (also when something calls ``.train()`` on a member), ``no_grad`` forward,
    left out of checkpoints by default (``save_teacher``) and re-attached on load. :attr:`teachers`
    is the same ensemble. Teachers with different class counts are rejected by the probe before
    any training step.

    Logs ``train/loss``, ``train/task_loss``, ``train/kd_loss`` and ``train/teacher{m}_weight`` (the
    mean weight of teacher m in the batch). Validation / test log ``val/acc`` (student),
    ``val/teacher{m}_acc`` (each teacher) and, against the mixture at :math:`T = 1` with the
    training weights (the ensemble's prediction), ``val/teacher_acc``, ``val/agreement`` (top-1)
    and ``val/kl``.

    Args:
        student: the network being trained.
        teachers: the frozen teachers, at least one, all predicting the same classes.
        teacher_checkpoints: optional weights, one entry per teacher (``None`` keeps that
            teacher's own weights): paths or ``zoo:NAME``, loaded with
            :func:`lightning_distill.checkpoint.load_weights` (``weights_only=True``).
        weighting: ``"mean"``, ``"confidence"`` or ``"learned"``.
        temperature: softmax temperature ``T > 0``.
        alpha: weight of the KD term in [0, 1]; ``1 - alpha`` weighs the hard labels.
        kl: ``"forward"`` (KL(p || q)), ``"reverse"``, ``"symmetric"`` or ``"js"``.
        gate_hidden: hidden units of the ``learned`` gate.
        **kwargs: ``save_teacher``, ``optimizer``, ``lr_scheduler``, ``num_classes``, ... of
            :class:`DistillationModule` (not ``teacher`` / ``teacher_checkpoint``: use
            ``teachers`` / ``teacher_checkpoints``).

    Example::

        >>> from lightning_distill.models import DigitsCNN, DigitsMLP
        >>> from lightning_distill.strategies.multi_teacher import MultiTeacherDistillation
        >>> module = MultiTeacherDistillation(DigitsMLP(), [DigitsCNN(), DigitsCNN()],
        ...                                   teacher_checkpoints=["zoo:digits_cnn", None], weighting="confidence")
        >>> len(module.teachers), module.teacher is module.teachers
        (2, True)
        >>> any(p.requires_grad for p in module.teachers.parameters()), module.teachers[1].training
        (False, False)
    """

    supports_teacher_cache = False  # several teachers (one cache each is not implemented)

    def __init__(
        self,
        student: nn.Module,
        teachers: Sequence[nn.Module],
        teacher_checkpoints: Optional[Sequence[Optional[str]]] = None,
        weighting: str = "mean",
        temperature: float = 4.0,
        alpha: float = 0.9,
        kl: str = "forward",
        gate_hidden: int = 32,
        **kwargs: Any,
    ) -> None:
        for single in ("teacher", "teacher_checkpoint"):
            if kwargs.get(single) is not None:
                raise ValueError(
                    f"MultiTeacherDistillation takes `{single}s` (one entry per teacher), not `{single}`; "
                    f"got {single}={kwargs[single]!r}."
                )
        if isinstance(teachers, nn.Module) and not isinstance(teachers, nn.ModuleList):
            raise TypeError(
                f"`teachers` must be a list of modules, got a single {type(teachers).__name__}; "
                "wrap it in a list (or use KnowledgeDistillation for one teacher)."
            )
        teachers = list(teachers) if teachers is not None else []
        if not teachers:
            raise ValueError("`teachers` must hold at least one teacher module, got none.")
        for m, teacher in enumerate(teachers):
            if not isinstance(teacher, nn.Module):
                raise TypeError(f"`teachers[{m}]` must be a torch.nn.Module, got {type(teacher).__name__}.")
            if teacher is student:
                raise ValueError(f"`teachers[{m}]` is the student module itself; pass separate modules.")
            if any(teacher is other for other in teachers[:m]):
                raise ValueError(f"`teachers[{m}]` is the same module object as an earlier teacher; pass separate modules.")
        if teacher_checkpoints is not None:
            if isinstance(teacher_checkpoints, str) or len(teacher_checkpoints) != len(teachers):
                given = 1 if isinstance(teacher_checkpoints, str) else len(teacher_checkpoints)
                raise ValueError(
                    f"`teacher_checkpoints` must have one entry per teacher: got {given} for {len(teachers)} teachers "
                    f"({teacher_checkpoints!r}). Use null / None for a teacher that keeps its own weights."
                )
        if weighting not in WEIGHTINGS:
            raise ValueError(f"`weighting` must be one of {WEIGHTINGS}, got {weighting!r}.")
        if isinstance(gate_hidden, bool) or not isinstance(gate_hidden, int) or gate_hidden < 1:
            raise ValueError(f"`gate_hidden` must be an integer >= 1, got {gate_hidden!r}.")
        checked_temperature = check_temperature(temperature)
        checked_alpha = check_alpha(alpha)
        if kl not in KL_MODES:
            raise ValueError(f"`kl` must be one of {KL_MODES}, got {kl!r}.")
        for m, path in enumerate(teacher_checkpoints or []):
            if path is not None:
                load_weights(teachers[m], path, argument=f"teacher_checkpoints[{m}]")
        super().__init__(student, TeacherEnsemble(teachers), **kwargs)
        self.teacher_checkpoints = list(teacher_checkpoints) if teacher_checkpoints is not None else None
        self.weighting = weighting
        self.temperature = checked_temperature
        self.alpha = checked_alpha
        self.kl = kl
        self.gate_hidden = gate_hidden
        self.gate: Optional[_TeacherGate] = None
        if weighting == "learned" and self.num_classes is not None:
            self._build_gate(int(self.num_classes))

    @property
    def teachers(self) -> TeacherEnsemble:
        """The frozen teachers (the same object as :attr:`teacher`)."""
        return self.teacher

    # ------------------------------------------------------------------ weights
    def _build_gate(self, num_classes: int) -> None:
        device = next(self.student.parameters(), torch.empty(0)).device
        self.gate = _TeacherGate(len(self.teachers), num_classes, self.gate_hidden).to(device)

    def teacher_weights(self, teacher_logits: Tensor) -> Tensor:
        """Per-sample teacher weights ``[*, M]`` (rows sum to 1) for stacked logits ``[M, *, C]``."""
        if self.weighting == "mean":
            shape = tuple(teacher_logits.shape[1:-1]) + (teacher_logits.shape[0],)
            return torch.full(shape, 1.0 / teacher_logits.shape[0], dtype=torch.float32, device=teacher_logits.device)
        if self.weighting == "confidence":
            return confidence_weights(teacher_logits, self.temperature)
        if self.gate is None:
            raise RuntimeError(
                "the `learned` gate is built from the number of classes, which is not known yet: pass "
                "`num_classes`, or let Trainer.fit / validate run setup() first."
            )
        return self.gate(teacher_logits, self.temperature)

    def teacher_probabilities(self, teacher_logits: Tensor) -> Tensor:
        """Pseudo-labels come from the ensemble: the mean of the teachers' probabilities."""
        return teacher_logits.float().softmax(-1).mean(0)

    # ------------------------------------------------------------------ probing and metrics
    def probe_outputs(self, example: Any) -> tuple[Any, Any]:
        return self.student(example), [self.call_teacher(teacher, example) for teacher in self.teachers]

    def on_probe(self, example: Any, output: Any, teacher_output: Any) -> int:
        counts = [int(t.shape[-1]) for t in teacher_output]
        n_student = int(output.shape[-1])
        listing = ", ".join(f"teacher {m} ({type(t).__name__}) outputs {c}" for m, (t, c) in enumerate(zip(self.teachers, counts)))
        if len(set(counts)) != 1:
            raise ValueError(
                f"the teachers disagree on the number of classes: {listing}. Every teacher must predict the "
                f"student's classes ({type(self.student).__name__} outputs {n_student}); build them with the same "
                "num_classes (init_args.num_classes in YAML)."
            )
        if counts[0] != n_student:
            raise ValueError(
                f"teachers and student disagree on the number of classes: {listing}, the student "
                f"({type(self.student).__name__}) outputs {n_student}. Build all of them with the same num_classes "
                "(init_args.num_classes in YAML)."
            )
        num_classes = super().on_probe(example, output, teacher_output[0])
        if self.weighting == "learned":
            if self.gate is None:
                self._build_gate(num_classes)
            elif self.gate.num_classes != num_classes:
                raise ValueError(f"the learned gate was built for {self.gate.num_classes} classes, the models predict {num_classes}.")
        return num_classes

    def build_metrics(self, num_classes: int, with_teacher: bool) -> nn.ModuleDict:
        """The base metrics (``teacher_acc``, ``agreement``, ``kl`` against the mixture) plus ``teacher{m}_acc``."""
        metrics = super().build_metrics(num_classes, with_teacher)
        for collection in metrics.values():
            for m in range(len(self.teachers)):
                collection[f"teacher{m}_acc"] = torchmetrics.classification.MulticlassAccuracy(
                    num_classes, top_k=1, average="micro"
                )
        return metrics

    # ------------------------------------------------------------------ checkpoints
    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False):  # type: ignore[override]
        """Build the learned gate from the saved shapes when it does not exist yet, then load."""
        key = "gate.fc1.weight"
        if self.weighting == "learned" and self.gate is None and key in state_dict:
            self._build_gate(int(state_dict[key].shape[1]) // len(self.teachers))
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    # ------------------------------------------------------------------ steps
    def distillation_losses(self, student_logits: Tensor, teacher_logits: Optional[Tensor], batch: Batch) -> dict[str, Tensor]:
        """``teacher_logits`` are the stacked ``[M, N, C]`` (or ``[M, N, L, C]``) logits of the ensemble."""
        mask = batch.mask if student_logits.ndim == 3 else None
        if mask is not None:  # masked positions may hold garbage: keep it out of the weights and the gate
            teacher_logits = torch.where(mask.bool().unsqueeze(-1), teacher_logits, torch.zeros_like(teacher_logits))
        weights = self.teacher_weights(teacher_logits)
        task = self.task_loss(student_logits, batch.target)
        kd = multi_teacher_kd_loss(student_logits, teacher_logits, weights, self.temperature, self.kl, mask=mask)
        loss = (1.0 - self.alpha) * task + self.alpha * kd
        terms = {"loss": loss, "task_loss": task, "kd_loss": kd}
        flat = weights.detach().reshape(-1, weights.shape[-1])
        if mask is not None:
            valid = mask.reshape(-1, 1).to(flat.dtype)
            mean_weights = (flat * valid).sum(0) / valid.sum().clamp_min(1)
        else:
            mean_weights = flat.mean(0)
        for m in range(flat.shape[-1]):
            terms[f"teacher{m}_weight"] = mean_weights[m]
        return terms

    def _eval_step(self, stage: str, batch: Any) -> None:
        b = self.unpack_batch(batch)
        student_logits = self.student(b.input)
        teacher_logits = self.teacher_forward(b.input)  # [M, ...]
        if b.target is not None:
            metrics = self.eval_metrics[stage]
            flat_target = b.target.reshape(-1)
            valid = flat_target != self.ignore_index
            for m in range(teacher_logits.shape[0]):
                flat = teacher_logits[m].reshape(-1, teacher_logits.shape[-1]).float()[valid]
                if flat.shape[0] > 0:
                    metrics[f"teacher{m}_acc"].update(flat, flat_target[valid])
        # the ensemble's prediction: the mixture at T = 1 with the training weights (base logs every metric)
        mixture = teacher_mixture_log_probs(teacher_logits, self.teacher_weights(teacher_logits), 1.0)
        self.update_eval_metrics(stage, student_logits, b.target, mixture)
