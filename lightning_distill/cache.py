r"""Teacher-output cache: run the frozen teacher once per sample, not once per epoch.

A frozen teacher in eval mode that sees the same input every epoch produces the same output
every epoch, so its forward pass can be paid once. :class:`TeacherCache` runs ``teacher_fn``
over the training set in index order (with a progress bar), stores every returned field per
sample index -- the logits and, for feature strategies, the captured features -- and
:meth:`TeacherCache.lookup` returns the rows for a batch's ``index`` (the sample's position in
its split, the third element of every ``(input, target, index)`` batch of this package).

**Where it lives.** ``storage="memory"``: CPU tensors, rebuilt every run. ``storage="disk"``:
memory-mapped ``.npy`` files in ``directory/<key>/`` that are reused by later runs. The *key* is
``sha256(format version, teacher fingerprint, dataset fingerprint, top_k, dtype, tag)``: the
teacher's architecture and every tensor of its ``state_dict`` (buffers such as BatchNorm
statistics included) and every input sample (bytes, dtype, shape, in index order). Changing a
weight or a sample changes the key and so the directory: a stale cache is never read, it is
just left behind (delete old ``directory/<key>/`` folders to reclaim space).

**Disk layout** (``directory/<key>/``)::

    meta.json                 format, key, n, fields (shape, dtype, files), top_k, dtype, created, ...
    00.data.npy               dense field 0, shape [n, *per-sample shape]
    01.values.npy             top-k field: the k largest logits, float32 [n, ..., k]
    01.indices.npy            their class ids, int32 (int64 when C >= 2**31) [n, ..., k]
    01.lse_rest.npy           log-sum-exp of the other C - k logits, float32 [n, ...]

A build writes into ``directory/.<key>.tmp-<pid>-<random>/`` and renames it to
``directory/<key>/`` only once every row and ``meta.json`` are on disk, so a killed or failing
build never leaves a directory that a later run would use (a ``.tmp-*`` folder left by a killed
process is ignored and safe to delete). ``bfloat16`` has no numpy dtype: on disk it is stored
bit-exactly as its ``int16`` view (``meta.json`` records ``"stored_as": "int16"``) and viewed
back as ``torch.bfloat16`` on lookup.

**Precision.** ``dtype="float32"`` stores exactly what the teacher returned (the KD loss on
cached logits is bit-identical to the loss on the same logits computed live; against a live
teacher run on *differently composed* batches the logits agree to float32 rounding, about
1e-6 relative, because matrix kernels may sum in another order). ``"float16"`` rounds every
value with relative error <= 2**-11 (~4.9e-4) and refuses logits beyond its range (65504);
``"bfloat16"`` <= 2**-8 (~3.9e-3), same range as float32. Logits moved by at most ``eta``
(``eta = max|z| * relative error``) move ``softmax(z / T)`` by at most ``exp(2 eta / T) - 1``
(about ``2 eta / T``) in L1, which bounds the change of the KD gradient the same way; the tests
check the T=4 KD loss to rtol 2e-3 (float16) and 2e-2 (bfloat16) for logits of a few units.

**Top-k storage** (``top_k=k``, for large class / vocabulary counts) keeps, per position, the
``k`` largest logits, their class ids and ``lse_rest``, the log-sum-exp of the other ``C - k``
logits; :func:`topk_to_dense` rebuilds dense logits with the top-k entries exact and every tail
class at ``lse_rest - log(C - k)`` (the tail's mass spread uniformly). At ``T = 1`` the
normaliser, the top-k probabilities and the tail's total mass ``eps`` are exact; only how
``eps`` splits *inside* the tail is lost, so for any student distribution ``q``

.. math::

    KL(p \| q) - KL(\hat p \| q) = \epsilon \, [KL(r \| q_{tail}) - KL(u \| q_{tail})],
    \qquad \| p - \hat p \|_1 \le 2 \epsilon

(``r`` the true tail distribution, ``u`` uniform, ``q_tail`` the student's renormalised tail);
since the gradient of ``KL(p || q)`` with respect to the student's logits is ``q - p``, the
per-sample gradient moves by at most ``2 eps`` in L1 (divided by ``N`` under ``batchmean``).
At a temperature ``T >= 1`` the rebuilt tail is *over*-weighted (Jensen: for a given
``sum exp(z)`` the uniform tail has the largest ``sum exp(z / T)``), so the true and the rebuilt
tail mass at ``T`` are both at most :math:`\hat\epsilon_T`, the tail mass of
``softmax(z_hat / T)`` -- computable from the cached values -- and
:math:`\|p^T - \hat p^T\|_1 \le 2\hat\epsilon_T`: the gradient of the ``T^2``-scaled, batchmean KD
loss with respect to one sample's student logits moves by at most :math:`2 T \hat\epsilon_T / N`
(L1). It is small for a peaked teacher (most mass in the top-k); choose ``k`` so that
:math:`\hat\epsilon_T` at your temperature is small, or use dense storage.

**Random transforms.** The cache is only valid when the teacher sees the same input every
epoch. :func:`check_deterministic` (run by :meth:`TeacherCache.build`) looks for random
transforms on the dataset (``Random*``, ``ColorJitter``, ``RandAugment``, ...) and loads a few
samples several times; any difference raises a ``ValueError`` unless
``allow_random_transforms=True`` (then one view per sample, drawn with a fixed seed, is cached).
Function matching / consistent-augmentation KD needs the teacher on the student's view: keep the
cache off there.

Building never changes the global random state (torch CPU, numpy, ``random``).

Example::

    >>> import torch
    >>> from torch import nn
    >>> from lightning_distill.cache import TeacherCache
    >>> from lightning_distill.data.common import TensorClassificationDataset
    >>> _ = torch.manual_seed(0)
    >>> data = TensorClassificationDataset(torch.randn(10, 4), torch.zeros(10, dtype=torch.long))
    >>> teacher = nn.Linear(4, 3).eval()
    >>> cache = TeacherCache(progress=False)
    >>> cache.build(teacher, data)
    >>> len(cache), cache.lookup(torch.tensor([7, 2])).shape
    (10, torch.Size([2, 3]))
    >>> torch.allclose(cache.lookup(torch.tensor([7])), teacher(data.inputs[7:8]).detach())
    True
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import inspect
import json
import logging
import math
import os
import random
import shutil
import sys
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Optional, Union

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, IterableDataset

from lightning_distill.module import _INPUT_KEYS, unpack_batch

__all__ = [
    "CACHE_DTYPES",
    "CACHE_STORAGES",
    "FORMAT_VERSION",
    "TeacherCache",
    "check_deterministic",
    "dataset_fingerprint",
    "dense_to_topk",
    "teacher_fingerprint",
    "topk_to_dense",
]

log = logging.getLogger(__name__)

#: Version of the key derivation and the on-disk layout; bumping it invalidates old caches.
FORMAT_VERSION = 1
#: Valid values of ``storage``.
CACHE_STORAGES = ("memory", "disk")
#: Valid values of ``dtype`` (storage dtype of dense fields).
CACHE_DTYPES = ("float32", "float16", "bfloat16")
#: Name of the field a bare-tensor ``teacher_fn`` output is stored under; ``top_k`` applies to it.
LOGITS = "logits"

_TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_NUMPY_STORED = {"float32": np.float32, "float16": np.float16, "bfloat16": np.int16}  # bf16: int16 view
_FLOAT16_MAX = 65504.0
# transforms that draw random numbers although their name does not start with "Random"
_RANDOM_TRANSFORM_NAMES = frozenset(
    {"ColorJitter", "RandAugment", "AutoAugment", "TrivialAugmentWide", "AugMix", "ElasticTransform",
     "GaussianNoise", "MixUp", "CutMix", "ScaleJitter"}
)
# attributes through which datasets and transform containers reach their transforms / inner datasets
_WALK_ATTRS = ("transform", "transforms", "train_transform", "augment", "augmentation", "augmentations",
               "dataset", "datasets")


# ---------------------------------------------------------------------------------------------
# helpers: RNG isolation, hashing, samples
# ---------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _isolated_rng(seed: Optional[int]) -> Iterator[None]:
    """Run the block with (optionally seeded) torch-CPU / numpy / ``random`` state, then restore it."""
    states = (random.getstate(), np.random.get_state(), torch.random.get_rng_state())
    try:
        if seed is not None:
            random.seed(seed)
            np.random.seed(seed)
            torch.random.default_generator.manual_seed(seed)
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.random.set_rng_state(states[2])


def _tensor_bytes(t: Tensor) -> np.ndarray:
    t = t.detach().to("cpu").contiguous().reshape(-1)
    return t.view(torch.uint8).numpy()


def _update_hash(h: Any, obj: Any, what: str) -> None:
    """Feed ``obj`` (tensor, array, mapping, sequence, scalar) into ``h``, with dtype and shape."""
    if isinstance(obj, Tensor):
        if obj.layout != torch.strided:
            obj = obj.to_dense()
        h.update(f"T|{obj.dtype}|{tuple(obj.shape)}|".encode())
        h.update(_tensor_bytes(obj))
    elif isinstance(obj, np.ndarray):
        if obj.dtype.hasobject:
            raise TypeError(f"cannot fingerprint {what}: a numpy array of Python objects.")
        a = np.ascontiguousarray(obj)
        h.update(f"A|{a.dtype.str}|{a.shape}|".encode())
        h.update(a.reshape(-1).view(np.uint8))
    elif isinstance(obj, Mapping):
        h.update(f"M|{len(obj)}|".encode())
        for k in sorted(obj, key=str):
            h.update(f"{k!s}=".encode())
            _update_hash(h, obj[k], what)
    elif isinstance(obj, (list, tuple)):
        h.update(f"S|{len(obj)}|".encode())
        for item in obj:
            _update_hash(h, item, what)
    elif obj is None or isinstance(obj, (bool, int, float, complex, str)):
        h.update(f"V|{type(obj).__name__}|{obj!r}|".encode())
    elif isinstance(obj, bytes):
        h.update(b"B|%d|" % len(obj) + obj)
    elif hasattr(obj, "__array__"):  # PIL images and other array-likes
        _update_hash(h, np.asarray(obj), what)
    else:
        raise TypeError(
            f"cannot fingerprint {what} of type {type(obj).__name__}: inputs must be tensors, numpy "
            "arrays (or array-likes such as PIL images), numbers, strings, or dicts / lists of them."
        )


def _digest(obj: Any, what: str) -> str:
    h = hashlib.sha256()
    _update_hash(h, obj, what)
    return h.hexdigest()


def _sample_input(sample: Any) -> Any:
    """The input of one dataset sample: element 0 of a tuple, the input key of a dict, or the sample."""
    if isinstance(sample, Mapping):
        for key in _INPUT_KEYS:
            if key in sample:
                return sample[key]
        raise ValueError(f"a dict sample needs one of the keys {_INPUT_KEYS}, got keys {sorted(sample)}.")
    if isinstance(sample, (tuple, list)):
        if not sample:
            raise ValueError("a dataset sample is an empty tuple; expected (input, target[, index, ...]).")
        return sample[0]
    return sample


def _dataset_len(dataset: Any) -> int:
    if isinstance(dataset, IterableDataset):
        raise TypeError(
            f"`dataset` must be a map-style dataset (with __len__ and __getitem__), got the IterableDataset "
            f"{type(dataset).__name__}: its samples have no stable index to key the cache on."
        )
    try:
        return len(dataset)
    except TypeError:
        raise TypeError(
            f"`dataset` must be a map-style dataset with __len__ and __getitem__, got {type(dataset).__name__}."
        ) from None


def _rank() -> int:
    try:
        from lightning.fabric.utilities.rank_zero import rank_zero_only

        return int(getattr(rank_zero_only, "rank", 0) or 0)
    except Exception:  # noqa: BLE001 - lightning missing or odd: behave as a single process
        return 0


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


def _to_device(x: Any, device: torch.device) -> Any:
    if isinstance(x, Tensor):
        return x.to(device, non_blocking=True)
    if isinstance(x, Mapping):
        return {k: _to_device(v, device) for k, v in x.items()}
    if isinstance(x, (list, tuple)) and not hasattr(x, "_fields"):
        return type(x)(_to_device(v, device) for v in x)
    return x


def _batch_len(x: Any) -> int:
    if isinstance(x, Tensor):
        return int(x.shape[0])
    if isinstance(x, Mapping):
        for v in x.values():
            if isinstance(v, Tensor):
                return int(v.shape[0])
    return len(x)


# ---------------------------------------------------------------------------------------------
# fingerprints and the determinism check
# ---------------------------------------------------------------------------------------------


def dataset_fingerprint(dataset: Any, progress: bool = False) -> str:
    """sha256 of a map-style dataset's inputs: its length and every sample's input, in index order.

    Each sample's input (element 0 of a ``(input, target[, index, ...])`` tuple, the input key of a
    dict sample, or the sample itself) is hashed with its dtype, shape and raw bytes. Targets are
    not part of it (the teacher never sees them). A dataset with an ``inputs`` tensor whose rows
    are exactly what ``dataset[i]`` returns (checked on a few indices), such as
    :class:`~lightning_distill.data.common.TensorClassificationDataset`, is hashed in one go.
    Samples are read under a fixed seed (and the global random state restored afterwards), so a
    dataset with random transforms still gets a stable fingerprint.

    Args:
        dataset: a map-style dataset.
        progress: show a progress bar while reading samples one by one.

    Returns:
        64 hex digits.

    Example::

        >>> import torch
        >>> from lightning_distill.cache import dataset_fingerprint
        >>> from lightning_distill.data.common import TensorClassificationDataset
        >>> x, y = torch.arange(6.0).reshape(3, 2), torch.zeros(3, dtype=torch.long)
        >>> a = dataset_fingerprint(TensorClassificationDataset(x, y))
        >>> a == dataset_fingerprint(TensorClassificationDataset(x.clone(), y + 1))  # labels do not count
        True
        >>> a == dataset_fingerprint(TensorClassificationDataset(x + 1, y))
        False
    """
    n = _dataset_len(dataset)
    h = hashlib.sha256()
    h.update(f"lightning_distill.dataset|v{FORMAT_VERSION}|n={n}|".encode())
    inputs = getattr(dataset, "inputs", None)
    with _isolated_rng(0):
        if isinstance(inputs, Tensor) and n > 0 and inputs.ndim >= 1 and len(inputs) == n:
            probes = sorted({0, n // 2, n - 1})
            same = True
            for i in probes:
                x = _sample_input(dataset[i])
                if not (isinstance(x, Tensor) and x.dtype == inputs.dtype and x.shape == inputs[i].shape
                        and torch.equal(x, inputs[i])):
                    same = False
                    break
            if same:
                h.update(b"tensor|")
                _update_hash(h, inputs, "the dataset's `inputs`")
                return h.hexdigest()
        h.update(b"samples|")
        from tqdm.auto import tqdm

        for i in tqdm(range(n), desc="teacher cache: fingerprinting data", unit="sample", leave=False,
                      disable=not progress or _rank() != 0):
            _update_hash(h, _sample_input(dataset[i]), f"sample {i}'s input")
    return h.hexdigest()


def teacher_fingerprint(module: nn.Module) -> str:
    """sha256 of a teacher: its module tree (names and classes) and its whole ``state_dict``.

    Every entry's name, dtype, shape and bytes are hashed, buffers included (BatchNorm running
    statistics), so any change of a weight or a statistic gives another fingerprint.

    Example::

        >>> import torch
        >>> from torch import nn
        >>> from lightning_distill.cache import teacher_fingerprint
        >>> net = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
        >>> before = teacher_fingerprint(net)
        >>> _ = net[1].running_mean.add_(1.0)
        >>> before == teacher_fingerprint(net)
        False
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"`teacher` must be a torch.nn.Module to fingerprint its weights, got {type(module).__name__}.")
    h = hashlib.sha256()
    h.update(f"lightning_distill.teacher|v{FORMAT_VERSION}|".encode())
    for name, sub in module.named_modules():
        h.update(f"{name}:{type(sub).__module__}.{type(sub).__qualname__};".encode())
    for name, value in module.state_dict().items():
        h.update(f"|{name}|".encode())
        try:
            _update_hash(h, value, f"state_dict entry {name!r}")
        except TypeError:
            h.update(repr(value).encode())  # extra state of an unusual type
    return h.hexdigest()


def _find_random_transforms(obj: Any, depth: int = 0, seen: Optional[set] = None) -> list[str]:
    seen = set() if seen is None else seen
    if obj is None or depth > 8 or id(obj) in seen:
        return []
    if isinstance(obj, (str, bytes, int, float, bool, Tensor, np.ndarray)):
        return []
    seen.add(id(obj))
    found: list[str] = []
    name = type(obj).__name__
    if not isinstance(obj, Dataset) and (name.startswith("Random") or name in _RANDOM_TRANSFORM_NAMES):
        found.append(name)
    children: list[Any] = []
    if isinstance(obj, (list, tuple)):
        children.extend(obj)
    elif isinstance(obj, Mapping):
        children.extend(obj.values())
    else:
        if isinstance(obj, nn.Module):
            children.extend(obj.children())
        for attr in _WALK_ATTRS:
            try:
                value = getattr(obj, attr, None)
            except Exception:  # noqa: BLE001 - a property that fails: nothing to inspect
                value = None
            # transform objects, lists and inner datasets; not classes, functions or bound methods
            if value is not None and not isinstance(value, type) and not inspect.isroutine(value):
                children.append(value)
    for child in children:
        for item in _find_random_transforms(child, depth + 1, seen):
            if item not in found:
                found.append(item)
    return found


def _random_transforms_error(reason: str) -> ValueError:
    return ValueError(
        f"TeacherCache: the dataset does not give the teacher the same input every epoch ({reason}). "
        "The cache computes the teacher's output once per sample index and reuses it every epoch, so with "
        "random training transforms (random crops, flips, colour jitter, ...) the cached output would belong "
        "to another view than the one the student sees: stale teacher targets. Fix it by one of: build the "
        "cache on data without random transforms; pass `allow_random_transforms=True` to cache one fixed view "
        "per sample anyway (an explicit approximation); or turn the cache off (teacher_cache=None), which "
        "function matching / consistent-augmentation KD needs: there the teacher must see the student's view."
    )


def check_deterministic(dataset: Any, n_probe: int = 4, repeats: int = 3) -> None:
    """Raise a ``ValueError`` when ``dataset`` gives a sample a different input on different loads.

    Two checks: the dataset's transforms (found through ``transform`` / ``transforms`` / ``dataset``
    attributes, ``Compose`` lists and module children) must not include a random one (a class
    named ``Random*``, ``ColorJitter``, ``RandAugment``, ``AutoAugment``, ...); and ``n_probe``
    indices spread over the dataset are each loaded ``repeats`` times and must give bit-identical
    inputs. The global random state is restored afterwards.

    Args:
        dataset: a map-style dataset of ``(input, target[, index, ...])`` samples.
        n_probe: how many indices to load (>= 1).
        repeats: loads per index (>= 2).

    Example::

        >>> import torch
        >>> from lightning_distill.cache import check_deterministic
        >>> from lightning_distill.data.common import TensorClassificationDataset
        >>> check_deterministic(TensorClassificationDataset(torch.zeros(5, 2), torch.zeros(5)))  # passes
    """
    if isinstance(n_probe, bool) or not isinstance(n_probe, int) or n_probe < 1:
        raise ValueError(f"`n_probe` must be an integer >= 1, got {n_probe!r}.")
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 2:
        raise ValueError(f"`repeats` must be an integer >= 2 (loads per probed index), got {repeats!r}.")
    found = _find_random_transforms(dataset)
    if found:
        raise _random_transforms_error(f"it applies random transforms: {', '.join(found)}")
    n = _dataset_len(dataset)
    if n == 0:
        return
    probes = sorted({int(round(v)) for v in np.linspace(0, n - 1, min(n_probe, n))})
    with _isolated_rng(None):
        for i in probes:
            first = _digest(_sample_input(dataset[i]), f"sample {i}'s input")
            for _ in range(repeats - 1):
                if _digest(_sample_input(dataset[i]), f"sample {i}'s input") != first:
                    raise _random_transforms_error(f"loading sample {i} twice gave two different inputs")


# ---------------------------------------------------------------------------------------------
# top-k storage
# ---------------------------------------------------------------------------------------------


def dense_to_topk(logits: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """Split logits ``[..., C]`` into the ``k`` largest (values, class ids) and the tail's log-sum-exp.

    Returns ``(values [..., k], indices [..., k] int64, lse_rest [...])``, float32 (float64 for
    float64 logits), where
    ``lse_rest = log sum_{c not in top-k} exp(z_c)`` (computed by masking, so it stays accurate when
    the tail is negligible). Requires ``1 <= k < C``.

    Example::

        >>> import torch
        >>> from lightning_distill.cache import dense_to_topk
        >>> v, i, rest = dense_to_topk(torch.tensor([[0.0, 3.0, 1.0, 0.0]]), 2)
        >>> v.tolist(), i.tolist(), round(rest.item(), 4)  # rest = log(e^0 + e^0)
        ([[3.0, 1.0]], [[1, 2]], 0.6931)
    """
    c = logits.shape[-1]
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k < c:
        raise ValueError(
            f"`top_k` must be an integer in [1, C - 1] = [1, {c - 1}] for logits with C={c} classes, got {k!r}. "
            "Use top_k=None for dense storage."
        )
    flat = logits.detach().reshape(-1, c)
    dtype = torch.float64 if flat.dtype == torch.float64 else torch.float32
    values, indices, rests = [], [], []
    rows = max(1, 2**24 // c)  # bound the masked copy to ~64 MB (a [B, L, V] vocabulary can be large)
    for start in range(0, flat.shape[0], rows):
        z = flat[start : start + rows].to(dtype, copy=True)  # scatter_ below must not touch the input
        v, i = z.topk(k, dim=-1)
        values.append(v)
        indices.append(i)
        rests.append(z.scatter_(-1, i, float("-inf")).logsumexp(-1))
    lead = tuple(logits.shape[:-1])
    if not values:  # no rows
        return flat.new_empty((*lead, k), dtype=dtype), flat.new_empty((*lead, k), dtype=torch.long), flat.new_empty(
            lead, dtype=dtype
        )
    return (torch.cat(values).reshape(*lead, k), torch.cat(indices).reshape(*lead, k), torch.cat(rests).reshape(lead))


def topk_to_dense(values: Tensor, indices: Tensor, lse_rest: Tensor, num_classes: int) -> Tensor:
    r"""Rebuild dense logits ``[..., C]`` (float32, or float64 for float64 values) from top-k storage.

    See the module docstring for the bound on the error.

    The ``k`` stored entries are exact; each of the other ``C - k`` classes gets
    ``lse_rest - log(C - k)``, so the log-partition function, the top-k probabilities and the
    tail's total probability are exact at temperature 1 and only the split of the tail mass among
    its classes is approximated (uniform).

    Example::

        >>> import math, torch
        >>> from lightning_distill.cache import dense_to_topk, topk_to_dense
        >>> z = torch.tensor([3.0, 1.0, 0.0, -1.0])
        >>> z_hat = topk_to_dense(*dense_to_topk(z, 2), num_classes=4)
        >>> z_hat[:2].tolist(), round(z_hat[2].item(), 4) == round(math.log((1 + math.exp(-1)) / 2), 4)
        ([3.0, 1.0], True)
        >>> torch.allclose(z_hat.softmax(-1)[:2], z.softmax(-1)[:2])
        True
    """
    k = values.shape[-1]
    dtype = torch.float64 if values.dtype == torch.float64 else torch.float32
    fill = (lse_rest.to(dtype) - math.log(num_classes - k)).unsqueeze(-1)
    out = fill.expand(*values.shape[:-1], num_classes).clone()
    return out.scatter_(-1, indices.long(), values.to(dtype))


# ---------------------------------------------------------------------------------------------
# the cache
# ---------------------------------------------------------------------------------------------


def _check_bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"`{name}` must be True or False, got {value!r}.")


class TeacherCache:
    """Precomputed teacher outputs per sample index, in memory or memory-mapped on disk.

    See the module docstring for the key, the disk layout, the precision of each ``dtype`` and
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
        if storage not in CACHE_STORAGES:
            raise ValueError(f"`storage` must be one of {CACHE_STORAGES}, got {storage!r}.")
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
        _check_bool("allow_random_transforms", allow_random_transforms)
        _check_bool("progress", progress)
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"`batch_size` must be an integer >= 1 (samples per teacher forward), got {batch_size!r}.")
        if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
            raise ValueError(f"`num_workers` must be an integer >= 0 (DataLoader workers), got {num_workers!r}.")
        self.storage = storage
        self.directory = None if directory is None else os.fspath(directory)
        self.top_k = top_k
        self.dtype = dtype
        self.allow_random_transforms = allow_random_transforms
        self.progress = progress
        self.batch_size = batch_size
        self.num_workers = num_workers
        self._expected_key: Optional[str] = None
        self._reset()

    def _reset(self) -> None:
        self._key: Optional[str] = None
        self._n = 0
        self._single = True
        self._fields: dict[str, dict[str, Any]] = {}  # name -> meta (kind, shape, num_classes, files)
        self._arrays: dict[str, dict[str, Union[Tensor, np.ndarray]]] = {}  # name -> part -> storage
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
        payload = {
            "format": FORMAT_VERSION,
            "teacher": teacher_fingerprint(teacher),
            "dataset": dataset_fingerprint(dataset, progress=self.progress),
            "top_k": self.top_k,
            "dtype": self.dtype,
            "tag": tag,
        }
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()

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
        root.mkdir(parents=True, exist_ok=True)
        tmp = root / f".{key}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            self._run(teacher_fn, dataset, device, collate_fn, n, tmp)
            for parts in self._arrays.values():
                for arr in parts.values():
                    arr.flush()
            meta = {
                "format": FORMAT_VERSION,
                "key": key,
                "n": n,
                "single": self._single,
                "top_k": self.top_k,
                "dtype": self.dtype,
                "tag": tag,
                "fields": self._fields,
                "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "torch": torch.__version__,
                "complete": True,
            }
            with open(tmp / "meta.json", "w") as f:
                json.dump(meta, f, indent=2)
                f.flush()
                os.fsync(f.fileno())
            self._arrays = {}
            try:
                os.rename(tmp, final)  # atomic: final appears complete or not at all
            except OSError:
                if not (final / "meta.json").is_file():
                    raise
                shutil.rmtree(tmp, ignore_errors=True)  # another process (DDP rank) finished first
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            self._reset()
            raise
        self._open(final, key, n)

    def _run(self, teacher_fn: Callable, dataset: Any, device: torch.device, collate_fn: Optional[Callable],
             n: int, tmp: Optional[Path]) -> None:
        from tqdm.auto import tqdm

        loader = DataLoader(dataset, batch_size=self.batch_size, shuffle=False, num_workers=self.num_workers,
                            collate_fn=collate_fn)
        pos = 0
        with _isolated_rng(0), torch.no_grad(), tqdm(
            total=n, desc="teacher cache", unit="sample", disable=not self.progress or _rank() != 0
        ) as bar:
            for batch in loader:
                b = unpack_batch(batch)
                bs = _batch_len(b.input)
                if b.index is not None:
                    index = torch.as_tensor(b.index).reshape(-1).cpu()
                    if not torch.equal(index.long(), torch.arange(pos, pos + bs)):
                        raise ValueError(
                            f"the dataset's sample index does not match the sample's position: samples {pos}.."
                            f"{pos + bs - 1} carry indices {index[:8].tolist()}.... The cache is looked up by the "
                            "batch's `index`, which must be the position in this dataset (see IndexedDataset)."
                        )
                out = teacher_fn(_to_device(b.input, device))
                fields = self._as_fields(out, bs, pos)
                if pos == 0:
                    self._allocate(fields, n, tmp)
                self._write(fields, pos, bs)
                pos += bs
                bar.update(bs)
        if pos != n:
            raise RuntimeError(f"the DataLoader gave {pos} samples but the dataset has {n}.")

    def _as_fields(self, out: Any, bs: int, pos: int) -> dict[str, Tensor]:
        if isinstance(out, Tensor):
            fields, single = {LOGITS: out}, True
        elif isinstance(out, Mapping) and out:
            fields, single = dict(out), False
        else:
            raise TypeError(
                f"`teacher_fn` must return a tensor (logits) or a non-empty dict of named tensors, got "
                f"{type(out).__name__}{'' if not isinstance(out, Mapping) else ' (empty)'}."
            )
        if pos == 0:
            self._single = single
            if self.top_k is not None and LOGITS not in fields:
                raise ValueError(
                    f"`top_k`={self.top_k!r} applies to the {LOGITS!r} field, but teacher_fn returned the fields "
                    f"{sorted(fields)}. Name the logits {LOGITS!r} or use top_k=None."
                )
        elif single != self._single or (not single and sorted(fields) != sorted(self._fields)):
            raise ValueError(
                f"teacher_fn returned fields {sorted(fields)} at sample {pos} but {sorted(self._fields)} on the first "
                "batch: the outputs must have the same structure for every batch."
            )
        for name, value in fields.items():
            if not isinstance(name, str) or not name:
                raise TypeError(f"teacher_fn's output dict keys must be non-empty str, got {name!r}.")
            if not isinstance(value, Tensor) or not value.is_floating_point():
                what = f"a {value.dtype} tensor" if isinstance(value, Tensor) else type(value).__name__
                raise TypeError(f"teacher_fn's field {name!r} must be a floating-point tensor, got {what}.")
            if value.ndim < 1 or value.shape[0] != bs:
                raise ValueError(
                    f"teacher_fn's field {name!r} has shape {tuple(value.shape)}; its first dimension must be the "
                    f"batch size {bs}."
                )
            if bool(torch.isnan(value).any()):
                raise ValueError(
                    f"teacher_fn's field {name!r} contains NaN for samples {pos}..{pos + bs - 1}: refusing to cache it."
                )
            if pos > 0 and tuple(value.shape[1:]) != tuple(self._fields[name]["shape"]):
                raise ValueError(
                    f"teacher_fn's field {name!r} has per-sample shape {tuple(value.shape[1:])} at sample {pos} but "
                    f"{tuple(self._fields[name]['shape'])} before: pad sequences to a fixed length to cache them."
                )
        return fields

    def _allocate(self, fields: dict[str, Tensor], n: int, tmp: Optional[Path]) -> None:
        def new(file: str, shape: tuple[int, ...], torch_dtype: torch.dtype, np_dtype: Any) -> Any:
            if tmp is None:
                return torch.empty(shape, dtype=torch_dtype)
            return np.lib.format.open_memmap(tmp / file, mode="w+", dtype=np_dtype, shape=shape)

        for i, (name, value) in enumerate(fields.items()):
            shape = tuple(int(s) for s in value.shape[1:])
            if self.top_k is not None and name == LOGITS:
                c = shape[-1] if shape else 1
                if not shape or self.top_k >= c:
                    raise ValueError(
                        f"`top_k`={self.top_k!r} must be smaller than the number of classes, but the logits have "
                        f"per-sample shape {shape} (C={c}). Use a smaller top_k or top_k=None (dense)."
                    )
                k, lead = self.top_k, shape[:-1]
                wide = c >= 2**31
                files = {"values": f"{i:02d}.values.npy", "indices": f"{i:02d}.indices.npy",
                         "lse_rest": f"{i:02d}.lse_rest.npy"}
                self._arrays[name] = {
                    "values": new(files["values"], (n, *lead, k), torch.float32, np.float32),
                    "indices": new(files["indices"], (n, *lead, k), torch.int64 if wide else torch.int32,
                                   np.int64 if wide else np.int32),
                    "lse_rest": new(files["lse_rest"], (n, *lead), torch.float32, np.float32),
                }
                self._fields[name] = {"kind": "topk", "shape": list(shape), "num_classes": c, "k": k,
                                      "files": files, "stored_as": "float32/int32"}
            else:
                files = {"data": f"{i:02d}.data.npy"}
                stored = np.dtype(_NUMPY_STORED[self.dtype]).name
                self._arrays[name] = {"data": new(files["data"], (n, *shape), _TORCH_DTYPES[self.dtype],
                                                  _NUMPY_STORED[self.dtype])}
                self._fields[name] = {"kind": "dense", "shape": list(shape), "dtype": self.dtype, "files": files,
                                      "stored_as": stored}

    def _write(self, fields: dict[str, Tensor], pos: int, bs: int) -> None:
        for name, value in fields.items():
            meta, parts = self._fields[name], self._arrays[name]
            if meta["kind"] == "topk":
                values, indices, rest = dense_to_topk(value, self.top_k)
                wide = meta["num_classes"] >= 2**31
                chunks = {"values": values, "indices": indices.to(torch.int64 if wide else torch.int32), "lse_rest": rest}
            else:
                cast = value.detach().to(_TORCH_DTYPES[self.dtype])
                if self.dtype == "float16":
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

    def _open(self, path: Path, key: str, n: int) -> None:
        """Reopen a complete disk cache read-only (memory-mapped)."""

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

    @staticmethod
    def _rows(store: Union[Tensor, np.ndarray], index: Tensor) -> Tensor:
        if isinstance(store, Tensor):
            return store.index_select(0, index)
        return torch.from_numpy(np.ascontiguousarray(store[index.numpy()]))

    def _field_rows(self, name: str, index: Tensor, device: torch.device) -> Tensor:
        meta, parts = self._fields[name], self._arrays[name]
        if meta["kind"] == "topk":
            values = self._rows(parts["values"], index).to(device)
            indices = self._rows(parts["indices"], index).to(device)
            rest = self._rows(parts["lse_rest"], index).to(device)
            return topk_to_dense(values, indices, rest, int(meta["num_classes"]))
        rows = self._rows(parts["data"], index)
        if rows.dtype == torch.int16:  # bfloat16 stored as its int16 view on disk
            rows = rows.view(torch.bfloat16)
        return rows.to(device).float()

    def lookup(self, index: Any, device: Optional[Union[str, torch.device]] = None) -> Union[Tensor, dict[str, Tensor]]:
        """Cached outputs of the samples ``index`` (the batch's ``index``), float32, on ``device``.

        Returns a tensor ``[len(index), *per-sample shape]`` when ``teacher_fn`` returned a tensor,
        else a dict with the same keys. Top-k logits are rebuilt with :func:`topk_to_dense`.

        Raises:
            RuntimeError: before :meth:`build`.
            ValueError: an index outside ``[0, len(cache))`` (a cache built for another dataset).
        """
        index = self._check_index(index)
        device = torch.device("cpu") if device is None else torch.device(device)
        out = {name: self._field_rows(name, index, device) for name in self._fields}
        return out[LOGITS] if self._single else out

    def lookup_topk(self, index: Any, device: Optional[Union[str, torch.device]] = None) -> tuple[Tensor, Tensor, Tensor]:
        """Raw top-k storage of the ``"logits"`` field: ``(values, class ids, lse_rest)`` for sparse KD losses."""
        index = self._check_index(index)
        if self._fields.get(LOGITS, {}).get("kind") != "topk":
            raise ValueError(f"lookup_topk() needs a cache built with `top_k`, got top_k={self.top_k!r}.")
        device = torch.device("cpu") if device is None else torch.device(device)
        parts = self._arrays[LOGITS]
        return (
            self._rows(parts["values"], index).to(device),
            self._rows(parts["indices"], index).to(device).long(),
            self._rows(parts["lse_rest"], index).to(device),
        )

