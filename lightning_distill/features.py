"""Capture intermediate outputs of named submodules with forward hooks -- no model rewrite.

Layers are named as in ``model.named_modules()`` (``"layer2"``, ``"blocks.3"``,
``"block2.0"``). A module's output may be a tensor or a tuple / list (e.g. a transformer block
returning ``(hidden, attention)``); ``select`` picks the element. A name ending in ``":input"``
(``"head:input"``) captures what *enters* that module (its first positional argument) instead --
e.g. the pooled feature a classifier layer reads.

Example::

    >>> import torch
    >>> from lightning_distill.features import FeatureCapture
    >>> from lightning_distill.models import DigitsCNN
    >>> model = DigitsCNN()
    >>> capture = FeatureCapture(model, ["block1", "block2"])
    >>> with capture:
    ...     logits = model(torch.zeros(2, 1, 8, 8))
    >>> {name: tuple(t.shape) for name, t in capture.outputs.items()}
    {'block1': (2, 16, 8, 8), 'block2': (2, 32, 4, 4)}
"""

from __future__ import annotations

import difflib
import functools
from typing import Any, Mapping, Optional, Sequence, Union

from torch import Tensor, nn

__all__ = ["INPUT_SUFFIX", "LAYER_MAPPINGS", "FeatureCapture", "check_layer_names", "layer_names", "map_layers"]

#: Strategies of :func:`map_layers`.
LAYER_MAPPINGS = ("uniform", "skip", "last")
#: a layer name with this suffix captures the module's input rather than its output
INPUT_SUFFIX = ":input"


def _module_name(name: str) -> str:
    return name[: -len(INPUT_SUFFIX)] if name.endswith(INPUT_SUFFIX) else name


def layer_names(model: nn.Module) -> list[str]:
    """Every hookable submodule name of ``model`` (``named_modules`` without the root)."""
    return [name for name, _ in model.named_modules() if name]


def check_layer_names(model: nn.Module, names: Sequence[str], role: str, argument: str) -> None:
    """Raise a ValueError listing valid names when any of ``names`` is not a submodule of ``model``."""
    valid = layer_names(model)
    valid_set = set(valid)
    unknown = [n for n in (_module_name(n) for n in names) if n not in valid_set]
    if not unknown:
        return
    hints = []
    for name in unknown:
        close = difflib.get_close_matches(name, valid, n=3)
        hints.append(f"{name!r}" + (f" (did you mean {', '.join(map(repr, close))}?)" if close else ""))
    shown = valid if len(valid) <= 40 else valid[:40] + [f"... {len(valid) - 40} more"]
    raise ValueError(
        f"`{argument}`: {role} ({type(model).__name__}) has no submodule named {', '.join(hints)}. "
        f"Valid names (from named_modules()): {shown}."
    )


def map_layers(
    teacher_layers: Sequence[str], student_layers: Sequence[str], mapping: str = "uniform", step: Optional[int] = None
) -> list[tuple[str, str]]:
    r"""Pair M student layers with M of N teacher layers (the layer mappings of TinyBERT and PKD).

    With layers numbered from 1, student layer :math:`j` is paired with teacher layer :math:`\varphi(j)`:

    * ``"uniform"``: :math:`\varphi(j) = \lfloor j N / M \rfloor` (TinyBERT; 4 of 12 -> 3, 6, 9, 12);
    * ``"skip"``: :math:`\varphi(j) = j k`, every k-th teacher layer, ``k = step`` (default
      :math:`\lfloor N/M \rfloor`; PKD-skip);
    * ``"last"``: :math:`\varphi(j) = N - M + j`, the last M teacher layers (PKD-last).

    TinyBERT: Jiao et al. 2020, arXiv:1909.10351; PKD ("Patient Knowledge Distillation for BERT
    Model Compression"): Sun et al. 2019, arXiv:1908.09355.

    Returns ``[(teacher_layer, student_layer), ...]`` in student order.

    Example::

        >>> map_layers([f"t{i}" for i in range(1, 13)], ["s1", "s2", "s3", "s4"], "uniform")
        [('t3', 's1'), ('t6', 's2'), ('t9', 's3'), ('t12', 's4')]
        >>> map_layers([f"t{i}" for i in range(1, 13)], ["s1", "s2", "s3", "s4"], "last")
        [('t9', 's1'), ('t10', 's2'), ('t11', 's3'), ('t12', 's4')]
    """
    n, m = len(teacher_layers), len(student_layers)
    if mapping not in LAYER_MAPPINGS:
        raise ValueError(f"`mapping` must be one of {LAYER_MAPPINGS}, got {mapping!r}.")
    if m == 0 or n == 0:
        raise ValueError(f"`teacher_layers` and `student_layers` must be non-empty, got {n} and {m} names.")
    if m > n:
        raise ValueError(
            f"`student_layers` has {m} names but `teacher_layers` only {n}: each student layer needs its own "
            "teacher layer; list more teacher layers or fewer student layers."
        )
    if mapping == "uniform":
        phi = [max(1, (j * n) // m) for j in range(1, m + 1)]
    elif mapping == "skip":
        k = (n // m) if step is None else int(step)
        if k < 1 or m * k > n:
            raise ValueError(f"`mapping_step`={step!r} does not fit: {m} student layers x step {k} > {n} teacher layers.")
        phi = [j * k for j in range(1, m + 1)]
    else:
        phi = [n - m + j for j in range(1, m + 1)]
    return [(teacher_layers[p - 1], s) for p, s in zip(phi, student_layers)]


class FeatureCapture:
    """Forward hooks on named submodules of one model, collecting their outputs.

    Hooks stay registered but record only while the capture is active (``with capture:`` or
    :meth:`start` / :meth:`stop`), so a model used elsewhere pays nothing. Outputs are kept as
    they are -- with their autograd graph for a trained model, detached when the forward ran
    under ``no_grad`` -- in ``capture.outputs`` (a dict in the order of ``layers``).

    Args:
        model: the network to observe.
        layers: submodule names, as in ``model.named_modules()``.
        select: which element to keep when a layer returns a tuple / list: one int for all
            layers or a mapping ``{layer: index}``; default 0 (the first element).
        role: ``"teacher"`` / ``"student"``, used in error messages.
        argument: the user-facing argument that named the layers, used in error messages.
    """

    def __init__(
        self,
        model: nn.Module,
        layers: Sequence[str],
        select: Union[int, Mapping[str, int], None] = None,
        role: str = "model",
        argument: str = "layers",
    ) -> None:
        layers = list(dict.fromkeys(layers))  # unique, order kept
        check_layer_names(model, layers, role, argument)
        self.layers = layers
        self.select = select
        self.role = role
        self.outputs: dict[str, Tensor] = {}
        self._versions: dict[str, int] = {}
        self._active = False
        modules = dict(model.named_modules())
        self._handles = [
            modules[_module_name(name)].register_forward_pre_hook(self._hook(name))
            if name.endswith(INPUT_SUFFIX)
            else modules[name].register_forward_hook(self._hook(name))
            for name in layers
        ]

    def _index(self, name: str) -> int:
        if isinstance(self.select, Mapping):
            return int(self.select.get(name, 0))
        return int(self.select or 0)

    def _hook(self, name: str) -> Any:
        # a partial of a bound method (not a closure), so models carrying these hooks stay picklable
        return functools.partial(self._record, name)

    def _record(self, name: str, module: nn.Module, args: Any, output: Any = None) -> None:
        if not self._active:
            return
        if name.endswith(INPUT_SUFFIX):  # a pre-hook: the module's first positional input
            output = args[0] if args else None
        if isinstance(output, (tuple, list)):
            index = self._index(name)
            if not -len(output) <= index < len(output):
                raise ValueError(
                    f"{self.role} layer {name!r} returns {len(output)} outputs; select index {index} is out of range."
                )
            output = output[index]
        if not isinstance(output, Tensor):
            raise TypeError(
                f"{self.role} layer {name!r} returned a {type(output).__name__}, not a tensor; "
                "choose a submodule that returns a tensor or a tuple of tensors (with `select`)."
            )
        self.outputs[name] = output
        # inference tensors have no version counter (and cannot be modified in place anyway)
        self._versions[name] = None if output.is_inference() else output._version

    def start(self) -> None:
        self.outputs = {}
        self._versions: dict[str, int] = {}
        self._active = True

    def stop(self) -> dict[str, Tensor]:
        self._active = False
        missing = [n for n in self.layers if n not in self.outputs]
        if missing:
            raise RuntimeError(
                f"{self.role} layers {missing} were not called during the forward pass; "
                "hook modules that the model's forward actually runs."
            )
        changed = [
            n for n in self.layers if self._versions[n] is not None and self.outputs[n]._version != self._versions[n]
        ]
        if changed:
            raise RuntimeError(
                f"{self.role} layers {changed} had their output modified in place later in the forward pass "
                "(e.g. by ReLU(inplace=True)), so the captured values are not that layer's output. Hook the "
                "module after the in-place operation, or make that operation out of place."
            )
        return {name: self.outputs[name] for name in self.layers}

    def __enter__(self) -> "FeatureCapture":
        self.start()
        return self

    def __exit__(self, exc_type: Optional[type], exc: Optional[BaseException], tb: Any) -> None:
        if exc_type is not None:
            self._active = False
            return
        self.outputs = self.stop()

    def pop(self) -> dict[str, Tensor]:
        """The captured outputs, forgotten by the capture (so no graph outlives the step)."""
        outputs, self.outputs = self.outputs, {}
        return outputs

    def remove(self) -> None:
        """Unregister the hooks for good."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

