"""The distilled student out of the library: ``lightning-distill export``.

::

    lightning-distill export --config CONFIG.yaml --ckpt_path RUN.ckpt --format FORMAT [--out PATH]

rebuilds the module from the config that trained it (the run's own ``config.yaml``, saved next to its
``checkpoints/``, works too), loads the checkpoint and writes the **student alone** -- the ``student`` of a
distillation module, the ``model`` of a :class:`~lightning_distill.Classifier`; never the teacher. The teacher's
weights are not even read (the config's ``teacher_checkpoint`` is set to null: a teacher file that has moved does
not stop an export). Formats:

``safetensors``
    the student's ``state_dict`` (``FILE.safetensors``, keys as ``Student().state_dict()``), loadable with
    ``load_student(path, Student(...))``, ``teacher_checkpoint: FILE.safetensors`` or a ``zoo:NAME``. Tied weights
    are stored once.
``onnx``
    an ONNX graph (default opset of the exporter, weights inside the file: students under ONNX's 2 GB limit) through
    torch's ``torch.export``-based exporter, ``torch.onnx.export(..., dynamo=True)``, which needs ``onnxscript``.
    It is the default since torch 2.9; the TorchScript exporter (``dynamo=False``) still runs on torch 2.14 but
    warns that it will be removed, and it has no ``dynamic_shapes``.
``torch_export``
    a ``torch.export`` program (``FILE.pt2``): ``torch.export.load(path).module()(*inputs)``.
``hf``
    a Hugging Face model directory (:func:`lightning_distill.hf.save_pretrained`, with the datamodule's tokenizer
    when it has one) for ``AutoModelFor...from_pretrained``; students that are ``transformers`` models only.

The ``onnx`` and ``torch_export`` graphs take the tensors the student is called with in training -- the batch's
input (``input``, or ``input_ids`` for token ids) for positional students, the named inputs its ``forward``
accepts (``input_ids``, ``attention_mask``, ...) for keyword-routed ones such as Hugging Face models -- in that
order, and return one tensor, ``logits``: a Hugging Face model's output object is reduced to its ``.logits``
(and its key/value cache switched off) by a small wrapper, :class:`LogitsModule`. The batch dimension is dynamic;
integer ``[N, L]`` inputs (token ids, attention masks) get a dynamic sequence length too (up to what the model
allows: a ``CharTransformer``'s ``max_len``, a GPT-2's ``n_positions``). The graphs are traced on two samples
(and half the sequence length), so the check below runs them at other sizes.

A quantised student (:class:`~lightning_distill.strategies.quant_aware.QuantAwareDistillation`, or a
:class:`~lightning_distill.quantization.QuantizedModel`) is exported with its quantised weights: each
fake-quantised weight is replaced by its quantised value ``Q(W)`` -- exactly what the student's own forward
uses -- so the exported model's outputs are the fake-quantised student's eval outputs. Input fake-quantisation
(``activation_bits``) is part of the ``onnx`` / ``torch_export`` graphs; the ``safetensors`` file stores the
*dequantised* weights in float (values on the k-bit / ternary grid, loadable into the plain float architecture)
and records the quantisation in its metadata (``lightning_distill.quantized_layers``,
``lightning_distill.activation_bits``), from which :func:`load_student` re-attaches the input quantisers. For the
packed integer codes (ternary: 4 per byte) use
:meth:`~lightning_distill.strategies.quant_aware.QuantAwareDistillation.export_quantized` instead.

After writing, the command checks the file: the exported model runs on a batch of real inputs -- the first batch
of the datamodule's test split (else validation, training or prediction split; else zeros of the input spec
the checkpoint's shape probe saved) -- and its outputs are compared with the PyTorch student's: through
onnxruntime for ``onnx``, ``torch.export.load(...).module()`` for ``torch_export``, a reload into a copy of the
student whose every weight was set to NaN for ``safetensors``, ``AutoModelFor...from_pretrained`` for ``hf``.
The file is written under a temporary name in the target directory and renamed only when the check passes
(``max |diff| <= tolerance * max(1, max |logits|)``); bad arguments -- an unknown format, a missing checkpoint,
a checkpoint that does not fit the config's student, ``--out`` an existing directory for a one-file format, a
missing optional package -- are reported before anything is written.

``onnx`` needs the ``[export]`` extra (``onnx``, ``onnxruntime``, ``onnxscript``, ``safetensors``;
``pip install -e ".[export]"``), ``safetensors`` the ``safetensors`` package (in ``[export]``; ``[hf]`` brings it
too), ``hf`` the ``[hf]`` extra; ``torch_export`` needs nothing beyond torch. They are imported when used, with an
``ImportError`` naming the extra when missing.

Example (the quickstart's student, after ``lightning-distill fit --config configs/digits/kd.yaml``)::

    lightning-distill export --config configs/digits/kd.yaml \\
        --ckpt_path runs/digits/kd/version_0/checkpoints/last.ckpt --format onnx --out student.onnx
    # exported student (DigitsMLP, 1.2k params) -> student.onnx; onnxruntime vs PyTorch on 64 test samples: ...

The same from Python (``inputs``: a batch of real inputs to trace and check on)::

    >>> import os, tempfile
    >>> import torch
    >>> from lightning_distill import KnowledgeDistillation
    >>> from lightning_distill.export import export_student, load_student
    >>> from lightning_distill.models import DigitsCNN, DigitsMLP
    >>> module = KnowledgeDistillation(DigitsMLP(), DigitsCNN(), teacher_checkpoint="zoo:digits_cnn")
    >>> tmp = tempfile.TemporaryDirectory()
    >>> out = os.path.join(tmp.name, "student.safetensors")
    >>> result = export_student(module, "safetensors", out, torch.rand(8, 1, 8, 8))
    >>> result.max_diff, str(result).startswith("exported student (DigitsMLP, 1.2k params) -> ")
    (0.0, True)
    >>> student = load_student(out, DigitsMLP())  # the architecture, then the file's weights
    >>> torch.equal(student.head.weight, module.student.head.weight)
    True
    >>> tmp.cleanup()
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import io
import json
import math
import os
import shutil
import sys
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence, Union

import lightning as L
import torch
from torch import Tensor, nn

from lightning_distill.batch import Batch, InputRouting, clip_batch, unpack_batch
from lightning_distill.hf import require
from lightning_distill.outputs import as_outputs

__all__ = [
    "FORMATS",
    "ExportCheckError",
    "ExportResult",
    "LogitsModule",
    "check_batch",
    "export_student",
    "load_student",
    "main",
    "trained_network",
]

#: export formats -> the suffix of the file written (``hf`` writes a directory)
FORMATS: dict[str, str] = {"safetensors": ".safetensors", "onnx": ".onnx", "torch_export": ".pt2", "hf": ""}

#: optional packages each format needs, imported lazily (``require`` names the extra that installs them)
_NEEDS: dict[str, tuple[tuple[str, str], ...]] = {
    "safetensors": (("safetensors.torch", "export"),),
    "onnx": (("onnxruntime", "export"), ("onnx", "export"), ("onnxscript", "export")),
    "torch_export": (),
    "hf": (("transformers", "hf"), ("safetensors.torch", "hf")),
}

_METADATA_PREFIX = "lightning_distill."
_PROBE_SPEC = "probe-spec"  # ``where`` of inputs made from the checkpoint's probe spec (zeros)


class ExportCheckError(RuntimeError):
    """The exported model's outputs differ from the PyTorch student's by more than the tolerance (nothing kept)."""


# --------------------------------------------------------------------------------------------- the network
def trained_network(module: nn.Module) -> tuple[nn.Module, str]:
    """``(network, role)``: the ``student`` of a distillation module, the ``model`` of a ``Classifier``, or
    ``module`` itself when it is not a LightningModule (a network)."""
    if isinstance(module, L.LightningModule):
        for name in ("student", "model"):
            network = getattr(module, name, None)
            if isinstance(network, nn.Module):
                return network, name
        raise TypeError(
            f"{type(module).__name__} has no `student` or `model` network to export (a distillation module or a "
            "Classifier has one)."
        )
    if not isinstance(module, nn.Module):
        raise TypeError(f"expected a LightningModule or a torch.nn.Module, got {type(module).__name__}.")
    return module, "model"


def _routing(module: nn.Module) -> InputRouting:
    routing = getattr(module, "student_routing", None) or getattr(module, "routing", None)
    return routing if isinstance(routing, InputRouting) else InputRouting("auto")


def _quantization(network: nn.Module) -> tuple[dict[str, dict], dict[str, int]]:
    """``({layer: weight options}, {layer: activation bits})`` of a fake-quantised network (empty otherwise)."""
    from lightning_distill.quantization import QuantizedModel, quantized_layers
    from lightning_distill.quantization.modules import activation_quantizer_bits, weight_quantizer

    root = network.model if isinstance(network, QuantizedModel) else network
    weights, activations = {}, {}
    for name, layer in quantized_layers(root).items():
        weights[name] = weight_quantizer(layer).options()
        bits = activation_quantizer_bits(layer)
        if bits is not None:
            activations[name] = bits
    return weights, activations


def _plain_copy(network: nn.Module) -> nn.Module:
    """A copy of ``network`` in eval mode with every fake-quantised weight replaced by its quantised value (plain
    float weights, the same forward), a ``QuantizedModel`` unwrapped, and the library's feature-capture hooks off."""
    from torch.nn.utils import parametrize

    from lightning_distill.features import FeatureCapture
    from lightning_distill.quantization import QuantizedModel, quantized_layers

    plain = copy.deepcopy(network)
    if isinstance(plain, QuantizedModel):
        plain = plain.model
    for name, layer in quantized_layers(plain).items():
        if set(layer.parametrizations) != {"weight"} or len(layer.parametrizations.weight) != 1:
            raise ValueError(
                f"layer {name!r} of the student has parametrizations besides its weight quantiser; export supports "
                "the fake quantisation of lightning_distill.quantization alone."
            )
        # the weight becomes Q(W), the value every forward of the student computes. Not
        # parametrize.remove_parametrizations: the copy shares its parametrized class with the student, and
        # removing would delete the `weight` property from that class, breaking the student itself.
        quantized = layer.weight.detach().clone()
        del layer._modules["parametrizations"]
        layer.__class__ = parametrize.type_before_parametrizations(layer)
        layer.weight = nn.Parameter(quantized, requires_grad=False)
    for layer in plain.modules():
        for hooks in (layer._forward_hooks, layer._forward_pre_hooks):
            for key, hook in list(hooks.items()):
                owner = getattr(getattr(hook, "func", None), "__self__", None)
                if isinstance(owner, FeatureCapture):
                    del hooks[key]
    return plain.cpu().eval()


def _count(network: nn.Module) -> str:
    from lightning_distill.cli import _count as count  # the parameter count of fit's summary, same format

    return count(network)


def _describe(network: nn.Module, weights: dict[str, dict], activations: dict[str, int]) -> str:
    parts = [type(network).__name__, f"{_count(network)} params"]
    if weights:
        kinds = sorted({"ternary" if o.get("ternary") else f"{o['bits']}-bit" for o in weights.values()})
        parts.append(f"{'/'.join(kinds)} weights")
    if activations:
        parts.append(f"{'/'.join(str(b) for b in sorted(set(activations.values())))}-bit inputs")
    return ", ".join(parts)


class LogitsModule(nn.Module):
    """The student as the ``onnx`` / ``torch_export`` graphs see it: tensors in, the logits tensor out.

    ``forward(*inputs)`` calls ``model(*inputs)`` (a positional student) or ``model(**dict(zip(names, inputs)))``
    (a keyword-routed one, e.g. a Hugging Face model, with ``use_cache=False`` when its ``forward`` takes it) and
    returns the logits of whatever the model returns (:func:`~lightning_distill.outputs.as_outputs`: a tensor,
    a Hugging Face output's ``.logits``, a tuple's first element).
    """

    def __init__(self, model: nn.Module, names: Sequence[str], keywords: bool) -> None:
        super().__init__()
        self.model = model
        self.names = tuple(names)
        self.keywords = bool(keywords)
        self.extra: dict[str, Any] = {}
        if self.keywords:
            from lightning_distill.batch import _forward_parameters

            if "use_cache" in _forward_parameters(model)[0]:
                self.extra["use_cache"] = False  # no key/value cache: the graph returns the logits only

    def forward(self, *inputs: Tensor) -> Tensor:
        if self.keywords:
            out = self.model(**dict(zip(self.names, inputs)), **self.extra)
        else:
            out = self.model(*inputs)
        return out if isinstance(out, Tensor) else as_outputs(out, "the student").logits


def _inputs_of(
    network: nn.Module, batch: Batch, routing: InputRouting
) -> tuple[tuple[str, ...], tuple[Tensor, ...], bool]:
    """``(names, tensors, keywords)``: what the student is called with for ``batch`` (its routing decides)."""
    kwargs = routing.keyword_inputs(network, batch)
    if kwargs is None:
        x = batch.input
        if not isinstance(x, Tensor):
            raise TypeError(f"the student's input is a {type(x).__name__}; export needs tensor inputs.")
        return (("input" if x.is_floating_point() else "input_ids"),), (x,), False
    other = sorted(k for k, v in kwargs.items() if not isinstance(v, Tensor))
    if other:
        raise TypeError(f"the student's named inputs {other} are not tensors; export needs tensor inputs.")
    return tuple(kwargs), tuple(kwargs.values()), True


def _token_like(t: Tensor) -> bool:
    """Integer ``[N, L]`` inputs (token ids, attention masks): their sequence length is dynamic too."""
    return t.ndim == 2 and not t.is_floating_point() and not t.is_complex()


def _trace_inputs(tensors: Sequence[Tensor]) -> tuple[Tensor, ...]:
    """Small copies of the inputs to trace on: 2 samples (3 when the sequence is 2 long, so that the two dynamic
    sizes differ) and about half the sequence length, so that checking on the real batch exercises dynamic sizes.

    ``torch.export`` specialises sizes 0 and 1, so no traced dynamic size is below 2; the copies are contiguous
    tensors of their own (a view would make the graph guard on its base's size)."""
    length = next((int(t.shape[1]) for t in tensors if _token_like(t)), None)
    seq = None if length is None else max(2, min(length, max(3, length // 2)))
    n = 3 if seq == 2 else 2

    def resize(t: Tensor, dim: int, size: int) -> Tensor:
        if t.shape[dim] == 0:
            raise ValueError(f"cannot trace the export on an input with an empty dimension {dim}: {tuple(t.shape)}.")
        reps = math.ceil(size / t.shape[dim])
        return torch.cat([t] * reps, dim=dim).narrow(dim, 0, size) if reps > 1 else t.narrow(dim, 0, size)

    out = []
    for t in tensors:
        t = resize(t, 0, n)
        if seq is not None and _token_like(t):
            t = resize(t, 1, seq)
        out.append(t.clone().contiguous())
    return tuple(out)


def _dims(tensors: Sequence[Tensor]) -> list[dict[int, str]]:
    return [{0: "batch", 1: "sequence"} if _token_like(t) else {0: "batch"} for t in tensors]


def _shape_text(t: Tensor, dims: dict[int, str]) -> str:
    return "[" + ", ".join(dims.get(i, str(s)) for i, s in enumerate(t.shape)) + "]"


@contextlib.contextmanager
def _eval_mode(network: nn.Module) -> Iterator[None]:
    modes = {m: m.training for m in network.modules()}
    network.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for m, mode in modes.items():
            m.training = mode


# --------------------------------------------------------------------------------------------- paths
def _check_format(fmt: str) -> str:
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; valid formats: {', '.join(FORMATS)}.")
    return fmt


def default_out(ckpt_path: Union[str, os.PathLike], fmt: str) -> Path:
    """Where ``--out`` defaults to: next to the checkpoint, ``last.ckpt`` -> ``last.onnx`` / ``last.pt2`` /
    ``last.safetensors`` / ``last_hf/``."""
    ckpt = Path(ckpt_path)
    if fmt == "hf":
        return ckpt.with_name(f"{ckpt.stem}_hf")
    return ckpt.with_suffix(FORMATS[fmt])


def _check_out(out: Path, fmt: str, source: Optional[Path] = None) -> Path:
    """Reject an output path that cannot take the format, before anything is written."""
    if source is not None and out.resolve() == source.resolve():
        raise ValueError(f"`--out` {str(out)!r} is the checkpoint itself; pass another path.")
    suffixes = {s: f for f, s in FORMATS.items() if s}
    if fmt != "hf" and out.suffix in suffixes and suffixes[out.suffix] != fmt:
        raise ValueError(
            f"`--out` {str(out)!r} has the suffix of the {suffixes[out.suffix]!r} format, but the format is {fmt!r}: "
            f"use a {FORMATS[fmt]} path."
        )
    if fmt == "hf":
        if out.exists() and not out.is_dir():
            raise ValueError(f"`--out` {str(out)!r} is a file; the hf format writes a directory.")
        if out.is_dir() and any(out.iterdir()) and not (out / "config.json").is_file():
            raise ValueError(
                f"`--out` {str(out)!r} is a directory that is neither empty nor a Hugging Face model directory "
                "(no config.json); choose a new directory (it is created)."
            )
    elif out.is_dir() or str(out).endswith(("/", os.sep)):
        raise ValueError(
            f"`--out` {str(out)!r} is a directory, but the {fmt} format writes one file: pass a file path such as "
            f"{str(out / ('student' + FORMATS[fmt]))!r}."
        )
    for parent in out.parents:
        if parent.exists():
            if not parent.is_dir():
                raise ValueError(f"`--out` {str(out)!r}: {str(parent)!r} is a file, not a directory.")
            break
    return out


def _require(fmt: str) -> None:
    for package, extra in _NEEDS[fmt]:
        require(package, extra)


def _temporary(out: Path) -> Path:
    """A hidden name next to ``out`` with the same suffix (readers such as ``torch.export.load`` go by it)."""
    return out.parent / f".{out.stem}.tmp-{uuid.uuid4().hex[:8]}{out.suffix}"


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _move_into_place(tmp: Path, out: Path) -> None:
    if not tmp.is_dir():
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # writers of private temporary files (safetensors) leave 0600
        os.replace(tmp, out)  # atomic on one file system: a reader sees the old file or the new one
        return
    if out.is_dir():  # an earlier Hugging Face export (or an empty directory): swap, then drop the old one
        old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)


# --------------------------------------------------------------------------------------------- formats
def _write_safetensors(plain: nn.Module, path: Path, weights: dict, activations: dict) -> None:
    st = require("safetensors.torch", "export")
    metadata = {
        "format": "pt",
        f"{_METADATA_PREFIX}architecture": f"{type(plain).__module__}.{type(plain).__qualname__}",
    }
    if weights:
        metadata[f"{_METADATA_PREFIX}quantized_layers"] = json.dumps(weights, sort_keys=True)
        metadata[f"{_METADATA_PREFIX}weights"] = "dequantized: each quantized layer's weight is Q(W) in float"
    if activations:
        metadata[f"{_METADATA_PREFIX}activation_bits"] = json.dumps(activations, sort_keys=True)
    st.save_model(plain, str(path), metadata=metadata, force_contiguous=True)  # tied weights are stored once


def load_student(path: Union[str, os.PathLike], model: nn.Module) -> nn.Module:
    """Load a ``safetensors`` export into ``model`` (the student's architecture, e.g. ``DigitsMLP(hidden=16)``).

    Strict: every key must fit (all mismatches named); tied weights stored once are filled in. When the export
    came from a student with fake-quantised inputs (``activation_bits``), the input quantisers are re-attached
    to the layers the file's metadata names, so the outputs are the quantised student's.

    Returns:
        ``model``.
    """
    from lightning_distill.checkpoint import load_weights
    from lightning_distill.quantization import ActivationFakeQuantize

    st = require("safetensors", "export")
    load_weights(model, path, argument="path")
    with st.safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
    activations = json.loads(metadata.get(f"{_METADATA_PREFIX}activation_bits", "{}"))
    for name, bits in activations.items():
        layer = model.get_submodule(name)
        if not any(isinstance(h, ActivationFakeQuantize) for h in layer._forward_pre_hooks.values()):
            layer.register_forward_pre_hook(ActivationFakeQuantize(int(bits)))
    return model


def _fresh_copy(plain: nn.Module) -> nn.Module:
    """A copy of the architecture whose every floating-point weight is NaN (and without input quantisers): only
    what a file loads into it can make its outputs finite."""
    from lightning_distill.quantization.modules import _activation_hooks

    fresh = copy.deepcopy(plain)
    for layer in fresh.modules():
        for key in _activation_hooks(layer):
            del layer._forward_pre_hooks[key]
    with torch.no_grad():
        for tensor in list(fresh.parameters()) + list(fresh.buffers()):
            if tensor.is_floating_point():
                tensor.fill_(float("nan"))
    return fresh


def _traceable_snap(scale: Tensor) -> Tensor:
    """:func:`lightning_distill.quantization.grid._snap` in arithmetic instead of bit masks (ONNX has no bit cast).

    The scales of the fake quantisers are positive normal floats truncated to ``SCALE_BITS`` significant bits;
    that is ``floor(x / ulp) * ulp`` with ``ulp = 2^(e - SCALE_BITS + 1)`` and ``2^e <= x < 2^(e + 1)``. ``e`` comes
    from ``log2``, corrected by one where rounding put it off (``2^e`` is exact), so the result is bit-identical.
    """
    from lightning_distill.quantization.grid import SCALE_BITS

    two = torch.full_like(scale, 2.0)
    e = torch.floor(torch.log2(scale))
    e = torch.where(torch.pow(two, e) > scale, e - 1, e)
    e = torch.where(torch.pow(two, e + 1) <= scale, e + 1, e)
    ulp = torch.pow(two, e - (SCALE_BITS - 1))
    return torch.floor(scale / ulp) * ulp


@contextlib.contextmanager
def _traceable_quantisers() -> Iterator[None]:
    """Trace input fake-quantisers (``activation_bits``) with :func:`_traceable_snap` in place of the bit-level
    ``_snap``; the exported graph is checked against the student's own forward afterwards."""
    from lightning_distill.quantization import grid

    snap = grid._snap
    grid._snap = _traceable_snap
    try:
        yield
    finally:
        grid._snap = snap


def _write_onnx(wrapper: nn.Module, trace: tuple[Tensor, ...], names: Sequence[str], path: Path) -> None:
    for package in ("onnx", "onnxscript"):
        require(package, "export")
    dims = tuple(_dims(trace))
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings(), _traceable_quantisers():
        warnings.simplefilter("ignore")  # the exporter's progress lines and deprecation notes
        program = torch.onnx.export(
            wrapper,
            trace,
            input_names=list(names),
            output_names=["logits"],
            dynamic_shapes=(dims,),
            dynamo=True,
            external_data=False,
        )
        program.save(str(path), external_data=False)


def _run_onnx(path: Path, names: Sequence[str], tensors: Sequence[Tensor]) -> Tensor:
    ort = require("onnxruntime", "export")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    wanted = {i.name for i in session.get_inputs()}  # the exporter drops inputs the graph does not use
    feeds = {name: t.detach().cpu().numpy() for name, t in zip(names, tensors) if name in wanted}
    return torch.from_numpy(session.run(None, feeds)[0])


def _export_program(wrapper: nn.Module, trace: tuple[Tensor, ...]) -> Any:
    from torch.export import Dim

    dims = tuple({i: Dim.DYNAMIC for i in d} for d in _dims(trace))
    with warnings.catch_warnings(), _traceable_quantisers():
        warnings.simplefilter("ignore")
        return torch.export.export(wrapper, trace, dynamic_shapes=(dims,))


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """No progress bars or warnings from ``save_pretrained`` / ``from_pretrained`` between the command's lines."""
    logging = require("transformers").utils.logging
    bars = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        if bars:
            logging.enable_progress_bar()


def _auto_class(model: nn.Module) -> Any:
    """The ``transformers`` auto class that rebuilds ``model``'s class from its config."""
    from lightning_distill.hf import PRETRAINED_TASKS

    transformers = require("transformers")
    for auto_name in PRETRAINED_TASKS.values():
        auto = getattr(transformers, auto_name)
        try:
            if auto._model_mapping[type(model.config)] is type(model):
                return auto
        except (KeyError, AttributeError):
            continue
    return type(model)  # a model class no auto class maps to: its own from_pretrained


# --------------------------------------------------------------------------------------------- the export
@dataclass
class ExportResult:
    """What :func:`export_student` wrote and how its check went."""

    path: Path
    format: str
    role: str
    description: str
    runtime: str
    samples: str
    max_diff: float
    signature: str

    def __str__(self) -> str:
        line = (
            f"exported {self.role} ({self.description}) -> {self.path}; {self.runtime} vs PyTorch on {self.samples}: "
            f"max |diff| {self.max_diff:.2g}"
        )
        return line + (f"\n  {self.signature}" if self.signature else "")


def _as_batch(inputs: Any) -> Batch:
    try:
        return unpack_batch(inputs)
    except ValueError:
        if isinstance(inputs, dict):  # named inputs without an input_ids / x / image entry
            return Batch(None, inputs=dict(inputs))
        raise


def _describe_samples(tensors: Sequence[Tensor], where: str) -> str:
    n = int(tensors[0].shape[0])
    plural = "s" if n != 1 else ""
    if where == _PROBE_SPEC:
        text = f"{n} all-zero sample{plural} of the checkpoint's input spec"
    else:
        text = f"{n} {where} sample{plural}"
    length = next((int(t.shape[1]) for t in tensors if _token_like(t)), None)
    return text + (f" of {length} tokens" if length is not None else "")


def export_student(
    module: nn.Module,
    format: str,
    out: Union[str, os.PathLike],
    inputs: Any = None,
    *,
    where: str = "given",
    tokenizer: Any = None,
    tolerance: float = 1e-3,
) -> ExportResult:
    """Write the student of ``module`` (a distillation module, a ``Classifier`` or a network) to ``out`` and check it.

    Args:
        module: the module whose ``student`` (or ``model``) is exported; a plain network is exported as it is.
        format: one of :data:`FORMATS` (``safetensors``, ``onnx``, ``torch_export``, ``hf``).
        out: the file (the directory for ``hf``); written under a temporary name, renamed when the check passes.
        inputs: a batch of real inputs (a tensor, a dataloader batch or a :class:`~lightning_distill.batch.Batch`):
            the graphs are traced on a slice of it and the check compares outputs on all of it. ``None``: the
            module's ``example_input_array``, else zeros of the input spec of its shape probe.
        where: which samples ``inputs`` are, for the printed check (``"test"``: "64 test samples").
        tokenizer: written into the ``hf`` directory next to the model (``save_pretrained``'s).
        tolerance: the check fails when ``max |diff| > tolerance * max(1, max |logits|)``.

    Returns:
        an :class:`ExportResult`; ``print`` it for the one-line summary.

    Raises:
        ValueError: unknown format, unusable ``out``; TypeError: ``hf`` for a student that is not a ``transformers``
            model; ImportError: a missing optional package (names the extra); ExportCheckError: the check failed
            (nothing is left at ``out``).
    """
    fmt = _check_format(format)
    out = _check_out(Path(out), fmt)
    _require(fmt)
    if not isinstance(tolerance, (int, float)) or isinstance(tolerance, bool) or not tolerance > 0:
        raise ValueError(f"`tolerance` must be a positive number, got {tolerance!r}.")
    network, role = trained_network(module)
    bad = [name for name, value in network.state_dict().items()
           if torch.is_tensor(value) and value.is_floating_point() and not bool(torch.isfinite(value).all())]
    if bad:
        raise ValueError(
            f"the {role} holds NaN / Inf in {len(bad)} tensor(s) ({', '.join(bad[:8])}{', ...' if len(bad) > 8 else ''}): "
            "its outputs would be NaN, so nothing was exported. The run that wrote it diverged: export an earlier "
            "checkpoint of it, or retrain it (lower learning rate, gradient clipping)."
        )
    routing = _routing(module)
    weights, activations = _quantization(network)
    plain = _plain_copy(network)
    if fmt == "hf":
        transformers = require("transformers")
        if not isinstance(plain, transformers.PreTrainedModel):
            raise TypeError(
                f"the hf format writes Hugging Face model directories, but the {role} is a "
                f"{type(plain).__module__}.{type(plain).__name__}; use --format safetensors, onnx or torch_export."
            )
        if activations:
            raise ValueError(
                "the hf format cannot express the student's input fake-quantisation (activation_bits); use --format "
                "onnx or torch_export, whose graphs include it."
            )

    if inputs is None:
        inputs, where = _fallback_inputs(module)
    batch = _as_batch(inputs)
    names, tensors, keywords = _inputs_of(network, batch, routing)
    tensors = tuple(t.detach().cpu() for t in tensors)
    device = next((t.device for t in network.parameters()), torch.device("cpu"))
    with _eval_mode(network):  # the student as it is, on its device; the export is made on the CPU
        reference = LogitsModule(network, names, keywords)(*(t.to(device) for t in tensors)).float().cpu()
    wrapper = LogitsModule(plain, names, keywords).eval()
    trace = _trace_inputs(tensors)
    dims = _dims(tensors)
    signature = ""
    if fmt in ("onnx", "torch_export"):
        shown = ", ".join(
            f"{n} {str(t.dtype).replace('torch.', '')} {_shape_text(t, d)}" for n, t, d in zip(names, tensors, dims)
        )
        out_dims = {0: "batch", **({1: "sequence"} if reference.ndim >= 2 and any(len(d) > 1 for d in dims) else {})}
        signature = (
            f"inputs: {shown} -> logits {str(reference.dtype).replace('torch.', '')} {_shape_text(reference, out_dims)}"
        )

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary(out)
    try:
        with torch.no_grad():
            if fmt == "safetensors":
                _write_safetensors(plain, tmp, weights, activations)
                fresh = load_student(tmp, _fresh_copy(plain))
                output = LogitsModule(fresh, names, keywords).eval()(*tensors)
                runtime = f"reloaded into a fresh {type(plain).__name__}"
            elif fmt == "onnx":
                _write_onnx(wrapper, trace, names, tmp)
                output = _run_onnx(tmp, names, tensors)
                runtime = "onnxruntime"
            elif fmt == "torch_export":
                torch.export.save(_export_program(wrapper, trace), str(tmp))
                output = torch.export.load(str(tmp)).module()(*tensors)
                runtime = "torch.export.load(...).module()"
            else:
                from lightning_distill.hf import save_pretrained

                auto = _auto_class(plain)
                with _quiet_transformers():
                    save_pretrained(plain, tmp, tokenizer=tokenizer)
                    reloaded = auto.from_pretrained(str(tmp)).eval()
                output = LogitsModule(reloaded, names, keywords)(*tensors)
                runtime = f"{auto.__name__}.from_pretrained"
        output = output.float()
        if output.shape != reference.shape:
            raise ExportCheckError(
                f"the exported {role} returns logits of shape {tuple(output.shape)}, PyTorch {tuple(reference.shape)}."
            )
        diff = float((output - reference).abs().max()) if reference.numel() else 0.0
        scale = max(1.0, float(reference.abs().max()) if reference.numel() else 0.0)
        if not diff <= tolerance * scale:  # also catches NaN
            raise ExportCheckError(
                f"the exported {role}'s outputs differ from PyTorch's by up to {diff:.3g} on "
                f"{_describe_samples(tensors, where)} (tolerance {tolerance:g} x {scale:.3g}); nothing was written. "
                "Raise --tolerance if this is expected."
            )
        _move_into_place(tmp, out)
    except BaseException:
        _remove(tmp)
        raise
    return ExportResult(
        out,
        fmt,
        role,
        _describe(plain, weights, activations),
        runtime,
        _describe_samples(tensors, where),
        diff,
        signature,
    )


def _fallback_inputs(module: nn.Module) -> tuple[Any, str]:
    example = getattr(module, "example_input_array", None)
    if example is not None:
        return example, "example-input"
    spec = getattr(module, "_probe_spec", None)
    if spec is not None:
        from lightning_distill.probe import batch_from_spec

        return batch_from_spec(spec["batch"]), _PROBE_SPEC
    raise ValueError(
        "no inputs to trace and check the export on: pass `inputs` (a batch of real inputs), or set the module's "
        "example_input_array."
    )


# --------------------------------------------------------------------------------------------- the command
_LOADERS = (
    ("test", "test_dataloader", "test"),
    ("validate", "val_dataloader", "validation"),
    ("fit", "train_dataloader", "training"),
    ("predict", "predict_dataloader", "prediction"),
)


def check_batch(datamodule: Any, samples: int = 64) -> tuple[Optional[Batch], str]:
    """The first batch (at most ``samples`` samples) of the datamodule's test loader, else of its validation,
    training or prediction loader: ``(batch, which split)``, or ``(None, why not)``."""
    reasons = []
    if datamodule is None:
        return None, "no datamodule in the config"
    for stage, loader_name, label in _LOADERS:
        try:
            datamodule.setup(stage)
            batch = next(iter(getattr(datamodule, loader_name)()))
            return clip_batch(unpack_batch(batch), samples), label
        except Exception as err:  # noqa: BLE001 - any datamodule may fail its own way: try the next split
            reasons.append(f"{label}: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}")
    return None, "; ".join(reasons)


def _tokenizer_of(datamodule: Any) -> Any:
    """The datamodule's tokenizer when it is one ``save_pretrained`` can write (a ``transformers`` tokenizer or a
    ``tokenizers.Tokenizer``), else ``None``."""
    try:
        tokenizer = getattr(datamodule, "tokenizer", None)
    except Exception:  # noqa: BLE001 - a property that needs data the datamodule does not have
        return None
    if tokenizer is None:
        return None
    kinds = []
    with contextlib.suppress(ImportError):
        kinds.append(require("transformers").PreTrainedTokenizerBase)
    with contextlib.suppress(ImportError):
        kinds.append(require("tokenizers").Tokenizer)
    return tokenizer if kinds and isinstance(tokenizer, tuple(kinds)) else None


def _skip_teacher_weights(config: Any) -> None:
    """Set the teacher checkpoints of the model config to null: export needs the student only, and the teacher's
    file (often a relative path of another run) need not be there."""
    from jsonargparse import Namespace

    model = config.get("model") if "model" in config else None
    init = model.get("init_args") if isinstance(model, Namespace) and "init_args" in model else None
    if not isinstance(init, Namespace):
        return
    if "teacher_checkpoint" in init:
        init["teacher_checkpoint"] = None
    if isinstance(init.get("teacher_checkpoints") if "teacher_checkpoints" in init else None, list):
        init["teacher_checkpoints"] = [None] * len(init["teacher_checkpoints"])
    for key in ("teacher", "teachers"):
        specs = init.get(key) if key in init else None
        for spec in specs if isinstance(specs, list) else [specs]:
            args = spec.get("init_args") if isinstance(spec, Namespace) and "init_args" in spec else None
            if isinstance(args, Namespace) and "module" in args and "checkpoint" in args:  # a FrozenTeacher
                args["checkpoint"] = None


@functools.lru_cache(maxsize=1)
def _export_cli_class() -> type:
    from lightning_distill.cli import DistillCLI

    class ExportCLI(DistillCLI):
        """DistillCLI that builds the module and datamodule of a config, without a Trainer and without the
        teacher's weights."""

        def add_arguments_to_parser(self, parser: Any) -> None:
            super().add_arguments_to_parser(parser)
            # keys a run's saved config.yaml holds for fit itself: accepted and ignored (the checkpoint to
            # export is this command's own --ckpt_path)
            parser.add_argument("--ckpt_path", type=Optional[str], default=None, help=argparse.SUPPRESS)
            parser.add_argument("--weights_only", type=Optional[bool], default=None, help=argparse.SUPPRESS)
            parser.add_argument("--verbose", type=Optional[bool], default=None, help=argparse.SUPPRESS)

        def before_instantiate_classes(self) -> None:
            super().before_instantiate_classes()
            _skip_teacher_weights(self.config)

        def instantiate_trainer(self, **kwargs: Any) -> Any:
            return None  # nothing runs: no Trainer, no loggers, no log directory

    return ExportCLI


def _argument_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lightning-distill export",
        allow_abbrev=False,
        description="Write the distilled student (never the teacher) of a training checkpoint as safetensors, ONNX, "
        "a torch.export program or a Hugging Face directory, then check the file's outputs against PyTorch's on a "
        "batch of the datamodule's test data. Every other option is the config's, as for fit: --config CONFIG.yaml "
        "(the run's saved config.yaml works too), --model.init_args.*, --data.init_args.*",
    )
    parser.add_argument(
        "--ckpt_path",
        required=True,
        help="the training checkpoint (.ckpt), or a student state dict / .safetensors file",
    )
    parser.add_argument("--format", required=True, help=f"one of: {', '.join(FORMATS)}")
    parser.add_argument(
        "--out",
        default=None,
        help="output file (a directory for hf); default: next to the "
        "checkpoint, RUN.safetensors / RUN.onnx / RUN.pt2 / RUN_hf/",
    )
    parser.add_argument("--samples", type=int, default=64, help="samples of the check batch (default 64)")
    parser.add_argument(
        "--tolerance",
        type=float,
        default=1e-3,
        help="the check fails above max |diff| > tolerance * max(1, max |logits|) (default 1e-3)",
    )
    return parser


def main(argv: Optional[Sequence[str]] = None) -> None:
    """``lightning-distill export ...`` (see the module docstring)."""
    from lightning_distill.checkpoint import load_weights

    parser = _argument_parser()
    args, rest = parser.parse_known_args(list(sys.argv[1:] if argv is None else argv))
    try:
        fmt = _check_format(args.format)
        ckpt = Path(args.ckpt_path)
        if not ckpt.exists():
            raise FileNotFoundError(f"`--ckpt_path` {args.ckpt_path!r}: no such file.")
        out = _check_out(Path(args.out) if args.out else default_out(ckpt, fmt), fmt, ckpt)
        if args.samples < 1:
            raise ValueError(f"`--samples` must be >= 1, got {args.samples}.")
        if not args.tolerance > 0:
            raise ValueError(f"`--tolerance` must be > 0, got {args.tolerance}.")
        _require(fmt)
    except (ValueError, FileNotFoundError, ImportError) as err:
        parser.error(str(err))
    argv0, sys.argv = sys.argv, sys.argv[:1]  # LightningCLI warns when sys.argv holds more than `args`
    try:
        cli = _export_cli_class()(args=rest, run=False)
    finally:
        sys.argv = argv0
    try:
        network, role = trained_network(cli.model)
        load_weights(network, ckpt, argument="ckpt_path")  # strict: every key that does not fit is named
        batch, where = check_batch(cli.datamodule, args.samples)
        if batch is None:
            print(
                f"the datamodule gave no batch to check on ({where}); using the module's example input", file=sys.stderr
            )
            inputs, where = _fallback_inputs(_probed(cli.model, ckpt))
        else:
            inputs = batch
        tokenizer = _tokenizer_of(cli.datamodule) if fmt == "hf" else None
        result = export_student(cli.model, fmt, out, inputs, where=where, tokenizer=tokenizer, tolerance=args.tolerance)
    except (ValueError, TypeError, FileNotFoundError, ImportError, ExportCheckError) as err:
        parser.error(str(err))
    print(result)


def _probed(module: nn.Module, ckpt: Path) -> nn.Module:
    """``module`` with the input spec its checkpoint's shape probe saved (for :func:`_fallback_inputs`)."""
    from lightning_distill.checkpoint import read_checkpoint
    from lightning_distill.module import CKPT_KEY

    spec = read_checkpoint(ckpt, argument="ckpt_path").get(CKPT_KEY, {}).get("probe")
    if spec is not None and getattr(module, "_probe_spec", None) is None:
        module._probe_spec = spec
    return module
