"""Running the teacher once over a dataset for the cache, and checking what it returns.

:func:`run_teacher` feeds the dataset to ``teacher_fn`` in index order (no shuffling, a progress
bar on rank 0, gradients off, under a fixed seed with the global random state restored
afterwards) and hands each batch's output to a callback; :func:`as_fields` turns one output into
named floating-point fields and refuses anything the cache could not serve faithfully (NaN, a
structure or per-sample shape that changes between batches).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Optional

import torch
from torch import Tensor
from torch.utils.data import DataLoader

from lightning_distill.batch import unpack_batch
from lightning_distill.cache.keys import _isolated_rng, _rank
from lightning_distill.cache.storage import LOGITS

__all__ = ["as_fields", "run_teacher"]


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


def run_teacher(
    teacher_fn: Callable, dataset: Any, device: torch.device, collate_fn: Optional[Callable], n: int,
    batch_size: int, num_workers: int, progress: bool, on_batch: Callable[[Any, int, int], None],
) -> None:
    """Call ``on_batch(output, pos, bs)`` with ``teacher_fn``'s output for samples ``pos .. pos + bs - 1``.

    Batches come in index order; ``on_batch`` runs inside the same no-grad, fixed-seed block.

    Raises:
        ValueError: a batch's ``index`` is not the samples' position in ``dataset``.
        RuntimeError: the DataLoader gave another number of samples than ``n``.
    """
    from tqdm.auto import tqdm

    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        collate_fn=collate_fn)
    pos = 0
    with _isolated_rng(0), torch.no_grad(), tqdm(
        total=n, desc="teacher cache", unit="sample", disable=not progress or _rank() != 0
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
            if getattr(teacher_fn, "takes_batch", False):  # a teacher source: the whole batch (keyword inputs)
                out = teacher_fn(type(b)(*(_to_device(v, device) for v in b)))
            else:
                out = teacher_fn(_to_device(b.input, device))
            on_batch(out, pos, bs)
            pos += bs
            bar.update(bs)
    if pos != n:
        raise RuntimeError(f"the DataLoader gave {pos} samples but the dataset has {n}.")


def as_fields(
    out: Any, bs: int, pos: int, top_k: Optional[int], single: bool, metas: Mapping[str, Mapping[str, Any]]
) -> tuple[dict[str, Tensor], bool]:
    """``teacher_fn``'s output for samples ``pos .. pos + bs - 1`` as checked named fields.

    A bare tensor becomes the field :data:`~lightning_distill.cache.storage.LOGITS`. From the second
    batch on (``pos > 0``) the output must have the first batch's structure (``single``: whether it
    was a bare tensor) and per-sample shapes (``metas``: field name -> metadata with ``"shape"``).

    Returns:
        ``(fields, single)``: name -> tensor, and whether ``out`` was a bare tensor.
    """
    if isinstance(out, Tensor):
        fields, bare = {LOGITS: out}, True
    elif isinstance(out, Mapping) and out:
        fields, bare = dict(out), False
    else:
        raise TypeError(
            f"`teacher_fn` must return a tensor (logits) or a non-empty dict of named tensors, got "
            f"{type(out).__name__}{'' if not isinstance(out, Mapping) else ' (empty)'}."
        )
    if pos == 0:
        if top_k is not None and LOGITS not in fields:
            raise ValueError(
                f"`top_k`={top_k!r} applies to the {LOGITS!r} field, but teacher_fn returned the fields "
                f"{sorted(fields)}. Name the logits {LOGITS!r} or use top_k=None."
            )
    elif bare != single or (not bare and sorted(fields) != sorted(metas)):
        raise ValueError(
            f"teacher_fn returned fields {sorted(fields)} at sample {pos} but {sorted(metas)} on the first "
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
        if pos > 0 and tuple(value.shape[1:]) != tuple(metas[name]["shape"]):
            raise ValueError(
                f"teacher_fn's field {name!r} has per-sample shape {tuple(value.shape[1:])} at sample {pos} but "
                f"{tuple(metas[name]['shape'])} before: pad sequences to a fixed length to cache them."
            )
    return fields, bare
