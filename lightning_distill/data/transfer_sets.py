"""Where transfer inputs come from: unlabeled datasets, array files, image folders, and the combined set.

:class:`UnlabeledDataset` reads unlabeled inputs from a map-style dataset (its labels dropped), a
tensor, a ``.npy`` / ``.pt`` array file (loaded without running any code from the file) or a
folder of images. :class:`_CombinedDataset` puts the labelled training set and the transfer set
one after the other with indices unique across both, so per-sample state keyed on the index (a
teacher-output cache, a memory bank) never collides.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Optional, Sized, Union

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset, IterableDataset

__all__ = ["ARRAY_SUFFIXES", "IMAGE_EXTENSIONS", "UnlabeledDataset"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
ARRAY_SUFFIXES = (".npy", ".pt", ".pth")


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
                    f"`source` {path!r} is neither a file nor a folder. Give an array file "
                    f"({', '.join(ARRAY_SUFFIXES)}), a folder of images, or a Dataset object."
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
                        f"{path!r} holds a dict without a tensor under the key 'inputs' "
                        f"(keys: {sorted(map(str, obj))}); save `{{'inputs': x}}` or the tensor `x` itself."
                    )
                obj = obj["inputs"]
            if not isinstance(obj, Tensor):
                raise TypeError(
                    f"{path!r} must hold a tensor [N, ...] or a dict {{'inputs': tensor}}, got {type(obj).__name__}."
                )
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
            raise ValueError(
                f"the folder {folder!r} (`source`) holds no image file with a suffix in {IMAGE_EXTENSIONS}."
            )
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

