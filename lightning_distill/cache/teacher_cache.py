"""The teacher-output cache: :class:`TeacherCache` builds, looks up and (never) checkpoints cached outputs.

:meth:`TeacherCache.build` runs ``teacher_fn`` over the training set in index order (with a
progress bar, rank 0 only) and stores every returned field per sample index;
:meth:`TeacherCache.lookup` returns the rows for a batch's ``index``. The key comes from
:mod:`lightning_distill.cache.keys`, the storage from :mod:`lightning_distill.cache.storage`.
Building never changes the global random state (torch CPU, numpy, ``random``).
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Union

import torch
from torch import Tensor, nn

from lightning_distill.cache.keys import FORMAT_VERSION, _dataset_len, _rank, cache_key, check_deterministic
from lightning_distill.cache.runner import as_fields, run_teacher
from lightning_distill.cache.storage import (
    CACHE_DTYPES,
    CACHE_STORAGES,
    LOGITS,
    Store,
    allocate,
    open_disk,
    publish,
    read_field,
    read_rows,
    temporary_directory,
    write,
    write_meta,
)
from lightning_distill.validation import check_bool, check_choice

__all__ = ["TeacherCache"]

# the package's name: users configure (and tests capture) the cache's messages under it
log = logging.getLogger("lightning_distill.cache")


def _report(message: str) -> None:
    """Tell the user (rank 0 only): through logging when it is configured, else on stderr."""
    if _rank() != 0:
        return
    if log.hasHandlers():
        log.info(message)
    else:
        print(message, file=sys.stderr)


def _fmt_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"  # pragma: no cover


class TeacherCache:
    """Precomputed teacher outputs per sample index, in memory or memory-mapped on disk.

    See :mod:`lightning_distill.cache.keys` for the key, :mod:`lightning_distill.cache.storage` for
    the disk layout and the precision of each ``dtype``, and :mod:`lightning_distill.cache.topk` for
    the top-k approximation with its bound. The cache is never checkpointed: :meth:`state_dict`
    holds the options and the key only, and a resumed run calls :meth:`build` again (which
    reopens a disk cache without running the teacher).

    Args:
        storage: ``"memory"`` (CPU tensors, rebuilt every run) or ``"disk"`` (memory-mapped
            ``.npy`` files in ``directory/<key>/``, reused by later runs with the same teacher
            weights and data).
        directory: where disk caches live; required for, and only valid with, ``storage="disk"``.
        top_k: store only the ``k`` largest logits per position plus the log-sum-exp of the rest
            (the ``"logits"`` field only; features stay dense). ``None``: dense.
        dtype: storage dtype of dense fields, one of :data:`CACHE_DTYPES`; top-k values and
            ``lse_rest`` are always float32. :meth:`lookup` always returns float32.
        allow_random_transforms: explicit opt-in to cache a dataset whose inputs change from load
            to load (one view per sample is cached); by default :meth:`build` refuses it.
        progress: show a progress bar while building (rank 0 only).
        batch_size: samples per teacher forward while building.
        num_workers: DataLoader workers while building (0: in the main process).

    Example::

        >>> from lightning_distill.cache import TeacherCache
        >>> TeacherCache(storage="disk", directory="cache/teacher", top_k=20)
        TeacherCache(storage='disk', directory='cache/teacher', top_k=20, dtype='float32', built=False)
    """

    def __init__(
        self,
        storage: str = "memory",
        directory: Optional[str] = None,
        top_k: Optional[int] = None,
        dtype: str = "float32",
        allow_random_transforms: bool = False,
        progress: bool = True,
        batch_size: int = 256,
        num_workers: int = 0,
    ) -> None:
        check_choice("storage", storage, CACHE_STORAGES)
        if directory is not None and not isinstance(directory, (str, os.PathLike)):
            raise TypeError(f"`directory` must be a path (str) or None, got {type(directory).__name__} {directory!r}.")
        if storage == "disk" and directory is None:
            raise ValueError(
                "`directory` is required with storage='disk' (the cache is written to directory/<key>/), got None. "
                "Pass e.g. directory='cache/teacher', or use storage='memory'."
            )
        if storage == "memory" and directory is not None:
            raise ValueError(
                f"`directory`={str(directory)!r} is only used with storage='disk', but storage='memory'. "
                "Set storage='disk' to keep the cache on disk, or drop `directory`."
            )
        if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
            raise ValueError(
                f"`top_k` must be an integer >= 1 (logits kept per position) or None (dense), got {top_k!r}."
            )
        if dtype not in CACHE_DTYPES:
            raise ValueError(f"`dtype` must be one of {CACHE_DTYPES} (storage dtype of dense fields), got {dtype!r}.")
        self.allow_random_transforms = check_bool("allow_random_transforms", allow_random_transforms)
        self.progress = check_bool("progress", progress)
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"`batch_size` must be an integer >= 1 (samples per teacher forward), got {batch_size!r}.")
        if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
            raise ValueError(f"`num_workers` must be an integer >= 0 (DataLoader workers), got {num_workers!r}.")
        self.storage = storage
        self.directory = None if directory is None else os.fspath(directory)
        self.top_k = top_k
        self.dtype = dtype
        self.batch_size = batch_size
        self.num_workers = num_workers
        self._expected_key: Optional[str] = None
        self._reset()

    def _reset(self) -> None:
        self._key: Optional[str] = None
        self._n = 0
        self._single = True
        self._fields: dict[str, dict[str, Any]] = {}  # name -> meta (kind, shape, num_classes, files)
        self._arrays: dict[str, dict[str, Store]] = {}  # name -> part -> storage
        self._path: Optional[Path] = None

    # ------------------------------------------------------------------ properties
    @property
    def is_built(self) -> bool:
        """Whether :meth:`lookup` can be used."""
        return self._key is not None

    @property
    def key(self) -> Optional[str]:
        """The cache key (64 hex digits) once built, else ``None``."""
        return self._key

    @property
    def path(self) -> Optional[Path]:
        """``directory/<key>`` of a built disk cache, else ``None``."""
        return self._path

    @property
    def fields(self) -> list[str]:
        """Names of the stored fields (``["logits"]`` when ``teacher_fn`` returns a tensor)."""
        return list(self._fields)

    @property
    def nbytes(self) -> int:
        """Bytes of stored data (in memory or on disk)."""
        return int(sum(int(a.nbytes) for parts in self._arrays.values() for a in parts.values()))

    def __len__(self) -> int:
        return self._n

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(storage={self.storage!r}, directory={self.directory!r}, top_k={self.top_k!r}, "
            f"dtype={self.dtype!r}, built={self.is_built})"
        )

    # ------------------------------------------------------------------ state (never the tensors)
    def state_dict(self) -> dict[str, Any]:
        """Options and key only -- the cached outputs are rebuilt or reopened, never checkpointed."""
        return {
            "format": FORMAT_VERSION,
            "key": self._key,
            "n": self._n,
            "storage": self.storage,
            "directory": self.directory,
            "top_k": self.top_k,
            "dtype": self.dtype,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Remember the checkpoint's key: :meth:`build` warns if the teacher or data changed since."""
        self._expected_key = state.get("key")

    def __getstate__(self) -> dict[str, Any]:  # pickling (DDP spawn, deepcopy) drops the data
        state = self.__dict__.copy()
        state.update(_key=None, _n=0, _single=True, _fields={}, _arrays={}, _path=None)
        return state

    def clear(self) -> None:
        """Drop the cached data from this object (files on disk are kept)."""
        self._reset()

    # ------------------------------------------------------------------ key
    def compute_key(self, teacher: nn.Module, dataset: Any, tag: str = "") -> str:
        """The key a :meth:`build` with this teacher, dataset and ``tag`` would use (reads every sample)."""
        return cache_key(teacher, dataset, self.top_k, self.dtype, tag, progress=self.progress)

    # ------------------------------------------------------------------ build
    def build(
        self,
        teacher_fn: Callable[[Any], Union[Tensor, Mapping[str, Tensor]]],
        dataset: Any,
        device: Optional[Union[str, torch.device]] = None,
        collate_fn: Optional[Callable[[list], Any]] = None,
        *,
        teacher: Optional[nn.Module] = None,
        tag: str = "",
    ) -> None:
        """Run ``teacher_fn`` over ``dataset`` in index order and store every output per sample index.

        A disk cache whose ``directory/<key>/`` already exists is reopened instead (the teacher is
        not run; "reusing teacher cache at ..." is reported once, on rank 0).

        Args:
            teacher_fn: ``inputs -> logits`` (``[B, C]`` or ``[B, L, V]``) or ``-> dict`` of named
                float tensors with batch dimension ``B`` (e.g. ``{"logits": ..., "feat:layer3": ...}``);
                called under ``torch.no_grad()`` on batches of ``batch_size`` samples. Per-sample
                shapes must be the same for every batch (pad sequences to a fixed length).
            dataset: the map-style dataset whose sample ``i`` is looked up as index ``i``.
            device: where inputs are moved before ``teacher_fn``; default: the teacher's device.
            collate_fn: the DataLoader's ``collate_fn`` (default collation when ``None``).
            teacher: the ``nn.Module`` whose weights produce the outputs (its fingerprint enters the
                key). Defaults to ``teacher_fn`` itself when that is a module; required otherwise.
                Must be in eval mode.
            tag: extra text mixed into the key -- anything else that changes the outputs, e.g. the
                captured feature layers of a feature strategy.

        Raises:
            ValueError: random transforms (unless allowed), a teacher in train mode, NaN outputs,
                float16 overflow, ``top_k`` not smaller than the class count, changing shapes, or a
                sample ``index`` that is not the sample's position.
        """
        if not callable(teacher_fn):
            raise TypeError(f"`teacher_fn` must be callable (inputs -> tensor or dict), got {type(teacher_fn).__name__}.")
        if teacher is None and isinstance(teacher_fn, nn.Module):
            teacher = teacher_fn
        if teacher is None:
            raise ValueError(
                "`teacher` is required when `teacher_fn` is not an nn.Module: its weights key the cache, so a "
                "changed teacher is never served stale outputs. Pass build(teacher_fn, dataset, teacher=model)."
            )
        if not isinstance(teacher, nn.Module):
            raise TypeError(f"`teacher` must be a torch.nn.Module, got {type(teacher).__name__}.")
        training = [name or type(teacher).__name__ for name, m in teacher.named_modules() if m.training]
        if training:
            raise ValueError(
                f"the teacher is in train mode (submodules {training[:5]}): its outputs would depend on the "
                "batch (BatchNorm) or on random draws (dropout), and caching one draw is wrong. Call "
                "teacher.eval() first; a teacher that must train (teacher_train_mode=True) cannot be cached."
            )
        if not isinstance(tag, str):
            raise TypeError(f"`tag` must be a str, got {type(tag).__name__}.")
        n = _dataset_len(dataset)
        if n == 0:
            raise ValueError("`dataset` is empty: there is nothing to cache.")
        if not self.allow_random_transforms:
            check_deterministic(dataset)
        if device is None:
            first = next(iter(teacher.parameters()), None)
            first = next(iter(teacher.buffers()), None) if first is None else first
            device = first.device if first is not None else torch.device("cpu")
        device = torch.device(device)
        key = self.compute_key(teacher, dataset, tag)
        if self._expected_key is not None and self._expected_key != key:
            log.warning(
                "the teacher cache key differs from the one in the checkpoint (%s... vs %s...): the teacher "
                "weights or the training data changed since that run.", key[:12], self._expected_key[:12]
            )
        self._reset()
        if self.storage == "memory":
            try:
                self._run(teacher_fn, dataset, device, collate_fn, n, None)
            except BaseException:
                self._reset()
                raise
            self._key, self._n = key, n
            return
        root = Path(self.directory).expanduser()
        final = root / key
        if final.is_dir():
            self._open(final, key, n)
            _report(f"reusing teacher cache at {final} ({n} samples, {_fmt_bytes(self.nbytes)})")
            return
        tmp = temporary_directory(root, key)
        try:
            self._run(teacher_fn, dataset, device, collate_fn, n, tmp)
            write_meta(tmp, self._arrays, key=key, n=n, single=self._single, top_k=self.top_k, dtype=self.dtype,
                       tag=tag, fields=self._fields)
            self._arrays = {}  # drop the writable memory maps before the rename
            publish(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            self._reset()
            raise
        self._open(final, key, n)

    def _run(self, teacher_fn: Callable, dataset: Any, device: torch.device, collate_fn: Optional[Callable],
             n: int, tmp: Optional[Path]) -> None:
        """Run the teacher over ``dataset`` and store its outputs (in memory, or in ``tmp`` on disk)."""

        def store(out: Any, pos: int, bs: int) -> None:
            fields, single = as_fields(out, bs, pos, self.top_k, self._single, self._fields)
            if pos == 0:
                self._single = single
                self._fields, self._arrays = allocate(fields, n, self.top_k, self.dtype, tmp)
            write(fields, self._fields, self._arrays, pos, bs)

        run_teacher(teacher_fn, dataset, device, collate_fn, n, self.batch_size, self.num_workers, self.progress,
                    store)

    def _open(self, path: Path, key: str, n: int) -> None:
        """Reopen a complete disk cache read-only (memory-mapped)."""
        meta, arrays = open_disk(path, key, n)
        self._reset()
        self._key, self._n, self._single, self._path = key, n, bool(meta["single"]), path
        self._fields, self._arrays = meta["fields"], arrays

    # ------------------------------------------------------------------ lookup
    def _check_index(self, index: Any) -> Tensor:
        if not self.is_built:
            raise RuntimeError("the teacher cache is not built yet: call build(teacher_fn, dataset) before lookup().")
        index = torch.as_tensor(index)
        if index.is_floating_point() or index.is_complex() or index.dtype == torch.bool:
            raise TypeError(f"`index` must be an integer tensor of sample indices, got dtype {index.dtype}.")
        if index.ndim != 1:
            raise ValueError(f"`index` must be 1-D (one sample index per batch row), got shape {tuple(index.shape)}.")
        index = index.to("cpu", torch.long)
        if index.numel() and (int(index.min()) < 0 or int(index.max()) >= self._n):
            bad = index[(index < 0) | (index >= self._n)]
            raise ValueError(
                f"`index` holds {bad[:5].tolist()} outside [0, {self._n - 1}]: the cache was built for a dataset of "
                f"{self._n} samples. Was it built on another split or dataset? Build it on the dataset whose batches "
                "you look up (the training set) and pass each sample's position in it."
            )
        return index

    def lookup(self, index: Any, device: Optional[Union[str, torch.device]] = None) -> Union[Tensor, dict[str, Tensor]]:
        """Cached outputs of the samples ``index`` (the batch's ``index``), float32, on ``device``.

        Returns a tensor ``[len(index), *per-sample shape]`` when ``teacher_fn`` returned a tensor,
        else a dict with the same keys. Top-k logits are rebuilt with
        :func:`~lightning_distill.cache.topk.topk_to_dense`.

        Raises:
            RuntimeError: before :meth:`build`.
            ValueError: an index outside ``[0, len(cache))`` (a cache built for another dataset).
        """
        index = self._check_index(index)
        device = torch.device("cpu") if device is None else torch.device(device)
        out = {name: read_field(self._fields[name], self._arrays[name], index, device) for name in self._fields}
        return out[LOGITS] if self._single else out

    def lookup_topk(self, index: Any, device: Optional[Union[str, torch.device]] = None) -> tuple[Tensor, Tensor, Tensor]:
        """Raw top-k storage of the ``"logits"`` field: ``(values, class ids, lse_rest)`` for sparse KD losses."""
        index = self._check_index(index)
        if self._fields.get(LOGITS, {}).get("kind") != "topk":
            raise ValueError(f"lookup_topk() needs a cache built with `top_k`, got top_k={self.top_k!r}.")
        device = torch.device("cpu") if device is None else torch.device(device)
        parts = self._arrays[LOGITS]
        return (
            read_rows(parts["values"], index).to(device),
            read_rows(parts["indices"], index).to(device).long(),
            read_rows(parts["lse_rest"], index).to(device),
        )

