"""Loading model weights from files safely (``torch.load(..., weights_only=True)``).

Used for ``teacher_checkpoint``: accepts a Lightning checkpoint of a :class:`Classifier` run
(keys ``model.*``), of a distillation run (its ``student.*`` becomes the weights), a
RepDistiller-style ``{"model": state_dict, ...}`` file, or a plain state dict; ``zoo:NAME`` names weights shipped inside the package (see
:mod:`lightning_distill.zoo`). Hugging Face weights load too: a ``.safetensors`` file, or a model directory
(what ``save_pretrained`` writes: ``model.safetensors``, sharded ``model.safetensors.index.json``, or a legacy
``pytorch_model.bin``). Weights such files leave out because they are tied to others (a language model's
output layer sharing the input embedding) are taken from the weight they are tied to.

Writing: :class:`AtomicCheckpointIO` saves training checkpoints atomically (a temporary file next to the
target, then a rename), so an interrupted or failed write never replaces the last good checkpoint; the
``lightning-distill`` CLI installs it by default. Reading a checkpoint to resume (``ckpt_path``), it turns a
truncated or corrupt file, or one that would need code execution to unpickle, into a ``ValueError`` that names
the file and the fix; :func:`check_ckpt_path` does the same for the CLI's ``--ckpt_path`` (which LightningCLI
reads first, to merge its hyperparameters into the config) and refuses a checkpoint written by another module
class than the config builds (:func:`check_checkpoint_class`).

Teacher weights holding NaN / Inf are refused when they are loaded (:func:`load_weights`), naming the tensors.
"""

from __future__ import annotations

import ast
import contextlib
import io
import json
import os
import pickle
import re
import tempfile
from pathlib import Path
from typing import Any, Optional, Union

import torch
from lightning.fabric.utilities.cloud_io import _is_local_file_protocol
from lightning.pytorch.plugins.io import TorchCheckpointIO
from torch import Tensor, nn

__all__ = [
    "AtomicCheckpointIO",
    "MissingCheckpointError",
    "check_checkpoint_class",
    "check_ckpt_path",
    "checkpoint_class",
    "extract_state_dict",
    "load_weights",
    "read_checkpoint",
]

#: Prefixes stripped, in order, from a Lightning checkpoint's ``state_dict``: the network of a
#: ``Classifier`` run, then the student of a distillation run.
_MODULE_PREFIXES = ("model.", "student.")


class MissingCheckpointError(FileNotFoundError):
    """A checkpoint argument naming a file that does not exist (yet), typically the output of a run that has not
    been made: ``argument`` is the argument that named it, ``path`` the value as given.

    ``lightning-distill`` turns it into a one-line error naming the command that trains the missing
    checkpoint (see :mod:`lightning_distill.cli`).
    """

    def __init__(self, message: str, argument: str = "", path: str = "") -> None:
        super().__init__(message)
        self.argument = argument
        self.path = path

    @classmethod
    def for_path(cls, argument: str, path: Any, resolved: Any) -> "MissingCheckpointError":
        return cls(f"`{argument}`={str(path)!r}: no such file ({resolved}).", argument, str(path))

    @classmethod
    def in_text(cls, text: str) -> Optional["MissingCheckpointError"]:
        """The error whose message ``text`` quotes, if any: argument parsers that try several types for one
        value (jsonargparse's unions) keep only the messages of the errors of all but the first type."""
        match = _MISSING_MESSAGE.search(text)
        if match is None:
            return None
        try:
            path = ast.literal_eval(match.group(2))
        except (ValueError, SyntaxError):
            return None
        return cls.for_path(match.group(1), path, match.group(3))


_MISSING_MESSAGE = re.compile(r"`([^`\s]+)`=('(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\"): no such file \((.*?)\)\.")


def read_checkpoint(path: Union[str, os.PathLike], argument: str = "teacher_checkpoint") -> dict:
    """``torch.load`` a file with ``weights_only=True`` and a clear error when that is refused; ``.safetensors``
    files and Hugging Face model directories are read with ``safetensors`` (a state dict)."""
    from lightning_distill.zoo import resolve

    resolved = resolve(path)
    if Path(resolved).is_dir():
        resolved = _weights_in_directory(Path(resolved), path, argument)
        if isinstance(resolved, dict):
            return resolved
    elif Path(resolved).suffix == ".safetensors" and Path(resolved).is_file():
        return _read_safetensors([Path(resolved)], path, argument)
    if not Path(resolved).is_file():
        raise MissingCheckpointError.for_path(argument, path, resolved)
    try:
        obj = torch.load(resolved, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, OSError, EOFError, RuntimeError, IndexError, ValueError, KeyError,
            UnicodeDecodeError) as err:
        unsafe, detail = _load_failure(err)
        if unsafe:
            raise ValueError(
                f"`{argument}`={str(path)!r} cannot be loaded safely: it contains Python objects that would "
                "need code execution to unpickle, and lightning_distill only loads checkpoints with "
                "`torch.load(..., weights_only=True)`. Save plain tensors instead, e.g. "
                "`torch.save(model.state_dict(), path)`. Details: " + detail
            ) from None
        raise ValueError(
            f"`{argument}`={str(path)!r} is not a readable torch.save file (truncated, corrupt, empty or another "
            f"format): {detail}"
        ) from None
    if not isinstance(obj, dict):
        raise ValueError(
            f"`{argument}`={str(path)!r} holds a {type(obj).__name__}, expected a state dict or a "
            "Lightning checkpoint (a dict with a 'state_dict' entry)."
        )
    return obj


#: what torch's weights-only unpickler says about a file that needs code execution (a class or function it
#: may not call), as opposed to bytes that are not a pickle at all ("Unsupported operand", a truncated stream)
_UNSAFE_PATTERNS = (
    r"GLOBAL (\S+) was not an allowed global",
    r"unsupported GLOBAL (\S+) whose module",
    r"Can only (?:create new object|build)",
    r"Trying to call reduce for unrecognized function",
    r"(\S+) must be (?:imported|\S+) to load",
)


def _load_failure(err: BaseException) -> tuple[bool, str]:
    """``(needs code execution, one-line detail)`` of a failed ``torch.load(..., weights_only=True)``."""
    text = str(err)
    if isinstance(err, pickle.UnpicklingError):
        for pattern in _UNSAFE_PATTERNS:
            match = re.search(pattern, text)
            if match:
                what = match.group(1) if match.groups() else None
                return True, (f"it refers to {what}" if what else match.group(0))
        # not a code-needing pickle: the bytes are not a (complete) pickle at all; keep torch's own reason
        reason = next((line.strip() for line in reversed(text.splitlines())
                       if line.strip() and not line.startswith(("Check the documentation", "Weights only load"))
                       and "file an issue" not in line), "")
        return False, f"UnpicklingError: {reason or 'not a pickle'}"
    first = text.splitlines()[0] if text else ""
    return False, f"{type(err).__name__}: {first}" if first else type(err).__name__


def _weights_in_directory(directory: Path, path: Any, argument: str) -> Union[dict, Path]:
    """The weights of a Hugging Face model directory (a state dict), or the ``pytorch_model.bin`` to ``torch.load``."""
    if (directory / "model.safetensors").is_file():
        return _read_safetensors([directory / "model.safetensors"], path, argument)
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            message = f"`{argument}`={str(path)!r}: unreadable {index.name} ({type(err).__name__}: {err})."
            raise ValueError(message) from None
        return _read_safetensors([directory / shard for shard in shards], path, argument)
    if (directory / "pytorch_model.bin").is_file():
        return directory / "pytorch_model.bin"
    raise FileNotFoundError(
        f"`{argument}`={str(path)!r} is a directory without model weights (model.safetensors, "
        "model.safetensors.index.json or pytorch_model.bin): pass a Hugging Face model directory written by "
        "save_pretrained, a .safetensors file or a torch.save file."
    )


def _read_safetensors(files: list[Path], path: Any, argument: str) -> dict[str, Tensor]:
    from lightning_distill.hf import require

    load_file = require("safetensors.torch").load_file
    state: dict[str, Tensor] = {}
    for file in files:
        try:
            state.update(load_file(str(file), device="cpu"))
        except FileNotFoundError:
            raise FileNotFoundError(f"`{argument}`={str(path)!r}: missing weight file {file}.") from None
        except Exception as err:  # noqa: BLE001 - safetensors raises its own error types
            raise ValueError(
                f"`{argument}`={str(path)!r}: {file.name} is not a readable safetensors file "
                f"({type(err).__name__}: {err})."
            ) from None
    return state


def _fill_tied(module: nn.Module, state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Entries of ``module`` missing from ``state`` that share their storage with an entry present (tied weights)."""
    own = module.state_dict()
    present: dict[tuple, str] = {}
    for key, value in own.items():
        if key in state and isinstance(value, Tensor) and value.data_ptr() != 0:
            present.setdefault((value.data_ptr(), tuple(value.shape)), key)
    filled = dict(state)
    for key, value in own.items():
        if key not in state and isinstance(value, Tensor) and value.numel() > 0:
            twin = present.get((value.data_ptr(), tuple(value.shape)))
            if twin is not None:
                filled[key] = state[twin]
    return filled


def extract_state_dict(checkpoint: dict) -> dict[str, Tensor]:
    """The network's weights from a Lightning checkpoint, a RepDistiller checkpoint or a plain state dict.

    A Lightning checkpoint's ``state_dict`` is searched for the ``model.`` prefix (a
    ``Classifier`` run) and then ``student.`` (a distillation run); the prefix is stripped
    and other entries (a teacher, projections, metrics) are dropped.
    """
    if "state_dict" not in checkpoint and isinstance(checkpoint.get("model"), dict):
        return dict(checkpoint["model"])  # RepDistiller-style {"model": state_dict, "epoch": ...}
    state = checkpoint.get("state_dict", checkpoint)
    if not isinstance(state, dict):
        raise ValueError(f"the checkpoint's 'state_dict' is a {type(state).__name__}, expected a dict.")
    if "state_dict" in checkpoint:
        for prefix in _MODULE_PREFIXES:
            sub = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
            if sub:
                return sub
    return dict(state)


def load_weights(module: nn.Module, path: Union[str, os.PathLike], argument: str = "teacher_checkpoint") -> None:
    """Load weights from ``path`` into ``module`` strictly, naming every key that does not fit.

    Raises:
        ValueError: keys missing from the file, unexpected keys, or shape mismatches -- all of
            them listed --, NaN / Inf in any of its tensors (named), or a file that would need code execution
            to load. The module is untouched then.
    """
    state = _fill_tied(module, extract_state_dict(read_checkpoint(path, argument)))
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    not_tensors = sorted(k for k in own if k in state and not isinstance(state[k], Tensor))
    mismatched = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in state and isinstance(state[k], Tensor) and state[k].shape != own[k].shape
    ]
    if missing or unexpected or mismatched or not_tensors:
        parts = []
        if missing:
            parts.append(f"missing keys ({len(missing)}): {_shorten(missing)}")
        if unexpected:
            parts.append(f"unexpected keys ({len(unexpected)}): {_shorten(unexpected)}")
        if mismatched:
            parts.append(f"shape mismatches ({len(mismatched)}): {_shorten(mismatched)}")
        if not_tensors:
            parts.append(f"entries that are not tensors ({len(not_tensors)}): {_shorten(not_tensors)}")
        raise ValueError(
            f"`{argument}`={str(path)!r} does not match the architecture of {type(module).__name__}: "
            + "; ".join(parts)
            + ". Check that the model's class and init_args are the ones the checkpoint was trained with."
        )
    nonfinite = []
    for key, value in state.items():
        if key in own and isinstance(value, Tensor) and (value.is_floating_point() or value.is_complex()):
            finite = torch.isfinite(value)
            if not bool(finite.all()):
                n_nan = int(torch.isnan(value).sum())
                n_inf = value.numel() - int(finite.sum()) - n_nan
                nonfinite.append(f"{key} ({n_nan} NaN, {n_inf} Inf of {value.numel()} values)")
    if nonfinite:
        raise ValueError(
            f"`{argument}`={str(path)!r} holds non-finite values (NaN / Inf) in {len(nonfinite)} tensor(s): "
            f"{_shorten(nonfinite)}. A {type(module).__name__} with these weights outputs NaN, and training against "
            "it turns the student's weights NaN. The run that wrote the file diverged: use an earlier checkpoint of "
            "it, or retrain it (with a lower learning rate or gradient clipping)."
        )
    # everything was validated above; restore the old weights if torch still refuses (dtype, ...)
    backup = {k: v.detach().clone() for k, v in own.items()}
    try:
        module.load_state_dict(state, strict=True)
    except Exception as err:
        module.load_state_dict(backup, strict=True)
        raise ValueError(
            f"`{argument}`={str(path)!r} could not be loaded into {type(module).__name__}: {err}"
        ) from None


def _shorten(items: list[str], limit: int = 12) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning ``CheckpointIO`` that never leaves a truncated checkpoint behind.

    Lightning's default writer stages the bytes in a temporary file of the system's temporary directory and
    then moves it into place; when that directory is on another filesystem the move is a copy, and a full
    disk or a kill during the copy leaves a truncated ``last.ckpt`` where the previous good one was. This
    writer serialises the checkpoint in memory first, writes it to a hidden temporary file **in the target
    directory**, flushes it to disk (``fsync``) and renames it over the target with :func:`os.replace`,
    which is atomic on one filesystem: readers see the old file or the complete new one, never a mix. A
    failed write removes its temporary file, leaves the previous checkpoint untouched and raises an
    ``OSError`` naming the path. Remote paths (``s3://`` ...) use Lightning's writer.

    Reading (``trainer.fit(..., ckpt_path=...)``): a file that is truncated (a copy cut short, a disk that filled
    while another writer saved), corrupt, not a checkpoint at all, or that needs code execution to unpickle
    (refused by ``torch.load(..., weights_only=True)``) raises a ``ValueError`` naming the file and the fix,
    instead of torch's low-level error.

    The ``lightning-distill`` CLI installs it unless the trainer already has a custom ``CheckpointIO``; in
    Python, pass it as a plugin.

    Example::

        >>> import lightning as L
        >>> from lightning_distill.checkpoint import AtomicCheckpointIO
        >>> trainer = L.Trainer(plugins=[AtomicCheckpointIO()], logger=False, enable_progress_bar=False)
        >>> type(trainer.strategy.checkpoint_io).__name__
        'AtomicCheckpointIO'
    """

    def load_checkpoint(self, path: Any, map_location: Optional[Any] = None, weights_only: Optional[bool] = None
                        ) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"weights_only": weights_only}
        if map_location is not None:
            kwargs["map_location"] = map_location
        try:
            return super().load_checkpoint(path, **kwargs)
        except (FileNotFoundError, PermissionError, IsADirectoryError):
            raise
        except Exception as err:  # noqa: BLE001 - every way torch.load fails on the file's bytes
            if not _is_local_file_protocol(path):
                raise
            raise _resume_error(path, err, "ckpt_path") from None

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Optional[Any] = None) -> None:
        if storage_options is not None or not _is_local_file_protocol(path):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)  # serialisation errors surface before the disk is touched
        fd, temporary = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(buffer.getbuffer())
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temporary, target)
        except BaseException as err:
            with contextlib.suppress(OSError):
                os.unlink(temporary)
            if not isinstance(err, OSError):
                raise
            kept = "the previous checkpoint there is untouched" if target.exists() else "nothing was written there"
            raise OSError(
                err.errno,
                f"could not write the checkpoint {str(target)!r} ({err.strerror or err}); {kept}. Free disk space "
                "or point the checkpoint directory elsewhere, then resume from the last good checkpoint.",
            ) from err
        with contextlib.suppress(OSError):  # make the rename itself durable
            directory = os.open(target.parent, os.O_RDONLY)
            try:
                os.fsync(directory)
            finally:
                os.close(directory)


# ------------------------------------------------------------------------------------------ resuming
def _resume_error(path: Any, err: BaseException, argument: str) -> ValueError:
    """The ``ValueError`` for a resume checkpoint that ``torch.load(..., weights_only=True)`` cannot read."""
    unsafe, detail = _load_failure(err)
    if unsafe:
        return ValueError(
            f"`{argument}`={str(path)!r} was refused: it contains Python objects that would need code execution to "
            f"unpickle ({detail}), and checkpoints are read with torch.load(..., weights_only=True). Checkpoints "
            "written by Lightning for this package's modules never need it: resume from one of those. Do not load "
            "this file unless you trust its source."
        )
    return ValueError(
        f"`{argument}`={str(path)!r} is not a complete checkpoint: torch cannot read it ({detail}). It is truncated "
        "(a copy cut short, a disk that filled during the save of a writer without atomic saves), corrupt, or not a "
        "checkpoint at all. Resume from another checkpoint of the run (its checkpoints directory keeps the last and "
        "the best ones), or start without a checkpoint."
    )


def _short_name(class_path: str) -> str:
    return class_path.rsplit(".", 1)[-1]


def checkpoint_class(checkpoint: dict) -> Optional[str]:
    """The class path of the module that wrote a Lightning checkpoint, or ``None`` when it does not tell:
    this package's modules record it (``checkpoint["lightning_distill"]["module"]``); the ``lightning-distill``
    CLI (LightningCLI) stores the configured ``class_path`` in ``hyper_parameters["_class_path"]``.

    Example::

        >>> checkpoint_class({"hyper_parameters": {"_class_path": "lightning_distill.FeatureDistillation"}})
        'lightning_distill.FeatureDistillation'
        >>> checkpoint_class({"state_dict": {}}) is None
        True
    """
    entry = checkpoint.get("lightning_distill")
    if isinstance(entry, dict) and isinstance(entry.get("module"), str):
        return entry["module"]
    hparams = checkpoint.get("hyper_parameters")
    if isinstance(hparams, dict) and isinstance(hparams.get("_class_path"), str):
        return hparams["_class_path"]
    return None


def _state_fits(checkpoint: dict, module: nn.Module) -> bool:
    """Whether the checkpoint's ``state_dict`` has the module's keys and shapes (teacher networks a checkpoint
    leaves out and a ``function_matching`` generator state are re-attached on load, so they may be absent)."""
    state = checkpoint.get("state_dict")
    if not isinstance(state, dict):
        return True
    own = module.state_dict()
    source = getattr(module, "teacher_source", None)
    optional = tuple(f"{name}." for name in (source.modules() if source is not None else {})) + ("function_matching.",)
    missing = [k for k in own if k not in state and not k.startswith(optional)]
    unexpected = [k for k in state if k not in own]
    mismatched = [k for k in own if k in state and isinstance(state[k], Tensor) and isinstance(own[k], Tensor)
                  and state[k].shape != own[k].shape]
    return not (missing or unexpected or mismatched)


def check_checkpoint_class(
    checkpoint: dict, expected: Union[str, nn.Module], path: Any = None, argument: str = "ckpt_path",
    fits: Optional[bool] = None,
) -> None:
    """Refuse a checkpoint written by another module class (a strategy resumed with another strategy's config).

    ``expected`` is the class path the CLI config builds (compared by class name), or the module that is about to
    load the checkpoint: then a checkpoint of another class still loads when its weights fit the module (the
    general :class:`~lightning_distill.DistillationModule` built with a preset's objectives reads that preset's
    checkpoint), and is refused only when they do not (``fits``: whether they do, when the caller knows; else
    compared key by key and shape by shape).

    Raises:
        ValueError: naming the file, the class that wrote it, the class expected and the fix.

    Example::

        >>> written = {"hyper_parameters": {"_class_path": "lightning_distill.FeatureDistillation"}}
        >>> check_checkpoint_class(written, "lightning_distill.FeatureDistillation")   # the same class: fine
        >>> check_checkpoint_class(written, "lightning_distill.KnowledgeDistillation", "last.ckpt", "--ckpt_path")
        Traceback (most recent call last):
        ...
        ValueError: `--ckpt_path`='last.ckpt' was written by FeatureDistillation (lightning_distill.FeatureDistillation), but the config builds KnowledgeDistillation (lightning_distill.KnowledgeDistillation): ...
    """
    written = checkpoint_class(checkpoint)
    if written is None:
        return
    if isinstance(expected, nn.Module):
        own_path = f"{type(expected).__module__}.{type(expected).__qualname__}"
        builds = "this module is"
        if _short_name(written) == type(expected).__name__:
            return
        if fits if fits is not None else _state_fits(checkpoint, expected):
            return
    else:
        own_path, builds = str(expected), "the config builds"
        if _short_name(written) == _short_name(own_path):
            return
    where = f"`{argument}`={str(path)!r}" if path is not None else "the checkpoint"
    config = Path(str(path)).resolve().parent.parent / "config.yaml" if path is not None else None
    hint = f" (the run saved it as {config})" if config is not None and config.is_file() else ""
    raise ValueError(
        f"{where} was written by {_short_name(written)} ({written}), but {builds} {_short_name(own_path)} "
        f"({own_path}): the checkpoint holds the weights, optimizer state and hyperparameters of a "
        f"{_short_name(written)} run, which a {_short_name(own_path)} cannot continue. Resume with the config that "
        f"wrote it{hint}, or start a new run without {argument}."
    )


def _read_resume_checkpoint(path: Path, argument: str) -> dict:
    """``torch.load(..., weights_only=True)`` of a checkpoint to resume, memory-mapped where the format allows it
    (only the metadata is read then), with the errors of :class:`AtomicCheckpointIO`."""
    try:
        try:
            checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as err:
            if "mmap" not in str(err):
                raise
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)  # the legacy (non-zip) format
    except (FileNotFoundError, PermissionError, IsADirectoryError):
        raise
    except Exception as err:  # noqa: BLE001 - every way torch.load fails on the file's bytes
        raise _resume_error(path, err, argument) from None
    if not isinstance(checkpoint, dict):
        raise ValueError(
            f"`{argument}`={str(path)!r} holds a {type(checkpoint).__name__}, not a Lightning checkpoint (a dict "
            "written by Trainer.save_checkpoint / ModelCheckpoint)."
        )
    return checkpoint


def check_ckpt_path(config: Any) -> None:
    """What the ``lightning-distill`` CLI runs before LightningCLI reads ``--ckpt_path``.

    LightningCLI loads the checkpoint while parsing, to merge the hyperparameters it holds into the config --
    including the module's ``class_path``, so a checkpoint of another strategy would silently switch the class
    and fail later with an unrelated shape error. This reads the file first (only its metadata: memory-mapped),
    with a clear error for a truncated, corrupt or code-needing file, and refuses a checkpoint written by
    another module class than the config's ``model.class_path`` (:func:`check_checkpoint_class`).

    ``config``: the CLI's parsed config (a ``jsonargparse.Namespace``; with a subcommand, its entry is read).

    Example::

        >>> from jsonargparse import Namespace
        >>> check_ckpt_path(Namespace(subcommand="fit", fit=Namespace(ckpt_path=None)))  # nothing to resume: fine
        >>> import os, tempfile
        >>> path = os.path.join(tempfile.mkdtemp(), "cut.ckpt")
        >>> with open(path, "wb") as f:
        ...     _ = f.write(b"PK\x03\x04 a zip archive cut short")
        >>> check_ckpt_path(Namespace(subcommand="fit", fit=Namespace(ckpt_path=path)))
        Traceback (most recent call last):
        ...
        ValueError: `--ckpt_path`='...cut.ckpt' is not a complete checkpoint: torch cannot read it (...
    """
    subcommand = config.get("subcommand") if hasattr(config, "get") else None
    section = config.get(subcommand) if subcommand else config
    if section is None or not hasattr(section, "get"):
        return
    ckpt_path = section.get("ckpt_path")
    if not ckpt_path or not Path(str(ckpt_path)).is_file():
        return  # "last" / "best" / "hpc" or a missing file: Lightning's own handling and message
    checkpoint = _read_resume_checkpoint(Path(str(ckpt_path)), "--ckpt_path")
    model = section.get("model")
    class_path = model.get("class_path") if hasattr(model, "get") else None
    if isinstance(class_path, str):
        check_checkpoint_class(checkpoint, class_path, ckpt_path, "--ckpt_path")
