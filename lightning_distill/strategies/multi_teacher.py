"""``MultiTeacherDistillation``: several frozen teachers mixed per sample (mean, confidence, learned gate)."""

from __future__ import annotations

from typing import Any, Optional, Sequence

import torchmetrics
from torch import Tensor, nn

from lightning_distill.checkpoint import load_weights
from lightning_distill.distiller import DistillationModule, check_alpha
from lightning_distill.losses import teacher_mixture_log_probs
from lightning_distill.objectives import WEIGHTINGS, CrossEntropy, MultiTeacherKD
from lightning_distill.outputs import as_outputs
from lightning_distill.probe import Probe
from lightning_distill.strategies.kd import KDPreset
from lightning_distill.teachers import FrozenTeacher, TeacherEnsemble

__all__ = ["WEIGHTINGS", "MultiTeacherDistillation", "TeacherEnsemble"]


class MultiTeacherDistillation(KDPreset, DistillationModule):
    r"""Distill several frozen teachers into one student through a per-sample weighted mixture.

    .. math::

        \mathcal{L} = (1 - \alpha)\,\mathrm{CE}(z_S, y)
                      + \alpha\, T^2\, D\Big(\sum_m w_{i,m}\,\mathrm{softmax}(z_{i,m}/T),\
                      \mathrm{softmax}(z_{S,i}/T)\Big)

    (:class:`~lightning_distill.objectives.MultiTeacherKD`, objective ``kd``; the task term is ``task``), with
    per-sample weights :math:`w_{i,\cdot}` summing to 1:

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

    **Teachers.** The M teachers are held by one :class:`~lightning_distill.teachers.TeacherEnsemble`
    (an ``nn.ModuleList`` whose forward stacks their logits to ``[M, N, C]``) in one
    :class:`~lightning_distill.teachers.FrozenTeacher`, registered as ``teacher``: every member therefore
    obeys the frozen-teacher contract with no code repeated here -- frozen, never in an optimizer,
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
        save_teacher, teacher_dtype: as for one teacher (every member).
        standardize: logit standardisation of the student's and every teacher's logits (Sun et al. 2024).
        **kwargs: ``optimizer``, ``lr_scheduler``, ``num_classes``, ``pseudo_labels``, ... of
            :class:`~lightning_distill.distiller.DistillationModule` (not ``teacher`` /
            ``teacher_checkpoint``: use ``teachers`` / ``teacher_checkpoints``).

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
        save_teacher: bool = False,
        teacher_dtype: Optional[str] = None,
        standardize: bool = False,
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
        objectives = {
            "task": CrossEntropy(1.0 - check_alpha(alpha)),
            "kd": MultiTeacherKD(alpha, weighting, temperature, kl, gate_hidden, standardize),
        }
        for m, path in enumerate(teacher_checkpoints or []):
            if path is not None:
                load_weights(teachers[m], path, argument=f"teacher_checkpoints[{m}]")
        source = FrozenTeacher(TeacherEnsemble(teachers), dtype=teacher_dtype, save=save_teacher, prefix="teacher_")
        super().__init__(student, source, objectives=objectives, **kwargs)
        self.teacher_checkpoints = list(teacher_checkpoints) if teacher_checkpoints is not None else None
        self.save_teacher = bool(save_teacher)
        if weighting == "learned" and self.num_classes is not None:
            self.objectives["kd"].build_gate(len(teachers), int(self.num_classes))

    @property
    def teachers(self) -> TeacherEnsemble:
        """The frozen teachers (the same object as :attr:`teacher`)."""
        return self.teacher

    @property
    def weighting(self) -> str:
        return self.objectives["kd"].weighting

    @property
    def gate(self) -> Optional[nn.Module]:
        """The ``learned`` weighting's gate (``None`` until the probe builds it)."""
        return self.objectives["kd"].gate

    def teacher_weights(self, teacher_logits: Tensor) -> Tensor:
        """Per-sample teacher weights ``[*, M]`` (rows sum to 1) for stacked logits ``[M, *, C]``."""
        return self.objectives["kd"].teacher_weights(teacher_logits)

    def teacher_probabilities(self, teacher_logits: Tensor) -> Tensor:
        """Pseudo-labels come from the ensemble: the mean of the teachers' probabilities."""
        return teacher_logits.float().softmax(-1).mean(0)

    # ------------------------------------------------------------------ probing and metrics
    def on_probe(self, probe: Probe) -> int:
        n_student = int(probe.student.logits.shape[-1])
        counts = [int(probe.teacher.logits.shape[-1])] * len(self.teachers)
        listing = ", ".join(f"teacher {m} ({type(t).__name__}) outputs {c}" for m, (t, c) in enumerate(zip(self.teachers, counts)))
        if counts[0] != n_student:
            raise ValueError(
                f"teachers and student disagree on the number of classes: {listing}, the student "
                f"({type(self.student).__name__}) outputs {n_student}. Build all of them with the same num_classes "
                "(init_args.num_classes in YAML)."
            )
        return super().on_probe(probe)

    def build_metrics(self, num_classes: int, with_teacher: bool) -> nn.ModuleDict:
        """The base metrics (``teacher_acc``, ``agreement``, ``kl`` against the mixture) plus ``teacher{m}_acc``."""
        metrics = super().build_metrics(num_classes, with_teacher)
        for collection in metrics.values():
            for m in range(len(self.teachers)):
                collection[f"teacher{m}_acc"] = torchmetrics.classification.MulticlassAccuracy(
                    num_classes, top_k=1, average="micro"
                )
        return metrics

    # ------------------------------------------------------------------ evaluation
    def _eval_step(self, stage: str, batch: Any) -> None:
        b = self.read_batch(batch)
        student_logits = as_outputs(self.student_routing(self.student, b), "the student").logits
        teacher_logits = self.teacher_source.eval_outputs(b).logits  # the teachers stacked [M, ...]
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
