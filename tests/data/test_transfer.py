"""Transfer sets: UnlabeledDataset sources, TransferDataModule batch composition, indices, resume, DDP, CLI."""

from __future__ import annotations

import sys
from collections import Counter

import lightning as L
import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import BatchSampler, TensorDataset
from torch.utils.data.distributed import DistributedSampler

from lightning_distill.data import DigitsDataModule
from lightning_distill.data.common import TensorClassificationDataset
from lightning_distill.data.transfer import TransferBatchSampler, TransferDataModule, UnlabeledDataset

IGNORE = -100


class TinyDataModule(L.LightningDataModule):
    """``n`` labelled 1x4x4 inputs; ``random=True`` returns a fresh input at every read."""

    num_classes = 3
    input_shape = (1, 4, 4)

    def __init__(self, n: int = 10, batch_size: int = 4, random: bool = False) -> None:
        super().__init__()
        self.n, self.batch_size, self.random = n, batch_size, random
        self.train_dataset = None

    def setup(self, stage=None) -> None:
        if self.train_dataset is None:
            g = torch.Generator().manual_seed(0)
            self.train_dataset = TensorClassificationDataset(torch.rand(self.n, 1, 4, 4, generator=g), torch.arange(self.n) % 3)
            if self.random:
                self.train_dataset = _RandomReads(self.train_dataset)


class _RandomReads(torch.utils.data.Dataset):
    def __init__(self, base):
        self.base = base

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        x, y, index = self.base[i]
        return x + torch.rand_like(x), y, index


def _epoch_batches(dm: TransferDataModule, epoch: int) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    loader = dm.train_dataloader()
    loader.batch_sampler.set_epoch(epoch)
    return list(loader)


@pytest.fixture(scope="module")
def digits_transfer():
    dm = TransferDataModule(DigitsDataModule(batch_size=20, shuffle_seed=0), augmented_copies=2, unlabeled_fraction=0.25)
    dm.setup("fit")
    return dm


# ------------------------------------------------------------------ batch composition
def test_mix_mode_has_the_requested_share_in_every_batch(digits_transfer):
    dm = digits_transfer
    n_lab = len(dm.labeled.train_dataset)
    batches = _epoch_batches(dm, 0)
    assert len(batches) == len(dm.train_dataloader()) == -(-n_lab // 15)  # 20 * 0.25 = 5 transfer, 15 labelled
    for x, y, index in batches[:-1]:
        assert x.shape == (20, 1, 8, 8) and int((y == IGNORE).sum()) == 5
        assert torch.equal(y == IGNORE, index >= n_lab)  # transfer samples are exactly the unlabelled ones
    x, y, index = batches[-1]  # 1079 = 71 * 15 + 14: the last batch keeps the ratio
    assert int((y != IGNORE).sum()) == 14 and int((y == IGNORE).sum()) == round(14 * 5 / 15)


def test_indices_are_unique_and_every_labelled_sample_appears_once_per_epoch(digits_transfer):
    dm = digits_transfer
    labeled = dm.labeled.train_dataset
    n_lab, n_transfer = len(labeled), len(dm.transfer_dataset)
    assert (dm.n_labeled, dm.n_transfer, len(dm.train_dataset)) == (n_lab, 2 * n_lab, 3 * n_lab)
    for epoch in (0, 1):
        batches = _epoch_batches(dm, epoch)
        index = torch.cat([b[2] for b in batches])
        x, y = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
        lab = index < n_lab
        assert sorted(index[lab].tolist()) == list(range(n_lab))  # each labelled sample once, as in the labelled module
        assert torch.equal(x[lab], labeled.inputs[index[lab]]) and torch.equal(y[lab], labeled.targets[index[lab]])
        transfer = index[~lab]
        assert transfer.min() >= n_lab and transfer.max() < n_lab + n_transfer
        assert len(set(transfer.tolist())) == len(transfer)  # no transfer sample twice before all were used
        # a transfer index always maps to the same input (teacher caches stay valid)
        for i in transfer[:5].tolist():
            pos = index.tolist().index(i)
            assert torch.equal(x[pos], dm.train_dataset[i][0])
    # the transfer stream continues across epochs: epoch 1 uses the samples epoch 0 did not
    used = [set(torch.cat([b[2] for b in _epoch_batches(dm, e)]).tolist()) - set(range(n_lab)) for e in (0, 1)]
    assert not used[0] & used[1]


def test_alternate_mode_alternates_whole_batches():
    dm = TransferDataModule(TinyDataModule(n=10, batch_size=4), augmented_copies=3, mode="alternate", shuffle_seed=1)
    dm.setup("fit")
    kinds = ["U" if bool((y == IGNORE).all()) else "L" if bool((y != IGNORE).all()) else "?" for _, y, _ in _epoch_batches(dm, 0)]
    assert kinds == ["L", "U", "L", "U", "L", "U"]
    labelled = torch.cat([i for _, y, i in _epoch_batches(dm, 0) if (y != IGNORE).all()])
    assert sorted(labelled.tolist()) == list(range(10))

    three_to_one = TransferDataModule(TinyDataModule(n=8, batch_size=4), augmented_copies=3, mode="alternate", unlabeled_fraction=0.75)
    three_to_one.setup("fit")
    kinds = ["U" if bool((y == IGNORE).all()) else "L" for _, y, _ in _epoch_batches(three_to_one, 0)]
    assert Counter(kinds) == {"L": 2, "U": 6} and kinds[0] == "L" and kinds[4] == "L"


def test_concat_mode_is_one_shuffled_pass_over_both():
    dm = TransferDataModule(TinyDataModule(n=10, batch_size=4), augmented_copies=2, mode="concat", shuffle_seed=0)
    dm.setup("fit")
    batches = _epoch_batches(dm, 0)
    index = torch.cat([b[2] for b in batches])
    assert sorted(index.tolist()) == list(range(30)) and len(batches) == len(dm.train_dataloader()) == 8
    assert torch.equal(torch.cat([b[1] for b in batches]) == IGNORE, index >= 10)


# ------------------------------------------------------------------ sources
def _digits_like(n: int = 7) -> torch.Tensor:
    return torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("kind", ["npy", "pt", "pt_dict", "dataset", "tensor"])
def test_unlabeled_sources(kind, tmp_path):
    inputs = _digits_like()
    if kind == "npy":
        source = str(tmp_path / "x.npy")
        np.save(source, inputs.double().numpy())  # float64 is converted to float32
    elif kind == "pt":
        source = str(tmp_path / "x.pt")
        torch.save(inputs, source)
    elif kind == "pt_dict":
        source = str(tmp_path / "x.pt")
        torch.save({"inputs": inputs, "note": torch.zeros(1)}, source)
    elif kind == "dataset":
        source = TensorDataset(inputs, torch.arange(7))  # labels are dropped
    else:
        source = inputs
    ds = UnlabeledDataset(source)
    assert len(ds) == 7
    x, y, index = ds[4]
    assert x.dtype == torch.float32 and torch.allclose(x, inputs[4]) and int(y) == IGNORE and index == 4

    dm = TransferDataModule(DigitsDataModule(batch_size=16, shuffle_seed=0), unlabeled=source)
    dm.setup("fit")
    n_lab = dm.n_labeled
    assert dm.n_transfer == 7 and torch.allclose(dm.train_dataset[n_lab + 4][0], inputs[4])
    _, y, index = next(iter(dm.train_dataloader()))
    assert int((y == IGNORE).sum()) == 8 and bool((index[y == IGNORE] >= n_lab).all())


def _write_pngs(folder, n: int = 3):
    from PIL import Image

    paths = [folder / "a" / "x0.png", folder / "b" / "c" / "x1.png", folder / "x2.PNG"][:n]
    for k, path in enumerate(paths):
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((8, 8), 40 * (k + 1), dtype=np.uint8), mode="L").save(path)
    (folder / "notes.txt").write_text("not an image")
    return paths


def test_image_folder_source(tmp_path):
    from torchvision import transforms

    _write_pngs(tmp_path)
    transform = transforms.Compose([transforms.Grayscale(1), transforms.ToTensor()])
    ds = UnlabeledDataset(str(tmp_path), transform=transform)
    assert len(ds) == 3 and ds[0][0].shape == (1, 8, 8) and int(ds[0][1]) == IGNORE
    assert sorted(round(ds[i][0].mean().item() * 255) for i in range(3)) == [40, 80, 120]
    assert UnlabeledDataset(tmp_path)[0][0].shape == (3, 8, 8)  # default: RGB + ToTensor, as ImageFolder

    dm = TransferDataModule(
        DigitsDataModule(batch_size=8, shuffle_seed=0), unlabeled=str(tmp_path), unlabeled_transform=transform, augmented_copies=1
    )
    dm.setup("fit")
    n_lab = dm.n_labeled
    assert dm.n_transfer == 3 + n_lab  # the folder first, then the augmented copies
    assert torch.equal(dm.train_dataset[n_lab][0], ds[0][0])


def test_augmented_transfer_set_is_fixed_and_built_from_the_labelled_inputs(digits_transfer):
    dm = digits_transfer
    n_lab = dm.n_labeled
    a = dm.train_dataset[n_lab + 5][0]
    assert torch.equal(a, dm.train_dataset[n_lab + 5][0])
    assert not torch.equal(a, dm.train_dataset[2 * n_lab + 5][0])  # second copy of the same digit differs
    assert (a - dm.labeled.train_dataset.inputs[5]).abs().mean() < 0.25  # a jittered version of digit 5


# ------------------------------------------------------------------ delegation to the labelled module
def test_val_and_test_loaders_and_metadata_are_the_labelled_modules(digits_transfer):
    dm, labeled = digits_transfer, digits_transfer.labeled
    for ours, theirs in ((dm.val_dataloader(), labeled.val_dataloader()), (dm.test_dataloader(), labeled.test_dataloader())):
        for (x1, y1, i1), (x2, y2, i2) in zip(ours, theirs):
            assert torch.equal(x1, x2) and torch.equal(y1, y2) and torch.equal(i1, i2)
    assert dm.val_dataset is labeled.val_dataset and dm.test_dataset is labeled.test_dataset
    assert dm.num_classes == 10 and dm.input_shape == (1, 8, 8)
    assert torch.equal(dm.example_input(4), labeled.example_input(4))
    assert dm.batch_size == 20 and dm.shuffle_seed == 0  # taken from the labelled module


# ------------------------------------------------------------------ resumable order
def test_order_depends_only_on_seed_and_epoch():
    def batches(seed, epoch):
        dm = TransferDataModule(TinyDataModule(n=12, batch_size=4), augmented_copies=2, shuffle_seed=seed)
        dm.setup("fit")
        return [b[2].tolist() for b in _epoch_batches(dm, epoch)]

    assert batches(5, 1) == batches(5, 1)  # a fresh module (a resumed run) gives the same batches
    assert batches(5, 0) != batches(5, 1) and batches(5, 1) != batches(6, 1)


def test_trainer_sets_the_epoch(tmp_path):
    """Lightning calls ``set_epoch`` on the batch sampler's ``sampler``: epoch e of a fit is ``batches(e)``."""
    seen: dict[int, list[list[int]]] = {}

    class Record(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.setdefault(trainer.current_epoch, []).append(batch[2].tolist())

    from lightning_distill import Classifier

    dm = TransferDataModule(DigitsDataModule(batch_size=32, shuffle_seed=0), augmented_copies=1)
    model = Classifier(nn.Sequential(nn.Flatten(), nn.Linear(64, 10)))
    trainer = L.Trainer(
        default_root_dir=tmp_path, accelerator="cpu", max_epochs=2, limit_train_batches=2, limit_val_batches=1,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, callbacks=[Record()],
    )
    trainer.fit(model, datamodule=dm)
    sampler = dm.train_batch_sampler()
    for epoch in (0, 1):
        assert seen[epoch] == sampler.batches(epoch)[:2]
    assert seen[0] != seen[1]


def test_a_resumed_fit_sees_the_restored_epochs_batches(tmp_path):
    """Resuming from the checkpoint of epoch 0 trains epoch 1 on ``batches(1)``, as an uninterrupted fit does. A
    DataLoader makes its batch sampler's iterator when its own iterator is created -- on a resumed run before
    Lightning calls ``set_epoch`` -- so the sampler must read the epoch lazily (it replayed epoch 0 before)."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    from lightning_distill import Classifier

    seen: dict[int, list[list[int]]] = {}

    class Record(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.setdefault(trainer.current_epoch, []).append(batch[2].tolist())

    def fit(max_epochs, ckpt_path=None):
        dm = TransferDataModule(DigitsDataModule(batch_size=32, shuffle_seed=0), augmented_copies=1)
        model = Classifier(nn.Sequential(nn.Flatten(), nn.Linear(64, 10)))
        trainer = L.Trainer(
            default_root_dir=tmp_path, accelerator="cpu", max_epochs=max_epochs, limit_train_batches=2,
            limit_val_batches=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
            callbacks=[Record(), ModelCheckpoint(dirpath=tmp_path, save_last=True, save_top_k=0)],
        )
        trainer.fit(model, datamodule=dm, ckpt_path=ckpt_path)
        return dm

    fit(1)
    seen.clear()
    dm = fit(2, ckpt_path=tmp_path / "last.ckpt")
    assert list(seen) == [1]
    assert seen[1] == dm.train_batch_sampler().batches(1)[:2] != dm.train_batch_sampler().batches(0)[:2]


def test_the_batch_sampler_reads_the_epoch_when_iteration_starts():
    dm = TransferDataModule(TinyDataModule(n=12, batch_size=4), augmented_copies=2, shuffle_seed=0)
    dm.setup("fit")
    sampler = dm.train_batch_sampler()
    iterator = iter(sampler)  # made first, as a DataLoader does
    sampler.set_epoch(3)
    assert list(iterator) == sampler.batches(3) != sampler.batches(0)


# ------------------------------------------------------------------ distributed
@pytest.mark.parametrize("mode", ["mix", "alternate", "concat"])
def test_lightning_injected_distributed_sampler_shards_the_batches(mode):
    """What Lightning does under DDP: re-create the batch sampler with a DistributedSampler per rank."""
    from lightning.fabric.utilities.data import _replace_dunder_methods
    from lightning.pytorch.utilities.data import _update_dataloader
    from torch.utils.data import DataLoader

    dm = TransferDataModule(TinyDataModule(n=11, batch_size=4), augmented_copies=2, mode=mode, shuffle_seed=0)
    dm.setup("fit")
    per_rank = []
    for rank in range(2):
        with _replace_dunder_methods(DataLoader, "dataset"), _replace_dunder_methods(BatchSampler):
            loader = dm.train_dataloader()  # as Lightning requests it: init args captured
        sampler = DistributedSampler(dm.train_dataset, num_replicas=2, rank=rank, shuffle=False)
        loader = _update_dataloader(loader, sampler)
        assert isinstance(loader.batch_sampler, TransferBatchSampler) and loader.batch_sampler.rank == rank
        sampler.set_epoch(1)  # Lightning sets the epoch on this sampler; the batch sampler reads it
        per_rank.append([b[2].tolist() for b in loader])
    assert len(per_rank[0]) == len(per_rank[1])
    labelled = sorted(i for batches in per_rank for b in batches for i in b if i < 11)
    if mode == "concat":
        assert set(i for batches in per_rank for b in batches for i in b) == set(range(33))
    else:
        assert set(labelled) == set(range(11)) and len(labelled) == 12  # one sample repeated to pad 11 to 2 x 6
        kinds = [[all(i >= 11 for i in b) for b in batches] for batches in per_rank]
        assert kinds[0] == kinds[1]  # the same kind of batch on every rank at every step
    # different ranks, different samples; same epoch again, same batches
    assert per_rank[0] != per_rank[1]
    unsharded = TransferBatchSampler(batch_size=4, n_labeled=11, n_transfer=22, mode=mode, seed=0, num_replicas=2, rank=0)
    assert unsharded.batches(1) == per_rank[0]


# ------------------------------------------------------------------ configuration
def test_lightning_cli_yaml_builds(tmp_path, monkeypatch):
    from lightning_distill.cli import DistillCLI

    np.save(tmp_path / "extra.npy", np.zeros((4, 1, 8, 8), dtype=np.float32))
    config = tmp_path / "transfer.yaml"
    config.write_text(
        f"""
model:
  class_path: lightning_distill.Classifier
  init_args:
    model:
      class_path: lightning_distill.models.DigitsStudentCNN
data:
  class_path: lightning_distill.data.transfer.TransferDataModule
  init_args:
    labeled:
      class_path: lightning_distill.data.DigitsDataModule
      init_args:
        batch_size: 64
    unlabeled: {tmp_path / "extra.npy"}
    augmented_copies: 5
    augment_degrees: 15.0
    mode: alternate
"""
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["lightning-distill"])
    cli = DistillCLI(args=["--config", str(config), "--trainer.default_root_dir", str(tmp_path)], run=False)
    dm = cli.datamodule
    assert type(dm) is TransferDataModule and type(dm.labeled) is DigitsDataModule
    assert (dm.augmented_copies, dm.augment_degrees, dm.mode, dm.batch_size) == (5, 15.0, "alternate", 64)
    assert dm.unlabeled == str(tmp_path / "extra.npy")
    dm.setup("fit")
    assert dm.n_transfer == 4 + 5 * dm.n_labeled


def test_random_labelled_inputs_warn_for_the_fixed_augmented_set():
    dm = TransferDataModule(TinyDataModule(random=True), augmented_copies=1)
    with pytest.warns(UserWarning, match="returns a different input each time it is read"):
        dm.setup("fit")


# ------------------------------------------------------------------ errors
@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"labeled": "digits"}, TypeError, r"`labeled` must be a LightningDataModule.*got str"),
        ({"augmented_copies": 0}, ValueError, r"`unlabeled` is None and `augmented_copies` is 0\. Set `unlabeled`"),
        ({"augmented_copies": -1}, ValueError, r"`augmented_copies` must be an integer >= 0.*got -1"),
        ({"mode": "interleave"}, ValueError, r"`mode` must be one of \('mix', 'alternate', 'concat', 'transfer_only'\).*got 'interleave'"),
        ({"unlabeled_fraction": 1.0}, ValueError, r"`unlabeled_fraction` must be a number in \(0, 1\).*got 1.0"),
        ({"unlabeled_fraction": 0}, ValueError, r"`unlabeled_fraction` must be a number in \(0, 1\).*got 0"),
        ({"batch_size": 1}, ValueError, r"`batch_size` must be >= 2 in mode 'mix'.*got 1"),
        ({"batch_size": 0}, ValueError, r"`batch_size` must be an integer >= 1, got 0"),
        ({"augment_degrees": -5.0}, ValueError, r"`augment_degrees` must be a number in \[0, 180\].*got -5.0"),
        ({"augment_mixup_alpha": -1.0}, ValueError, r"`augment_mixup_alpha` must be a finite number >= 0"),
        ({"unlabeled": 3}, TypeError, r"`unlabeled` must be None, a path.*got int"),
        ({"num_workers": -1}, ValueError, r"`num_workers` must be an integer >= 0 or None.*got -1"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    args = {"labeled": TinyDataModule(), "augmented_copies": 1, **kwargs}
    with pytest.raises(error, match=match):
        TransferDataModule(**args)


def test_labelled_module_without_batch_size():
    labeled = TinyDataModule()
    del labeled.batch_size
    with pytest.raises(ValueError, match=r"`batch_size` is None and the labelled module TinyDataModule has no `batch_size`"):
        TransferDataModule(labeled, augmented_copies=1)


def test_input_shapes_must_match(tmp_path):
    np.save(tmp_path / "small.npy", np.zeros((3, 1, 4, 4), dtype=np.float32))
    dm = TransferDataModule(DigitsDataModule(), unlabeled=str(tmp_path / "small.npy"))
    with pytest.raises(ValueError, match=r"have shape \(1, 4, 4\), but the labelled training inputs of DigitsDataModule have shape \(1, 8, 8\)"):
        dm.setup("fit")


@pytest.mark.parametrize(
    ("make", "error", "match"),
    [
        (lambda p: str(p / "missing.npy"), FileNotFoundError, r"`source` '.*missing.npy' is neither a file nor a folder"),
        (lambda p: (p / "x.csv").write_text("1,2") and str(p / "x.csv"), ValueError, r"unsupported suffix '.csv'.*\('.npy', '.pt', '.pth'\)"),
        (lambda p: np.save(p / "x.npy", np.zeros((2, 3), dtype=np.uint8)) or str(p / "x.npy"), TypeError, r"floating-point inputs, got dtype torch.uint8"),
        (lambda p: torch.save({"x": torch.zeros(2)}, p / "x.pt") or str(p / "x.pt"), TypeError, r"without a tensor under the key 'inputs' \(keys: \['x'\]\)"),
        (lambda p: (p / "empty").mkdir() or str(p / "empty"), ValueError, r"holds no image file"),
        (lambda p: iter([]), TypeError, r"`source` must be a path.*got list_iterator"),
    ],
)
def test_unlabeled_dataset_errors(make, error, match, tmp_path):
    with pytest.raises(error, match=match):
        UnlabeledDataset(make(tmp_path))


def test_batch_sampler_errors():
    with pytest.raises(ValueError, match=r"`rank` must be an integer in \[0, 2\).*got 2"):
        TransferBatchSampler(batch_size=4, n_labeled=4, n_transfer=4, num_replicas=2, rank=2)
    with pytest.raises(ValueError, match=r"`n_transfer` must be an integer >= 1, got 0"):
        TransferBatchSampler(batch_size=4, n_labeled=4, n_transfer=0)
    with pytest.raises(RuntimeError, match=r"call setup\('fit'\) first"):
        TransferDataModule(TinyDataModule(), augmented_copies=1).train_dataloader()


def test_transfer_only_mode_uses_the_transfer_set_alone():
    from lightning_distill.data.transfer import TransferBatchSampler

    bs = TransferBatchSampler(batch_size=4, n_labeled=6, n_transfer=10, mode="transfer_only", seed=0)
    batches = bs.batches(0)
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(6, 16))  # every transfer sample once, no labelled one
    assert [len(b) for b in batches] == [4, 4, 2] and len(bs) == 3
    assert bs.batches(1) != batches and bs.batches(0) == batches  # reshuffled per epoch, reproducible
