"""Teacher sources: where a distillation step gets the teacher's outputs.

A step asks its source for :class:`~lightning_distill.outputs.ModelOutputs` of the batch and does not
know which source it is:

* :class:`FrozenTeacher` -- a network run under ``torch.no_grad()`` in eval mode. It carries the whole
  frozen-teacher contract: weights loaded safely (``weights_only=True``), ``requires_grad=False``,
  eval mode restored whenever something switches it to train mode (with one warning), never in an
  optimizer, left out of checkpoints unless ``save=True``, optionally held in a reduced precision;
* :class:`CachedTeacher` -- a :class:`FrozenTeacher` whose training-set outputs are computed once and
  looked up by sample index (:class:`~lightning_distill.cache.TeacherCache`); evaluation still runs
  the live teacher;
* :class:`EMATeacher` -- an exponential moving average of a network that trains alongside the student
  (mean-teacher style), frozen itself and kept in checkpoints.

Several frozen teachers are one :class:`FrozenTeacher` around a :class:`TeacherEnsemble`, whose output
is the teachers' logits stacked ``[M, N, C]``.

The host module (:class:`~lightning_distill.distiller.DistillationModule`) registers the source's
networks as its own submodules (``teacher``, ``ema_teacher``), so ``.to(device)``, ``state_dict`` and
the model summary see them under the names users know.

Example::

    >>> import torch
    >>> from lightning_distill.batch import Batch
    >>> from lightning_distill.models import DigitsCNN
    >>> from lightning_distill.teachers import FrozenTeacher
    >>> source = FrozenTeacher(DigitsCNN(), checkpoint="zoo:digits_cnn")
    >>> out = source.outputs(Batch(torch.zeros(2, 1, 8, 8)))
    >>> out.logits.shape, out.logits.requires_grad, source.module.training
    (torch.Size([2, 10]), False, False)
"""

from __future__ import annotations

import copy
import warnings
from typing import Any, Iterable, Mapping, Optional, Union

import torch
from torch import Tensor, nn

from lightning_distill.batch import Batch, require_index, resolve_routing
from lightning_distill.checkpoint import load_weights
from lightning_distill.features import FeatureCapture
from lightning_distill.outputs import ModelOutputs, as_outputs
from lightning_distill.validation import check_bool, check_choice, check_float

__all__ = ["CachedTeacher", "EMATeacher", "FrozenTeacher", "TeacherEnsemble", "TeacherSource"]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_FEAT = "feat:"  # key prefix of cached teacher features


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


class TeacherSource:
    """Interface of every teacher source (see the module docstring).

    Attributes:
        module: the network whose outputs the source gives (``None`` for a source without one).
        save: whether the source's frozen networks are stored in checkpoints.
        cacheable: whether the outputs for a sample never change during training (a frozen,
            eval-mode teacher): what a teacher-output cache needs.
        frozen: whether the teacher is fixed (``False`` for a teacher trained alongside the student).
    """

    module: Optional[nn.Module] = None
    save: bool = False
    cacheable: bool = False
    #: whether the teacher is fixed during training (a trained one cannot pseudo-label)
    frozen: bool = True

    def modules(self) -> dict[str, nn.Module]:
        """``{attribute name: network}`` that the host registers as its submodules."""
        return {}

    def frozen_modules(self) -> list[nn.Module]:
        """Networks that must stay frozen and in eval mode (never optimised)."""
        return []

    def capture(self, layers: Mapping[str, int], argument: str) -> None:
        """Record the outputs of these teacher layers (``{name: tuple element}``) in ``outputs().features``."""
        if layers:
            raise ValueError(f"`{argument}`: {type(self).__name__} has no teacher network to read layers from.")

    def outputs(self, batch: Batch) -> Optional[ModelOutputs]:
        """The teacher's outputs for a training batch (no gradient)."""
        raise NotImplementedError

    def eval_outputs(self, batch: Batch) -> Optional[ModelOutputs]:
        """The teacher's outputs for a validation / test batch (default: as in training)."""
        return self.outputs(batch)

    def probe_outputs(self, batch: Batch) -> Optional[ModelOutputs]:
        """The teacher's outputs for a shape probe (called in eval mode under ``no_grad``)."""
        return self.eval_outputs(batch)

    def train(self, mode: bool = True) -> None:
        """Follow the host's train / eval switch where the contract allows it (frozen networks stay in eval)."""

    def on_train_start(self, host: Any) -> None:
        """Called when training starts (a cache builds here)."""

    def after_optimizer_step(self) -> None:
        """Called after every optimizer step (an EMA moves here)."""

    def state_dict(self) -> dict[str, Any]:
        """Extra state for checkpoints (besides the registered networks' weights)."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`."""


class FrozenTeacher(TeacherSource):
    """A frozen network: the teacher of every classic distillation method.

    Args:
        module: the teacher network.
        checkpoint: optional weights -- a path (a ``Classifier`` or distillation ``.ckpt``, a
            RepDistiller ``{"model": ...}`` file, a plain state dict) or ``zoo:NAME`` for weights
            shipped with the package; loaded with ``weights_only=True``, keys must match exactly.
        dtype: ``"bfloat16"`` / ``"float16"`` hold the teacher in that precision (half its memory;
            floating inputs are cast to it, outputs come back as float32); ``None`` keeps it as built.
        train_mode: explicit opt-in to let the teacher follow train / eval mode (its BatchNorm
            statistics then change). Off by default.
        save: also store the teacher's weights in checkpoints (off by default: it is re-attached from
            the config when resuming).
        inputs: how a batch becomes the teacher's call (``"auto"``, ``"positional"``, ``"keywords"``,
            a :class:`~lightning_distill.batch.KeywordInputs` or a callable ``(model, batch) -> output``);
            the teacher may take other inputs than the student.
        prefix: prefix of the argument names in error messages (``"teacher_"`` for the presets, whose
            arguments are ``teacher_checkpoint``, ``teacher_dtype``, ``teacher_train_mode``).
    """

    cacheable = True

    def __init__(
        self,
        module: nn.Module,
        checkpoint: Optional[str] = None,
        dtype: Optional[str] = None,
        train_mode: bool = False,
        save: bool = False,
        inputs: Any = "auto",
        prefix: str = "",
    ) -> None:
        if not isinstance(module, nn.Module):
            raise TypeError(f"the teacher must be a torch.nn.Module, got {type(module).__name__}.")
        if dtype is not None:
            check_choice(f"{prefix}dtype", dtype, tuple(_DTYPES), hint=" None keeps the teacher as built.")
        self.train_mode = check_bool(f"{prefix}train_mode", train_mode)
        self.save = bool(save)
        self.checkpoint = checkpoint
        self.dtype = _DTYPES[dtype] if dtype is not None else None
        self.routing = resolve_routing(inputs, "teacher inputs")
        self.cacheable = not self.train_mode
        if checkpoint is not None:
            load_weights(module, checkpoint, argument=f"{prefix}checkpoint")
        module.requires_grad_(False)
        module.eval()
        if self.dtype is not None:
            module.to(self.dtype)
        self.module = module
        self._submodules = tuple(module.modules())
        self._capture: Optional[FeatureCapture] = None
        self._warned = False

    def modules(self) -> dict[str, nn.Module]:
        return {"teacher": self.module}

    def frozen_modules(self) -> list[nn.Module]:
        return [self.module]

    def capture(self, layers: Mapping[str, int], argument: str) -> None:
        if self._capture is not None:
            self._capture.remove()
            self._capture = None
        if layers:
            self._capture = FeatureCapture(self.module, list(layers), dict(layers), "the teacher", argument)

    @property
    def captured_layers(self) -> list[tuple[str, int]]:
        """``[(layer, tuple element)]`` recorded in ``outputs().features``."""
        c = self._capture
        return [] if c is None else [(name, c._index(name)) for name in c.layers]

    def train(self, mode: bool = True) -> None:
        if not self.train_mode:
            self.module.eval()

    def ensure_eval(self) -> None:
        """Put the teacher back in eval mode if something switched a submodule to train mode (warns once)."""
        if self.train_mode:
            return
        for m in self._submodules:
            if m.training:
                if not self._warned:
                    warnings.warn(
                        "a teacher submodule was in train mode (something called .train() on it); "
                        "lightning_distill put it back in eval mode. Pass teacher_train_mode=True to allow it.",
                        stacklevel=3,
                    )
                    self._warned = True
                self.module.eval()
                return

    def _route(self, batch: Batch) -> Any:
        if isinstance(self.module, TeacherEnsemble):  # every member gets its own keyword inputs
            return self.module(batch, self.routing)
        return self.routing(self.module, batch)

    def call(self, batch: Batch) -> Any:
        """``teacher(batch)`` through the input routing, with the reduced-precision casts (no mode / grad handling)."""
        if self.dtype is None:
            return self._route(batch)
        inp = batch.input
        if isinstance(inp, Tensor) and inp.is_floating_point():
            batch = batch._replace(input=inp.to(self.dtype))
        if batch.inputs is not None:
            batch = batch._replace(
                inputs={k: v.to(self.dtype) if isinstance(v, Tensor) and v.is_floating_point() else v
                        for k, v in batch.inputs.items()}
            )
        return _to_float32(self._route(batch))

    def run(self, batch: Batch) -> ModelOutputs:
        """One forward with the layer capture; features of a reduced-precision teacher come back as float32."""
        capture = self._capture
        if capture is None:
            return as_outputs(self.call(batch), "the teacher")
        with capture:
            raw = self.call(batch)
        out = as_outputs(raw, "the teacher")
        features = capture.pop()
        out.features = {k: v.float() for k, v in features.items()} if self.dtype is not None else features
        return out

    def outputs(self, batch: Batch) -> ModelOutputs:
        self.ensure_eval()
        with torch.no_grad():
            return self.run(batch)

    def probe_outputs(self, batch: Batch) -> ModelOutputs:
        return self.run(batch)


class CachedTeacher(TeacherSource):
    """A :class:`FrozenTeacher` whose training-set outputs come from a :class:`~lightning_distill.cache.TeacherCache`.

    The cache is filled (or reopened from disk) when training starts, from the training DataLoader's
    dataset in index order: the teacher's logits and every captured teacher layer. Each training step
    then looks its rows up by the batch's sample ``index`` instead of running the teacher; validation
    and test run the live teacher. Needs batches with an ``index``, a map-style training set without
    random transforms, and a teacher in eval mode.

    Args:
        teacher: the frozen teacher whose outputs are cached.
        cache: the cache (in memory or on disk).
    """

    cacheable = True

    def __init__(self, teacher: FrozenTeacher, cache: Any) -> None:
        from lightning_distill.cache import TeacherCache

        if not isinstance(cache, TeacherCache):
            raise TypeError(
                f"`teacher_cache` must be a lightning_distill.cache.TeacherCache or None, got {type(cache).__name__}. "
                "In YAML: teacher_cache: {class_path: lightning_distill.cache.TeacherCache, init_args: {storage: memory}}."
            )
        if not teacher.cacheable:
            raise ValueError("`teacher_cache` cannot be combined with teacher_train_mode=True: a train-mode teacher's "
                             "outputs change from step to step. Remove one of the two.")
        self.teacher = teacher
        self.cache = cache
        self.module = teacher.module

    @property
    def save(self) -> bool:  # type: ignore[override]
        return self.teacher.save

    @save.setter
    def save(self, value: bool) -> None:
        self.teacher.save = value

    def modules(self) -> dict[str, nn.Module]:
        return self.teacher.modules()

    def frozen_modules(self) -> list[nn.Module]:
        return self.teacher.frozen_modules()

    def capture(self, layers: Mapping[str, int], argument: str) -> None:
        self.teacher.capture(layers, argument)

    def train(self, mode: bool = True) -> None:
        self.teacher.train(mode)

    def tag(self) -> str:
        """Extra text in the cache key: whatever else decides the stored outputs."""
        dtype = f":{self.teacher.dtype}" if self.teacher.dtype is not None else ""
        return f"{dtype}:{self.teacher.captured_layers}"

    def _teacher_fn(self, batch: Batch) -> dict[str, Tensor]:
        out = self.teacher.outputs(batch)
        return {"logits": out.logits, **{_FEAT + name: f for name, f in out.features.items()}}

    _teacher_fn.takes_batch = True  # the cache runner hands it the whole batch (keyword inputs included)

    def on_train_start(self, host: Any) -> None:
        """Fill (or reopen) the cache from the training set.

        Disk caches under DDP: rank 0 builds, the others wait and reopen its files. Memory caches:
        every rank builds its own copy (each rank needs every row of its shard, whichever it gets).
        """
        trainer = host.trainer
        loader = trainer.train_dataloader
        if isinstance(loader, (list, tuple, dict)) or not hasattr(loader, "dataset"):
            raise ValueError("`teacher_cache` needs a single training DataLoader over a map-style dataset.")

        def build() -> None:
            self.cache.build(self._teacher_fn, loader.dataset, device=host.device, collate_fn=loader.collate_fn,
                             teacher=self.module, tag=type(host).__name__ + self.tag())

        if self.cache.storage == "disk" and trainer.world_size > 1:
            if trainer.is_global_zero:
                build()
            trainer.strategy.barrier("teacher_cache")
            if not trainer.is_global_zero:
                build()
        else:
            build()

    def outputs(self, batch: Batch) -> ModelOutputs:
        index = require_index(batch, "`teacher_cache` looks teacher outputs up by sample index")
        device = batch.input.device if isinstance(batch.input, Tensor) else None
        found = self.cache.lookup(index, device=device)
        if not isinstance(found, dict):
            return ModelOutputs(found)
        features = {k[len(_FEAT):]: v for k, v in found.items() if k.startswith(_FEAT)}
        return ModelOutputs(found["logits"], features)

    def eval_outputs(self, batch: Batch) -> ModelOutputs:
        return self.teacher.outputs(batch)

    def probe_outputs(self, batch: Batch) -> ModelOutputs:
        return self.teacher.probe_outputs(batch)

    def state_dict(self) -> dict[str, Any]:
        return {"teacher_cache": self.cache.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if "teacher_cache" in state:
            self.cache.load_state_dict(state["teacher_cache"])


class EMATeacher(TeacherSource):
    r"""An exponential moving average of a network that trains alongside the student.

    After every optimizer step, :math:`\theta_{ema} \leftarrow d\,\theta_{ema} + (1-d)\,\theta` for
    parameters and floating-point buffers (integer buffers are copied). The copy is frozen, always in
    eval mode, registered as ``ema_teacher`` and kept in checkpoints (it cannot be rebuilt from the
    config). Its outputs are computed under ``torch.no_grad()``.

    Args:
        of: the live network being averaged (trained by the host's optimizer).
        decay: :math:`d \in [0, 1)`; the EMA starts at the network's current weights.
        inputs: how a batch becomes the network's call (see :class:`FrozenTeacher`).
    """

    save = True

    def __init__(self, of: nn.Module, decay: float, inputs: Any = "auto") -> None:
        self.decay = check_float(
            "ema_decay", decay, 0.0, 1.0, high_open=True, what="in [0, 1) or None",
            hint=" Typical values: 0.99 (short runs), 0.999 (long runs); None distills from the online teacher directly.",
        )
        self.live = (of,)  # a tuple: the live network is the host's, not this source's
        self.routing = resolve_routing(inputs, "teacher inputs")
        ema = copy.deepcopy(of)
        ema.requires_grad_(False)
        ema.eval()
        self.module = ema
        self._submodules = tuple(ema.modules())

    def modules(self) -> dict[str, nn.Module]:
        return {"ema_teacher": self.module}

    def frozen_modules(self) -> list[nn.Module]:
        return [self.module]

    def train(self, mode: bool = True) -> None:
        self.module.eval()

    def outputs(self, batch: Batch) -> ModelOutputs:
        if any(m.training for m in self._submodules):
            self.module.eval()
        with torch.no_grad():
            return as_outputs(self.routing(self.module, batch), "the EMA teacher")

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        d, live = self.decay, self.live[0]
        for (name, e), (live_name, p) in zip(self.module.named_parameters(), live.named_parameters()):
            assert name == live_name, (name, live_name)
            e.mul_(d).add_(p.detach(), alpha=1.0 - d)
        for (name, e), (live_name, b) in zip(self.module.named_buffers(), live.named_buffers()):
            assert name == live_name, (name, live_name)
            if e.is_floating_point():
                e.mul_(d).add_(b, alpha=1.0 - d)
            else:
                e.copy_(b)


class TeacherEnsemble(nn.ModuleList):
    """Several teachers as *one* module whose ``forward`` stacks their logits, ``[M, N, C]``.

    A ``ModuleList`` (``ensemble[m]`` is teacher m, state-dict keys ``0.*``, ``1.*``, ...); wrapped in a
    :class:`FrozenTeacher`, every member obeys the frozen-teacher contract at once.

    Example::

        >>> import torch
        >>> from lightning_distill.models import DigitsCNN
        >>> TeacherEnsemble([DigitsCNN(), DigitsCNN()])(torch.zeros(3, 1, 8, 8)).shape
        torch.Size([2, 3, 10])
    """

    def forward(self, inputs: Any, routing: Any = None) -> Tensor:
        """The members' logits stacked; with ``routing`` (and ``inputs`` a :class:`~lightning_distill.batch.Batch`)
        every member is called through it, so each gets the keyword inputs its ``forward`` names."""
        if routing is not None:
            return self.stack([routing(teacher, inputs) for teacher in self])
        return self.stack([teacher(inputs) for teacher in self])

    def stack(self, raw_outputs: list[Any]) -> Tensor:
        """``[M, N, ...]`` from the members' raw outputs (any type :func:`as_outputs` reads)."""
        outputs = [as_outputs(out, f"teacher {m}").logits for m, out in enumerate(raw_outputs)]
        counts = [int(o.shape[-1]) for o in outputs]
        if len(set(counts)) != 1:
            listing = ", ".join(f"teacher {m} ({type(t).__name__}) outputs {c}" for m, (t, c) in enumerate(zip(self, counts)))
            raise ValueError(
                f"the teachers disagree on the number of classes: {listing}. Every teacher must predict the same "
                "classes; build them with the same num_classes (init_args.num_classes in YAML)."
            )
        shapes = [tuple(o.shape) for o in outputs]
        if len(set(shapes)) != 1:
            listing = ", ".join(f"teacher {m} ({type(t).__name__}): {s}" for m, (t, s) in enumerate(zip(self, shapes)))
            raise ValueError(f"the teachers' outputs differ in shape: {listing}; they must predict the same classes.")
        return torch.stack(outputs)


TeacherLike = Union[nn.Module, TeacherSource, None]


def as_source(teacher: TeacherLike) -> Optional[TeacherSource]:
    """A :class:`TeacherSource` from a source, a bare network (a :class:`FrozenTeacher` with defaults) or ``None``."""
    if teacher is None or isinstance(teacher, TeacherSource):
        return teacher
    if isinstance(teacher, nn.Module):
        return FrozenTeacher(teacher)
    raise TypeError(
        f"`teacher` must be a torch.nn.Module, a lightning_distill.teachers.TeacherSource or None, got "
        f"{type(teacher).__name__}."
    )


def frozen_parameters(source: Optional[TeacherSource]) -> Iterable[nn.Parameter]:
    """Every parameter of the source's frozen networks."""
    if source is None:
        return ()
    return [p for m in source.frozen_modules() for p in m.parameters()]


