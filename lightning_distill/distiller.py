"""``DistillationModule``: the one LightningModule every distillation method runs in.

A training step is visibly four moves::

    batch --(input routing)--> student(...)  -> ModelOutputs (logits, captured features, ...)
          --(teacher source)-------------------> ModelOutputs of the teacher (no gradient, never optimised)
    objectives: {name: Objective} each (student, teacher, batch, step) -> {"loss": contribution, name_loss, ...}
    loss = sum of the contributions; every term logged as train/<name>

* the **student** is any ``nn.Module``; how a batch reaches it is ``inputs`` (:mod:`lightning_distill.batch`)
  and whatever it returns is read by :func:`~lightning_distill.outputs.as_outputs`;
* the **teacher** is a :class:`~lightning_distill.teachers.TeacherSource` (a bare network becomes a
  :class:`~lightning_distill.teachers.FrozenTeacher`), which carries the frozen-teacher contract;
* the **objectives** (:mod:`lightning_distill.objectives`) are the loss terms, each with its own
  hyperparameters and trained parts, built from one shape probe (:mod:`lightning_distill.probe`).

The named strategies (``KnowledgeDistillation``, ``FeatureDistillation``, ``CRD``, ``CTKD``, ...) are
presets that assemble objectives; any combination is a config (see the README's "How it fits together").

The teacher contract, enforced here for every module: frozen (``requires_grad=False``, never in an
optimizer -- ``configure_optimizers`` refuses if one leaks in), always in eval mode (restored whenever
something switches it, with a warning; ``teacher_train_mode`` is the explicit opt-out), run under
``torch.no_grad()`` (not ``inference_mode``, whose tensors cannot enter autograd later, e.g. through a
learned temperature), and left out of checkpoints unless the source says ``save``.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Any, Iterable, Mapping, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_distill.augment import FunctionMatching
from lightning_distill.batch import Batch, resolve_routing, unpack_batch, with_pseudo_labels
from lightning_distill.features import FeatureCapture, check_layer_names
from lightning_distill.hf import request_outputs
from lightning_distill.module import CKPT_KEY, TrainingModule
from lightning_distill.objectives.base import Objective, StepInfo, named_objectives
from lightning_distill.outputs import ModelOutputs, as_outputs
from lightning_distill.probe import Probe
from lightning_distill.teachers import CachedTeacher, TeacherSource, as_source, frozen_parameters
from lightning_distill.temperature import Temperature
from lightning_distill.validation import check_alpha, check_choice, check_float

__all__ = ["DistillationModule", "check_alpha"]

_FM = "function_matching"
#: Lightning warns about modules in eval mode when training starts; a frozen teacher is one on purpose
_EVAL_WARNING = r"Found \d+ module\(s\) in eval mode at the start of training"
#: hyperparameters that are objects (modules, factories, sources): never in ``hparams``
VOCAB_ALIGNMENTS = ("strict", "truncate")

_NOT_HPARAMS = (
    "student", "students", "teacher", "teachers", "objectives", "optimizer", "lr_scheduler", "teacher_cache",
    "function_matching", "inputs",
)


def _plain(value: Any) -> bool:
    if value is None or isinstance(value, (bool, int, float, str)):
        return True
    if isinstance(value, (list, tuple)):
        return all(_plain(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _plain(v) for k, v in value.items())
    return False


class DistillationModule(TrainingModule):
    """The general distillation module (see the module docstring); base class of every strategy.

    Args:
        student: the network being trained.
        teacher: a :class:`~lightning_distill.teachers.TeacherSource`, a network (wrapped in a
            :class:`~lightning_distill.teachers.FrozenTeacher`) or ``None``.
        objectives: the loss terms, ``{name: Objective}`` or a list (named by each objective's ``name``).
        inputs: how a batch reaches the student: ``"auto"``, ``"positional"``, ``"keywords"``, a
            :class:`~lightning_distill.batch.KeywordInputs` or a callable ``(model, batch) -> output``.
        pseudo_labels: confidence threshold in [0, 1] to give unlabelled samples (target ``ignore_index``
            or no target at all) the teacher's top-1 class as a hard label where the teacher's softmax
            probability of it is at least the threshold; ``None`` keeps them label-free.
        function_matching: a :class:`~lightning_distill.augment.FunctionMatching` applied to every
            training batch *once*, before both forwards, so teacher and student see the identical
            augmented (and mixup / cutmix-mixed) input (Beyer et al. 2022, arXiv:2106.05237). Mixed
            samples lose their hard label. It lives on the module (not in a datamodule) so that it works
            for any data source, and its random state is saved with the module's checkpoint.
        vocab_alignment: ``"strict"`` (default): teacher and student must predict the same number of
            classes / tokens. ``"truncate"``: vocabularies of different sizes are compared on their shared
            prefix (the first ``min(V_teacher, V_student)`` entries, both softmaxes renormalised over it) --
            the common case of one tokenizer with a padded embedding matrix (152,064 vs 151,936 rows).
            The task loss still uses all of the student's outputs. Different tokenizers are not supported.
        **kwargs: ``optimizer``, ``lr_scheduler``, ``num_classes``, ... of
            :class:`~lightning_distill.module.TrainingModule`.
    """

    #: whether the strategy can train from cached teacher outputs (presets with a fixed teacher)
    supports_teacher_cache: bool = True
    #: objectives whose public attributes a preset also shows as its own (read-only), e.g. CRD's memory
    #: banks as ``module.memory_student`` for ``module.objectives["crd"].memory_student``
    exposes: tuple[str, ...] = ()

    def __init__(
        self,
        student: nn.Module,
        teacher: Union[nn.Module, TeacherSource, None] = None,
        objectives: Union[Mapping[str, Objective], Sequence[Objective], None] = None,
        inputs: Any = "auto",
        pseudo_labels: Optional[float] = None,
        function_matching: Optional[FunctionMatching] = None,
        vocab_alignment: str = "strict",
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        check_choice("vocab_alignment", vocab_alignment, VOCAB_ALIGNMENTS)
        if not isinstance(student, nn.Module):
            raise TypeError(f"`student` must be a torch.nn.Module, got {type(student).__name__}.")
        source = as_source(teacher)
        if source is not None and source.module is student:
            raise ValueError("`teacher` and `student` are the same module object; pass two separate modules.")
        if function_matching is not None and not isinstance(function_matching, FunctionMatching):
            raise TypeError(
                "`function_matching` must be a lightning_distill.augment.FunctionMatching or None, got "
                f"{type(function_matching).__name__}. In YAML: function_matching: {{class_path: "
                "lightning_distill.augment.FunctionMatching, init_args: {mixup_alpha: 1.0}}."
            )
        if isinstance(source, CachedTeacher) and function_matching is not None:
            raise ValueError(
                "`teacher_cache` cannot be combined with `function_matching`: the teacher must see each step's "
                "freshly augmented input, which no cache holds. Remove teacher_cache (or function_matching)."
            )
        if pseudo_labels is not None:
            pseudo_labels = check_float(
                "pseudo_labels", pseudo_labels, 0.0, 1.0, what="in [0, 1]",
                hint=" It is a confidence threshold, not a weight: an unlabelled sample gets the teacher's top-1 class "
                "as its label when the teacher's probability of that class is at least this value (e.g. 0.9 labels "
                "the samples the teacher is 90% sure of); null keeps unlabelled samples label-free.",
            )
            if source is None or not source.frozen:
                raise ValueError(
                    f"`pseudo_labels` needs a frozen teacher to label samples, but {type(self).__name__} has none "
                    "(strategies without a teacher, or whose teacher trains alongside the student, such as "
                    "OnlineDistillation, cannot pseudo-label). Remove pseudo_labels."
                )
        named = named_objectives(objectives)
        with warnings.catch_warnings():  # objects among the arguments are dropped from hparams just below
            warnings.filterwarnings("ignore", message=r"Attribute '.*' is an instance of `nn.Module`")
            self.save_hyperparameters(ignore=list(_NOT_HPARAMS))
        for store in (self._hparams, getattr(self, "_hparams_initial", {})):
            for key in [k for k, v in store.items() if not _plain(v)]:
                del store[key]
        self.student = student
        self.teacher: Optional[nn.Module] = None
        self.teacher_source: Optional[TeacherSource] = None
        self.objectives = nn.ModuleDict(named)
        self.student_routing = resolve_routing(inputs, "inputs")
        self.pseudo_labels = pseudo_labels
        self.function_matching = function_matching
        self.vocab_alignment = vocab_alignment
        #: size of the shared vocabulary prefix when ``vocab_alignment="truncate"`` found different sizes (the probe)
        self.shared_vocab: Optional[int] = None
        self._student_capture: Optional[FeatureCapture] = None
        self._eval_warning_filter: Optional[warnings.catch_warnings] = None
        self.set_teacher(source)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name.startswith("_") or not type(self).exposes or "objectives" not in self._modules:
                raise
            objectives = self._modules["objectives"]
            for key in type(self).exposes:
                if key in objectives and hasattr(objectives[key], name):
                    return getattr(objectives[key], name)
            raise

    # ------------------------------------------------------------------ teacher source and captures
    def set_teacher(self, source: Optional[TeacherSource]) -> None:
        """Attach a teacher source: register its networks as submodules and the layers objectives read."""
        previous = self.teacher_source
        if previous is not None:
            for name in previous.modules():
                if name in self._modules:
                    del self._modules[name]
        self.teacher_source = source
        self.teacher = None
        if source is not None:
            for name, module in source.modules().items():
                setattr(self, name, module)
        self._frozen_modules = tuple(m for fm in (source.frozen_modules() if source else []) for m in fm.modules())
        self.attach_captures()

    def attach_captures(self) -> None:
        """Hook every layer the objectives read, after checking that the names exist."""
        student_layers: dict[str, int] = {}
        teacher_layers: dict[str, int] = {}
        student_arg = teacher_arg = "layers"
        for objective in self.objectives.values():
            for layers, found in (
                (student_layers, objective.student_layers()),
                (teacher_layers, objective.teacher_layers()),
            ):
                for name, select in found.items():
                    if layers.setdefault(name, select) != select:
                        raise ValueError(
                            f"two objectives read layer {name!r} with different tuple elements ({layers[name]} and "
                            f"{select}); capture one element per layer."
                        )
            if objective.student_layers():
                student_arg = objective.student_layer_argument
            if objective.teacher_layers():
                teacher_arg = objective.teacher_layer_argument
        source = self.teacher_source
        outputs = {name for objective in self.objectives.values() for name in objective.model_outputs}
        if outputs:
            request_outputs(self.student, outputs)
            if source is not None and source.module is not None:
                for model in (source.module if isinstance(source.module, nn.ModuleList) else [source.module]):
                    request_outputs(model, outputs)  # every member of a TeacherEnsemble
        if teacher_layers:
            if source is None or source.module is None:
                raise ValueError(f"`{teacher_arg}`: the objectives read teacher layers, but there is no teacher network.")
            check_layer_names(source.module, list(teacher_layers), "the teacher", teacher_arg)
        if student_layers:
            check_layer_names(self.student, list(student_layers), "the student", student_arg)
        if source is not None:
            source.capture(teacher_layers, teacher_arg)
        if self._student_capture is not None:
            self._student_capture.remove()
        self._student_capture = (
            FeatureCapture(self.student, list(student_layers), student_layers, "the student", student_arg)
            if student_layers else None
        )

    def frozen_parameters(self) -> Iterable[nn.Parameter]:
        return frozen_parameters(self.teacher_source)

    def parameter_groups(self) -> list[dict]:
        """One group of every trainable parameter, then the objectives' own groups (a learned temperature's,
        projections with their own learning rate, ...)."""
        own = [g for objective in self.objectives.values() for g in objective.parameter_groups()]
        taken = {id(p) for g in own for p in g["params"]} | {id(p) for p in self.frozen_parameters()}
        main = [p for p in self.parameters() if p.requires_grad and id(p) not in taken]
        return [{"params": main}, *own]

    def eval_mode_modules(self) -> set[int]:
        """Ids of submodules that are in eval mode on purpose (frozen networks)."""
        return {id(m) for m in self._frozen_modules}

    def train(self, mode: bool = True) -> "DistillationModule":
        super().train(mode)
        source = getattr(self, "teacher_source", None)
        if source is not None:
            source.train(mode)
        return self

    def temperatures(self) -> dict[str, Temperature]:
        """Every temperature of the module by name (what temperature callbacks read and set)."""
        names = self.__dict__.get("_temperature_names")
        if names is None:
            names = self.__dict__["_temperature_names"] = tuple(
                name for name, m in self.named_modules() if isinstance(m, Temperature)
            )
        modules = dict(self.named_modules())
        return {name: modules[name] for name in names}

    @property
    def temperature(self) -> float:
        """The distillation temperature (the first of :meth:`temperatures`); setting it sets every one."""
        found = self.temperatures()
        if not found:
            raise AttributeError(f"{type(self).__name__} has no distillation temperature.")
        return next(iter(found.values())).value

    @temperature.setter
    def temperature(self, value: float) -> None:
        found = self.temperatures()
        if not found:
            raise AttributeError(f"{type(self).__name__} has no distillation temperature to set.")
        for temperature in found.values():
            temperature.set(value)

    # ------------------------------------------------------------------ probing
    def needs_probe(self) -> bool:
        return any(objective.needs_probe for objective in self.objectives.values())

    def probe_outputs(self, batch: Batch) -> tuple[ModelOutputs, Optional[ModelOutputs]]:
        source = self.teacher_source
        teacher = source.probe_outputs(batch) if source is not None else None
        return self.student_outputs(batch), teacher

    def on_probe(self, probe: Probe) -> int:
        num_classes = super().on_probe(probe)
        for objective in self.objectives.values():
            objective.build(probe)
            objective.to(self.device)
        self.attach_captures()  # building may have resolved more layers to read (e.g. a module's input)
        return num_classes

    def check_teacher_outputs(self, probe: Probe, num_classes: int) -> None:
        """Teacher and student must predict the same classes / tokens; under ``vocab_alignment="truncate"``
        different sizes set :attr:`shared_vocab` to the shared prefix's."""
        self.shared_vocab = None
        if probe.teacher is None or probe.teacher.logits is None:
            return
        n_teacher, n_student = int(probe.teacher.logits.shape[-1]), num_classes
        if n_teacher == n_student:
            return
        teacher, student = type(self.teacher).__name__, type(self.student).__name__
        if self.vocab_alignment == "truncate":
            self.shared_vocab = min(n_teacher, n_student)
            return
        if self.token_level:
            raise ValueError(
                f"teacher and student have different vocabulary sizes: the teacher ({teacher}) outputs {n_teacher} "
                f"logits per token, the student ({student}) outputs {n_student}. Token-level distillation compares "
                "the two distributions token by token, so both must use the same tokenizer: build both with the same "
                "vocab_size (init_args.vocab_size in YAML), or, when one vocabulary is the other's padded prefix (the "
                "same tokenizer with a larger embedding matrix, e.g. 152064 vs 151936), set "
                "vocab_alignment='truncate'. Different tokenizers are not supported."
            )
        raise ValueError(
            f"teacher and student disagree on the number of classes: the teacher ({teacher}) outputs {n_teacher}, "
            f"the student ({student}) outputs {n_student}. Build both with the same num_classes "
            "(init_args.num_classes in YAML)."
        )

    def teacher_view(self, student: ModelOutputs, teacher: ModelOutputs) -> tuple[ModelOutputs, ModelOutputs]:
        """The outputs the teacher-reading objectives compare: with ``vocab_alignment="truncate"`` and vocabularies
        of different sizes, both logits cut to the shared prefix (softmaxes renormalise over it)."""
        n = self.shared_vocab
        if n is None or student.logits is None or teacher.logits is None:
            return student, teacher
        return (dataclasses.replace(student, logits=student.logits[..., :n]),
                dataclasses.replace(teacher, logits=teacher.logits[..., :n]))

    # ------------------------------------------------------------------ steps
    def student_outputs(self, batch: Batch) -> ModelOutputs:
        """The student's outputs for ``batch``, with every layer the objectives read in ``features``."""
        capture = self._student_capture
        if capture is None:
            return as_outputs(self.student_routing(self.student, batch), "the student")
        with capture:
            raw = self.student_routing(self.student, batch)
        out = as_outputs(raw, "the student")
        out.features = capture.pop()
        return out

    def forward_models(self, batch: Any) -> tuple[ModelOutputs, Optional[ModelOutputs]]:
        """Training forward of teacher and student: ``(student outputs, teacher outputs or None)``.

        ``batch`` is a :class:`~lightning_distill.batch.Batch` or a bare model input.
        """
        b = batch if isinstance(batch, Batch) else Batch(batch)
        source = self.teacher_source
        teacher = source.outputs(b) if source is not None and self.reads_teacher else None
        return self.student_outputs(b), teacher

    @property
    def reads_teacher(self) -> bool:
        """Whether a training step needs the teacher's outputs (an objective reads them, or pseudo-labels)."""
        return self.pseudo_labels is not None or any(o.needs_teacher for o in self.objectives.values())

    def teacher_forward(self, inputs: Any) -> Optional[Tensor]:
        """The teacher's logits for a model input (eval mode, ``no_grad``), or ``None`` without a teacher."""
        source = self.teacher_source
        if source is None:
            return None
        return source.outputs(inputs if isinstance(inputs, Batch) else Batch(inputs)).logits

    def prepare_batch(self, batch: Any) -> Batch:
        """The training batch both models see: read (:meth:`read_batch`) and through ``function_matching`` when it
        is set."""
        b = self.read_batch(batch)
        if self.function_matching is None:
            return b
        inputs, target, info = self.function_matching(b.input, b.target, ignore_index=self.ignore_index)
        named = b.inputs
        if named is not None:  # keyword routing reads the named inputs: give it the augmented tensor too
            named = {k: (inputs if v is b.input else v) for k, v in named.items()}
        return b._replace(input=inputs, target=target, inputs=named, mixed=info.get("mixed"))

    def teacher_probabilities(self, teacher_logits: Tensor) -> Tensor:
        """The teacher's class probabilities at T=1 (what pseudo-labels are read from)."""
        return teacher_logits.float().softmax(-1)

    def with_pseudo_labels(self, batch: Batch, teacher: Any) -> Batch:
        """Give unlabelled samples the teacher's confident top-1 class (``pseudo_labels``; see
        :func:`lightning_distill.batch.with_pseudo_labels`)."""
        if self.pseudo_labels is None or teacher is None:
            return batch
        teacher_logits = teacher.logits if isinstance(teacher, ModelOutputs) else teacher
        if not isinstance(teacher_logits, Tensor):
            return batch
        probs = self.teacher_probabilities(teacher_logits.detach())
        return with_pseudo_labels(batch, probs, self.pseudo_labels, self.ignore_index)

    def step_info(self) -> StepInfo:
        return StepInfo(self.current_epoch if self.attached_trainer is not None else 0, self)

    def combine(self, contributions: dict[str, Tensor], step: StepInfo) -> Tensor:
        """The total loss from each objective's contribution (their sum; presets may stage them)."""
        total = None
        for value in contributions.values():
            total = value if total is None else total + value
        return total

    def distillation_losses(self, student: Any, teacher: Any, batch: Batch) -> dict[str, Tensor]:
        """Every objective's named terms and ``"loss"``, the total to minimise.

        ``student`` / ``teacher`` are :class:`~lightning_distill.outputs.ModelOutputs` (from
        :meth:`forward_models`) or bare logits.
        """
        s = as_outputs(student, "the student")
        t = None if teacher is None else as_outputs(teacher, "the teacher")
        s_kd = s
        if t is not None and self.shared_vocab is not None:
            s_kd, t = self.teacher_view(s, t)
        step = self.step_info()
        counts = None
        if self.normalizes_tokens and s.logits is not None and s.logits.ndim == 3:
            counts = self.token_counts(batch, s.logits.shape[0] * s.logits.shape[1])
        terms: dict[str, Tensor] = {}
        contributions: dict[str, Tensor] = {}
        for key, objective in self.objectives.items():
            out = objective(s_kd if objective.needs_teacher else s, t, batch, step)
            # loss_normalization="tokens": each mean back to a sum over its positions (the step divides by the count)
            contributions[key] = out["loss"] if counts is None else out["loss"] * counts[objective.averages_over]
            for name, value in out.items():
                if name != "loss":
                    terms[f"{key}_{name}" if name in terms else name] = value
        if not contributions:
            raise ValueError(f"{type(self).__name__} has no objectives: pass at least one (e.g. CrossEntropy, LogitKD).")
        if self.training:  # each objective's contribution, named when the loss turns non-finite (check_finite_loss)
            self.__dict__["_step_terms"] = contributions
        total = self.combine(contributions, step)
        if counts is None:
            return {"loss": total, **terms}
        tokens = torch.where(counts["labels"] > 0, counts["labels"], counts["tokens"]).clamp_min(1)
        # "loss" (what is minimised) is a sum; the logs show it per token of this batch
        return {"loss": total, "loss_per_token": total.detach() / tokens, "tokens": tokens.float(), **terms}

    def training_terms(self, batch: Any) -> tuple[dict[str, Tensor], Batch]:
        """One training step's named loss terms (and the batch as the objectives saw it)."""
        b = self.prepare_batch(batch)
        student, teacher = self.forward_models(b)
        b = self.with_pseudo_labels(b, teacher)
        return self.distillation_losses(student, teacher, b), b

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        terms, b = self.training_terms(batch)
        loss = terms["loss"]
        if "loss_per_token" in terms:  # loss_normalization="tokens": log the per-token value as train/loss
            terms = {**terms, "loss": terms.pop("loss_per_token")}
        self.log_terms("train", terms, self.batch_size_of(b))
        return loss

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        if self.teacher_source is not None:
            self.teacher_source.after_optimizer_step()

    # ------------------------------------------------------------------ evaluation
    def forward(self, inputs: Any) -> Any:
        """Inference uses the student (a dict of named inputs is routed by keyword)."""
        b = Batch(None, inputs=dict(inputs)) if isinstance(inputs, dict) else Batch(inputs)
        return self.student_routing(self.student, b)

    def eval_logits(self, batch: Batch) -> tuple[Tensor, Optional[Tensor]]:
        """``(student logits, teacher logits or None)`` of an evaluation batch; several teachers' stacked logits
        ``[M, N, ...]`` (a :class:`~lightning_distill.teachers.TeacherEnsemble`) are evaluated as their
        ensemble, the log of their mean probabilities."""
        student = as_outputs(self.student_routing(self.student, batch), "the student").logits
        source = self.teacher_source
        teacher = source.eval_outputs(batch).logits if source is not None else None
        if teacher is not None and teacher.ndim == student.ndim + 1:
            teacher = teacher.float().log_softmax(-1).logsumexp(0) - math.log(teacher.shape[0])
        if teacher is not None and teacher.shape[-1] != student.shape[-1] and self.shared_vocab is not None:
            # vocab_alignment="truncate": the teacher's metrics over the student's vocabulary (its extra entries cut,
            # or the student's extra entries given probability 0)
            n = student.shape[-1]
            teacher = teacher[..., :n] if teacher.shape[-1] > n else F.pad(teacher, (0, n - teacher.shape[-1]),
                                                                              value=-math.inf)
        return student, teacher

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> Any:
        b = unpack_batch(batch)
        return as_outputs(self.student_routing(self.student, b), "the student").logits

    # ------------------------------------------------------------------ training start / end
    def on_fit_start(self) -> None:
        # Lightning warns that "N modules are in eval mode" right before on_train_start; a frozen teacher is
        # in eval mode on purpose. The filter is scoped to this interval (removed in on_train_start / teardown),
        # and on_train_start repeats the warning for any *other* module left in eval mode.
        if self.teacher_source is not None and self._eval_warning_filter is None:
            self._eval_warning_filter = warnings.catch_warnings()
            self._eval_warning_filter.__enter__()
            warnings.filterwarnings("ignore", message=_EVAL_WARNING)

    def _drop_eval_warning_filter(self) -> None:
        if self._eval_warning_filter is not None:
            self._eval_warning_filter.__exit__(None, None, None)
            self._eval_warning_filter = None

    def on_train_start(self) -> None:
        self._drop_eval_warning_filter()
        if self.teacher_source is not None:
            self.teacher_source.on_train_start(self)
        for objective in self.objectives.values():
            objective.on_train_start(self)
        self._batch_checked = False
        exempt = self.eval_mode_modules()
        stray = [n for n, m in self.named_modules() if not m.training and id(m) not in exempt]
        if stray:
            warnings.warn(
                f"{len(stray)} non-teacher module(s) are in eval mode at the start of training: {stray[:5]}",
                stacklevel=2,
            )

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> Optional[int]:
        super().on_train_batch_start(batch, batch_idx)
        if not self.__dict__.get("_batch_checked", True):  # the first batch: refused before any forward
            b = self.read_batch(batch)
            for objective in self.objectives.values():
                objective.check_batch(b)
            self._batch_checked = True
        return None

    def teardown(self, stage: str) -> None:
        self._drop_eval_warning_filter()

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        entry = checkpoint.setdefault(CKPT_KEY, {})
        entry["objectives"] = {k: o.extra_state() for k, o in self.objectives.items() if o.extra_state()}
        source = self.teacher_source
        if source is None:
            return
        entry["teacher_source"] = source.state_dict()
        if not source.save:
            state = checkpoint.get("state_dict", {})
            for name in source.modules():
                for key in [k for k in state if k.startswith(name + ".")]:
                    del state[key]

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        entry = checkpoint.get(CKPT_KEY, {})
        for key, state in entry.get("objectives", {}).items():
            if key in self.objectives:
                self.objectives[key].load_extra_state(state)
        if self.teacher_source is not None and "teacher_source" in entry:
            self.teacher_source.load_state_dict(entry["teacher_source"])

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False):  # type: ignore[override]
        """Re-attach the current teacher when the state dict was saved without it.

        ``function_matching`` only carries its random generator's state: a checkpoint trained with it
        loads into a module without it (e.g. for evaluation) and vice versa (the augmenter then keeps
        its own fresh state)."""
        state_dict = dict(state_dict)
        fm_keys = [k for k in state_dict if k.startswith(_FM + ".")]
        if self.function_matching is None:
            for key in fm_keys:
                del state_dict[key]
        elif not fm_keys:
            state_dict.update({f"{_FM}.{k}": v for k, v in self.function_matching.state_dict().items()})
        source = self.teacher_source
        if source is not None:
            for name, module in source.modules().items():
                if not any(k.startswith(name + ".") for k in state_dict):
                    state_dict.update({f"{name}.{k}": v for k, v in module.state_dict().items()})
        return super().load_state_dict(state_dict, strict=strict, assign=assign)
