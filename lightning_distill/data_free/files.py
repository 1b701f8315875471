"""The transfer-set file: a ``torch.save`` dict of plain tensors, written atomically, read safely.

A file holds ``"inputs"`` (float32 ``[N, *input_shape]``) and, when the synthesis produced them,
``"targets"``, ``"teacher_acc"``, ``"loss_history"``, ``"loss_terms"`` and ``"meta"``. Nothing in
it needs pickled code, so it loads with ``torch.load(path, weights_only=True)``, and code that
reads unlabeled arrays (:class:`~lightning_distill.data.UnlabeledDataset`) takes its ``"inputs"``.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Union

import torch
from torch import Tensor

__all__ = ["load_transfer_set", "save_transfer_set"]


def save_transfer_set(result: dict[str, Any], path: Union[str, os.PathLike], *, overwrite: bool = True) -> Path:
    """Save a :func:`~lightning_distill.data_free.deep_inversion` result with ``torch.save``, atomically.

    The file is a dict of plain tensors and Python values -- ``"inputs"`` (float32
    ``[N, *input_shape]``), ``"targets"`` (int64 ``[N]``, if present), ``"teacher_acc"``,
    ``"loss_history"``, ``"loss_terms"`` and ``"meta"`` (whatever of them the result has) --
    so it loads with ``torch.load(path, weights_only=True)``; code that reads unlabeled
    arrays uses its ``"inputs"`` key. It is written to a temporary file in the same folder
    and then renamed, so an interrupted save never leaves a half-written file at ``path``.

    Args:
        result: a dict with at least ``"inputs"`` (a tensor), e.g. what
            :func:`~lightning_distill.data_free.deep_inversion` returns.
        path: the output file (``.pt``); parent folders are created.
        overwrite: replace an existing file (``False`` raises ``FileExistsError`` instead).

    Returns:
        The path written.

    Example::

        >>> import os, tempfile, torch
        >>> folder = tempfile.mkdtemp()
        >>> path = save_transfer_set({"inputs": torch.zeros(4, 1, 8, 8), "targets": torch.arange(4)},
        ...                          os.path.join(folder, "set.pt"))
        >>> sorted(torch.load(path, weights_only=True))
        ['inputs', 'targets']
    """
    if not isinstance(result, dict) or not isinstance(result.get("inputs"), Tensor):
        raise ValueError(
            f"`result` must be a dict with an 'inputs' tensor (what deep_inversion returns), got "
            f"{type(result).__name__} with keys {sorted(result) if isinstance(result, dict) else None!r}."
        )
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"`path`={str(path)!r} exists; pass overwrite=True (CLI: --overwrite) to replace it.")
    payload: dict[str, Any] = {"inputs": result["inputs"].detach().to("cpu", torch.float32).contiguous()}
    if result.get("targets") is not None:
        targets = result["targets"]
        if not isinstance(targets, Tensor) or tuple(targets.shape) != (len(payload["inputs"]),):
            raise ValueError(
                f"`result['targets']` must be a tensor of shape [{len(payload['inputs'])}] (one class per input), "
                f"got {targets!r}."
            )
        payload["targets"] = targets.detach().to("cpu", torch.long).contiguous()
    for key in ("teacher_acc", "loss_history", "loss_terms", "meta"):
        if key in result:
            payload[key] = result[key]
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(payload, handle)
        if not overwrite and path.exists():
            raise FileExistsError(f"`path`={str(path)!r} appeared while saving; pass overwrite=True to replace it.")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def load_transfer_set(path: Union[str, os.PathLike]) -> dict[str, Any]:
    """Load a file written by :func:`save_transfer_set` (``torch.load(..., weights_only=True)``).

    Returns the saved dict: ``"inputs"`` always, and ``"targets"``, ``"teacher_acc"``,
    ``"loss_history"``, ``"loss_terms"``, ``"meta"`` when the file has them.

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: the file cannot be loaded safely or has no ``"inputs"`` tensor.

    Example::

        >>> import os, tempfile, torch
        >>> path = os.path.join(tempfile.mkdtemp(), "set.pt")
        >>> _ = save_transfer_set({"inputs": torch.ones(2, 3)}, path)
        >>> load_transfer_set(path)["inputs"].shape
        torch.Size([2, 3])
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"`path`={str(path)!r}: no such file. Create one with python -m lightning_distill.data_free."
        )
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle refusal, truncated file, other format
        lines = [line for line in str(err).splitlines() if line.strip()]
        first = next((line for line in lines if "WeightsUnpickler error" in line), lines[0] if lines else repr(err))
        raise ValueError(
            f"`path`={str(path)!r} is not a transfer set readable with torch.load(weights_only=True): {first}"
        ) from None
    if not isinstance(obj, dict) or not isinstance(obj.get("inputs"), Tensor):
        found = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
        raise ValueError(
            f"`path`={str(path)!r} holds {found!r}, expected a dict with an 'inputs' tensor (see save_transfer_set)."
        )
    return obj
