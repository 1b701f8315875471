"""Data modules (batches are ``(input, target, index)``, or Hugging Face style dicts) and the pieces they share."""

from lightning_distill.data.cifar import CIFARDataModule
from lightning_distill.data.common import EpochShuffleSampler, IndexedDataset, TensorClassificationDataset
from lightning_distill.data.digits import DigitsDataModule
from lightning_distill.data.text import CharTokenizer, TextDataModule
from lightning_distill.data.tokenized import TokenizedTextDataModule, train_tokenizer
from lightning_distill.data.transfer import TransferDataModule
from lightning_distill.data.transfer_sampler import TransferBatchSampler
from lightning_distill.data.transfer_sets import UnlabeledDataset

__all__ = [
    "CIFARDataModule",
    "CharTokenizer",
    "DigitsDataModule",
    "EpochShuffleSampler",
    "IndexedDataset",
    "TensorClassificationDataset",
    "TextDataModule",
    "TokenizedTextDataModule",
    "TransferBatchSampler",
    "TransferDataModule",
    "UnlabeledDataset",
    "train_tokenizer",
]
