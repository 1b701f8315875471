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
``lightning-distill`` CLI installs it by default.
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

__all__ = ["AtomicCheckpointIO", "MissingCheckpointError", "extract_state_dict", "load_weights", "read_checkpoint"]

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
    except pickle.UnpicklingError as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        if "weights only load failed" in str(err).lower():
            raise ValueError(
                f"`{argument}`={str(path)!r} cannot be loaded safely: it contains Python objects that would "
                "need code execution to unpickle, and lightning_distill only loads checkpoints with "
                "`torch.load(..., weights_only=True)`. Save plain tensors instead, e.g. "
                "`torch.save(model.state_dict(), path)`. Details: " + first
            ) from None
        raise ValueError(f"`{argument}`={str(path)!r} is not a readable torch.save file ({first}).") from None
    except (OSError, EOFError, RuntimeError, IndexError, ValueError) as err:
        raise ValueError(
            f"`{argument}`={str(path)!r} is not a readable torch.save file (truncated, empty or another "
            f"format): {type(err).__name__}: {err}"
        ) from None
    if not isinstance(obj, dict):
        raise ValueError(
            f"`{argument}`={str(path)!r} holds a {type(obj).__name__}, expected a state dict or a "
            "Lightning checkpoint (a dict with a 'state_dict' entry)."
        )
    return obj


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
            them listed -- or a file that would need code execution to load.
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

    The ``lightning-distill`` CLI installs it unless the trainer already has a custom ``CheckpointIO``; in
    Python, pass it as a plugin.

    Example::

        >>> import lightning as L
        >>> from lightning_distill.checkpoint import AtomicCheckpointIO
        >>> trainer = L.Trainer(plugins=[AtomicCheckpointIO()], logger=False, enable_progress_bar=False)
        >>> type(trainer.strategy.checkpoint_io).__name__
        'AtomicCheckpointIO'
    """

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
