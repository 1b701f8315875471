"""``DistillationModule``: the frozen-teacher contract and the step contract of every strategy.

The teacher contract (``DESIGN.md`` §3), enforced here once for all strategies:

* **frozen** -- ``requires_grad_(False)`` on every teacher parameter, never in an optimizer
  (``configure_optimizers`` refuses if one leaks in), so it never receives a gradient;
* **always eval** -- :meth:`train` puts the teacher back in eval mode whatever Lightning or the
  user does, and :meth:`teacher_forward` checks every teacher submodule before each use, so
  BatchNorm running statistics and every teacher tensor stay bit-identical through ``fit``;
  ``teacher_train_mode=True`` is the explicit opt-out;
* **no_grad forward** -- ``torch.no_grad()``, not ``inference_mode`` (whose tensors cannot enter
  autograd later, e.g. through a learnable temperature);
* **not checkpointed** by default (``save_teacher=False``): its weights are dropped from the
  checkpoint and re-attached from the module you construct (the config) when loading;
* **teacher_checkpoint** -- weights loaded with ``torch.load(..., weights_only=True)`` from a
  ``Classifier`` checkpoint, a distillation checkpoint (its student) or a plain state dict.

The step contract: ``training_step`` unpacks the batch, runs the teacher (no_grad) and the
student, asks the strategy for its named loss terms (:meth:`distillation_losses`), logs each as
``train/<name>`` and returns ``terms["loss"]``. Validation / test log ``val/acc``, ``val/loss``,
``val/agreement``, ``val/kl``, ``val/ece``, ``val/teacher_acc`` (and ``test/...``).
"""

from __future__ import annotations

import warnings
from typing import Any, Iterable, Mapping, Optional

import torch
from torch import Tensor, nn

from lightning_distill.checkpoint import load_weights
from lightning_distill.losses import check_temperature
from lightning_distill.module import Batch, TrainingModule

__all__ = ["DistillationModule", "check_alpha", "check_temperature"]

# Lightning warns about every module in eval mode when fit starts; the frozen teacher is in
# eval mode on purpose. The filter hides that one message; :meth:`on_train_start` repeats the
# warning for any *other* module left in eval mode, so nothing else goes unreported.
warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode at the start of training")

_TEACHER = "teacher"


def check_alpha(value: Any, name: str = "alpha") -> float:
    """Validate a mixing weight in [0, 1]."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= float(value) <= 1.0:
        raise ValueError(
            f"`{name}` must be in [0, 1] (the weight of the distillation term; 1 - {name} weighs the "
            f"hard-label loss), got {value!r}."
        )
    return float(value)


class DistillationModule(TrainingModule):
    """Base LightningModule of every distillation strategy: a trained student and a frozen teacher.

    Subclasses implement :meth:`distillation_losses`; everything else (the teacher contract,
    optimizers, metrics, checkpoints) lives here.

    Args:
        student: the network being trained (any ``nn.Module`` producing logits).
        teacher: the frozen network (``None`` for strategies without one).
        teacher_checkpoint: optional weights for ``teacher``: a path, or ``zoo:NAME`` for weights
            shipped with the package. Loaded with ``weights_only=True``; keys must match exactly.
        save_teacher: also store the teacher's weights in checkpoints (off by default: the
            teacher is re-attached from the config when resuming).
        teacher_train_mode: explicit opt-in to let the teacher follow train/eval mode (its
            BatchNorm statistics then change). Off by default; the contract test relies on it.
        **kwargs: optimizer / scheduler / metric options of :class:`TrainingModule`.
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: Optional[nn.Module] = None,
        teacher_checkpoint: Optional[str] = None,
        save_teacher: bool = False,
        teacher_train_mode: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if not isinstance(student, nn.Module):
            raise TypeError(f"`student` must be a torch.nn.Module, got {type(student).__name__}.")
        if teacher is not None and not isinstance(teacher, nn.Module):
            raise TypeError(f"`teacher` must be a torch.nn.Module or None, got {type(teacher).__name__}.")
        if teacher is not None and teacher is student:
            raise ValueError("`teacher` and `student` are the same module object; pass two separate modules.")
        if teacher_checkpoint is not None and teacher is None:
            raise ValueError("`teacher_checkpoint` was given but `teacher` is None: pass the teacher architecture too.")
        # modules and factories stay out of hparams (checkpoints must load with weights_only=True);
        # `students` / `teachers` are the list arguments of MutualLearning / MultiTeacherDistillation
        self.save_hyperparameters(ignore=["student", "students", "teacher", "teachers", "optimizer", "lr_scheduler"])
        self.student = student
        self.teacher = teacher
        self.teacher_checkpoint = teacher_checkpoint
        self.save_teacher = save_teacher
        self.teacher_train_mode = teacher_train_mode
        if teacher is not None:
            if teacher_checkpoint is not None:
                load_weights(teacher, teacher_checkpoint, argument="teacher_checkpoint")
            teacher.requires_grad_(False)
            teacher.eval()
        self._teacher_modules: tuple[nn.Module, ...] = tuple(teacher.modules()) if teacher is not None else ()
        self._warned_teacher_mode = False

    # ------------------------------------------------------------------ teacher contract
    def frozen_parameters(self) -> Iterable[nn.Parameter]:
        return self.teacher.parameters() if self.teacher is not None else ()

    def train(self, mode: bool = True) -> "DistillationModule":
        super().train(mode)
        if self.teacher is not None and not self.teacher_train_mode:
            self.teacher.eval()
        return self

    def teacher_forward(self, inputs: Any) -> Optional[Tensor]:
        """The teacher's output under ``torch.no_grad()``, after checking it is still in eval mode."""
        if self.teacher is None:
            return None
        if not self.teacher_train_mode and any(m.training for m in self._teacher_modules):
            if not self._warned_teacher_mode:
                warnings.warn(
                    "a teacher submodule was in train mode (something called .train() on it); "
                    "lightning_distill put it back in eval mode. Pass teacher_train_mode=True to allow it.",
                    stacklevel=2,
                )
                self._warned_teacher_mode = True
            self.teacher.eval()
        with torch.no_grad():
            return self.teacher(inputs)

    def on_train_start(self) -> None:
        frozen = {id(m) for m in self._teacher_modules}
        stray = [n for n, m in self.named_modules() if not m.training and id(m) not in frozen]
        if stray:
            warnings.warn(
                f"{len(stray)} non-teacher module(s) are in eval mode at the start of training: {stray[:5]}",
                stacklevel=2,
            )

    def forward(self, inputs: Any) -> Tensor:
        """Inference uses the student."""
        return self.student(inputs)

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.teacher is not None and not self.save_teacher:
            state = checkpoint.get("state_dict", {})
            for key in [k for k in state if k.startswith(_TEACHER + ".")]:
                del state[key]

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False):  # type: ignore[override]
        """Re-attach the current teacher when the state dict was saved without it."""
        if self.teacher is not None and not any(k.startswith(_TEACHER + ".") for k in state_dict):
            state_dict = dict(state_dict)
            state_dict.update({f"{_TEACHER}.{k}": v for k, v in self.teacher.state_dict().items()})
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    # ------------------------------------------------------------------ probing
    def probe_outputs(self, example: Any) -> tuple[Any, Any]:
        teacher_out = self.teacher(example) if self.teacher is not None else None
        return self.student(example), teacher_out

    # ------------------------------------------------------------------ steps
    def distillation_losses(self, student_logits: Tensor, teacher_logits: Optional[Tensor], batch: Batch) -> dict[str, Tensor]:
        """Named loss terms of the strategy; must include ``"loss"`` (the total to minimise)."""
        raise NotImplementedError(f"{type(self).__name__} must implement distillation_losses()")

    def forward_models(self, inputs: Any) -> tuple[Tensor, Optional[Tensor]]:
        """Training forward of student and teacher: ``(student_logits, teacher_logits)``.

        Strategies that need more than logits (captured features) extend this and keep what
        they captured for :meth:`distillation_losses`.
        """
        teacher_logits = self.teacher_forward(inputs)
        student_logits = self.student(inputs)
        return student_logits, teacher_logits

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        b = self.unpack_batch(batch)
        student_logits, teacher_logits = self.forward_models(b.input)
        terms = self.distillation_losses(student_logits, teacher_logits, b)
        self.log_terms("train", terms, self.batch_size_of(b))
        return terms["loss"]

    def log_terms(self, stage: str, terms: Mapping[str, Tensor], batch_size: int) -> None:
        """Log every loss term as ``{stage}/{name}`` (``loss`` also on the progress bar)."""
        self.log_dict(
            {f"{stage}/{name}": value.detach() for name, value in terms.items() if name != "loss"},
            on_step=True,
            on_epoch=False,
            batch_size=batch_size,
        )
        self.log(f"{stage}/loss", terms["loss"].detach(), prog_bar=True, on_step=True, on_epoch=False, batch_size=batch_size)

    def _eval_step(self, stage: str, batch: Any) -> None:
        b = self.unpack_batch(batch)
        student_logits = self.student(b.input)
        teacher_logits = self.teacher_forward(b.input)
        self.update_eval_metrics(stage, student_logits, b.target, teacher_logits)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._eval_step("val", batch)

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._eval_step("test", batch)

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> Tensor:
        return self.student(self.unpack_batch(batch).input)
