"""Presets with one frozen teacher: the flat ``teacher_*`` arguments users know, built into a teacher source.

:class:`SingleTeacherDistillation` is the base of the named strategies that distill from one frozen
network (``KnowledgeDistillation``, ``FeatureDistillation``, ``CRD``, ``CTKD``, ``QuantAwareDistillation``,
``BornAgain``, ``MutualLearning``): it turns ``teacher``, ``teacher_checkpoint``, ``save_teacher``,
``teacher_train_mode``, ``teacher_dtype`` and ``teacher_cache`` into a
:class:`~lightning_distill.teachers.FrozenTeacher` (or a :class:`~lightning_distill.teachers.CachedTeacher`)
and hands it to :class:`~lightning_distill.distiller.DistillationModule`. Strategies without a frozen
teacher (``SelfDistillation``, ``OnlineDistillation``) derive from ``DistillationModule`` directly and do
not take these arguments at all.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence, Union

from torch import nn

from lightning_distill.distiller import DistillationModule, check_alpha
from lightning_distill.losses import check_temperature
from lightning_distill.teachers import CachedTeacher, FrozenTeacher, TeacherSource

__all__ = [
    "FROZEN_TEACHER_OPTIONS", "DistillationModule", "SingleTeacherDistillation", "check_alpha", "check_temperature",
    "reject_teacher_options",
]


#: the arguments of a frozen teacher (:class:`SingleTeacherDistillation`)
FROZEN_TEACHER_OPTIONS = ("teacher", "teacher_checkpoint", "save_teacher", "teacher_train_mode", "teacher_dtype",
                          "teacher_cache")


def reject_teacher_options(owner: type, kwargs: Mapping[str, Any], allowed: Sequence[str] = ()) -> None:
    """A ``TypeError`` naming ``owner`` for frozen-teacher arguments given to a module without a frozen teacher."""
    for key in FROZEN_TEACHER_OPTIONS:
        if key in kwargs and key not in allowed:
            raise TypeError(
                f"{owner.__name__}.__init__() got an unexpected keyword argument {key!r}: {owner.__name__} has no "
                "frozen teacher, so it takes no frozen-teacher options. For a frozen teacher use "
                "KnowledgeDistillation, FeatureDistillation or DistillationModule."
            )


class SingleTeacherDistillation(DistillationModule):
    """A :class:`DistillationModule` whose teacher is one frozen network given by the flat arguments below.

    Args:
        student: the network being trained.
        teacher: the frozen teacher network (or an already built teacher source).
        teacher_checkpoint: optional weights for ``teacher``: a path, or ``zoo:NAME`` for weights shipped
            with the package. Loaded with ``weights_only=True``; keys must match exactly.
        save_teacher: also store the teacher's weights in checkpoints (off by default: the teacher is
            re-attached from the config when resuming).
        teacher_train_mode: explicit opt-in to let the teacher follow train / eval mode (its BatchNorm
            statistics then change). Off by default.
        teacher_dtype: ``"bfloat16"`` / ``"float16"`` hold the frozen teacher in that dtype (half its memory;
            its inputs are cast, its outputs come back as float32). ``None`` keeps it as built.
        teacher_cache: a :class:`~lightning_distill.cache.TeacherCache`: the teacher's training-set outputs
            are computed once when training starts and looked up by sample index at every step (see
            :class:`~lightning_distill.teachers.CachedTeacher`).
        objectives: the loss terms (the preset's).
        **kwargs: ``pseudo_labels``, ``function_matching``, ``inputs``, ``optimizer``, ``lr_scheduler``, ... of
            :class:`~lightning_distill.distiller.DistillationModule`.
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: Union[nn.Module, TeacherSource, None],
        teacher_checkpoint: Optional[str] = None,
        save_teacher: bool = False,
        teacher_train_mode: bool = False,
        teacher_dtype: Optional[str] = None,
        teacher_cache: Any = None,
        **kwargs: Any,
    ) -> None:
        if isinstance(teacher, nn.Module) and teacher is student:
            raise ValueError("`teacher` and `student` are the same module object; pass two separate modules.")
        options = {"teacher_checkpoint": teacher_checkpoint, "save_teacher": save_teacher,
                   "teacher_train_mode": teacher_train_mode, "teacher_dtype": teacher_dtype, "teacher_cache": teacher_cache}
        super().__init__(student, self._source(teacher, **options), **kwargs)
        self.teacher_checkpoint = teacher_checkpoint
        self.teacher_train_mode = bool(teacher_train_mode)
        self.teacher_cache = teacher_cache

    @classmethod
    def _source(
        cls, teacher: Union[nn.Module, TeacherSource, None], teacher_checkpoint: Optional[str], save_teacher: bool,
        teacher_train_mode: bool, teacher_dtype: Optional[str], teacher_cache: Any,
    ) -> Optional[TeacherSource]:
        """The teacher source from the flat arguments (a FrozenTeacher, cached when asked)."""
        name = cls.__name__
        if teacher_cache is not None and not cls.supports_teacher_cache:
            raise ValueError(
                f"{name} cannot use `teacher_cache`: its teacher changes during training or its step needs more "
                "than the teacher's logits. Remove teacher_cache."
            )
        if isinstance(teacher, TeacherSource):
            given = [k for k, v in (("teacher_checkpoint", teacher_checkpoint), ("teacher_dtype", teacher_dtype),
                                    ("teacher_cache", teacher_cache), ("save_teacher", save_teacher or None),
                                    ("teacher_train_mode", teacher_train_mode or None)) if v is not None]
            if given:
                raise ValueError(f"{name}: `teacher` is already a {type(teacher).__name__}; set {given} on it instead.")
            return teacher
        if teacher is None:
            if teacher_checkpoint is not None:
                raise ValueError("`teacher_checkpoint` was given but `teacher` is None: pass the teacher architecture too.")
            if teacher_cache is not None:
                raise ValueError(f"`teacher_cache` was given but {name} has no frozen teacher to cache.")
            return None
        if not isinstance(teacher, nn.Module):
            raise TypeError(f"`teacher` must be a torch.nn.Module or None, got {type(teacher).__name__}.")
        source = FrozenTeacher(teacher, teacher_checkpoint, teacher_dtype, teacher_train_mode, save_teacher, prefix="teacher_")
        return CachedTeacher(source, teacher_cache) if teacher_cache is not None else source

    @property
    def save_teacher(self) -> bool:
        """Whether checkpoints keep the teacher's weights (the teacher source's ``save``)."""
        return self.teacher_source is not None and self.teacher_source.save

    @save_teacher.setter
    def save_teacher(self, value: bool) -> None:
        if self.teacher_source is not None:
            self.teacher_source.save = bool(value)
