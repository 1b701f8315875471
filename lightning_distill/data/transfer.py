"""Transfer sets: distill on unlabeled, augmented and synthetic inputs next to the labelled data.

Hinton et al. 2015 note that the *transfer set* the student matches the teacher on need not be
labelled; Beyer et al. 2022 (arXiv:2106.05237) distil on heavily augmented and mixed inputs.
This module adds such inputs to any labelled :class:`~lightning.LightningDataModule`:

* :class:`UnlabeledDataset` -- unlabeled inputs from a map-style dataset (labels dropped), an
  array file (``.npy`` / ``.pt``) or an image folder;
* :class:`TransferDataModule` -- the labelled training set plus the transfer data (an
  :class:`UnlabeledDataset` and / or a fixed :class:`~lightning_distill.augment.AugmentedDataset`
  of the labelled training inputs), mixed in every batch, in alternating batches, or
  concatenated; validation and test are the labelled module's, unchanged;
* :class:`TransferBatchSampler` -- the resumable (seeded per epoch), DDP-aware batch sampler
  behind it.

Batches stay ``(input, target, index)``. Transfer samples carry ``target == ignore_index``
(-100): the hard-label loss averages over labelled samples only, so they are trained by the
distillation term alone. Indices are unique across the combined training set: labelled samples
keep their index ``0 .. n_labeled - 1``, transfer samples are numbered from ``n_labeled`` on,
so per-sample state (a teacher-output cache, CRD's memory bank of ``len(train_dataset)`` rows)
never collides.
"""

from __future__ import annotations

import math
import os
from typing import Any, Callable, Iterator, Optional, Sized, Union

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from torch.utils.data import BatchSampler, ConcatDataset, DataLoader, Dataset, IterableDataset, Sampler
from torch.utils.data.distributed import DistributedSampler

from lightning_distill.augment import AugmentedDataset, _check_affine_args, _check_alpha, _derive_seed
from lightning_distill.data.common import EpochShuffleSampler, check_positive_int

__all__ = ["TransferBatchSampler", "TransferDataModule", "UnlabeledDataset"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
ARRAY_SUFFIXES = (".npy", ".pt", ".pth")
MODES = ("mix", "alternate", "concat", "transfer_only")


def _no_label(ignore_index: int) -> Tensor:
    return torch.tensor(ignore_index, dtype=torch.long)


class UnlabeledDataset(Dataset):
    """Unlabeled inputs as ``(input, ignore_index, index)`` samples.

    ``source`` is one of

    * a map-style dataset: its samples' element 0 is the input (a bare, non-tuple sample is the
      input itself); labels are dropped;
    * a tensor ``[N, ...]`` of inputs;
    * the path of an array file: ``.npy`` (read with ``numpy.load(allow_pickle=False)``) or
      ``.pt`` / ``.pth`` (read with ``torch.load(weights_only=True)``: a file can never run code)
      holding a floating-point array ``[N, ...]``, or, for ``.pt``, a dict with that tensor under
      the key ``"inputs"``; values are converted to float32 and used as they are (scale them
      like the labelled inputs);
    * the path of a folder: every image file below it, recursively (``.png``, ``.jpg``, ...;
      sorted by path), opened with PIL and converted to RGB as torchvision's ``ImageFolder``
      does, then passed through ``transform`` (default ``ToTensor()``; e.g. add ``Grayscale(1)``
      and ``Resize`` to match the labelled inputs). Class sub-folders are allowed and ignored.

    ``transform`` is applied to every input (of any source) when given.

    Args:
        source: dataset, tensor, array-file path or image-folder path.
        transform: callable applied to each input.
        ignore_index: the target every sample carries.

    Example::

        >>> from torch.utils.data import TensorDataset
        >>> ds = UnlabeledDataset(TensorDataset(torch.rand(5, 1, 8, 8), torch.arange(5)))
        >>> x, y, index = ds[3]
        >>> len(ds), tuple(x.shape), int(y), index
        (5, (1, 8, 8), -100, 3)
    """

    def __init__(
        self,
        source: Union[str, os.PathLike, Dataset, Tensor],
        transform: Optional[Callable[[Any], Any]] = None,
        ignore_index: int = -100,
    ) -> None:
        if transform is not None and not callable(transform):
            raise TypeError(f"`transform` must be callable or None, got {type(transform).__name__}.")
        self.transform = transform
        self.ignore_index = int(ignore_index)
        self.inputs: Optional[Tensor] = None
        self.files: Optional[list[str]] = None
        self.dataset: Optional[Dataset] = None
        if isinstance(source, Tensor):
            self.inputs = self._check_array(source, "the `source` tensor")
        elif isinstance(source, (str, os.PathLike)):
            path = os.fspath(source)
            if os.path.isdir(path):
                self.files = self._image_files(path)
                if self.transform is None:
                    from torchvision.transforms import ToTensor

                    self.transform = ToTensor()
            elif os.path.isfile(path):
                self.inputs = self._load_array(path)
            else:
                raise FileNotFoundError(
                    f"`source` {path!r} is neither a file nor a folder. Give an array file ({', '.join(ARRAY_SUFFIXES)}), "
                    f"a folder of images, or a Dataset object."
                )
        elif isinstance(source, IterableDataset) or not (isinstance(source, Sized) and hasattr(source, "__getitem__")):
            raise TypeError(
                f"`source` must be a path (array file or image folder), a tensor, or a map-style Dataset (with __len__ "
                f"and __getitem__), got {type(source).__name__}."
            )
        else:
            self.dataset = source
        if len(self) == 0:
            raise ValueError(f"`source` {source!r} holds no samples: the transfer set would be empty.")

    @staticmethod
    def _check_array(array: Tensor, what: str) -> Tensor:
        if not array.is_floating_point():
            raise TypeError(
                f"{what} must hold floating-point inputs, got dtype {array.dtype}; convert and scale them like the "
                f"labelled inputs before saving (e.g. images as `x.float() / 255`)."
            )
        if array.dim() < 1:
            raise ValueError(f"{what} must be an array [N, ...] with one row per sample, got a scalar.")
        return array.float()

    @classmethod
    def _load_array(cls, path: str) -> Tensor:
        suffix = os.path.splitext(path)[1].lower()
        if suffix == ".npy":
            array = torch.from_numpy(np.load(path, allow_pickle=False))
        elif suffix in (".pt", ".pth"):
            obj = torch.load(path, map_location="cpu", weights_only=True)
            if isinstance(obj, dict):
                if not isinstance(obj.get("inputs"), Tensor):
                    raise TypeError(
                        f"{path!r} holds a dict without a tensor under the key 'inputs' (keys: {sorted(map(str, obj))}); "
                        f"save `{{'inputs': x}}` or the tensor `x` itself."
                    )
                obj = obj["inputs"]
            if not isinstance(obj, Tensor):
                raise TypeError(f"{path!r} must hold a tensor [N, ...] or a dict {{'inputs': tensor}}, got {type(obj).__name__}.")
            array = obj
        else:
            raise ValueError(
                f"`source` {path!r} has an unsupported suffix {suffix!r}: array files must be one of {ARRAY_SUFFIXES}; "
                f"for images, give the folder that holds them."
            )
        return cls._check_array(array, f"the array in {path!r}")

    @staticmethod
    def _image_files(folder: str) -> list[str]:
        files = sorted(
            os.path.join(root, name)
            for root, _, names in os.walk(folder)
            for name in names
            if name.lower().endswith(IMAGE_EXTENSIONS)
        )
        if not files:
            raise ValueError(f"the folder {folder!r} (`source`) holds no image file with a suffix in {IMAGE_EXTENSIONS}.")
        return files

    def __len__(self) -> int:
        if self.inputs is not None:
            return len(self.inputs)
        if self.files is not None:
            return len(self.files)
        return len(self.dataset)  # type: ignore[arg-type]

    def _raw(self, index: int) -> Any:
        if self.inputs is not None:
            return self.inputs[index]
        if self.files is not None:
            from PIL import Image

            with open(self.files[index], "rb") as f:
                return Image.open(f).convert("RGB")
        sample = self.dataset[index]  # type: ignore[index]
        return sample[0] if isinstance(sample, (tuple, list)) else sample

    def __getitem__(self, index: int) -> tuple[Any, Tensor, int]:
        x = self._raw(index)
        if self.transform is not None:
            x = self.transform(x)
        return x, _no_label(self.ignore_index), index


class _CombinedDataset(Dataset):
    """The labelled training set followed by the transfer set, with indices unique across both."""

    def __init__(self, labeled: Dataset, transfer: Dataset, ignore_index: int) -> None:
        self.labeled = labeled
        self.transfer = transfer
        self.n_labeled = len(labeled)  # type: ignore[arg-type]
        self.n_transfer = len(transfer)  # type: ignore[arg-type]
        self.ignore_index = ignore_index

    def __len__(self) -> int:
        return self.n_labeled + self.n_transfer

    def __getitem__(self, index: int) -> tuple[Any, Tensor, int]:
        index = int(index)
        if index < self.n_labeled:
            sample = self.labeled[index]
            return sample[0], torch.as_tensor(sample[1]), index
        return self.transfer[index - self.n_labeled][0], _no_label(self.ignore_index), index


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
        check_positive_int("batch_size", batch_size)
        check_positive_int("n_labeled", n_labeled)
        check_positive_int("n_transfer", n_transfer)
        _check_mode(mode)
        _check_fraction(unlabeled_fraction)
        if mode == "mix" and batch_size < 2:
            raise ValueError(
                f"`batch_size` must be >= 2 in mode 'mix' (each batch holds labelled and transfer samples), got "
                f"{batch_size!r}; use a larger batch_size or mode='alternate'."
            )
        if isinstance(sampler, DistributedSampler):
            num_replicas, rank = sampler.num_replicas, sampler.rank
        check_positive_int("num_replicas", num_replicas)
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < num_replicas:
            raise ValueError(f"`rank` must be an integer in [0, {num_replicas}) (num_replicas={num_replicas}), got {rank!r}.")
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
        return iter(self.batches())

    def __len__(self) -> int:
        return self._length


def _check_mode(mode: Any) -> None:
    if mode not in MODES:
        raise ValueError(
            f"`mode` must be one of {MODES} ('mix': labelled and transfer samples in every batch; 'alternate': whole "
            f"labelled and whole transfer batches in turn; 'concat': one shuffled set of both; 'transfer_only': the transfer "
            f"set alone, e.g. a data-free synthetic set), got {mode!r}."
        )


def _check_fraction(fraction: Any) -> None:
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0.0 < fraction < 1.0:
        raise ValueError(
            f"`unlabeled_fraction` must be a number in (0, 1) -- the share of transfer samples per batch ('mix') or "
            f"of transfer batches ('alternate'), e.g. 0.5 -- got {fraction!r}."
        )


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
        if isinstance(augmented_copies, bool) or not isinstance(augmented_copies, int) or augmented_copies < 0:
            raise ValueError(
                f"`augmented_copies` must be an integer >= 0 (augmented versions of each labelled input; 0 = none), "
                f"got {augmented_copies!r}."
            )
        if unlabeled is None and augmented_copies == 0:
            raise ValueError(
                "TransferDataModule has no transfer data: `unlabeled` is None and `augmented_copies` is 0. Set "
                "`unlabeled` (a .npy/.pt array file, an image folder, or a Dataset) and/or `augmented_copies` > 0 "
                "(e.g. 5 augmented copies of every labelled training input)."
            )
        _check_affine_args(augment_degrees, augment_translate, augment_scale, prefix="augment_")
        _check_alpha("augment_mixup_alpha", augment_mixup_alpha)
        if isinstance(augment_seed, bool) or not isinstance(augment_seed, int):
            raise TypeError(f"`augment_seed` must be an int, got {augment_seed!r}.")
        _check_mode(mode)
        _check_fraction(unlabeled_fraction)
        if batch_size is None:
            batch_size = getattr(labeled, "batch_size", None)
            if batch_size is None:
                raise ValueError(
                    f"`batch_size` is None and the labelled module {type(labeled).__name__} has no `batch_size` "
                    f"attribute to take it from: set `batch_size`."
                )
        check_positive_int("batch_size", batch_size)
        if mode == "mix" and batch_size < 2:
            raise ValueError(
                f"`batch_size` must be >= 2 in mode 'mix' (each batch holds labelled and transfer samples), got "
                f"{batch_size!r}; use a larger batch_size or mode='alternate'."
            )
        if shuffle_seed is not None and (isinstance(shuffle_seed, bool) or not isinstance(shuffle_seed, int)):
            raise TypeError(f"`shuffle_seed` must be an int or None, got {shuffle_seed!r}.")
        if unlabeled_transform is not None and not callable(unlabeled_transform):
            raise TypeError(f"`unlabeled_transform` must be callable or None, got {type(unlabeled_transform).__name__}.")
        if num_workers is not None and (isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0):
            raise ValueError(f"`num_workers` must be an integer >= 0 or None (= the labelled module's), got {num_workers!r}.")
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
    @property
    def num_classes(self) -> Any:
        return getattr(self.labeled, "num_classes", None)

    @property
    def input_shape(self) -> Any:
        return getattr(self.labeled, "input_shape", None)

    @property
    def val_dataset(self) -> Any:
        return getattr(self.labeled, "val_dataset", None)

    @property
    def test_dataset(self) -> Any:
        return getattr(self.labeled, "test_dataset", None)

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
