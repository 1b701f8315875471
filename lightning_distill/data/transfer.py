"""Transfer sets: distill on unlabeled, augmented and synthetic inputs next to the labelled data.

Hinton et al. 2015 note that the *transfer set* the student matches the teacher on need not be
labelled; Beyer et al. 2022 (arXiv:2106.05237) distil on heavily augmented and mixed inputs.
This module adds such inputs to any labelled :class:`~lightning.LightningDataModule`:

* :class:`~lightning_distill.data.transfer_sets.UnlabeledDataset` -- unlabeled inputs from a
  map-style dataset (labels dropped), an array file (``.npy`` / ``.pt``) or an image folder;
* :class:`TransferDataModule` -- the labelled training set plus the transfer data (an
  :class:`UnlabeledDataset` and / or a fixed :class:`~lightning_distill.augment.AugmentedDataset`
  of the labelled training inputs), mixed in every batch, in alternating batches, or
  concatenated; validation and test are the labelled module's, unchanged;
* :class:`~lightning_distill.data.transfer_sampler.TransferBatchSampler` -- the resumable
  (seeded per epoch), DDP-aware batch sampler behind it.

Batches stay ``(input, target, index)``. Transfer samples carry ``target == ignore_index``
(-100): the hard-label loss averages over labelled samples only, so they are trained by the
distillation term alone. Indices are unique across the combined training set: labelled samples
keep their index ``0 .. n_labeled - 1``, transfer samples are numbered from ``n_labeled`` on,
so per-sample state (a teacher-output cache, CRD's memory bank of ``len(train_dataset)`` rows)
never collides.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Optional, Sized, Union

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from torch.utils.data import ConcatDataset, DataLoader, Dataset, IterableDataset

from lightning_distill.augment import AugmentedDataset, _check_affine_args, _check_alpha
from lightning_distill.data.common import EpochShuffleSampler
from lightning_distill.data.transfer_sampler import TransferBatchSampler, check_batching
from lightning_distill.data.transfer_sets import UnlabeledDataset, _CombinedDataset
from lightning_distill.validation import check_int

__all__ = ["TransferBatchSampler", "TransferDataModule", "UnlabeledDataset"]


def _from_labeled(name: str, doc: str) -> property:
    """A read-only property that forwards ``name`` to the labelled module (``None`` if it has none)."""
    return property(lambda self: getattr(self.labeled, name, None), doc=doc)


class TransferDataModule(L.LightningDataModule):
    """A labelled datamodule plus a transfer set of unlabeled / augmented inputs for distillation.

    The training set is the labelled module's training set followed by the transfer data:
    ``unlabeled`` (an :class:`UnlabeledDataset` built from an array file, an image folder or a
    dataset) and, when ``augmented_copies > 0``, a fixed
    :class:`~lightning_distill.augment.AugmentedDataset` of the labelled training inputs
    (``augmented_copies`` affinely jittered, optionally mixup-mixed versions of each -- the
    digits demonstration's augmented transfer set). Validation, test and predict loaders are the
    labelled module's, unchanged, and ``num_classes``, ``input_shape``, ``example_input`` are
    its as well.

    Batches are ``(input, target, index)``: transfer samples have ``target == ignore_index``, and
    the index is unique across the combined set -- labelled samples keep ``0 .. n_labeled - 1``
    (their index in the labelled module), the unlabeled set follows from ``n_labeled`` on, then
    the augmented set; ``len(train_dataset)`` is the total, so per-sample state keyed on the
    index (a teacher cache, CRD's memory bank) has one row per sample.

    **Batches and epochs** (see :class:`TransferBatchSampler`): ``"mix"`` puts
    ``round(batch_size * unlabeled_fraction)`` transfer samples into every batch, ``"alternate"``
    interleaves whole labelled and whole transfer batches (``unlabeled_fraction`` of the batches
    are transfer batches), ``"concat"`` shuffles both sets together. In ``"mix"`` and
    ``"alternate"`` an epoch is **one pass over the labelled set**: every labelled sample is used
    once per epoch, exactly as in the labelled module, so validation curves, epoch-based LR
    schedules and ``max_epochs`` in configs keep their meaning, and the epoch length does not
    explode with a large unlabeled folder; the transfer samples come from a stream of
    permutations that continues across epochs, so all of them are used equally often over
    training. (In ``"mix"`` an epoch has ``1 / (1 - unlabeled_fraction)`` times as many steps as
    the labelled module.) In ``"concat"`` an epoch is one pass over both sets, in
    ``"transfer_only"`` one pass over the transfer set (data-free distillation: the labelled
    module only supplies validation and test data). The order depends
    only on ``(shuffle_seed, epoch)``: resumed runs see the same batches.

    **DDP**: the training loader uses a custom batch sampler; under DDP Lightning re-creates it
    with its ``DistributedSampler``, from which it takes rank and world size and shards the
    labelled order and the transfer stream itself (outside a Trainer's automatic injection,
    ``trainer.global_rank`` / ``world_size`` are used when a trainer is attached). Every rank gets
    the same number of batches. ``batch_size`` is per rank.

    Args:
        labeled: the labelled :class:`~lightning.LightningDataModule` (e.g. ``DigitsDataModule``);
            its training set must be a map-style ``train_dataset`` with ``(input, target, ...)``
            samples after ``setup("fit")``.
        unlabeled: transfer inputs: path of an array file (``.npy`` / ``.pt``) or image folder,
            or a map-style dataset (labels are dropped), or (from Python) a tensor ``[N, ...]``;
            see :class:`UnlabeledDataset`. Read in ``setup``, not here.
        augmented_copies: augmented versions of each labelled training input added to the
            transfer set; 0 = none.
        augment_degrees: maximal rotation of that augmented set, in degrees.
        augment_translate: maximal shift of that set, as a fraction of the image size.
        augment_scale: ``(low, high)`` zoom range of that set.
        augment_mixup_alpha: Beta parameter for mixing each augmented sample with another
            labelled input; 0 = no mixing.
        augment_seed: seed of the augmented set (fixed, so a teacher cache stays valid).
        mode: ``"mix"``, ``"alternate"``, ``"concat"`` or ``"transfer_only"`` (above).
        unlabeled_fraction: share of transfer samples per batch (``"mix"``) or of transfer
            batches (``"alternate"``), in (0, 1); not used by ``"concat"``.
        batch_size: samples per training batch; ``None`` takes ``labeled.batch_size``.
        shuffle_seed: seed of the training order; ``None`` takes ``labeled.shuffle_seed`` after
            its setup (the global seed for the package's modules), else ``torch.initial_seed()``.
        unlabeled_transform: callable applied to every ``unlabeled`` input (e.g. for an image
            folder ``Compose([Grayscale(1), Resize(8), ToTensor()])``; default ``ToTensor()``).
        num_workers: training DataLoader workers; ``None`` takes ``labeled.num_workers`` (or 0).
        ignore_index: target of the transfer samples; keep it equal to the model's.

    Example::

        >>> from lightning_distill.data import DigitsDataModule
        >>> dm = TransferDataModule(DigitsDataModule(batch_size=64), augmented_copies=5, shuffle_seed=0)
        >>> dm.setup("fit")
        >>> x, y, index = next(iter(dm.train_dataloader()))
        >>> tuple(x.shape), int((y == -100).sum()), len(dm.train_dataset), len(dm.train_dataloader())
        ((64, 1, 8, 8), 32, 6474, 34)
    """

    def __init__(
        self,
        labeled: L.LightningDataModule,
        unlabeled: Optional[Union[str, Dataset]] = None,
        augmented_copies: int = 0,
        augment_degrees: float = 10.0,
        augment_translate: float = 0.1,
        augment_scale: tuple[float, float] = (0.9, 1.1),
        augment_mixup_alpha: float = 0.0,
        augment_seed: int = 0,
        mode: str = "mix",
        unlabeled_fraction: float = 0.5,
        batch_size: Optional[int] = None,
        shuffle_seed: Optional[int] = None,
        unlabeled_transform: Optional[Callable] = None,
        num_workers: Optional[int] = None,
        ignore_index: int = -100,
    ) -> None:
        super().__init__()
        if not isinstance(labeled, L.LightningDataModule):
            raise TypeError(
                f"`labeled` must be a LightningDataModule (e.g. lightning_distill.data.DigitsDataModule), got "
                f"{type(labeled).__name__}; in YAML give it as `labeled: {{class_path: ..., init_args: {{...}}}}`."
            )
        if unlabeled is not None and not isinstance(unlabeled, (str, os.PathLike, Dataset, Tensor)):
            raise TypeError(
                f"`unlabeled` must be None, a path (array file .npy/.pt or image folder), a Dataset or a tensor, got "
                f"{type(unlabeled).__name__}."
            )
        check_int(
            "augmented_copies", augmented_copies, minimum=0,
            hint=" It counts the augmented versions of each labelled input; 0 = none.",
        )  # fmt: skip
        if unlabeled is None and augmented_copies == 0:
            raise ValueError(
                "TransferDataModule has no transfer data: `unlabeled` is None and `augmented_copies` is 0. Set "
                "`unlabeled` (a .npy/.pt array file, an image folder, or a Dataset) and/or `augmented_copies` > 0 "
                "(e.g. 5 augmented copies of every labelled training input)."
            )
        _check_affine_args(augment_degrees, augment_translate, augment_scale, prefix="augment_")
        _check_alpha("augment_mixup_alpha", augment_mixup_alpha)
        check_int("augment_seed", augment_seed, type_error=True)
        if batch_size is None:
            batch_size = getattr(labeled, "batch_size", None)
            if batch_size is None:
                raise ValueError(
                    f"`batch_size` is None and the labelled module {type(labeled).__name__} has no `batch_size` "
                    f"attribute to take it from: set `batch_size`."
                )
        check_batching(mode, unlabeled_fraction, batch_size)
        if shuffle_seed is not None and (isinstance(shuffle_seed, bool) or not isinstance(shuffle_seed, int)):
            raise TypeError(f"`shuffle_seed` must be an int or None, got {shuffle_seed!r}.")
        if unlabeled_transform is not None and not callable(unlabeled_transform):
            raise TypeError(
                f"`unlabeled_transform` must be callable or None, got {type(unlabeled_transform).__name__}."
            )
        if num_workers is not None and (
            isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0
        ):
            raise ValueError(
                f"`num_workers` must be an integer >= 0 or None (= the labelled module's), got {num_workers!r}."
            )
        self.labeled = labeled
        self.unlabeled = unlabeled
        self.augmented_copies = augmented_copies
        self.augment_degrees = augment_degrees
        self.augment_translate = augment_translate
        self.augment_scale = tuple(augment_scale)
        self.augment_mixup_alpha = augment_mixup_alpha
        self.augment_seed = augment_seed
        self.mode = mode
        self.unlabeled_fraction = unlabeled_fraction
        self.batch_size = batch_size
        self.shuffle_seed = shuffle_seed
        self.unlabeled_transform = unlabeled_transform
        self.num_workers = num_workers if num_workers is not None else int(getattr(labeled, "num_workers", 0) or 0)
        self.ignore_index = ignore_index
        self.train_dataset: Optional[_CombinedDataset] = None
        self.transfer_dataset: Optional[ConcatDataset] = None

    # ------------------------------------------------------------------ delegated to `labeled`
    num_classes = _from_labeled("num_classes", "The labelled module's number of classes.")
    input_shape = _from_labeled("input_shape", "The labelled module's input shape (without the batch dimension).")
    val_dataset = _from_labeled("val_dataset", "The labelled module's validation set.")
    test_dataset = _from_labeled("test_dataset", "The labelled module's test set.")

    @property
    def n_labeled(self) -> int:
        """Size of the labelled training set (after ``setup("fit")``)."""
        return self._require_setup().n_labeled

    @property
    def n_transfer(self) -> int:
        """Size of the transfer set (after ``setup("fit")``)."""
        return self._require_setup().n_transfer

    def prepare_data(self) -> None:
        self.labeled.prepare_data()

    def example_input(self, n: int = 8) -> Tensor:
        """The labelled module's ``example_input`` (or its first ``n`` training inputs)."""
        if callable(getattr(self.labeled, "example_input", None)):
            return self.labeled.example_input(n)
        self.labeled.setup("fit")
        train = self._labeled_train()
        return torch.stack([train[i][0] for i in range(min(n, len(train)))])

    def val_dataloader(self) -> Any:
        return self.labeled.val_dataloader()

    def test_dataloader(self) -> Any:
        return self.labeled.test_dataloader()

    def predict_dataloader(self) -> Any:
        return self.labeled.predict_dataloader()

    def teardown(self, stage: str) -> None:
        self.labeled.teardown(stage)

    def state_dict(self) -> dict[str, Any]:
        return self.labeled.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.labeled.load_state_dict(state_dict)

    # ------------------------------------------------------------------ setup
    def _labeled_train(self) -> Dataset:
        train = getattr(self.labeled, "train_dataset", None)
        if train is None or isinstance(train, IterableDataset) or not isinstance(train, Sized):
            raise TypeError(
                f"TransferDataModule needs the labelled module's training set as a map-style `train_dataset` "
                f"attribute after setup('fit'); {type(self.labeled).__name__} has {type(train).__name__}."
            )
        if len(train) == 0:
            raise ValueError(f"the labelled training set of {type(self.labeled).__name__} is empty.")
        return train

    def _require_setup(self) -> _CombinedDataset:
        if self.train_dataset is None:
            raise RuntimeError("TransferDataModule: call setup('fit') first (the Trainer does it before training).")
        return self.train_dataset

    def setup(self, stage: Optional[str] = None) -> None:
        if getattr(self, "trainer", None) is not None:
            self.labeled.trainer = self.trainer
        self.labeled.setup(stage)
        if stage not in (None, "fit") or self.train_dataset is not None:
            return
        train = self._labeled_train()
        sources: list[tuple[str, Dataset]] = []
        if self.unlabeled is not None:
            source = self.unlabeled
            if not isinstance(source, UnlabeledDataset):
                source = UnlabeledDataset(source, transform=self.unlabeled_transform, ignore_index=self.ignore_index)
            sources.append((f"`unlabeled` ({self.unlabeled!r})", source))
        if self.augmented_copies > 0:
            self._warn_if_random(train)
            augmented = AugmentedDataset(
                train,
                copies=self.augmented_copies,
                degrees=self.augment_degrees,
                translate=self.augment_translate,
                scale=self.augment_scale,
                mixup_alpha=self.augment_mixup_alpha,
                seed=self.augment_seed,
                ignore_index=self.ignore_index,
            )
            sources.append((f"the augmented copies (`augmented_copies`={self.augmented_copies})", augmented))
        labeled_shape = self._shape(train[0][0], f"the labelled training inputs of {type(self.labeled).__name__}")
        for name, dataset in sources:
            shape = self._shape(dataset[0][0], f"the transfer inputs of {name}")
            if shape != labeled_shape:
                raise ValueError(
                    f"the transfer inputs of {name} have shape {shape}, but the labelled training inputs of "
                    f"{type(self.labeled).__name__} have shape {labeled_shape}; both go into the same batches, so they "
                    f"must match: convert the transfer inputs (e.g. `unlabeled_transform` for an image folder, or "
                    f"reshape the array file)."
                )
        self.transfer_dataset = ConcatDataset([dataset for _, dataset in sources])
        self.train_dataset = _CombinedDataset(train, self.transfer_dataset, self.ignore_index)
        if self.shuffle_seed is None:
            seed = getattr(self.labeled, "shuffle_seed", None)
            self.shuffle_seed = seed if isinstance(seed, int) else torch.initial_seed() % (2**31)

    @staticmethod
    def _shape(x: Any, what: str) -> tuple[int, ...]:
        if not isinstance(x, Tensor):
            raise TypeError(
                f"{what} must be tensors, got {type(x).__name__}; give a transform that returns tensors "
                f"(e.g. `unlabeled_transform: torchvision.transforms.ToTensor`)."
            )
        return tuple(x.shape)

    def _warn_if_random(self, train: Dataset) -> None:
        first, again = train[0][0], train[0][0]
        if isinstance(first, Tensor) and isinstance(again, Tensor) and not torch.equal(first, again):
            rank_zero_warn(
                f"the labelled training set of {type(self.labeled).__name__} returns a different input each time it "
                f"is read (random training transforms), so the 'fixed' augmented transfer set (`augmented_copies`) "
                f"changes between epochs and a teacher-output cache keyed on the index would be stale. Turn the "
                f"labelled module's random augmentation off, or cache nothing."
            )

    # ------------------------------------------------------------------ training loader
    def train_batch_sampler(self) -> TransferBatchSampler:
        """The batch sampler of :meth:`train_dataloader` (sharded by the attached trainer's rank)."""
        dataset = self._require_setup()
        trainer = getattr(self, "trainer", None)
        num_replicas = int(getattr(trainer, "world_size", 1) or 1) if trainer is not None else 1
        rank = int(getattr(trainer, "global_rank", 0) or 0) if trainer is not None else 0
        return TransferBatchSampler(
            EpochShuffleSampler(dataset, seed=self.shuffle_seed),
            batch_size=self.batch_size,
            drop_last=False,
            n_labeled=dataset.n_labeled,
            n_transfer=dataset.n_transfer,
            mode=self.mode,
            unlabeled_fraction=self.unlabeled_fraction,
            seed=self.shuffle_seed,
            num_replicas=num_replicas,
            rank=rank,
        )

    def train_dataloader(self) -> DataLoader:
        return DataLoader(
            self._require_setup(),
            batch_sampler=self.train_batch_sampler(),
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )
