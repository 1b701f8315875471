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

from lightning_distill.augment import FunctionMatching
from lightning_distill.cache import TeacherCache
from lightning_distill.checkpoint import load_weights
from lightning_distill.losses import check_temperature
from lightning_distill.module import Batch, TrainingModule

__all__ = ["DistillationModule", "check_alpha", "check_temperature"]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_COMPILE = ("student", "teacher", "both")

# Lightning warns about every module in eval mode when fit starts; the frozen teacher is in
# eval mode on purpose. The filter hides that one message; :meth:`on_train_start` repeats the
# warning for any *other* module left in eval mode, so nothing else goes unreported.
warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode at the start of training")

_TEACHER = "teacher"
_FM = "function_matching"


def check_alpha(value: Any, name: str = "alpha") -> float:
    """Validate a mixing weight in [0, 1]."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= float(value) <= 1.0:
        raise ValueError(
            f"`{name}` must be in [0, 1] (the weight of the distillation term; 1 - {name} weighs the "
            f"hard-label loss), got {value!r}."
        )
    return float(value)


def _to_float32(output: Any) -> Any:
    """Floating tensors of a (possibly nested) output as float32 (a reduced-precision teacher's)."""
    if isinstance(output, Tensor):
        return output.float() if output.is_floating_point() else output
    if isinstance(output, tuple) and hasattr(output, "_fields"):  # NamedTuple
        return type(output)(*(_to_float32(o) for o in output))
    if isinstance(output, (tuple, list)):
        return type(output)(_to_float32(o) for o in output)
    if isinstance(output, dict):
        return {k: _to_float32(v) for k, v in output.items()}
    return output


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
        function_matching: a :class:`~lightning_distill.augment.FunctionMatching` to apply to every
            training batch *once*, before both forwards, so teacher and student see the identical
            augmented (and mixup / cutmix-mixed) input (Beyer et al. 2022, arXiv:2106.05237).
            Mixed samples lose their hard label (pure distillation for them).
        pseudo_labels: confidence threshold in [0, 1] to give unlabelled samples (target
            ``ignore_index`` or no target at all) the teacher's top-1 class as a hard label
            where the teacher's softmax probability of it is at least the threshold; ``None``
            (default) keeps them label-free (distillation terms only).
        teacher_dtype: ``"bfloat16"`` / ``"float16"`` hold the frozen teacher in that dtype (half
            its memory; its inputs are cast, its logits come back as float32). ``None`` keeps it as built.
        channels_last: put student and teacher (and 4-D inputs) in ``torch.channels_last`` memory
            format -- faster convolutions on GPUs with tensor cores and on recent CPUs.
        teacher_cache: a :class:`~lightning_distill.cache.TeacherCache`: the teacher's training-set
            outputs (logits, and captured features for feature strategies) are computed once when
            training starts, keyed by sample index, and looked up at every step instead of running
            the teacher (in memory, or on disk memory-mapped and reused across runs; keyed by
            teacher weights + dataset fingerprint, so a stale cache is never used). Needs batches
            with an ``index`` and a training set without random transforms; validation and test
            always run the live teacher. See :mod:`lightning_distill.cache` for the tolerances.
        compile: ``"student"``, ``"teacher"`` or ``"both"``: ``torch.compile`` those modules in
            place (``nn.Module.compile``: parameter names and checkpoints are unchanged) when
            fitting starts. Needs a working compiler toolchain (inductor).
        **kwargs: optimizer / scheduler / metric options of :class:`TrainingModule`.
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: Optional[nn.Module] = None,
        teacher_checkpoint: Optional[str] = None,
        save_teacher: bool = False,
        teacher_train_mode: bool = False,
        function_matching: Optional[FunctionMatching] = None,
        pseudo_labels: Optional[float] = None,
        teacher_dtype: Optional[str] = None,
        channels_last: bool = False,
        compile: Optional[str] = None,
        teacher_cache: Optional[TeacherCache] = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if teacher_cache is not None:
            self._check_teacher_cache(teacher_cache, teacher, teacher_train_mode, function_matching)
        if function_matching is not None and not isinstance(function_matching, FunctionMatching):
            raise TypeError(
                "`function_matching` must be a lightning_distill.augment.FunctionMatching or None, got "
                f"{type(function_matching).__name__}. In YAML: function_matching: {{class_path: "
                "lightning_distill.augment.FunctionMatching, init_args: {mixup_alpha: 1.0}}."
            )
        if pseudo_labels is not None:
            pseudo_labels = check_alpha(pseudo_labels, "pseudo_labels")
            if teacher is None:
                raise ValueError(
                    f"`pseudo_labels` needs a frozen teacher to label samples, but {type(self).__name__} has none "
                    "(strategies without a teacher, or whose teacher trains alongside the student, such as "
                    "OnlineDistillation, cannot pseudo-label). Remove pseudo_labels."
                )
        if teacher_dtype is not None and teacher_dtype not in _DTYPES:
            raise ValueError(
                f"`teacher_dtype` must be one of {tuple(_DTYPES)} or None (keep the teacher as built), got "
                f"{teacher_dtype!r}."
            )
        if compile is not None and compile not in _COMPILE:
            raise ValueError(f"`compile` must be one of {_COMPILE} or None (no torch.compile), got {compile!r}.")
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
        self.save_hyperparameters(
            ignore=["student", "students", "teacher", "teachers", "optimizer", "lr_scheduler", "teacher_cache", "function_matching"]
        )
        self.student = student
        self.teacher = teacher
        self.teacher_checkpoint = teacher_checkpoint
        self.save_teacher = save_teacher
        self.teacher_train_mode = teacher_train_mode
        self.function_matching = function_matching
        self.pseudo_labels = pseudo_labels
        self.teacher_dtype = _DTYPES[teacher_dtype] if teacher_dtype is not None else None
        self.channels_last = bool(channels_last)
        self.compile_modules = compile
        self.teacher_cache = teacher_cache
        self._cached: Optional[dict[str, Tensor]] = None  # this step's cached teacher outputs
        self._mixed: Optional[Tensor] = None  # samples function matching mixed in this step
        if teacher is not None:
            if teacher_checkpoint is not None:
                load_weights(teacher, teacher_checkpoint, argument="teacher_checkpoint")
            teacher.requires_grad_(False)
            teacher.eval()
            if self.teacher_dtype is not None:
                teacher.to(self.teacher_dtype)
        if self.channels_last:
            student.to(memory_format=torch.channels_last)
            if teacher is not None:
                teacher.to(memory_format=torch.channels_last)
        self._teacher_modules: tuple[nn.Module, ...] = tuple(teacher.modules()) if teacher is not None else ()
        self._warned_teacher_mode = False

    # ------------------------------------------------------------------ teacher cache
    #: whether the strategy can train from cached teacher outputs (its teacher is fixed and its
    #: training step reads only the teacher's logits / the features of :meth:`teacher_cache_outputs`)
    supports_teacher_cache: bool = True

    def _check_teacher_cache(self, cache: Any, teacher: Any, teacher_train_mode: bool, function_matching: Any) -> None:
        name = type(self).__name__
        if not isinstance(cache, TeacherCache):
            raise TypeError(
                f"`teacher_cache` must be a lightning_distill.cache.TeacherCache or None, got {type(cache).__name__}. "
                "In YAML: teacher_cache: {class_path: lightning_distill.cache.TeacherCache, init_args: {storage: memory}}."
            )
        if not self.supports_teacher_cache:
            raise ValueError(
                f"{name} cannot use `teacher_cache`: its teacher changes during training or its step needs more "
                "than the teacher's logits. Remove teacher_cache."
            )
        if teacher is None:
            raise ValueError(f"`teacher_cache` was given but {name} has no frozen teacher to cache.")
        if teacher_train_mode:
            raise ValueError("`teacher_cache` cannot be combined with teacher_train_mode=True: a train-mode teacher's "
                             "outputs change from step to step. Remove one of the two.")
        if function_matching is not None:
            raise ValueError(
                "`teacher_cache` cannot be combined with `function_matching`: the teacher must see each step's "
                "freshly augmented input, which no cache holds. Remove teacher_cache (or function_matching)."
            )

    def teacher_cache_outputs(self, inputs: Any) -> dict[str, Tensor]:
        """What the cache stores per training sample: ``{"logits": ...}`` (feature strategies add
        their captured teacher features)."""
        return {"logits": self.teacher_forward(self.to_memory_format(inputs))}

    def to_memory_format(self, inputs: Any) -> Any:
        """4-D inputs in ``channels_last`` when that option is on (as the models are)."""
        if self.channels_last and isinstance(inputs, Tensor) and inputs.ndim == 4:
            return inputs.contiguous(memory_format=torch.channels_last)
        return inputs

    def teacher_cache_tag(self) -> str:
        """Extra text in the cache key: whatever else decides :meth:`teacher_cache_outputs`."""
        return type(self).__name__ + (f":{self.teacher_dtype}" if self.teacher_dtype is not None else "")

    def build_teacher_cache(self) -> None:
        """Fill (or reopen) the cache from the training set; called when training starts.

        Disk caches under DDP: rank 0 builds, the others wait and reopen its files. Memory caches:
        every rank builds its own copy (each rank needs every row of its shard, whichever it gets).
        """
        cache, trainer = self.teacher_cache, self.trainer
        loader = trainer.train_dataloader
        if isinstance(loader, (list, tuple)) or isinstance(loader, dict) or not hasattr(loader, "dataset"):
            raise ValueError("`teacher_cache` needs a single training DataLoader over a map-style dataset.")

        def build() -> None:
            cache.build(self.teacher_cache_outputs, loader.dataset, device=self.device, collate_fn=loader.collate_fn,
                        teacher=self.teacher, tag=self.teacher_cache_tag())

        if cache.storage == "disk" and trainer.world_size > 1:
            if trainer.is_global_zero:
                build()
            trainer.strategy.barrier("teacher_cache")
            if not trainer.is_global_zero:
                build()
        else:
            build()

    def cached_teacher_outputs(self, batch: Batch) -> dict[str, Tensor]:
        if batch.index is None:
            raise ValueError(
                "`teacher_cache` looks teacher outputs up by sample index, but the training batches carry none: use "
                "a dataset returning (input, target, index) -- the package's data modules do, or wrap yours in "
                "lightning_distill.data.IndexedDataset."
            )
        out = self.teacher_cache.lookup(torch.as_tensor(batch.index), device=self.device)
        return out if isinstance(out, dict) else {"logits": out}

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
            return self.call_teacher(self.teacher, inputs)

    def call_teacher(self, teacher: nn.Module, inputs: Any) -> Any:
        """``teacher(inputs)``, with inputs cast to ``teacher_dtype`` and outputs back to float32 when
        the teacher is held in reduced precision (no grad / mode handling: see :meth:`teacher_forward`)."""
        if self.teacher_dtype is None:
            return teacher(inputs)
        if isinstance(inputs, Tensor) and inputs.is_floating_point():
            inputs = inputs.to(self.teacher_dtype)
        return _to_float32(teacher(inputs))

    def on_train_start(self) -> None:
        if self.teacher_cache is not None:
            self.build_teacher_cache()
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
        if self.teacher_cache is not None:
            checkpoint["teacher_cache"] = self.teacher_cache.state_dict()
        if self.teacher is not None and not self.save_teacher:
            state = checkpoint.get("state_dict", {})
            for key in [k for k in state if k.startswith(_TEACHER + ".")]:
                del state[key]

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.teacher_cache is not None and "teacher_cache" in checkpoint:
            self.teacher_cache.load_state_dict(checkpoint["teacher_cache"])

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
        if self.teacher is not None and not any(k.startswith(_TEACHER + ".") for k in state_dict):
            state_dict.update({f"{_TEACHER}.{k}": v for k, v in self.teacher.state_dict().items()})
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    # ------------------------------------------------------------------ probing
    def probe_outputs(self, example: Any) -> tuple[Any, Any]:
        teacher_out = self.call_teacher(self.teacher, example) if self.teacher is not None else None
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
        cached = self._cached
        teacher_logits = cached["logits"] if cached is not None else self.teacher_forward(inputs)
        student_logits = self.student(inputs)
        return student_logits, teacher_logits

    def prepare_batch(self, batch: Any) -> Batch:
        """The training batch both models see: unpacked, in channels_last if asked, and through
        ``function_matching`` (one augmentation for teacher and student) when it is set."""
        b = self.unpack_batch(batch)
        inputs = self.to_memory_format(b.input)
        self._mixed = None
        if self.function_matching is not None:
            inputs, target, info = self.function_matching(inputs, b.target, ignore_index=self.ignore_index)
            self._mixed = info.get("mixed")  # mixed samples stay label-free, even with pseudo_labels
            return b._replace(input=inputs, target=target)
        return b._replace(input=inputs)

    def with_pseudo_labels(self, batch: Batch, teacher_logits: Any) -> Batch:
        """Give unlabelled samples the teacher's confident top-1 class (``pseudo_labels``)."""
        if self.pseudo_labels is None or not isinstance(teacher_logits, Tensor):
            return batch
        probs = self.teacher_probabilities(teacher_logits.detach())
        if probs.ndim == 3 and batch.mask is None:
            raise ValueError(
                "`pseudo_labels` with token-level logits [N, L, V] needs the batch's `mask`: without it padding "
                "(target ignore_index) cannot be told from unlabelled tokens. Use a data module that yields a mask "
                "(lightning_distill.data.TextDataModule does) or remove pseudo_labels."
            )
        with torch.no_grad():
            confidence, guess = probs.max(-1)
            guess = torch.where(confidence >= self.pseudo_labels, guess, torch.full_like(guess, self.ignore_index))
            if batch.target is None:
                target = guess
            else:
                target = torch.where(batch.target == self.ignore_index, guess, batch.target)
            if batch.mask is not None and target.ndim == batch.mask.ndim:
                target = torch.where(batch.mask.bool(), target, torch.full_like(target, self.ignore_index))
            mixed = getattr(self, "_mixed", None)
            if mixed is not None and mixed.shape == target.shape[:1]:
                keep = mixed.to(target.device).reshape(-1, *([1] * (target.ndim - 1)))
                target = torch.where(keep, torch.full_like(target, self.ignore_index), target)
        return batch._replace(target=target)

    def teacher_probabilities(self, teacher_logits: Tensor) -> Tensor:
        """The teacher's class probabilities at T=1 (what pseudo-labels are read from)."""
        return teacher_logits.float().softmax(-1)

    def training_terms(self, batch: Any) -> tuple[dict[str, Tensor], Batch]:
        """One training step's named loss terms (and the batch as the losses saw it)."""
        b = self.prepare_batch(batch)
        self._cached = self.cached_teacher_outputs(b) if self.teacher_cache is not None else None
        try:
            student_logits, teacher_logits = self.forward_models(b.input)
        finally:
            self._cached = None
        b = self.with_pseudo_labels(b, teacher_logits)
        return self.distillation_losses(student_logits, teacher_logits, b), b

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        terms, b = self.training_terms(batch)
        self.log_terms("train", terms, self.batch_size_of(b))
        return terms["loss"]

    def should_log_step(self) -> bool:
        """Whether this training step's terms go to ``self.log``.

        Lightning writes step metrics to the loggers only every ``log_every_n_steps`` steps, but
        each ``self.log`` call costs about 0.4 ms (on the CPU, more than the whole forward of a
        small student). The terms are therefore handed to Lightning on exactly the steps it writes
        (``(batches_that_stepped + 1) % log_every_n_steps == 0``), plus the first and the last
        batch of every epoch and the last step of a ``max_steps`` run, so the progress bar and
        ``trainer.callback_metrics`` hold current values at those points (between them, callbacks
        reading ``train/*`` see the last logged step: set ``log_every_n_steps=1`` for every step).
        Without a trainer (a manual call) it always logs.
        """
        trainer = self._trainer
        if trainer is None:
            return True
        loop = trainer.fit_loop.epoch_loop
        n = max(int(trainer.log_every_n_steps), 1)
        max_steps = int(trainer.max_steps or -1)
        return (
            (loop._batches_that_stepped + 1) % n == 0
            or loop.batch_progress.current.ready <= 1
            or bool(trainer.is_last_batch)
            or bool(trainer.should_stop)
            or (max_steps > 0 and trainer.global_step + 1 >= max_steps)
        )

    def log_terms(self, stage: str, terms: Mapping[str, Tensor], batch_size: int) -> None:
        """Log every loss term as ``{stage}/{name}`` (``loss`` also on the progress bar).

        Training terms are logged on the steps where Lightning writes them (:meth:`should_log_step`).
        """
        if stage == "train" and not self.should_log_step():
            return
        self.log_dict(
            {f"{stage}/{name}": value.detach() for name, value in terms.items() if name != "loss"},
            on_step=True,
            on_epoch=False,
            batch_size=batch_size,
        )
        self.log(f"{stage}/loss", terms["loss"].detach(), prog_bar=True, on_step=True, on_epoch=False, batch_size=batch_size)

    def on_fit_start(self) -> None:
        if self.compile_modules in ("student", "both"):
            self.student.compile()
        if self.compile_modules in ("teacher", "both") and self.teacher is not None:
            self.teacher.compile()

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
