"""Pieces shared by the data modules: index-returning datasets and a resumable shuffle."""

from __future__ import annotations

from typing import Any, Iterator, Sized

import torch
from torch import Tensor
from torch.utils.data import Dataset, Sampler

__all__ = ["EpochShuffleSampler", "IndexedDataset", "TensorClassificationDataset", "check_positive_int"]


def check_positive_int(name: str, value: Any) -> None:
    """Raise a ``ValueError`` naming ``name`` unless ``value`` is an int >= 1."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"`{name}` must be an integer >= 1, got {value!r}.")


class TensorClassificationDataset(Dataset):
    """In-memory ``(input, target, index)`` samples from two tensors.

    The third element is the sample's position in this dataset, so strategies can key
    per-sample state (a teacher-output cache, a CRD memory bank) on it.
    """

    def __init__(self, inputs: Tensor, targets: Tensor) -> None:
        if len(inputs) != len(targets):
            raise ValueError(f"inputs and targets differ in length: {len(inputs)} vs {len(targets)}.")
        self.inputs = inputs
        self.targets = targets

    def __len__(self) -> int:
        return len(self.inputs)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor, int]:
        return self.inputs[index], self.targets[index], index


class IndexedDataset(Dataset):
    """Wrap any map-style ``(input, target)`` dataset so it yields ``(input, target, index)``."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[Any, Any, int]:
        x, y = self.dataset[index]
        return x, y, index


class EpochShuffleSampler(Sampler[int]):
    """Random permutation that depends only on ``(seed, epoch)``.

    Lightning calls ``set_epoch`` at the start of every epoch, so a run resumed from a
    checkpoint sees exactly the same order of batches as an uninterrupted one -- which a
    plain ``shuffle=True`` (drawing from the global RNG) does not give. Under DDP Lightning
    swaps it for a ``DistributedSampler``, which is seeded the same way.
    """

    def __init__(self, data_source: Sized, seed: int = 0) -> None:
        self.num_samples = len(data_source)
        self.seed = int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator()
        g.manual_seed(self.seed * 1_000_003 + self.epoch)
        return iter(torch.randperm(self.num_samples, generator=g).tolist())

    def __len__(self) -> int:
        return self.num_samples
