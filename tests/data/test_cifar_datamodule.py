"""``CIFARDataModule`` on small fake CIFAR-10 / CIFAR-100 folders in torchvision's on-disk format."""

from __future__ import annotations

import os
import pickle
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch

from lightning_distill.data import CIFARDataModule, IndexedDataset
from lightning_distill.data.cifar import stratified_split

N_PER_BATCH = 40  # CIFAR-10: 5 train batches -> 200 train images, 20 per class
N_TEST = 30


def _dump(path: Path, obj: dict) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f)


def _images(rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)


def write_fake_cifar10(root: Path) -> Path:
    rng = np.random.default_rng(0)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for b in range(1, 6):
        labels = [(i + b) % 10 for i in range(N_PER_BATCH)]
        _dump(
            folder / f"data_batch_{b}",
            {"batch_label": f"batch {b}", "data": _images(rng, N_PER_BATCH), "labels": labels},
        )
    _dump(folder / "test_batch", {"data": _images(rng, N_TEST), "labels": [i % 10 for i in range(N_TEST)]})
    _dump(folder / "batches.meta", {"label_names": [f"class{i}" for i in range(10)], "num_vis": 3072})
    return root


def write_fake_cifar100(root: Path) -> Path:
    rng = np.random.default_rng(1)
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    n_train = 300  # 3 per class
    _dump(
        folder / "train",
        {
            "data": _images(rng, n_train),
            "fine_labels": [i % 100 for i in range(n_train)],
            "coarse_labels": [0] * n_train,
        },
    )
    _dump(folder / "test", {"data": _images(rng, 100), "fine_labels": list(range(100)), "coarse_labels": [0] * 100})
    _dump(folder / "meta", {"fine_label_names": [f"f{i}" for i in range(100)], "coarse_label_names": ["c"]})
    return root


@pytest.fixture(scope="module")
def cifar10_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_fake_cifar10(tmp_path_factory.mktemp("cifar10"))


@pytest.fixture(scope="module")
def cifar100_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_fake_cifar100(tmp_path_factory.mktemp("cifar100"))


def make_dm(root: Path, **kwargs) -> CIFARDataModule:
    args = {
        "root": str(root),
        "num_classes": 10,
        "batch_size": 16,
        "num_workers": 0,
        "download": False,
        "val_size": 50,
        "verify_checksums": False,
        "shuffle_seed": 0,
    }
    args.update(kwargs)
    return CIFARDataModule(**args)


def test_cifar10_loads_and_batches(cifar10_root: Path) -> None:
    dm = make_dm(cifar10_root)
    dm.prepare_data()  # download=False: nothing to do
    dm.setup("fit")
    assert dm.num_classes == 10
    assert dm.input_shape == (3, 32, 32)
    assert len(dm.train_dataset) == 5 * N_PER_BATCH - 50
    assert len(dm.val_dataset) == 50
    assert len(dm.test_dataset) == N_TEST
    assert isinstance(dm.train_dataset, IndexedDataset)
    x, y, index = next(iter(dm.train_dataloader()))
    assert x.shape == (16, 3, 32, 32)
    assert x.dtype == torch.float32
    assert y.shape == (16,)
    assert y.dtype == torch.long
    assert int(y.max()) < 10
    assert sorted(index.tolist()) == sorted(set(index.tolist()))
    assert int(index.max()) < len(dm.train_dataset)
    xv, _, iv = next(iter(dm.val_dataloader()))
    assert iv.tolist() == list(range(16))  # not shuffled, index = position in the split
    assert xv.shape == (16, 3, 32, 32)
    xt, _, _ = next(iter(dm.test_dataloader()))
    assert xt.shape == (16, 3, 32, 32)
    # normalised with the CIFAR-10 statistics: uniform random pixels give mean (0.5 - mu) / sigma
    assert abs(float(xv[:, 0].mean()) - (0.5 - 0.4914) / 0.2470) < 0.1
    assert dm.example_input(4).shape == (4, 3, 32, 32)


def test_cifar100_loads(cifar100_root: Path) -> None:
    dm = make_dm(cifar100_root, num_classes=100, val_size=100)
    dm.setup()
    assert dm.num_classes == 100
    assert (len(dm.train_dataset), len(dm.val_dataset), len(dm.test_dataset)) == (200, 100, 100)
    # stratified: one validation image per class
    val_targets = sorted(int(dm.val_dataset[i][1]) for i in range(len(dm.val_dataset)))
    assert val_targets == list(range(100))
    x, _, i = dm.train_dataset[0]
    assert x.shape == (3, 32, 32)
    assert i == 0


def test_split_is_fixed_stratified_and_disjoint(cifar10_root: Path) -> None:
    a, b = make_dm(cifar10_root), make_dm(cifar10_root)
    a.setup()
    b.setup()
    ia, ib = a.val_dataset.dataset.indices, b.val_dataset.dataset.indices
    assert ia == ib
    assert not set(ia) & set(a.train_dataset.dataset.indices)
    assert len(set(ia) | set(a.train_dataset.dataset.indices)) == 5 * N_PER_BATCH
    targets = torch.tensor([int(a.val_dataset[i][1]) for i in range(len(a.val_dataset))])
    assert torch.bincount(targets, minlength=10).tolist() == [5] * 10
    other = make_dm(cifar10_root, split_seed=1)
    other.setup()
    assert other.val_dataset.dataset.indices != ia


def test_stratified_split_proportional() -> None:
    targets = torch.tensor([0] * 60 + [1] * 30 + [2] * 10)
    keep, holdout = stratified_split(targets, 10, seed=3)
    assert torch.bincount(targets[holdout]).tolist() == [6, 3, 1]
    assert len(keep) == 90
    assert not set(keep.tolist()) & set(holdout.tolist())


def test_val_is_not_augmented_but_train_is(cifar10_root: Path) -> None:
    dm = make_dm(cifar10_root, augment=True)
    dm.setup()
    assert torch.equal(dm.val_dataset[3][0], dm.val_dataset[3][0])
    torch.manual_seed(0)
    draws = [dm.train_dataset[3][0] for _ in range(8)]
    assert any(not torch.equal(draws[0], d) for d in draws[1:])
    # the same image without augmentation equals the example input (eval transform)
    assert torch.equal(dm.example_input(1)[0], dm._train_plain[0][0])


def test_augment_false_is_deterministic(cifar10_root: Path) -> None:
    dm = make_dm(cifar10_root, augment=False)
    dm.setup()
    assert torch.equal(dm.train_dataset[5][0], dm.train_dataset[5][0])


def test_val_size_zero_validates_on_test(cifar10_root: Path) -> None:
    dm = make_dm(cifar10_root, val_size=0)
    dm.setup()
    assert len(dm.train_dataset) == 5 * N_PER_BATCH
    assert dm.val_dataset is dm.test_dataset


def test_shuffle_order_per_seed_and_epoch(cifar10_root: Path) -> None:
    def order(seed: int, epoch: int) -> list[int]:
        dm = make_dm(cifar10_root, shuffle_seed=seed, augment=False)
        dm.setup()
        loader = dm.train_dataloader()
        loader.sampler.set_epoch(epoch)
        return [i for _, _, idx in loader for i in idx.tolist()]

    assert order(7, 0) == order(7, 0)
    assert order(7, 0) != order(7, 1)
    assert order(7, 1) != order(8, 1)
    assert sorted(order(7, 0)) == list(range(5 * N_PER_BATCH - 50))


def test_shuffle_seed_defaults_to_global_seed(cifar10_root: Path) -> None:
    torch.manual_seed(123)
    dm = make_dm(cifar10_root, shuffle_seed=None)
    dm.setup()
    assert dm.shuffle_seed == 123


@pytest.mark.parametrize("bad", [0, 1000, "100", True])
def test_bad_num_classes(bad) -> None:
    with pytest.raises(ValueError, match=rf"`num_classes` must be 10 .* or 100 .*got {bad!r}"):
        CIFARDataModule(num_classes=bad)


def test_other_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"`batch_size`.*0"):
        CIFARDataModule(root=str(tmp_path), batch_size=0)
    with pytest.raises(ValueError, match=r"`val_size`.*-1"):
        CIFARDataModule(root=str(tmp_path), val_size=-1)
    with pytest.raises(ValueError, match=r"`num_workers`.*-2"):
        CIFARDataModule(root=str(tmp_path), num_workers=-2)


def test_val_size_too_large(cifar10_root: Path) -> None:
    with pytest.raises(ValueError, match=r"`val_size` must be smaller than the 200 training images"):
        make_dm(cifar10_root, val_size=200).setup()


def test_missing_files_clear_error(tmp_path: Path) -> None:
    dm = make_dm(tmp_path, num_classes=100)
    dm.prepare_data()
    with pytest.raises(RuntimeError, match=r"(?s)CIFAR-100 was not found under root=.*cifar-100-python.*no network"):
        dm.setup()


def test_checksum_mismatch_points_to_verify_checksums(cifar10_root: Path) -> None:
    with pytest.raises(RuntimeError, match=r"md5 integrity check.*verify_checksums=False"):
        make_dm(cifar10_root, verify_checksums=True).setup()


@pytest.mark.parametrize("num_classes", [10, 100])
def test_failing_download_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, num_classes: int) -> None:
    import torchvision.datasets.cifar

    def no_network(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torchvision.datasets.cifar, "download_and_extract_archive", no_network)
    dm = make_dm(tmp_path / "data", num_classes=num_classes, download=True, verify_checksums=True)
    folder = "cifar-10-batches-py" if num_classes == 10 else "cifar-100-python"
    with pytest.raises(RuntimeError, match=rf"(?s)could not be downloaded to root=.*no network.*{folder}") as info:
        dm.prepare_data()
    assert isinstance(info.value.__cause__, urllib.error.URLError)


def test_download_skipped_when_present(cifar10_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torchvision.datasets.cifar

    def fail(*args, **kwargs):
        raise AssertionError("must not download")

    monkeypatch.setattr(torchvision.datasets.cifar, "download_and_extract_archive", fail)
    dm = make_dm(cifar10_root, download=True)
    dm.prepare_data()
    dm.setup()
    assert os.path.isdir(os.path.join(dm.root, "cifar-10-batches-py"))
