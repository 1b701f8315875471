"""How labelled and transfer samples share the training batches: the modes and the batch sampler.

:class:`TransferBatchSampler` lays out one epoch of batches over the combined training set
(labelled indices first, transfer indices after them) in one of four :data:`MODES` -- transfer
samples in every batch, whole transfer batches between labelled ones, one shuffled pass over
both, or the transfer set alone. The order depends only on the seed and the epoch, so a resumed
run sees the batches of an uninterrupted one, and under DDP every rank takes its own share.
"""

from __future__ import annotations

import math
from typing import Any, Iterator, Optional

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import BatchSampler, Sampler
from torch.utils.data.distributed import DistributedSampler

from lightning_distill.augment import _derive_seed
from lightning_distill.data.common import EpochShuffleSampler
from lightning_distill.validation import check_choice, check_int

__all__ = ["MODES", "TransferBatchSampler", "check_batching"]

MODES = ("mix", "alternate", "concat", "transfer_only")


class TransferBatchSampler(BatchSampler):
    """Batches of labelled indices ``[0, n_labeled)`` and transfer indices ``[n_labeled, n_labeled + n_transfer)``.

    Modes (``b`` = ``batch_size``, ``f`` = ``unlabeled_fraction``):

    * ``"mix"``: every batch holds ``k_u = round(b * f)`` (at least 1, at most ``b - 1``)
      transfer samples after ``b - k_u`` labelled ones; an epoch is one pass over the
      labelled set (each labelled sample once), i.e. ``ceil(n_labeled / (b - k_u))`` batches;
      the last, shorter batch keeps the ratio;
    * ``"alternate"``: whole labelled batches (one pass over the labelled set) and whole
      transfer batches, ``round(n_labeled_batches * f / (1 - f))`` of them (at least 1), spread
      evenly between the labelled ones -- ``f = 0.5`` alternates labelled / transfer;
    * ``"concat"``: one shuffled pass over both sets together (``f`` is not used);
    * ``"transfer_only"``: one shuffled pass over the transfer set, the labelled training set is
      not used (data-free distillation from a synthetic set; ``f`` is not used).

    Transfer samples are drawn, in ``"mix"`` and ``"alternate"``, from an endless stream of
    seeded permutations of the transfer set that continues from one epoch to the next, so over
    the epochs every transfer sample is used equally often and none twice before all were used.

    The order depends only on ``(seed, epoch)``: the epoch is read from ``sampler.epoch``, and
    Lightning calls ``set_epoch`` on the batch sampler's ``sampler`` at every epoch start (a
    resumed run sees the same batches as an uninterrupted one). Call :meth:`set_epoch` yourself
    outside a Trainer.

    Distributed: each rank takes its share of the labelled order (padded by repetition to a
    multiple of ``num_replicas``, like ``DistributedSampler``) and of the transfer stream and
    builds its batches the same way, so every rank has the same number of batches and, in
    ``"alternate"`` mode, the same kind of batch at the same step. ``num_replicas`` / ``rank``
    come from ``sampler`` when it is a ``DistributedSampler`` (Lightning injects one this way
    under DDP, re-creating this batch sampler with it), else from the arguments.

    Args:
        sampler: holds the epoch (``set_epoch`` / ``epoch``); its order is not used. ``None``
            creates an :class:`~lightning_distill.data.common.EpochShuffleSampler`.
        batch_size: samples per batch (per rank).
        drop_last: drop the last labelled (and, in ``"concat"``, the last) batch if it is short.
        n_labeled: size of the labelled set.
        n_transfer: size of the transfer set.
        mode: ``"mix"``, ``"alternate"``, ``"concat"`` or ``"transfer_only"``.
        unlabeled_fraction: share of transfer samples (``"mix"``) or batches (``"alternate"``).
        seed: seed of the order.
        num_replicas: number of ranks (when ``sampler`` is not a ``DistributedSampler``).
        rank: this process's rank (idem).

    Example::

        >>> bs = TransferBatchSampler(batch_size=4, n_labeled=6, n_transfer=100, seed=0)
        >>> [sum(i >= 6 for i in batch) for batch in bs], len(bs)
        ([2, 2, 2], 3)
    """

    def __init__(
        self,
        sampler: Optional[Sampler] = None,
        batch_size: int = 64,
        drop_last: bool = False,
        *,
        n_labeled: int,
        n_transfer: int,
        mode: str = "mix",
        unlabeled_fraction: float = 0.5,
        seed: int = 0,
        num_replicas: int = 1,
        rank: int = 0,
    ) -> None:
        check_batching(mode, unlabeled_fraction, batch_size)
        check_int("n_labeled", n_labeled, minimum=1)
        check_int("n_transfer", n_transfer, minimum=1)
        if isinstance(sampler, DistributedSampler):
            num_replicas, rank = sampler.num_replicas, sampler.rank
        check_int("num_replicas", num_replicas, minimum=1)
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < num_replicas:
            raise ValueError(
                f"`rank` must be an integer in [0, {num_replicas}) (num_replicas={num_replicas}), got {rank!r}."
            )
        if sampler is None:
            sampler = EpochShuffleSampler(range(n_labeled + n_transfer), seed=seed)
        self.sampler = sampler
        self.batch_size = batch_size
        self.drop_last = bool(drop_last)
        self.n_labeled = n_labeled
        self.n_transfer = n_transfer
        self.mode = mode
        self.unlabeled_fraction = float(unlabeled_fraction)
        self.seed = int(seed)
        self.num_replicas = num_replicas
        self.rank = rank
        self.k_transfer = min(max(round(batch_size * self.unlabeled_fraction), 1), batch_size - 1)
        self.k_labeled = batch_size - self.k_transfer
        self._length = len(self._layout())

    # ------------------------------------------------------------------ epoch
    @property
    def epoch(self) -> int:
        return int(getattr(self.sampler, "epoch", 0))

    def set_epoch(self, epoch: int) -> None:
        """Select the order of ``epoch`` (forwarded to ``sampler.set_epoch``)."""
        self.sampler.set_epoch(int(epoch))  # type: ignore[attr-defined]

    # ------------------------------------------------------------------ orders
    def _shard(self, order: Tensor) -> Tensor:
        """This rank's share of ``order``, padded by repetition to a multiple of ``num_replicas``."""
        per_rank = math.ceil(len(order) / self.num_replicas)
        total = per_rank * self.num_replicas
        if total > len(order):
            order = order.repeat(math.ceil(total / len(order)))[:total]
        return order[self.rank :: self.num_replicas]

    def _perm(self, n: int, *key: int) -> Tensor:
        return torch.randperm(n, generator=torch.Generator().manual_seed(_derive_seed(self.seed, *key)))

    def _transfer_stream(self, epoch: int, count: int) -> Tensor:
        """``count`` transfer indices of this rank for ``epoch``, from the endless stream of permutations."""
        positions = (epoch * count + torch.arange(count)) * self.num_replicas + self.rank
        block, offset = positions // self.n_transfer, positions % self.n_transfer
        out = torch.empty(count, dtype=torch.long)
        for b in block.unique().tolist():
            where = block == b
            out[where] = self._perm(self.n_transfer, 1, b)[offset[where]]
        return out + self.n_labeled

    def _layout(self) -> list[tuple[str, int]]:
        """The epoch's batches as ``(kind, size)``: kind ``"L"`` labelled part, ``"U"`` transfer-only, ``"C"`` concat.

        For ``"mix"`` the size is the labelled part (the transfer part follows from it). Depends
        only on the sizes, so ``len`` is the same every epoch.
        """
        if self.mode == "concat":
            m = math.ceil((self.n_labeled + self.n_transfer) / self.num_replicas)
            return [("C", s) for s in self._chunks(m, self.batch_size)]
        if self.mode == "transfer_only":
            m = math.ceil(self.n_transfer / self.num_replicas)
            return [("C", s) for s in self._chunks(m, self.batch_size)]
        m = math.ceil(self.n_labeled / self.num_replicas)
        if self.mode == "mix":
            return [("L", s) for s in self._chunks(m, self.k_labeled)]
        labeled = self._chunks(m, self.batch_size)
        f = self.unlabeled_fraction
        n_u = max(1, round(len(labeled) * f / (1.0 - f))) if labeled else 0
        # labelled batch i at i / n_l, transfer batch j at (j + 1/2) / n_u: starts with a labelled batch,
        # then each labelled batch is followed by its share of transfer batches (L U L U ... for f = 1/2)
        keys = [(i / len(labeled), 0, "L", s) for i, s in enumerate(labeled)]
        keys += [((j + 0.5) / n_u, 1, "U", self.batch_size) for j in range(n_u)]
        return [(kind, size) for _, _, kind, size in sorted(keys)]

    def _chunks(self, n: int, size: int) -> list[int]:
        sizes = [size] * (n // size)
        if n % size and not self.drop_last:
            sizes.append(n % size)
        return sizes

    def _transfer_count(self, n_labeled_part: int) -> int:
        if n_labeled_part == self.k_labeled:
            return self.k_transfer
        return max(1, round(n_labeled_part * self.k_transfer / self.k_labeled))

    def batches(self, epoch: Optional[int] = None) -> list[list[int]]:
        """This rank's batches of ``epoch`` (default: the current one)."""
        epoch = self.epoch if epoch is None else int(epoch)
        layout = self._layout()
        if self.mode in ("concat", "transfer_only"):
            if self.mode == "concat":
                order = self._shard(self._perm(self.n_labeled + self.n_transfer, 2, epoch)).tolist()
            else:
                order = (self._shard(self._perm(self.n_transfer, 3, epoch)) + self.n_labeled).tolist()
            starts = np.cumsum([0] + [s for _, s in layout])
            return [order[a : a + s] for a, (_, s) in zip(starts, layout)]
        labeled = self._shard(self._perm(self.n_labeled, 0, epoch)).tolist()
        if self.mode == "mix":
            counts = [self._transfer_count(s) for _, s in layout]
        else:
            counts = [s if kind == "U" else 0 for kind, s in layout]
        transfer = self._transfer_stream(epoch, sum(counts)).tolist()
        out, li, ti = [], 0, 0
        for (kind, size), count in zip(layout, counts):
            batch = []
            if kind == "L":
                batch, li = labeled[li : li + size], li + size
            batch, ti = batch + transfer[ti : ti + count], ti + count
            out.append(batch)
        return out

    def __iter__(self) -> Iterator[list[int]]:
        # a generator: the epoch is read at the first ``next``, not when the iterator is made. A DataLoader makes
        # its batch sampler's iterator when its own iterator is created, which on a resumed run happens before
        # Lightning calls ``set_epoch`` for the restored epoch: read eagerly, that epoch replayed epoch 0's order
        yield from self.batches()

    def __len__(self) -> int:
        return self._length

def check_batching(mode: Any, unlabeled_fraction: Any, batch_size: Any) -> None:
    """Refuse a mode, transfer share or batch size that cannot make batches (see :class:`TransferBatchSampler`)."""
    check_choice(
        "mode", mode, MODES,
        hint=" 'mix': labelled and transfer samples in every batch; 'alternate': whole labelled and whole transfer "
        "batches in turn; 'concat': one shuffled set of both; 'transfer_only': the transfer set alone, e.g. a "
        "data-free synthetic set.",
    )  # fmt: skip
    if (
        isinstance(unlabeled_fraction, bool)
        or not isinstance(unlabeled_fraction, (int, float))
        or not 0.0 < unlabeled_fraction < 1.0
    ):
        raise ValueError(
            f"`unlabeled_fraction` must be a number in (0, 1) -- the share of transfer samples per batch ('mix') or "
            f"of transfer batches ('alternate'), e.g. 0.5 -- got {unlabeled_fraction!r}."
        )
    check_int("batch_size", batch_size, minimum=1)
    if mode == "mix" and batch_size < 2:
        raise ValueError(
            f"`batch_size` must be >= 2 in mode 'mix' (each batch holds labelled and transfer samples), got "
            f"{batch_size!r}; use a larger batch_size or mode='alternate'."
        )
