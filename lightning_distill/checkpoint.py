"""Loading model weights from files safely (``torch.load(..., weights_only=True)``).

Used for ``teacher_checkpoint``: accepts a Lightning checkpoint of a :class:`Classifier` run
(keys ``model.*``), of a distillation run (its ``student.*`` becomes the weights), a
RepDistiller-style ``{"model": state_dict, ...}`` file, or a plain state dict; ``zoo:NAME`` names weights shipped inside the package (see
:mod:`lightning_distill.zoo`).
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Union

import torch
from torch import Tensor, nn

__all__ = ["extract_state_dict", "load_weights", "read_checkpoint"]

#: Prefixes stripped, in order, from a Lightning checkpoint's ``state_dict``: the network of a
#: ``Classifier`` run, then the student of a distillation run.
_MODULE_PREFIXES = ("model.", "student.")


def read_checkpoint(path: Union[str, os.PathLike], argument: str = "teacher_checkpoint") -> dict:
    """``torch.load`` a file with ``weights_only=True`` and a clear error when that is refused."""
    from lightning_distill.zoo import resolve

    resolved = resolve(path)
    if not Path(resolved).is_file():
        raise FileNotFoundError(f"`{argument}`={str(path)!r}: no such file ({resolved}).")
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
    state = extract_state_dict(read_checkpoint(path, argument))
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
        raise ValueError(f"`{argument}`={str(path)!r} could not be loaded into {type(module).__name__}: {err}") from None


def _shorten(items: list[str], limit: int = 12) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")
