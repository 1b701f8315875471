"""Teacher-output cache: run the frozen teacher once per sample, not once per epoch.

A frozen teacher in eval mode that sees the same input every epoch produces the same output
every epoch, so its forward pass can be paid once. :class:`TeacherCache` runs ``teacher_fn``
over the training set in index order (with a progress bar), stores every returned field per
sample index -- the logits and, for feature strategies, the captured features -- and
:meth:`TeacherCache.lookup` returns the rows for a batch's ``index`` (the sample's position in
its split, the third element of every ``(input, target, index)`` batch of this package).
``storage="memory"`` keeps CPU tensors, rebuilt every run; ``storage="disk"`` keeps
memory-mapped ``.npy`` files in ``directory/<key>/``, reused by later runs.

The package, one concept per module:

* :mod:`~lightning_distill.cache.keys` -- the key: fingerprints of the teacher's weights and of
  the dataset's inputs (a changed teacher or dataset is never served a stale cache), and
  :func:`check_deterministic`, which refuses datasets with random transforms;
* :mod:`~lightning_distill.cache.topk` -- the top-k codec (:func:`dense_to_topk`,
  :func:`topk_to_dense`) for large class counts, with its error bound on the KD gradient;
* :mod:`~lightning_distill.cache.storage` -- memory and disk storage: the disk layout, atomic
  builds, ``meta.json``, and the precision of each storage ``dtype``;
* :mod:`~lightning_distill.cache.runner` -- running the teacher over the dataset and checking
  what it returns;
* :mod:`~lightning_distill.cache.teacher_cache` -- :class:`TeacherCache` itself: options, build,
  lookup and ``state_dict``.

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

from lightning_distill.cache.keys import FORMAT_VERSION, check_deterministic, dataset_fingerprint, teacher_fingerprint
from lightning_distill.cache.storage import CACHE_DTYPES, CACHE_STORAGES
from lightning_distill.cache.teacher_cache import TeacherCache
from lightning_distill.cache.topk import dense_to_topk, topk_to_dense

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
