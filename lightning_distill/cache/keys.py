"""Cache keys: fingerprints of the teacher and of the dataset, and the check that the data is deterministic.

A cached teacher output is only valid for the teacher weights and the input it was computed
from, so the cache is keyed by both. The key is
``sha256(format version, teacher fingerprint, dataset fingerprint, top_k, dtype, tag)``:

* :func:`teacher_fingerprint` hashes the teacher's architecture (module names and classes) and
  every tensor of its ``state_dict`` (buffers such as BatchNorm statistics included);
* :func:`dataset_fingerprint` hashes every input sample (bytes, dtype, shape, in index order);
* :func:`cache_key` combines them with the storage options and a free-form ``tag``.

Changing a weight or a sample changes the key and so the directory of a disk cache: a stale cache
is never read, it is just left behind (delete old ``directory/<key>/`` folders to reclaim space).

**Random transforms.** The cache is only valid when the teacher sees the same input every
epoch. :func:`check_deterministic` (run by :meth:`~lightning_distill.cache.TeacherCache.build`)
looks for random transforms on the dataset (``Random*``, ``ColorJitter``, ``RandAugment``, ...)
and loads a few samples several times; any difference raises a ``ValueError`` unless
``allow_random_transforms=True`` (then one view per sample, drawn with a fixed seed, is cached).
Function matching / consistent-augmentation KD needs the teacher on the student's view: keep the
cache off there.

Reading samples here never changes the global random state (torch CPU, numpy, ``random``).
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import random
from typing import Any, Iterator, Mapping, Optional

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import Dataset, IterableDataset

from lightning_distill.batch import _INPUT_KEYS
from lightning_distill.validation import check_int

__all__ = ["FORMAT_VERSION", "cache_key", "check_deterministic", "dataset_fingerprint", "teacher_fingerprint"]

#: Version of the key derivation and the on-disk layout; bumping it invalidates old caches.
FORMAT_VERSION = 1
# transforms that draw random numbers although their name does not start with "Random"
_RANDOM_TRANSFORM_NAMES = frozenset(
    {"ColorJitter", "RandAugment", "AutoAugment", "TrivialAugmentWide", "AugMix", "ElasticTransform",
     "GaussianNoise", "MixUp", "CutMix", "ScaleJitter"}
)
# attributes through which datasets and transform containers reach their transforms / inner datasets
_WALK_ATTRS = ("transform", "transforms", "train_transform", "augment", "augmentation", "augmentations",
               "dataset", "datasets")


# ---------------------------------------------------------------------------------------------
# helpers: RNG isolation, process rank, samples, hashing
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


def _rank() -> int:
    """This process's global rank (0 without Lightning or outside distributed runs)."""
    try:
        from lightning.fabric.utilities.rank_zero import rank_zero_only

        return int(getattr(rank_zero_only, "rank", 0) or 0)
    except Exception:  # noqa: BLE001 - lightning missing or odd: behave as a single process
        return 0


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
    """``len(dataset)`` of a map-style dataset; a ``TypeError`` for iterable or length-less datasets."""
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


# ---------------------------------------------------------------------------------------------
# fingerprints and the key
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


def cache_key(
    teacher: nn.Module, dataset: Any, top_k: Optional[int], dtype: str, tag: str = "", progress: bool = False
) -> str:
    """The cache key (64 hex digits): sha256 of the format version, both fingerprints, ``top_k``, ``dtype`` and ``tag``.

    Reads every sample of ``dataset`` (see :func:`dataset_fingerprint`; ``progress`` shows a bar).
    """
    payload = {
        "format": FORMAT_VERSION,
        "teacher": teacher_fingerprint(teacher),
        "dataset": dataset_fingerprint(dataset, progress=progress),
        "top_k": top_k,
        "dtype": dtype,
        "tag": tag,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


# ---------------------------------------------------------------------------------------------
# the determinism check
# ---------------------------------------------------------------------------------------------


def _find_random_transforms(obj: Any, depth: int = 0, seen: Optional[set] = None) -> list[str]:
    """Class names of the random transforms reachable from ``obj`` (see ``_WALK_ATTRS``), without repeats."""
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
    n_probe = check_int("n_probe", n_probe, minimum=1)
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
