"""DigitsDataModule: fixed stratified split, index-carrying batches, resumable shuffling, argument checks."""

from __future__ import annotations

import pytest
import torch

from lightning_distill.data import DigitsDataModule, EpochShuffleSampler


def test_split_is_fixed_stratified_and_disjoint():
    a, b = DigitsDataModule(), DigitsDataModule()
    a.setup(), b.setup()
    sizes = (len(a.train_dataset), len(a.val_dataset), len(a.test_dataset))
    assert sizes == (1079, 359, 359) and sum(sizes) == 1797
    assert torch.equal(a.test_dataset.inputs, b.test_dataset.inputs)  # same split every time
    # disjoint: no image appears in two splits (digits has a few exact duplicates, so compare rows)
    flat = {name: ds.inputs.flatten(1) for name, ds in (("train", a.train_dataset), ("test", a.test_dataset))}
    overlap = (torch.cdist(flat["train"], flat["test"]) == 0).any(dim=0).sum().item()
    assert overlap <= 3
    # stratified: every class has 35 or 36 test samples (359 / 10)
    counts = torch.bincount(a.test_dataset.targets, minlength=10)
    assert counts.min() >= 35 and counts.max() <= 37
    # inputs scaled to [0, 1]
    assert a.train_dataset.inputs.min() == 0 and a.train_dataset.inputs.max() == 1


def test_batches_carry_the_sample_index():
    dm = DigitsDataModule(batch_size=16, shuffle_seed=0)
    dm.setup()
    x, y, index = next(iter(dm.train_dataloader()))
    assert x.shape == (16, 1, 8, 8) and y.shape == (16,)
    assert torch.equal(dm.train_dataset.inputs[index], x) and torch.equal(dm.train_dataset.targets[index], y)


def test_shuffle_depends_only_on_seed_and_epoch():
    data = list(range(50))
    s1, s2 = EpochShuffleSampler(data, seed=3), EpochShuffleSampler(data, seed=3)
    order0 = list(s1)
    assert list(s2) == order0 and sorted(order0) == data
    s1.set_epoch(1)
    assert list(s1) != order0
    s2.set_epoch(1)
    assert list(s2) == list(s1)
    assert list(EpochShuffleSampler(data, seed=4)) != order0


def test_shuffle_seed_defaults_to_the_global_seed():
    torch.manual_seed(11)
    dm = DigitsDataModule()
    dm.setup()
    assert dm.shuffle_seed == 11


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"batch_size": 0}, r"`batch_size` must be an integer >= 1, got 0"),
        ({"val_fraction": 1.2}, r"`val_fraction` must be in \(0, 1\), got 1.2"),
        ({"test_fraction": 0.0}, r"`test_fraction` must be in \(0, 1\), got 0.0"),
        ({"val_fraction": 0.5, "test_fraction": 0.45}, "must leave at least 10% for training"),
        ({"num_workers": -1}, r"`num_workers` must be >= 0, got -1"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DigitsDataModule(**kwargs)
