"""Storage of cached fields: CPU tensors in memory, or memory-mapped ``.npy`` files on disk.

Every field a teacher returns (the logits and, for feature strategies, captured features) is
stored as one array per *part*, with the sample index as its first dimension: a dense field has
one part, ``data``; the top-k ``"logits"`` field (see :mod:`lightning_distill.cache.topk`) has
three, ``values``, ``indices`` and ``lse_rest``. A field's metadata (kind, per-sample shape,
dtype, files) is a plain dict, the one written to ``meta.json``.

**Where it lives.** ``storage="memory"``: CPU tensors, rebuilt every run. ``storage="disk"``:
memory-mapped ``.npy`` files in ``directory/<key>/`` that are reused by later runs (the key is
described in :mod:`lightning_distill.cache.keys`).

**Disk layout** (``directory/<key>/``)::

    meta.json                 format, key, n, fields (shape, dtype, files), top_k, dtype, created, ...
    00.data.npy               dense field 0, shape [n, *per-sample shape]
    01.values.npy             top-k field: the k largest logits, float32 [n, ..., k]
    01.indices.npy            their class ids, int32 (int64 when C >= 2**31) [n, ..., k]
    01.lse_rest.npy           log-sum-exp of the other C - k logits, float32 [n, ...]

A build writes into ``directory/.<key>.tmp-<pid>-<random>/`` (:func:`temporary_directory`) and
renames it to ``directory/<key>/`` (:func:`publish`) only once every row and ``meta.json`` are on
disk, so a killed or failing build never leaves a directory that a later run would use (a
``.tmp-*`` folder left by a killed process is ignored and safe to delete). ``bfloat16`` has no
numpy dtype: on disk it is stored bit-exactly as its ``int16`` view (``meta.json`` records
``"stored_as": "int16"``) and viewed back as ``torch.bfloat16`` on lookup.

**Precision.** ``dtype="float32"`` stores exactly what the teacher returned (the KD loss on
cached logits is bit-identical to the loss on the same logits computed live; against a live
teacher run on *differently composed* batches the logits agree to float32 rounding, about
1e-6 relative, because matrix kernels may sum in another order). ``"float16"`` rounds every
value with relative error <= 2**-11 (~4.9e-4) and refuses logits beyond its range (65504);
``"bfloat16"`` <= 2**-8 (~3.9e-3), same range as float32. Logits moved by at most ``eta``
(``eta = max|z| * relative error``) move ``softmax(z / T)`` by at most ``exp(2 eta / T) - 1``
(about ``2 eta / T``) in L1, which bounds the change of the KD gradient the same way; the tests
check the T=4 KD loss to rtol 2e-3 (float16) and 2e-2 (bfloat16) for logits of a few units.
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Mapping, Optional, Union

import numpy as np
import torch
from torch import Tensor

from lightning_distill.cache.keys import FORMAT_VERSION
from lightning_distill.cache.topk import dense_to_topk, topk_to_dense

__all__ = ["CACHE_DTYPES", "CACHE_STORAGES", "LOGITS"]

#: Valid values of ``storage``.
CACHE_STORAGES = ("memory", "disk")
#: Valid values of ``dtype`` (storage dtype of dense fields).
CACHE_DTYPES = ("float32", "float16", "bfloat16")
#: Name of the field a bare-tensor ``teacher_fn`` output is stored under; ``top_k`` applies to it.
LOGITS = "logits"

_TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_NUMPY_STORED = {"float32": np.float32, "float16": np.float16, "bfloat16": np.int16}  # bf16: int16 view
_FLOAT16_MAX = 65504.0

#: One part of a field: a CPU tensor (memory) or a memory-mapped array (disk).
Store = Union[Tensor, np.ndarray]


# ---------------------------------------------------------------------------------------------
# fields: allocation, writes, reads
# ---------------------------------------------------------------------------------------------


def allocate(
    fields: Mapping[str, Tensor], n: int, top_k: Optional[int], dtype: str, directory: Optional[Path]
) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, Store]]]:
    """Metadata and empty storage for ``n`` samples of each field, shaped like the first batch ``fields``.

    The :data:`LOGITS` field is stored as top-k when ``top_k`` is set, every other field densely in
    ``dtype``. With ``directory=None`` the parts are CPU tensors, else ``.npy`` files created in
    ``directory`` and memory-mapped for writing.

    Returns:
        ``(metas, arrays)``: field name -> metadata, and field name -> part name -> storage.
    """

    def new(file: str, shape: tuple[int, ...], torch_dtype: torch.dtype, np_dtype: Any) -> Store:
        if directory is None:
            return torch.empty(shape, dtype=torch_dtype)
        return np.lib.format.open_memmap(directory / file, mode="w+", dtype=np_dtype, shape=shape)

    metas: dict[str, dict[str, Any]] = {}
    arrays: dict[str, dict[str, Store]] = {}
    for i, (name, value) in enumerate(fields.items()):
        shape = tuple(int(s) for s in value.shape[1:])
        if top_k is not None and name == LOGITS:
            c = shape[-1] if shape else 1
            if not shape or top_k >= c:
                raise ValueError(
                    f"`top_k`={top_k!r} must be smaller than the number of classes, but the logits have "
                    f"per-sample shape {shape} (C={c}). Use a smaller top_k or top_k=None (dense)."
                )
            k, lead = top_k, shape[:-1]
            wide = c >= 2**31
            files = {"values": f"{i:02d}.values.npy", "indices": f"{i:02d}.indices.npy",
                     "lse_rest": f"{i:02d}.lse_rest.npy"}
            arrays[name] = {
                "values": new(files["values"], (n, *lead, k), torch.float32, np.float32),
                "indices": new(files["indices"], (n, *lead, k), torch.int64 if wide else torch.int32,
                               np.int64 if wide else np.int32),
                "lse_rest": new(files["lse_rest"], (n, *lead), torch.float32, np.float32),
            }
            metas[name] = {"kind": "topk", "shape": list(shape), "num_classes": c, "k": k,
                           "files": files, "stored_as": "float32/int32"}
        else:
            files = {"data": f"{i:02d}.data.npy"}
            stored = np.dtype(_NUMPY_STORED[dtype]).name
            arrays[name] = {"data": new(files["data"], (n, *shape), _TORCH_DTYPES[dtype], _NUMPY_STORED[dtype])}
            metas[name] = {"kind": "dense", "shape": list(shape), "dtype": dtype, "files": files,
                           "stored_as": stored}
    return metas, arrays


def write(
    fields: Mapping[str, Tensor], metas: Mapping[str, Mapping[str, Any]], arrays: Mapping[str, Mapping[str, Store]],
    pos: int, bs: int,
) -> None:
    """Store one batch: rows ``pos .. pos + bs - 1`` of every field, encoded as its metadata says.

    Raises a ``ValueError`` for finite values that ``float16`` storage would turn into ``inf``.
    """
    for name, value in fields.items():
        meta, parts = metas[name], arrays[name]
        if meta["kind"] == "topk":
            values, indices, rest = dense_to_topk(value, meta["k"])
            wide = meta["num_classes"] >= 2**31
            chunks = {"values": values, "indices": indices.to(torch.int64 if wide else torch.int32), "lse_rest": rest}
        else:
            cast = value.detach().to(_TORCH_DTYPES[meta["dtype"]])
            if meta["dtype"] == "float16":
                over = torch.isinf(cast) & torch.isfinite(value)
                if bool(over.any()):
                    raise ValueError(
                        f"teacher_fn's field {name!r} has values beyond the float16 range (|x| > {_FLOAT16_MAX:g}, "
                        f"max |x| = {value.abs().max().item():.4g}) at samples {pos}..{pos + bs - 1}: `dtype`="
                        "'float16' would turn them into inf. Use dtype='bfloat16' or 'float32'."
                    )
            chunks = {"data": cast}
        for part, chunk in chunks.items():
            target = parts[part]
            chunk = chunk.detach().to("cpu")
            if isinstance(target, Tensor):
                target[pos : pos + bs].copy_(chunk)
            else:
                if chunk.dtype == torch.bfloat16:
                    chunk = chunk.view(torch.int16)
                target[pos : pos + bs] = chunk.numpy()


def read_rows(store: Store, index: Tensor) -> Tensor:
    """Rows ``index`` (a CPU ``long`` tensor) of one part, as a tensor on the CPU."""
    if isinstance(store, Tensor):
        return store.index_select(0, index)
    return torch.from_numpy(np.ascontiguousarray(store[index.numpy()]))


def read_field(meta: Mapping[str, Any], parts: Mapping[str, Store], index: Tensor, device: torch.device) -> Tensor:
    """Rows ``index`` of one field as float32 on ``device``; top-k logits are rebuilt dense."""
    if meta["kind"] == "topk":
        values = read_rows(parts["values"], index).to(device)
        indices = read_rows(parts["indices"], index).to(device)
        rest = read_rows(parts["lse_rest"], index).to(device)
        return topk_to_dense(values, indices, rest, int(meta["num_classes"]))
    rows = read_rows(parts["data"], index)
    if rows.dtype == torch.int16:  # bfloat16 stored as its int16 view on disk
        rows = rows.view(torch.bfloat16)
    return rows.to(device).float()


# ---------------------------------------------------------------------------------------------
# disk: temporary build directory, meta.json, atomic rename, reopening
# ---------------------------------------------------------------------------------------------


def temporary_directory(root: Path, key: str) -> Path:
    """Create ``root`` (if needed) and an empty ``root/.<key>.tmp-<pid>-<random>/`` to build into."""
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".{key}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    return tmp


def write_meta(
    directory: Path, arrays: Mapping[str, Mapping[str, Store]], *, key: str, n: int, single: bool,
    top_k: Optional[int], dtype: str, tag: str, fields: Mapping[str, Any],
) -> None:
    """Flush every memory-mapped part to disk, then write ``meta.json`` (and sync it) in ``directory``."""
    for parts in arrays.values():
        for arr in parts.values():
            arr.flush()
    meta = {
        "format": FORMAT_VERSION,
        "key": key,
        "n": n,
        "single": single,
        "top_k": top_k,
        "dtype": dtype,
        "tag": tag,
        "fields": fields,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "complete": True,
    }
    with open(directory / "meta.json", "w") as f:
        json.dump(meta, f, indent=2)
        f.flush()
        os.fsync(f.fileno())


def publish(tmp: Path, final: Path) -> None:
    """Rename the finished build directory ``tmp`` to ``final``, atomically.

    When another process (a DDP rank) has already published a complete ``final``, ``tmp`` is
    deleted instead.
    """
    try:
        os.rename(tmp, final)  # atomic: final appears complete or not at all
    except OSError:
        if not (final / "meta.json").is_file():
            raise
        shutil.rmtree(tmp, ignore_errors=True)  # another process (DDP rank) finished first


def open_disk(path: Path, key: str, n: int) -> tuple[dict[str, Any], dict[str, dict[str, np.ndarray]]]:
    """Reopen a complete disk cache read-only (memory-mapped): its ``meta.json`` and every part.

    Raises a ``ValueError`` (delete the directory to rebuild) when ``meta.json`` or a part is
    unreadable or does not match ``key`` and ``n``.
    """

    def corrupt(why: str) -> ValueError:
        return ValueError(
            f"the teacher cache at {path} is unreadable ({why}). It was not written by this version of "
            "lightning_distill or was modified; delete that directory and the cache is rebuilt."
        )

    try:
        with open(path / "meta.json") as f:
            meta = json.load(f)
    except (OSError, ValueError) as err:
        raise corrupt(f"meta.json: {err}") from None
    if meta.get("format") != FORMAT_VERSION or meta.get("key") != key or meta.get("n") != n:
        raise corrupt(f"format/key/n in meta.json are {meta.get('format')!r}/{meta.get('key')!r}/{meta.get('n')!r}")
    arrays: dict[str, dict[str, np.ndarray]] = {}
    for name, field in meta["fields"].items():
        arrays[name] = {}
        for part, file in field["files"].items():
            try:
                arr = np.load(path / file, mmap_mode="r")
            except (OSError, ValueError) as err:
                raise corrupt(f"{file}: {err}") from None
            if arr.shape[0] != n:
                raise corrupt(f"{file} has {arr.shape[0]} rows, expected {n}")
            arrays[name][part] = arr
    return meta, arrays
