"""CIFAR-10 / CIFAR-100 through torchvision as a LightningDataModule."""

from __future__ import annotations

import copy
import os
import pickle
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset, Subset
from torchvision import transforms
from torchvision.datasets import CIFAR10, CIFAR100

from lightning_distill.data.common import IndexedDataset, SplitDataModule, check_positive_int

__all__ = ["CIFARDataModule", "stratified_split"]

# Per-channel mean / std of the training images (pixel values in [0, 1]). The CIFAR-100 values
# are the ones RepDistiller / CRD use; for CIFAR-10 these are the true per-pixel statistics.
CIFAR_STATS = {
    10: ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    100: ((0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)),
}


class _MaybeUnverified:
    """Mixin for torchvision's CIFAR datasets: ``verify_checksums=False`` only checks that files exist.

    torchvision compares every file's md5 with the original archive's, which rejects re-packed or
    re-pickled copies (and the small fake datasets of the tests). With ``verify_checksums=False``
    the integrity check (used both before loading and by ``download``) only asks that the
    data files and the meta file are there.
    """

    base_folder: str
    train_list: list
    test_list: list
    meta: dict
    root: str

    def __init__(self, *args: Any, verify_checksums: bool = True, **kwargs: Any) -> None:
        self.verify_checksums = verify_checksums
        super().__init__(*args, **kwargs)

    def _paths(self) -> list[str]:
        names = [name for name, _ in self.train_list + self.test_list] + [self.meta["filename"]]
        return [os.path.join(self.root, self.base_folder, name) for name in names]

    def _check_integrity(self) -> bool:
        if self.verify_checksums:
            return super()._check_integrity()  # type: ignore[misc]
        return all(os.path.isfile(path) for path in self._paths())

    def _load_meta(self) -> None:
        if self.verify_checksums:
            return super()._load_meta()  # type: ignore[misc]
        with open(os.path.join(self.root, self.base_folder, self.meta["filename"]), "rb") as f:
            self.classes = pickle.load(f, encoding="latin1")[self.meta["key"]]
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}


class _CIFAR10(_MaybeUnverified, CIFAR10):
    pass


class _CIFAR100(_MaybeUnverified, CIFAR100):
    pass


def stratified_split(targets: Tensor, n_holdout: int, seed: int) -> tuple[Tensor, Tensor]:
    """Split ``range(len(targets))`` into ``(keep, holdout)`` with ``n_holdout`` samples held out.

    Every class contributes in proportion to its size (exactly ``n_holdout / num_classes`` per
    class when the classes are balanced and that divides), and which samples of a class are held
    out is random but fixed by ``seed``. Both index tensors are sorted.

    Example::

        >>> keep, holdout = stratified_split(torch.arange(20) % 2, n_holdout=4, seed=0)
        >>> len(keep), len(holdout), torch.bincount(torch.arange(20)[holdout] % 2).tolist()
        (16, 4, [2, 2])
    """
    n = len(targets)
    if not 0 <= n_holdout <= n:
        raise ValueError(f"`n_holdout` must be in [0, {n}], got {n_holdout!r}.")
    g = torch.Generator().manual_seed(int(seed))
    perm = torch.randperm(n, generator=g)
    labels = torch.as_tensor(targets, dtype=torch.long)[perm]
    counts = torch.bincount(labels)
    starts = torch.cumsum(counts, 0) - counts
    order = torch.argsort(labels, stable=True)  # grouped by class, random order inside a class
    rank = torch.empty(n, dtype=torch.long)
    rank[order] = torch.arange(n) - starts[labels[order]]
    quantile = (rank.double() + 0.5) / counts[labels].double()  # position of a sample inside its class
    chosen = torch.argsort(quantile, stable=True)[:n_holdout]
    is_holdout = torch.zeros(n, dtype=torch.bool)
    is_holdout[perm[chosen]] = True
    return torch.nonzero(~is_holdout).flatten(), torch.nonzero(is_holdout).flatten()


class CIFARDataModule(SplitDataModule):
    """CIFAR-10 or CIFAR-100 (32x32 colour images, 50k train / 10k test) through torchvision.

    ``val_size`` training images are held out for validation by a stratified split fixed by
    ``split_seed`` (the default 5,000 is 500 per class on CIFAR-10 and 50 per class on CIFAR-100),
    so model selection never looks at the test set. With ``val_size=0`` all 50k images are used
    for training and **the test set doubles as the validation set** -- the common protocol of the
    distillation papers (CRD / RepDistiller report the best test accuracy), but then validation
    numbers are not an unbiased estimate any more.

    Training images are augmented with ``RandomCrop(32, padding=4)`` and ``RandomHorizontalFlip``
    when ``augment=True``; all images are then converted with ``ToTensor`` and normalised with the
    dataset's per-channel mean / std (``self.mean``, ``self.std``). Validation and test images are
    never augmented (the validation split reads the training files through a second dataset
    object with the evaluation transform). Batches are ``(input, target, index)``; ``index`` is the
    sample's position in its split.

    Data location: torchvision's layout, i.e. the extracted ``cifar-10-batches-py`` or
    ``cifar-100-python`` folder directly under ``root``. ``prepare_data`` downloads it there when
    ``download=True`` (about 170 MB, needs network once); on a machine without network, copy the
    extracted folder (from https://www.cs.toronto.edu/~kriz/cifar.html) under ``root`` instead.

    Args:
        root: folder that holds (or will hold) the extracted dataset folder.
        num_classes: 10 for CIFAR-10, 100 for CIFAR-100.
        batch_size: samples per batch (all splits).
        num_workers: DataLoader worker processes.
        download: download the dataset in ``prepare_data`` if it is not under ``root`` yet.
        augment: random crop + horizontal flip on the training split.
        val_size: training images held out for validation; 0 validates on the test set.
        split_seed: seed of the train / val split (keep it fixed to compare runs).
        shuffle_seed: seed of the training order; ``None`` takes the global seed at setup time
            (``seed_everything`` / the CLI's ``seed_everything``), so runs with different seeds
            also see different orders.
        verify_checksums: compare the files' md5 sums with torchvision's; set ``False`` for a
            re-packed copy, then only the presence of the files is checked.

    Example::

        >>> dm = CIFARDataModule(root="data", num_classes=100, batch_size=64)  # doctest: +SKIP
        >>> dm.prepare_data(); dm.setup("fit")  # doctest: +SKIP
        >>> x, y, index = next(iter(dm.train_dataloader()))  # doctest: +SKIP
        >>> tuple(x.shape), len(dm.train_dataset), len(dm.val_dataset)  # doctest: +SKIP
        ((64, 3, 32, 32), 45000, 5000)
    """

    input_shape = (3, 32, 32)

    def __init__(
        self,
        root: str = "data",
        num_classes: int = 100,
        batch_size: int = 128,
        num_workers: int = 2,
        download: bool = True,
        augment: bool = True,
        val_size: int = 5000,
        split_seed: int = 0,
        shuffle_seed: int | None = None,
        verify_checksums: bool = True,
    ) -> None:
        super().__init__()
        if isinstance(num_classes, bool) or num_classes not in (10, 100):
            raise ValueError(f"`num_classes` must be 10 (CIFAR-10) or 100 (CIFAR-100), got {num_classes!r}.")
        check_positive_int("batch_size", batch_size)
        if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
            raise ValueError(f"`num_workers` must be an integer >= 0, got {num_workers!r}.")
        if isinstance(val_size, bool) or not isinstance(val_size, int) or val_size < 0:
            raise ValueError(f"`val_size` must be an integer >= 0 (0 = validate on the test set), got {val_size!r}.")
        self.root = os.fspath(root)
        self.num_classes = num_classes
        self.input_shape = (3, 32, 32)
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.download = download
        self.augment = augment
        self.val_size = val_size
        self.split_seed = split_seed
        self.shuffle_seed = shuffle_seed
        self.pin_memory = torch.cuda.is_available()  # faster host-to-GPU copies of image batches
        self.verify_checksums = verify_checksums
        self.mean, self.std = CIFAR_STATS[num_classes]
        self.train_dataset: Dataset | None = None
        self.val_dataset: Dataset | None = None
        self.test_dataset: Dataset | None = None

    # ---------------------------------------------------------------------------------- files

    @property
    def _dataset_cls(self) -> type:
        return _CIFAR10 if self.num_classes == 10 else _CIFAR100

    @property
    def _name(self) -> str:
        return f"CIFAR-{self.num_classes}"

    @property
    def _folder(self) -> str:
        return self._dataset_cls.base_folder

    def _missing_files(self) -> list[str]:
        cls = self._dataset_cls
        names = [name for name, _ in cls.train_list + cls.test_list] + [cls.meta["filename"]]
        folder = os.path.join(os.path.expanduser(self.root), self._folder)
        return [name for name in names if not os.path.isfile(os.path.join(folder, name))]

    def _how_to_fix(self) -> str:
        cls = self._dataset_cls
        return (
            f"To fix it, either place the extracted {self._folder!r} folder (from {cls.filename}, "
            f"{cls.url}) under root={self.root!r} and use download=False, or run once with "
            f"download=True on a machine with network access so that it is stored under {self.root!r}."
        )

    def _open(self, train: bool, transform: Any) -> Dataset:
        missing = self._missing_files()
        if missing:
            raise RuntimeError(
                f"{self._name} was not found under root={self.root!r}: missing {missing} in "
                f"{os.path.join(self.root, self._folder)!r} (download={self.download}; the download runs in "
                f"prepare_data(), which the Trainer calls before setup()). This machine may have no network. "
                + self._how_to_fix()
            )
        try:
            return self._dataset_cls(
                self.root, train=train, transform=transform, download=False, verify_checksums=self.verify_checksums
            )
        except RuntimeError as err:
            if not self.verify_checksums:
                raise
            raise RuntimeError(
                f"{self._name} under root={self.root!r} failed torchvision's md5 integrity check ({err}). "
                f"If it is a re-packed copy of the dataset, pass verify_checksums=False; otherwise delete "
                f"{os.path.join(self.root, self._folder)!r} and download it again."
            ) from err

    def prepare_data(self) -> None:
        """Download the dataset to ``root`` if ``download=True`` and it is not there yet."""
        if not self.download:
            return
        try:
            # Loads the training files once afterwards, which also checks that the download is usable.
            self._dataset_cls(self.root, train=True, download=True, verify_checksums=self.verify_checksums)
        except Exception as err:  # no network (URLError / OSError), bad archive, md5 mismatch (RuntimeError)
            raise RuntimeError(
                f"{self._name} could not be downloaded to root={self.root!r} ({type(err).__name__}: {err}). "
                f"This machine may have no network access. " + self._how_to_fix()
            ) from err

    # ----------------------------------------------------------------------------- transforms

    def eval_transform(self) -> transforms.Compose:
        """``ToTensor`` + ``Normalize(mean, std)``: validation, test and ``example_input``."""
        return transforms.Compose([transforms.ToTensor(), transforms.Normalize(self.mean, self.std)])

    def train_transform(self) -> transforms.Compose:
        """The training transform: random crop + flip (if ``augment``), then the eval transform."""
        if not self.augment:
            return self.eval_transform()
        return transforms.Compose(
            [
                transforms.RandomCrop(32, padding=4),
                transforms.RandomHorizontalFlip(),
                transforms.ToTensor(),
                transforms.Normalize(self.mean, self.std),
            ]
        )

    # ---------------------------------------------------------------------------------- setup

    def setup(self, stage: str | None = None) -> None:
        if self.train_dataset is not None:
            return
        train_full = self._open(train=True, transform=self.train_transform())
        # A second dataset object over the same (shared, already loaded) arrays, without augmentation.
        plain_full = copy.copy(train_full)
        plain_full.transform = self.eval_transform()
        plain_full.transforms = type(train_full.transforms)(plain_full.transform, None)
        test = self._open(train=False, transform=self.eval_transform())

        n_train = len(train_full)
        if self.val_size >= n_train:
            raise ValueError(
                f"`val_size` must be smaller than the {n_train} training images of {self._name}, got {self.val_size!r}."
            )
        train_idx, val_idx = stratified_split(torch.as_tensor(train_full.targets), self.val_size, self.split_seed)
        self.train_dataset = IndexedDataset(Subset(train_full, train_idx.tolist()))
        self._train_plain = Subset(plain_full, train_idx.tolist())
        self.test_dataset = IndexedDataset(test)
        if self.val_size > 0:
            self.val_dataset = IndexedDataset(Subset(plain_full, val_idx.tolist()))
        else:
            self.val_dataset = self.test_dataset
        self.resolve_shuffle_seed()

    def example_input(self, n: int = 8) -> Tensor:
        """A few real (non-augmented, normalised) training inputs, used to probe model shapes."""
        self.setup()
        n = min(n, len(self._train_plain))
        return torch.stack([self._train_plain[i][0] for i in range(n)])

    # ---------------------------------------------------------------------------- dataloaders
