"""scikit-learn's bundled handwritten digits as a LightningDataModule (offline, no download)."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from lightning_distill.data.common import SplitDataModule, TensorClassificationDataset, check_positive_int

__all__ = ["DigitsDataModule"]


class DigitsDataModule(SplitDataModule):
    """The 1,797 8x8 handwritten digits that ship with scikit-learn (UCI optdigits test set).

    Images are scaled from ``0..16`` to ``[0, 1]`` and shaped ``[1, 8, 8]``. The split into
    train / val / test is stratified by class and fixed by ``split_seed`` (defaults give
    1,079 / 359 / 359 samples), so every run and every seed is evaluated on the same
    held-out digits. Batches are ``(input, target, index)``; ``index`` is the sample's
    position in its split.

    Args:
        batch_size: samples per batch (all splits).
        val_fraction: share of all samples held out for validation.
        test_fraction: share of all samples held out for the final test.
        split_seed: seed of the stratified split (keep it fixed to compare runs).
        shuffle_seed: seed of the training order; ``None`` takes the global seed at setup time
            (``seed_everything`` / the CLI's ``seed_everything``), so runs with different seeds
            also see different orders. Call ``seed_everything`` before the first ``fit`` (or
            ``setup``), and build a new datamodule per seed: the order is fixed at the first setup.
        num_workers: DataLoader workers; 0 is fastest for this in-memory dataset.

    Example::

        >>> dm = DigitsDataModule(batch_size=32)
        >>> dm.setup("fit")
        >>> x, y, index = next(iter(dm.train_dataloader()))
        >>> tuple(x.shape), len(dm.train_dataset), len(dm.val_dataset), len(dm.test_dataset)
        ((32, 1, 8, 8), 1079, 359, 359)
    """

    num_classes = 10
    input_shape = (1, 8, 8)

    def __init__(
        self,
        batch_size: int = 64,
        val_fraction: float = 0.2,
        test_fraction: float = 0.2,
        split_seed: int = 0,
        shuffle_seed: Optional[int] = None,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        check_positive_int("batch_size", batch_size)
        for name, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
            if not 0.0 < value < 1.0:
                raise ValueError(f"`{name}` must be in (0, 1), got {value!r}.")
        if val_fraction + test_fraction >= 0.9:
            raise ValueError(
                f"`val_fraction` + `test_fraction` must leave at least 10% for training, got "
                f"{val_fraction!r} + {test_fraction!r}."
            )
        if num_workers < 0:
            raise ValueError(f"`num_workers` must be >= 0, got {num_workers!r}.")
        self.batch_size = batch_size
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction
        self.split_seed = split_seed
        self.shuffle_seed = shuffle_seed
        self.num_workers = num_workers
        self.train_dataset: Optional[TensorClassificationDataset] = None
        self.val_dataset: Optional[TensorClassificationDataset] = None
        self.test_dataset: Optional[TensorClassificationDataset] = None

    def setup(self, stage: Optional[str] = None) -> None:
        if self.train_dataset is not None:
            return
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        data = load_digits()
        x = torch.tensor(data.images, dtype=torch.float32).div_(16.0).unsqueeze(1)
        y = torch.tensor(data.target, dtype=torch.long)
        idx = torch.arange(len(y)).numpy()
        n_test = round(self.test_fraction * len(y))
        n_val = round(self.val_fraction * len(y))
        rest, test = train_test_split(idx, test_size=n_test, stratify=y.numpy(), random_state=self.split_seed)
        train, val = train_test_split(rest, test_size=n_val, stratify=y.numpy()[rest], random_state=self.split_seed)
        self.train_dataset = TensorClassificationDataset(x[train], y[train])
        self.val_dataset = TensorClassificationDataset(x[val], y[val])
        self.test_dataset = TensorClassificationDataset(x[test], y[test])
        self.resolve_shuffle_seed()

    def example_input(self, n: int = 8) -> Tensor:
        """A few real training inputs, used to probe model shapes before training."""
        self.setup()
        return self.train_dataset.inputs[:n]
