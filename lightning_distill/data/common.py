"""Pieces shared by the data modules: index-returning datasets and a resumable shuffle."""

from __future__ import annotations

from typing import Any, Iterator, Sized

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from lightning_distill.validation import check_int

__all__ = ["EpochShuffleSampler", "IndexedDataset", "SplitDataModule", "TensorClassificationDataset", "check_positive_int"]


def check_positive_int(name: str, value: Any) -> None:
    """Raise a ``ValueError`` naming ``name`` unless ``value`` is an int >= 1."""
    check_int(name, value, minimum=1)


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


class SplitDataModule(L.LightningDataModule):
    """The loader half every data module with fixed train / val / test datasets shares.

    Subclasses set ``batch_size``, ``num_workers``, ``shuffle_seed`` and, in ``setup``, the three
    datasets, then call :meth:`resolve_shuffle_seed`. Training batches come in the resumable order of
    :class:`EpochShuffleSampler`; validation, test and predict loaders keep the dataset order.
    """

    batch_size: int
    num_workers: int
    shuffle_seed: Any
    #: pin host memory for faster copies to a GPU (set by data modules whose batches are large)
    pin_memory: bool = False

    def resolve_shuffle_seed(self) -> None:
        """``shuffle_seed=None`` takes the global seed (``seed_everything``) the first time setup runs."""
        if self.shuffle_seed is None:
            self.shuffle_seed = torch.initial_seed() % (2**31)

    def _loader(self, dataset: Dataset, train: bool) -> DataLoader:
        sampler = EpochShuffleSampler(dataset, seed=self.shuffle_seed) if train else None  # type: ignore[arg-type]
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=sampler,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=self.pin_memory,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_dataset, train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_dataset, train=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_dataset, train=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader(self.test_dataset, train=False)
