"""Data modules (batches are ``(input, target, index)``) and the pieces they share."""

from lightning_distill.data.cifar import CIFARDataModule
from lightning_distill.data.common import EpochShuffleSampler, IndexedDataset, TensorClassificationDataset
from lightning_distill.data.digits import DigitsDataModule
from lightning_distill.data.transfer import TransferBatchSampler, TransferDataModule, UnlabeledDataset

__all__ = [
    "CIFARDataModule",
    "DigitsDataModule",
    "EpochShuffleSampler",
    "IndexedDataset",
    "TensorClassificationDataset",
    "TransferBatchSampler",
    "TransferDataModule",
    "UnlabeledDataset",
]
