"""``OnlineDistillation``: teacher and student trained together from scratch, optionally through an EMA teacher."""

from __future__ import annotations

from typing import Any, Optional

import torchmetrics
from torch import Tensor, nn

from lightning_distill.batch import Batch, resolve_routing
from lightning_distill.checkpoint import load_weights
from lightning_distill.distiller import DistillationModule
from lightning_distill.losses import cross_entropy_loss
from lightning_distill.objectives import Objective, StepInfo
from lightning_distill.outputs import ModelOutputs, as_outputs
from lightning_distill.strategies.base import reject_teacher_options
from lightning_distill.strategies.kd import KDPreset, kd_objectives
from lightning_distill.teachers import EMATeacher, TeacherSource
from lightning_distill.validation import check_float

__all__ = ["OnlineDistillation", "OnlineTeacher", "OnlineTeacherLoss"]


class OnlineTeacher(TeacherSource):
    """A teacher trained alongside the student: its live logits (with their graph, for its own loss) and
    the student's target -- the live logits detached, or an :class:`~lightning_distill.teachers.EMATeacher`'s.

    Registers ``online_teacher`` (trained: in the optimizer and in checkpoints) and, with ``ema_decay``,
    ``ema_teacher`` (frozen, checkpointed). ``outputs(batch).logits`` is the student's target;
    ``extras["online_logits"]`` the live teacher's logits.
    """

    save = True  # neither network can be rebuilt from the config
    frozen = False  # it trains: no pseudo-labels, no cache

    def __init__(self, module: nn.Module, ema_decay: Optional[float] = None, inputs: Any = "auto") -> None:
        self.module = module
        self.routing = resolve_routing(inputs, "teacher inputs")
        self.ema = EMATeacher(module, ema_decay, inputs=self.routing) if ema_decay is not None else None

    def modules(self) -> dict[str, nn.Module]:
        found = {"online_teacher": self.module}
        if self.ema is not None:
            found.update(self.ema.modules())
        return found

    def frozen_modules(self) -> list[nn.Module]:
        return self.ema.frozen_modules() if self.ema is not None else []

    def train(self, mode: bool = True) -> None:
        if self.ema is not None:
            self.ema.train(mode)

    def outputs(self, batch: Batch) -> ModelOutputs:
        return self.targets(batch, as_outputs(self.routing(self.module, batch), "the online teacher").logits)

    def targets(self, batch: Batch, live: Tensor) -> ModelOutputs:
        """The student's target for the online teacher's live logits ``live`` on ``batch``."""
        target = self.ema.outputs(batch).logits if self.ema is not None else live.detach()
        return ModelOutputs(target, extras={"online_logits": live})

    def eval_outputs(self, batch: Batch) -> ModelOutputs:
        return self.outputs(batch)

    def probe_outputs(self, batch: Batch) -> ModelOutputs:
        return as_outputs(self.routing(self.module, batch), "the online teacher")

    def after_optimizer_step(self) -> None:
        if self.ema is not None:
            self.ema.after_optimizer_step()


class OnlineTeacherLoss(Objective):
    """The online teacher's own cross-entropy with the labels, ``weight * CE(z_T, y)``; logged as
    ``train/teacher_loss``."""

    name = "teacher"
    averages_over = "labels"

    def __init__(self, weight: float = 1.0, ignore_index: int = -100) -> None:
        super().__init__(weight)
        self.ignore_index = int(ignore_index)

    def forward(
        self, student: ModelOutputs, teacher: Optional[ModelOutputs], batch: Batch, step: StepInfo
    ) -> dict[str, Tensor]:
        return self.terms(cross_entropy_loss(teacher.extras["online_logits"], batch.target, self.ignore_index))


class OnlineDistillation(KDPreset, DistillationModule):
    r"""Online distillation: the teacher learns from the labels while the student learns from it.

    Nothing is precomputed and no trained teacher is needed: at every step the teacher is trained
    with cross-entropy and the student is distilled from the teacher's *current* predictions
    (one-way codistillation, Anil et al. 2018, arXiv:1804.03235).
    With ``ema_decay`` the student's target comes instead from an exponential moving average of
    the teacher's weights (the "mean teacher" of Tarvainen & Valpola 2017, arXiv:1703.01780), which
    smooths the noise of a teacher that changes every step:

    .. math::

        \mathcal{L} = \lambda\,\mathrm{CE}(z_T, y) + (1 - \alpha)\,\mathrm{CE}(z_S, y)
                      + \alpha\, T^2\, D\big(\mathrm{softmax}(\mathrm{sg}[\hat z]/T),\
                      \mathrm{softmax}(z_S/T)\big)

    where :math:`\lambda` is ``teacher_loss_weight``, :math:`\mathrm{sg}` stops the gradient (the
    student never trains the teacher through the KD term) and :math:`\hat z = z_T`, or the EMA
    teacher's logits when ``ema_decay`` = :math:`d` is set. After every optimizer step (once per
    step, also with gradient accumulation):

    .. math:: \theta_{\mathrm{ema}} \leftarrow d\,\theta_{\mathrm{ema}} + (1 - d)\,\theta

    for every parameter *and* every floating-point buffer (BatchNorm running statistics are
    averaged like the weights, as ``timm``'s ``ModelEmaV2``, so they stay consistent with the
    averaged weights); integer buffers (``num_batches_tracked``) are copied. The EMA starts from
    the teacher's initial weights.

    The frozen-teacher contract does not apply to the trained teacher: its source is an
    :class:`OnlineTeacher`, which registers it as :attr:`online_teacher` (in train mode during training,
    in the optimizer, in checkpoints); :attr:`teacher` is ``None``. The objectives are ``teacher``
    (:class:`OnlineTeacherLoss`), ``task`` and ``kd``.
    :attr:`ema_teacher` is frozen (``requires_grad=False``, always in eval mode, ``no_grad``
    forward, never in an optimizer) but *is* checkpointed, so resuming continues the same average.

    Logs ``train/loss``, ``train/teacher_loss``, ``train/task_loss``, ``train/kd_loss``; validation
    and test log the student (``val/acc``, ``val/loss``, ...), the online teacher
    (``val/teacher_acc``), the EMA teacher (``val/ema_teacher_acc``) and ``val/agreement`` /
    ``val/kl`` against the target the student is trained on (the EMA teacher when there is one).

    Args:
        student: the network being distilled.
        teacher: the teacher architecture, trained here from scratch (same number of classes,
            checked before training).
        ema_decay: decay :math:`d \in [0, 1)` of the EMA teacher (e.g. 0.99 for a few hundred
            steps, 0.999 for long runs), or ``None`` to distill from the online teacher directly.
            The EMA starts at the initial weights: keep ``1 / (1 - d)`` well below the number of
            training steps.
        temperature: softmax temperature ``T > 0`` of the KD term.
        alpha: weight of the KD term in [0, 1]; ``1 - alpha`` weighs the student's hard-label
            cross-entropy.
        kl: ``"forward"``, ``"reverse"``, ``"symmetric"`` or ``"js"`` (see
            :func:`lightning_distill.losses.kd_loss`).
        teacher_loss_weight: weight :math:`\lambda \ge 0` of the teacher's cross-entropy.
        teacher_checkpoint: optional initial weights for the teacher (a warm start; it keeps
            training). Loaded before the EMA copy is made.
        **kwargs: ``optimizer``, ``lr_scheduler``, ... of :class:`~lightning_distill.distiller.DistillationModule`
            (one optimizer trains the student and the teacher together). Frozen-teacher options
            (``teacher_checkpoint`` aside, a warm start) do not apply.

    Example::

        >>> import lightning as L
        >>> from lightning_distill.data import DigitsDataModule
        >>> from lightning_distill.models import DigitsCNN, DigitsMLP
        >>> from lightning_distill.strategies.online import OnlineDistillation
        >>> module = OnlineDistillation(DigitsMLP(), DigitsCNN(), ema_decay=0.99, temperature=3.0, alpha=0.7)
        >>> module.teacher is None, module.online_teacher.training, module.ema_teacher.training
        (True, True, False)
        >>> any(p.requires_grad for p in module.ema_teacher.parameters())
        False
        >>> trainer = L.Trainer(max_epochs=1, logger=False, enable_checkpointing=False,
        ...                     enable_progress_bar=False, enable_model_summary=False)
        >>> trainer.fit(module, datamodule=DigitsDataModule())  # doctest: +SKIP
    """

    supports_teacher_cache = False  # its teacher is trained concurrently: its outputs change every step

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        ema_decay: Optional[float] = None,
        temperature: float = 3.0,
        alpha: float = 0.7,
        kl: str = "forward",
        teacher_loss_weight: float = 1.0,
        teacher_checkpoint: Optional[str] = None,
        **kwargs: Any,
    ) -> None:
        reject_teacher_options(type(self), kwargs)
        if teacher is None:
            raise ValueError("OnlineDistillation needs a `teacher` module (the architecture trained alongside the student).")
        if not isinstance(teacher, nn.Module):
            raise TypeError(f"`teacher` must be a torch.nn.Module, got {type(teacher).__name__}.")
        if teacher is student:
            raise ValueError("`teacher` and `student` are the same module object; pass two separate modules.")
        teacher_loss_weight = check_float("teacher_loss_weight", teacher_loss_weight, 0.0, what="a finite number >= 0")
        objectives = {"teacher": OnlineTeacherLoss(teacher_loss_weight), **kd_objectives(alpha, temperature, kl)}
        if teacher_checkpoint is not None:
            load_weights(teacher, teacher_checkpoint, argument="teacher_checkpoint")
        super().__init__(student, OnlineTeacher(teacher, ema_decay), objectives=objectives, **kwargs)
        self.teacher_checkpoint = teacher_checkpoint
        self.ema_decay = None if ema_decay is None else float(ema_decay)
        self.teacher_loss_weight = float(teacher_loss_weight)
        self.teacher_metrics: Optional[nn.ModuleDict] = None

    @property
    def has_teacher(self) -> bool:  # the student's target (agreement / kl metrics) exists
        return True

    def ema_forward(self, inputs: Any) -> Tensor:
        """The EMA teacher's logits, in eval mode under ``torch.no_grad()``."""
        ema = self.teacher_source.ema
        if ema is None:
            raise RuntimeError("ema_forward() needs `ema_decay`: this OnlineDistillation has no EMA teacher.")
        return ema.outputs(Batch(inputs)).logits

    def update_ema(self) -> None:
        r""":math:`\theta_{ema} \leftarrow d\,\theta_{ema} + (1-d)\,\theta` for parameters and floating-point
        buffers; integer buffers are copied. Called once after every optimizer step."""
        self.teacher_source.after_optimizer_step()

    def distillation_losses(self, student: Any, teacher: Any, batch: Batch) -> dict[str, Tensor]:
        """``teacher`` is :meth:`forward_models`'s teacher outputs, or the online teacher's live logits."""
        if isinstance(teacher, Tensor):
            teacher = self.teacher_source.targets(batch, teacher)
        return super().distillation_losses(student, teacher, batch)

    # ------------------------------------------------------------------ probing and metrics
    def on_probe(self, probe: Any) -> int:
        n_student, n_teacher = int(probe.student.logits.shape[-1]), int(probe.teacher.logits.shape[-1])
        if n_teacher != n_student:
            raise ValueError(
                f"teacher and student disagree on the number of classes: the online teacher "
                f"({type(self.online_teacher).__name__}) outputs {n_teacher}, the student "
                f"({type(self.student).__name__}) outputs {n_student}. Build both with the same "
                "num_classes (init_args.num_classes in YAML)."
            )
        return super().on_probe(probe)

    def build_metrics(self, num_classes: int, with_teacher: bool) -> nn.ModuleDict:
        """The base metrics with teacher agreement / KL, plus ``teacher_acc`` (and ``ema_teacher_acc``)
        kept in :attr:`teacher_metrics`: ``agreement`` and ``kl`` compare with the target (the EMA
        teacher when there is one), ``teacher_acc`` is always the online teacher's."""
        metrics = super().build_metrics(num_classes, with_teacher=True)
        for collection in metrics.values():
            if "teacher_acc" in collection:
                del collection["teacher_acc"]
        names = ["teacher_acc"] + (["ema_teacher_acc"] if self.teacher_source.ema is not None else [])

        def accuracy() -> torchmetrics.Metric:
            return torchmetrics.classification.MulticlassAccuracy(num_classes, top_k=1, average="micro")

        self.teacher_metrics = nn.ModuleDict(
            {stage: nn.ModuleDict({name: accuracy() for name in names}) for stage in metrics}
        )
        return metrics

    def _update_accuracy(self, stage: str, name: str, logits: Tensor, target: Optional[Tensor]) -> None:
        if target is None:
            return
        flat, flat_target = logits.reshape(-1, logits.shape[-1]).float(), target.reshape(-1)
        valid = flat_target != self.ignore_index
        flat, flat_target = flat[valid], flat_target[valid]
        if flat.shape[0] == 0:
            return
        metric = self.teacher_metrics[stage][name]
        metric.update(flat, flat_target)
        self.log(f"{stage}/{name}", metric, on_step=False, on_epoch=True, batch_size=flat.shape[0])

    # ------------------------------------------------------------------ steps
    def _eval_step(self, stage: str, batch: Any) -> None:
        b = self.read_batch(batch)
        student_logits = as_outputs(self.student_routing(self.student, b), "the student").logits
        teacher = self.teacher_source.eval_outputs(b)
        self._update_accuracy(stage, "teacher_acc", teacher.extras["online_logits"], b.target)
        if self.teacher_source.ema is not None:
            self._update_accuracy(stage, "ema_teacher_acc", teacher.logits, b.target)
        self.update_eval_metrics(stage, student_logits, b.target, teacher.logits)
