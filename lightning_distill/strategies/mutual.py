"""``MutualLearning``: Zhang, Xiang, Hospedales & Lu (CVPR 2018), "Deep Mutual Learning" (arXiv:1706.00384)."""

from __future__ import annotations

import copy
import os
from typing import Any, Optional, Sequence, Union

import torch
import torchmetrics
from torch import Tensor, nn

from lightning_distill.batch import Batch
from lightning_distill.losses import KL_MODES, mutual_loss
from lightning_distill.outputs import ModelOutputs, as_outputs
from lightning_distill.strategies.base import SingleTeacherDistillation, check_alpha
from lightning_distill.strategies.born_again import reset_module_parameters
from lightning_distill.temperature import FixedTemperature
from lightning_distill.validation import check_choice, check_int

__all__ = ["MutualLearning"]

_CKPT_KEY = "mutual_learning"
_DEFAULT_METRIC = "val/student{k}_acc"


# =============================================================================================


def _flat_valid(values: Tensor, target: Tensor, ignore_index: int) -> tuple[Tensor, Tensor]:
    flat = values.reshape(-1, values.shape[-1])
    flat_target = target.reshape(-1)
    valid = flat_target != ignore_index
    return flat[valid], flat_target[valid]


class MutualLearning(SingleTeacherDistillation):
    r"""Deep Mutual Learning: K students trained together, each mimicking the others.

    Student :math:`k` minimises

    .. math::

        \mathcal{L}_k = (1 - \alpha)\,\mathrm{CE}(z_k, y) + \alpha\,\mathcal{L}^{\mathrm{mut}}_k,
        \qquad \mathcal{L}^{\mathrm{mut}}_k = \frac{1}{|P_k|}\sum_{j \in P_k}
        T^2\,\mathrm{KL}\big(p_j^{T} \,\|\, p_k^{T}\big)

    over its peers :math:`P_k` (the other students and, when given, the frozen ``teacher`` as
    one more peer that is never trained), with the peers' logits **detached**
    (``mutual_loss``). DML's objective :math:`\mathrm{CE} + D_{KL}` is ``alpha=0.5`` up to a
    factor 2; DML uses ``T=1``.

    **Optimisation.** The objective is :math:`\sum_k \mathcal{L}_k` with one optimizer over all
    students and one forward per model per step. Because peers are detached, student k's
    gradient is exactly :math:`\nabla \mathcal{L}_k` -- the update of DML's per-student
    optimizers. The paper updates the students *in turn*, recomputing the predictions after
    each update; here all students step on predictions from the same forward (simultaneous
    rather than alternating updates), which needs K forwards instead of K^2 per step.

    ``students`` is an ``nn.ModuleList``; ``student`` is ``students[0]`` (``forward``,
    ``predict`` and the ``val/acc`` metric use it). Pass ``students`` explicitly, or ``student``
    and ``num_students``: the other students are deep copies re-initialised
    (``reset_parameters()`` on every submodule that has it) with seeds derived from ``seed``, so
    they start different.

    Logging: ``train/loss``, ``train/task_loss``, ``train/kd_loss`` (means over students; the
    optimised sum is K x ``train/loss``), ``train/student{k}_loss``; validation / test:
    ``val/acc`` (student 0), ``val/student{k}_acc`` for every k, ``val/ensemble_acc`` (mean of
    the students' softmax outputs) and, with a teacher, ``val/teacher_acc``,
    ``val/agreement``, ``val/kl`` (student 0 vs the teacher). :meth:`best_student` /
    :meth:`export_best_student` pick the student with the best last validation score.

    Checkpoints hold every student and the last validation scores; the teacher follows the
    frozen-teacher contract (not saved, re-attached from the config).

    DML trains several models together, so it has its own step (one forward per model; the peers'
    logits detached) rather than objectives over one student: :meth:`forward_models` returns student
    0's outputs with every student's logits in ``extras["students"]``, and :meth:`distillation_losses`
    takes those outputs or the list of the K students' logits.

    Args:
        student: the first student; with ``num_students`` the others are seeded copies of it.
        teacher: optional frozen teacher, used as one more (never trained) peer.
        students: K >= 2 distinct student modules (instead of ``student``).
        num_students: K >= 2 when ``student`` is given.
        teacher_checkpoint: weights of ``teacher`` (see
            :class:`~lightning_distill.strategies.base.SingleTeacherDistillation`).
        temperature: ``T > 0`` of the mimicry term (T² scaling applies).
        alpha: weight of the mimicry term in [0, 1]; ``1 - alpha`` weighs the labels.
        kl: ``"forward"`` (DML's KL), ``"reverse"``, ``"symmetric"`` or ``"js"``.
        seed: seed of the copies' re-initialisation; ``None`` takes ``torch.initial_seed()``.
        **kwargs: ``optimizer``, ``lr_scheduler``, ... of
            :class:`~lightning_distill.strategies.base.SingleTeacherDistillation`.

    Example::

        >>> import lightning as L
        >>> from lightning_distill.strategies.mutual import MutualLearning
        >>> from lightning_distill.data import DigitsDataModule
        >>> from lightning_distill.models import DigitsMLP
        >>> module = MutualLearning(DigitsMLP(), num_students=3, alpha=0.5, seed=0)
        >>> len(module.students), module.student is module.students[0]
        (3, True)
        >>> trainer = L.Trainer(max_epochs=30, logger=False, enable_checkpointing=False,
        ...                     enable_progress_bar=False, enable_model_summary=False)
        >>> trainer.fit(module, datamodule=DigitsDataModule())  # doctest: +SKIP
        >>> module.export_best_student("best_student.pt")  # doctest: +SKIP
    """

    supports_teacher_cache = False  # the peers are trained; the optional teacher is rarely the cost

    def __init__(
        self,
        student: Optional[nn.Module] = None,
        teacher: Optional[nn.Module] = None,
        students: Optional[list[nn.Module]] = None,
        num_students: int = 2,
        teacher_checkpoint: Optional[str] = None,
        temperature: float = 1.0,
        alpha: float = 0.5,
        kl: str = "forward",
        seed: Optional[int] = None,
        **kwargs: Any,
    ) -> None:
        check_int("num_students", num_students, minimum=2)
        if seed is not None:
            check_int("seed", seed, minimum=0, what="an integer >= 0 or None")
        self_alpha = check_alpha(alpha)
        mutual_temperature = FixedTemperature(temperature)
        check_choice("kl", kl, KL_MODES)
        resolved_seed = int(seed) if seed is not None else int(torch.initial_seed() % (2**31))
        models = self._build_students(student, students, num_students, resolved_seed)
        if teacher is not None and any(teacher is m for m in models):
            raise ValueError("`teacher` is also one of the students; pass a separate module.")
        super().__init__(models[0], teacher, teacher_checkpoint=teacher_checkpoint, **kwargs)
        self.students = nn.ModuleList(models)
        self.mutual_temperature = mutual_temperature  # module.temperature reads / sets it
        self.alpha = self_alpha
        self.kl = kl
        self.seed = resolved_seed
        #: ``{metric name: value}`` of the last validation epoch (``val/student{k}_acc``, ...)
        self.last_validation: dict[str, float] = {}

    @staticmethod
    def _build_students(
        student: Optional[nn.Module], students: Optional[Sequence[nn.Module]], num_students: int, seed: int
    ) -> list[nn.Module]:
        if (student is None) == (students is None):
            raise ValueError(
                "MutualLearning needs exactly one of `student` (copied `num_students` times) or `students` "
                f"(a list of modules), got student={type(student).__name__} and students="
                f"{type(students).__name__}."
            )
        if students is not None:
            models = list(students)
            if len(models) < 2:
                raise ValueError(f"`students` must hold at least 2 modules, got {len(models)}.")
            bad = [type(m).__name__ for m in models if not isinstance(m, nn.Module)]
            if bad:
                raise TypeError(f"`students` must be torch.nn.Module instances, got {bad}.")
            if len({id(m) for m in models}) != len(models):
                raise ValueError("`students` contains the same module object twice; pass distinct modules.")
            if num_students not in (2, len(models)):
                raise ValueError(
                    f"`num_students`={num_students!r} disagrees with the {len(models)} modules in `students`; "
                    "leave `num_students` out when passing `students`."
                )
            return models
        if not isinstance(student, nn.Module):
            raise TypeError(f"`student` must be a torch.nn.Module, got {type(student).__name__}.")
        models = [student]
        for k in range(1, num_students):
            peer = copy.deepcopy(student)
            reset_module_parameters(peer, (seed * 1_000_003 + k) % (2**63 - 1))
            models.append(peer)
        return models

    # ------------------------------------------------------------------ probing
    def probe_outputs(self, batch: Any) -> tuple[ModelOutputs, Optional[ModelOutputs]]:
        batch = batch if isinstance(batch, Batch) else Batch(batch)
        source = self.teacher_source
        teacher = source.probe_outputs(batch) if source is not None else None
        outputs = [as_outputs(self.student_routing(s, batch), f"student {k}") for k, s in enumerate(self.students)]
        classes = [int(o.logits.shape[-1]) for o in outputs]
        if len(set(classes)) != 1:
            raise ValueError(
                f"the students disagree on the number of classes: {classes} (student k -> outputs). Build "
                "every student with the same num_classes."
            )
        return outputs[0], teacher

    # ------------------------------------------------------------------ training
    def student_logits(self, batch: Batch) -> list[Tensor]:
        """One forward per student: the K students' logits."""
        return [as_outputs(self.student_routing(s, batch), f"student {k}").logits for k, s in enumerate(self.students)]

    def forward_models(self, batch: Any) -> tuple[ModelOutputs, Optional[ModelOutputs]]:
        """One forward per model: student 0's outputs with every student's logits in ``extras["students"]``."""
        b = batch if isinstance(batch, Batch) else Batch(batch)
        source = self.teacher_source
        teacher = source.outputs(b) if source is not None else None
        logits = self.student_logits(b)
        return ModelOutputs(logits[0], extras={"students": logits}), teacher

    def distillation_losses(self, student: Any, teacher: Any, batch: Batch) -> dict[str, Tensor]:
        r"""Loss terms; ``student`` is :meth:`forward_models`'s output or the list of the K students' logits.

        ``loss`` is the optimised sum over students; ``task_loss`` / ``kd_loss`` are means over
        students and ``student{k}_loss`` is :math:`\mathcal{L}_k`.
        """
        logits = list(student.extras["students"]) if isinstance(student, ModelOutputs) else list(student)
        teacher_logits = teacher.logits if isinstance(teacher, ModelOutputs) else teacher
        mask = batch.mask if logits[0].ndim == 3 else None
        tasks = torch.stack([self.task_loss(z, batch.target) for z in logits])
        mutual = mutual_loss(logits, self.mutual_temperature.value, self.kl, teacher_logits, mask)
        per_student = (1.0 - self.alpha) * tasks + self.alpha * mutual
        terms = {"loss": per_student.sum(), "task_loss": tasks.mean(), "kd_loss": mutual.mean()}
        for k, value in enumerate(per_student.unbind(0)):
            terms[f"student{k}_loss"] = value
        return terms

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        terms, b = self.training_terms(batch)
        logged = dict(terms)
        logged["loss"] = terms["loss"] / len(self.students)  # train/loss: the mean over students
        self.log_terms("train", logged, self.batch_size_of(b))
        return terms["loss"]

    # ------------------------------------------------------------------ evaluation
    def build_metrics(self, num_classes: int, with_teacher: bool) -> nn.ModuleDict:
        metrics = super().build_metrics(num_classes, with_teacher)

        def accuracy() -> torchmetrics.Metric:
            return torchmetrics.classification.MulticlassAccuracy(num_classes, top_k=1, average="micro")

        for stage in metrics.values():
            for k in range(len(self.students)):
                stage[f"student{k}_acc"] = accuracy()
            stage["ensemble_acc"] = accuracy()
        return metrics

    def _eval_step(self, stage: str, batch: Any) -> None:
        b = self.read_batch(batch)
        logits = self.student_logits(b)
        source = self.teacher_source
        teacher_logits = source.eval_outputs(b).logits if source is not None else None
        metrics = self.eval_metrics[stage]
        if b.target is not None:
            probs = torch.stack([z.float().softmax(-1) for z in logits]).mean(0)
            flat, target = _flat_valid(probs, b.target, self.ignore_index)
            if target.numel() > 0:
                metrics["ensemble_acc"].update(flat, target)
                for k, z in enumerate(logits):
                    metrics[f"student{k}_acc"].update(*_flat_valid(z.float(), b.target, self.ignore_index))
        # logs {stage}/acc (student 0), the teacher metrics and every metric above
        self.update_eval_metrics(stage, logits[0], b.target, teacher_logits)

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking:
            return
        metrics = self.eval_metrics["val"]
        names = [f"student{k}_acc" for k in range(len(self.students))] + ["ensemble_acc"]
        record = {}
        for name in names:
            if metrics[name].update_called:
                record[f"val/{name}"] = float(metrics[name].compute())
        if record:
            self.last_validation = record

    # ------------------------------------------------------------------ best student
    def best_student_index(self, metric: str = _DEFAULT_METRIC, mode: str = "max") -> int:
        """Index k of the student with the best last validation value of ``metric``.

        ``metric`` is a name with ``{k}``; values come from :attr:`last_validation` (kept in
        checkpoints), else from ``trainer.callback_metrics``.
        """
        if mode not in ("max", "min"):
            raise ValueError(f"`mode` must be 'max' or 'min', got {mode!r}.")
        if "{k}" not in metric:
            raise ValueError(f"`metric` must contain '{{k}}' (the student index), got {metric!r}.")
        callback_metrics = self.attached_trainer.callback_metrics if self.attached_trainer is not None else {}
        values = []
        for k in range(len(self.students)):
            key = metric.format(k=k)
            if key in self.last_validation:
                values.append(self.last_validation[key])
            elif key in callback_metrics:
                values.append(float(callback_metrics[key]))
            else:
                known = sorted(set(self.last_validation) | set(callback_metrics))
                raise ValueError(
                    f"no value of {key!r} found: run a validation epoch first (fit or validate), or pick "
                    f"another `metric`. Known: {known}."
                )
        best = max if mode == "max" else min
        return values.index(best(values))

    def best_student(self, metric: str = _DEFAULT_METRIC, mode: str = "max") -> nn.Module:
        """The student with the best last validation value of ``metric`` (ties: lowest index)."""
        return self.students[self.best_student_index(metric, mode)]

    def export_best_student(self, path: Union[str, os.PathLike], metric: str = _DEFAULT_METRIC, mode: str = "max") -> int:
        """Save the best student's plain state dict to ``path`` (CPU tensors); return its index.

        The file loads with ``torch.load(path, weights_only=True)`` and works as a
        ``teacher_checkpoint`` of any strategy.
        """
        k = self.best_student_index(metric, mode)
        directory = os.path.dirname(os.fspath(path))
        if directory:
            os.makedirs(directory, exist_ok=True)
        torch.save({name: v.detach().cpu() for name, v in self.students[k].state_dict().items()}, path)
        return k

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint[_CKPT_KEY] = {"num_students": len(self.students), "last_validation": dict(self.last_validation)}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        state = checkpoint.get(_CKPT_KEY)
        if state is None:
            return
        if int(state["num_students"]) != len(self.students):
            raise ValueError(
                f"the checkpoint holds {state['num_students']} students, this module has {len(self.students)}. "
                f"Build it with num_students={state['num_students']} (or that many `students`)."
            )
        self.last_validation = {str(k): float(v) for k, v in state.get("last_validation", {}).items()}
