"""``OnlineDistillation``: teacher and student trained together from scratch, optionally through an EMA teacher."""

from __future__ import annotations

import copy
import itertools
import math
from typing import Any, Iterable, Optional

import torch
import torchmetrics
from torch import Tensor, nn

from lightning_distill.checkpoint import load_weights
from lightning_distill.losses import KL_MODES, kd_loss
from lightning_distill.module import Batch
from lightning_distill.strategies.base import DistillationModule, check_alpha, check_temperature

__all__ = ["OnlineDistillation"]


class OnlineDistillation(DistillationModule):
    r"""Online distillation: the teacher learns from the labels while the student learns from it.

    Nothing is precomputed and no trained teacher is needed: at every step the teacher is trained
    with cross-entropy and the student is distilled from the teacher's *current* predictions
    (one-way codistillation, Anil et al. 2018, arXiv:1804.03235; seed 000's ``OnlineDistiller``).
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

    The teacher contract of :class:`DistillationModule` concerns *frozen* teachers and does not
    apply here: the base class gets ``teacher=None`` and the trained teacher lives in
    :attr:`online_teacher` (in train mode during training, in the optimizer, in checkpoints).
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
        temperature: softmax temperature ``T > 0`` of the KD term (seed 000: 3).
        alpha: weight of the KD term in [0, 1]; ``1 - alpha`` weighs the student's hard-label
            cross-entropy (seed 000: 0.7).
        kl: ``"forward"``, ``"reverse"``, ``"symmetric"`` or ``"js"`` (see
            :func:`lightning_distill.losses.kd_loss`).
        teacher_loss_weight: weight :math:`\lambda \ge 0` of the teacher's cross-entropy.
        teacher_checkpoint: optional initial weights for the teacher (a warm start; it keeps
            training). Loaded before the EMA copy is made.
        **kwargs: ``optimizer``, ``lr_scheduler``, ... of :class:`DistillationModule` (one optimizer
            trains the student and the teacher together).

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
        if teacher is None:
            raise ValueError("OnlineDistillation needs a `teacher` module (the architecture trained alongside the student).")
        if not isinstance(teacher, nn.Module):
            raise TypeError(f"`teacher` must be a torch.nn.Module, got {type(teacher).__name__}.")
        if teacher is student:
            raise ValueError("`teacher` and `student` are the same module object; pass two separate modules.")
        if ema_decay is not None and (
            isinstance(ema_decay, bool) or not isinstance(ema_decay, (int, float)) or not 0.0 <= float(ema_decay) < 1.0
        ):
            raise ValueError(
                f"`ema_decay` must be in [0, 1) or None, got {ema_decay!r}. Typical values: 0.99 (short runs), "
                "0.999 (long runs); None distills from the online teacher directly."
            )
        if (
            isinstance(teacher_loss_weight, bool)
            or not isinstance(teacher_loss_weight, (int, float))
            or not 0.0 <= float(teacher_loss_weight) < math.inf
        ):
            raise ValueError(f"`teacher_loss_weight` must be a finite number >= 0, got {teacher_loss_weight!r}.")
        checked_temperature = check_temperature(temperature)
        checked_alpha = check_alpha(alpha)
        if kl not in KL_MODES:
            raise ValueError(f"`kl` must be one of {KL_MODES}, got {kl!r}.")
        # the base class's teacher is the *frozen* one; the online teacher is trained, so it is not that
        super().__init__(student, None, **kwargs)
        if teacher_checkpoint is not None:
            load_weights(teacher, teacher_checkpoint, argument="teacher_checkpoint")
        self.teacher_checkpoint = teacher_checkpoint
        self.online_teacher = teacher
        self.ema_decay = None if ema_decay is None else float(ema_decay)
        self.ema_teacher: Optional[nn.Module] = None
        if ema_decay is not None:
            ema = copy.deepcopy(teacher)
            ema.requires_grad_(False)
            ema.eval()
            self.ema_teacher = ema
            # deliberately in eval mode: exempt from the base's stray-eval-module warning in on_train_start
            self._teacher_modules = tuple(ema.modules())
        self.temperature = checked_temperature
        self.alpha = checked_alpha
        self.kl = kl
        self.teacher_loss_weight = float(teacher_loss_weight)
        self.teacher_metrics: Optional[nn.ModuleDict] = None

    # ------------------------------------------------------------------ the EMA teacher
    def frozen_parameters(self) -> Iterable[nn.Parameter]:
        ema = self.ema_teacher.parameters() if self.ema_teacher is not None else ()
        return itertools.chain(super().frozen_parameters(), ema)

    def train(self, mode: bool = True) -> "OnlineDistillation":
        super().train(mode)
        ema = getattr(self, "ema_teacher", None)
        if ema is not None:
            ema.eval()
        return self

    def ema_forward(self, inputs: Any) -> Tensor:
        """The EMA teacher's logits, in eval mode under ``torch.no_grad()``."""
        if self.ema_teacher is None:
            raise RuntimeError("ema_forward() needs `ema_decay`: this OnlineDistillation has no EMA teacher.")
        if any(m.training for m in self._teacher_modules):
            self.ema_teacher.eval()
        with torch.no_grad():
            return self.ema_teacher(inputs)

    @torch.no_grad()
    def update_ema(self) -> None:
        r""":math:`\theta_{ema} \leftarrow d\,\theta_{ema} + (1-d)\,\theta` for parameters and floating-point
        buffers; integer buffers are copied. Called once after every optimizer step."""
        d = self.ema_decay
        ema, live = self.ema_teacher, self.online_teacher
        for (name, e), (live_name, p) in zip(ema.named_parameters(), live.named_parameters()):
            assert name == live_name, (name, live_name)
            e.mul_(d).add_(p.detach(), alpha=1.0 - d)
        for (name, e), (live_name, b) in zip(ema.named_buffers(), live.named_buffers()):
            assert name == live_name, (name, live_name)
            if e.is_floating_point():
                e.mul_(d).add_(b, alpha=1.0 - d)
            else:
                e.copy_(b)

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer: Any, optimizer_closure: Any = None) -> None:
        """Step the optimizer, then move the EMA teacher (Lightning calls this once per optimizer step)."""
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        if self.ema_teacher is not None:
            self.update_ema()

    # ------------------------------------------------------------------ probing and metrics
    def probe_outputs(self, example: Any) -> tuple[Any, Any]:
        return self.student(example), self.online_teacher(example)

    def on_probe(self, example: Any, output: Any, teacher_output: Any) -> int:
        n_student, n_teacher = int(output.shape[-1]), int(teacher_output.shape[-1])
        if n_teacher != n_student:
            raise ValueError(
                f"teacher and student disagree on the number of classes: the online teacher "
                f"({type(self.online_teacher).__name__}) outputs {n_teacher}, the student "
                f"({type(self.student).__name__}) outputs {n_student}. Build both with the same "
                "num_classes (init_args.num_classes in YAML)."
            )
        return super().on_probe(example, output, None)

    def build_metrics(self, num_classes: int, with_teacher: bool) -> nn.ModuleDict:
        """The base metrics with teacher agreement / KL, plus ``teacher_acc`` (and ``ema_teacher_acc``)
        kept in :attr:`teacher_metrics`: ``agreement`` and ``kl`` compare with the target (the EMA
        teacher when there is one), ``teacher_acc`` is always the online teacher's."""
        metrics = super().build_metrics(num_classes, with_teacher=True)
        for collection in metrics.values():
            if "teacher_acc" in collection:
                del collection["teacher_acc"]
        names = ["teacher_acc"] + (["ema_teacher_acc"] if self.ema_teacher is not None else [])

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
    def forward_models(self, inputs: Any) -> tuple[Tensor, Optional[Tensor]]:
        """``(student_logits, online_teacher_logits)``; the teacher's logits keep their graph (it trains)."""
        teacher_logits = self.online_teacher(inputs)
        student_logits = self.student(inputs)
        return student_logits, teacher_logits

    def target_logits(self, inputs: Any, teacher_logits: Tensor) -> Tensor:
        """The student's KD target: the EMA teacher's logits, or the online teacher's, detached."""
        if self.ema_teacher is not None:
            return self.ema_forward(inputs)
        return teacher_logits.detach()

    def distillation_losses(self, student_logits: Tensor, teacher_logits: Optional[Tensor], batch: Batch) -> dict[str, Tensor]:
        mask = batch.mask if student_logits.ndim == 3 else None
        target = self.target_logits(batch.input, teacher_logits)
        teacher_loss = self.task_loss(teacher_logits, batch.target)
        task = self.task_loss(student_logits, batch.target)
        kd = kd_loss(student_logits, target, self.temperature, self.kl, mask=mask)
        loss = self.teacher_loss_weight * teacher_loss + (1.0 - self.alpha) * task + self.alpha * kd
        return {"loss": loss, "teacher_loss": teacher_loss, "task_loss": task, "kd_loss": kd}

    def _eval_step(self, stage: str, batch: Any) -> None:
        b = self.unpack_batch(batch)
        student_logits = self.student(b.input)
        teacher_logits = self.online_teacher(b.input)
        self._update_accuracy(stage, "teacher_acc", teacher_logits, b.target)
        target = teacher_logits
        if self.ema_teacher is not None:
            target = self.ema_forward(b.input)
            self._update_accuracy(stage, "ema_teacher_acc", target, b.target)
        self.update_eval_metrics(stage, student_logits, b.target, target)
