"""Bad data is refused before the first optimizer step, with a message that names the problem.

Covers :mod:`lightning_distill.data_checks` as pure functions (with hypothesis: the label check accepts exactly
the valid label tensors) and through ``Trainer.fit`` for a ``Classifier`` and a ``KnowledgeDistillation`` on
digits, fed by a datamodule and by plain DataLoaders: non-finite inputs (tuple and dict batches), labels out of
range, negative labels, float64 inputs, token targets beyond the vocabulary, empty training sets. Each refusal
happens before any parameter changes and before any checkpoint is written. Also: a validation set whose token
targets are all ``ignore_index`` no longer crashes the metrics, ``check_batches=0`` turns the checks off, and
after the first batches the checks do not run at all.
"""

from __future__ import annotations

import re

import lightning as L
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

import lightning_distill.module as module_mod
from lightning_distill import Classifier, KnowledgeDistillation
from lightning_distill.batch import Batch
from lightning_distill.data import DigitsDataModule
from lightning_distill.data_checks import BadDataError, NonFiniteLossError, check_inputs, check_targets, invalid_labels
from lightning_distill.models import DigitsCNN, DigitsMLP

pytestmark = pytest.mark.usefixtures("restore_global_state", "single_thread")


# ------------------------------------------------------------------------------------------ helpers
def _trainer(root, **kwargs) -> L.Trainer:
    defaults = dict(
        default_root_dir=root, accelerator="cpu", devices=1, max_epochs=1, limit_train_batches=2,
        limit_val_batches=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=[ModelCheckpoint(dirpath=root / "ckpt", save_last=True, every_n_train_steps=1)],
    )
    defaults.update(kwargs)
    return L.Trainer(**defaults)


def _module(kind: str) -> L.LightningModule:
    torch.manual_seed(0)
    if kind == "classifier":
        return Classifier(DigitsMLP())
    return KnowledgeDistillation(DigitsMLP(), DigitsCNN(), teacher_checkpoint="zoo:digits_cnn")


def _snapshot(module: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _assert_untouched(module: nn.Module, before: dict[str, Tensor], root) -> None:
    after = module.state_dict()
    changed = [k for k, v in before.items() if k in after and not torch.equal(after[k], v)]
    assert changed == [], f"refused data still trained: {changed}"
    written = list((root / "ckpt").glob("*.ckpt")) if (root / "ckpt").exists() else []
    assert written == [], f"a checkpoint was written: {written}"


def _digits(n: int = 128) -> tuple[Tensor, Tensor]:
    dm = DigitsDataModule()
    dm.setup("fit")
    return dm.train_dataset.inputs[:n].clone(), dm.train_dataset.targets[:n].clone()


#: bad data -> (how to corrupt (x, y) at the sample positions given, what the message must say)
def _nan(x, y, rows):
    x[rows, 0, 2, 3] = float("nan")
    return x, y


def _inf(x, y, rows):
    x[rows, 0, 4, 4] = float("-inf")
    return x, y


def _label_10(x, y, rows):
    y[rows] = 10
    return x, y


def _label_negative(x, y, rows):
    y[rows] = -3
    return x, y


def _float64(x, y, rows):
    return x.double(), y


BAD = {
    "nan_input": (_nan, [r"NaN", r"value nan", r"nan_to_num"]),
    "inf_input": (_inf, [r"Inf", r"value -inf", r"nan_to_num"]),
    "label_out_of_range": (_label_10, [r"label 10 of sample", r"valid labels are 0\.\.9", r"num_classes=11",
                                       r"y - 1"]),
    "negative_label": (_label_negative, [r"label -3 of sample", r"-100 \(ignore_index", r"ignore_index=-3"]),
    "float64_input": (_float64, [r"torch\.float64", r"torch\.float32", r"dtype=torch\.float32",
                                 r"precision='64-true'"]),
}


class _CorruptDigits(DigitsDataModule):
    """Digits with every other training sample from position 8 on corrupted (the probe's example, the first 8
    samples, stays clean, so the refusal comes from the first training batch) -- validation stays clean."""

    def __init__(self, corrupt) -> None:
        super().__init__(batch_size=32, shuffle_seed=0)
        self.corrupt = corrupt
        self.rows = list(range(8, 1079, 2))

    def setup(self, stage=None) -> None:
        fresh = self.train_dataset is None
        super().setup(stage)
        if fresh:
            ds = self.train_dataset
            ds.inputs, ds.targets = self.corrupt(ds.inputs.clone(), ds.targets.clone(), self.rows)


# ----------------------------------------------------------------------------------- through Trainer.fit
@pytest.mark.parametrize("bad", list(BAD))
@pytest.mark.parametrize("kind", ["classifier", "kd"])
def test_bad_data_in_a_datamodule_is_refused_before_the_first_step(bad, kind, tmp_path):
    corrupt, expected = BAD[bad]
    module = _module(kind)
    dm = _CorruptDigits(corrupt)
    before = _snapshot(module)
    with pytest.raises(BadDataError) as info:
        _trainer(tmp_path).fit(module, datamodule=dm)
    message = str(info.value)
    # a float64 dataset is float64 in the shape probe's example too: refused before the probe runs the models
    first = "the example batch of the shape probe" if bad == "float64_input" else "training batch 0 (epoch 0)"
    assert message.startswith(first), message
    for pattern in expected:
        assert re.search(pattern, message), (pattern, message)
    if bad != "float64_input":  # the sample and its position in the dataset (the datamodule yields indices)
        index = int(re.search(r"dataset index (\d+)", message).group(1))
        assert index in dm.rows
    assert "check_batches=0" in message
    _assert_untouched(module, before, tmp_path)


@pytest.mark.parametrize("bad", list(BAD))
@pytest.mark.parametrize("kind", ["classifier", "kd"])
def test_bad_data_in_dataloaders_is_refused_before_the_first_step(bad, kind, tmp_path):
    """Plain DataLoaders: no example before training, the shape probe runs on the first batch -- the inputs are
    checked before it runs, the labels once it has found the number of classes."""
    corrupt, expected = BAD[bad]
    x, y = _digits()
    bad_x, bad_y = corrupt(x.clone(), y.clone(), [5])
    module = _module(kind)
    before = _snapshot(module)
    train = DataLoader(TensorDataset(bad_x, bad_y), batch_size=32)
    val = DataLoader(TensorDataset(x.to(bad_x.dtype), y), batch_size=32)  # clean labels, same dtype
    with pytest.raises(BadDataError) as info:
        _trainer(tmp_path, num_sanity_val_steps=0).fit(module, train, val)
    message = str(info.value)
    assert message.startswith("training batch 0 (epoch 0)"), message
    if bad != "float64_input":
        assert "sample 5" in message
    for pattern in expected:
        assert re.search(pattern, message), (pattern, message)
    _assert_untouched(module, before, tmp_path)


def test_bad_validation_data_is_refused_in_the_sanity_check(tmp_path):
    x, y = _digits()
    bad_y = y.clone()
    bad_y[17] = 12
    module = _module("classifier")
    before = _snapshot(module)
    with pytest.raises(BadDataError, match=r"^validation batch 0 \(sanity check before training\): label 12 of "
                                           r"sample 17"):
        _trainer(tmp_path).fit(module, DataLoader(TensorDataset(x, y), batch_size=32),
                               DataLoader(TensorDataset(x, bad_y), batch_size=32))
    _assert_untouched(module, before, tmp_path)


class _DictDigits(Dataset):
    def __init__(self, x: Tensor, y: Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> dict:
        return {"image": self.x[i], "extra": {"scale": self.x[i, 0, 0, :1]}, "label": self.y[i], "index": i}


def test_nan_in_a_dict_batch_is_named_by_key(tmp_path):
    x, y = _digits()
    x[120, 0, 0, 0] = float("nan")  # read through a nested entry too: inputs['extra']['scale']
    module = _module("kd")
    before = _snapshot(module)
    loader = DataLoader(_DictDigits(x, y), batch_size=32, sampler=list(range(127, -1, -1)))  # batch 0: 127..96
    with pytest.raises(BadDataError) as info:
        _trainer(tmp_path, num_sanity_val_steps=0, limit_val_batches=0).fit(module, loader)
    message = str(info.value)
    assert message.startswith("training batch 0 (epoch 0): the input `inputs['image']`"), message
    assert "first: sample 7 (dataset index 120), value nan at position (0, 0, 0)" in message
    _assert_untouched(module, before, tmp_path)


def test_nested_input_tensors_are_checked():
    x = torch.zeros(3, 2)
    extra = torch.ones(3, 1)
    extra[1, 0] = float("inf")
    with pytest.raises(BadDataError, match=r"the input `inputs\['extra'\]\['scale'\]` holds 0 NaN and 1 Inf"):
        check_inputs(Batch(x, inputs={"x": x, "extra": {"scale": extra}}), "training batch 0")


# --------------------------------------------------------------------------------------- empty datasets
class _EmptyDigits(DigitsDataModule):
    def setup(self, stage=None) -> None:
        super().setup(stage)
        for name in ("inputs", "targets"):
            setattr(self.train_dataset, name, getattr(self.train_dataset, name)[:0])


@pytest.mark.parametrize("kind", ["classifier", "kd"])
def test_empty_training_set_has_its_own_message(kind, tmp_path):
    module = _module(kind)
    with pytest.raises(BadDataError, match=r"the training set of _EmptyDigits is empty .*data path / split"):
        _trainer(tmp_path).fit(module, datamodule=_EmptyDigits())
    x, y = _digits()
    module = _module(kind)
    with pytest.raises(BadDataError, match=r"the training set is empty: its DataLoader yields no batch \(dataset of "
                                           r"0 samples\)"):
        _trainer(tmp_path).fit(module, DataLoader(TensorDataset(x[:0], y[:0]), batch_size=32),
                               DataLoader(TensorDataset(x, y), batch_size=32))


def test_empty_batch_is_refused():
    with pytest.raises(BadDataError, match=r"training batch 0 holds no samples"):
        check_inputs(Batch(torch.zeros(0, 3), torch.zeros(0, dtype=torch.long)), "training batch 0")


# ------------------------------------------------------------------------------------ token-level targets
class _TinyLM(nn.Module):
    """Token ids [N, L] -> logits [N, L, V]."""

    def __init__(self, vocab: int = 12) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, 8)
        self.head = nn.Linear(8, vocab)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.embed(x))


def _tokens(n: int = 16, length: int = 6, vocab: int = 12) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, vocab, (n, length), generator=g)
    return x, torch.randint(0, vocab, (n, length), generator=g)


def test_token_target_beyond_the_vocabulary_is_refused(tmp_path):
    x, y = _tokens()
    y[3, 4] = 40
    module = Classifier(_TinyLM(), label_shift="none")
    before = _snapshot(module)
    with pytest.raises(BadDataError) as info:
        _trainer(tmp_path, num_sanity_val_steps=0).fit(module, DataLoader(TensorDataset(x, y), batch_size=8))
    message = str(info.value)
    assert "token target 40 of sample 3, token 4 is out of range" in message
    assert "valid token ids are 0..11 (the vocabulary of 12)" in message
    assert "vocabulary of at least 41" in message
    _assert_untouched(module, before, tmp_path)


def test_all_ignored_validation_targets_do_not_crash_the_metrics(tmp_path):
    """Every validation token target -100 (the sanity check used to fail computing the calibration metric with
    "No samples to concatenate"): the label metrics are simply not logged for such an epoch."""
    x, y = _tokens()
    unlabelled = torch.full_like(y, -100)
    module = Classifier(_TinyLM(), label_shift="none")
    trainer = _trainer(tmp_path, limit_val_batches=2, callbacks=None, enable_checkpointing=False)
    trainer.fit(module, DataLoader(TensorDataset(x, y), batch_size=8), DataLoader(TensorDataset(x, unlabelled),
                                                                                    batch_size=8))
    assert not any(k.startswith("val/") for k in trainer.callback_metrics)
    trainer.validate(module, DataLoader(TensorDataset(x, y), batch_size=8), verbose=False)
    assert {"val/acc", "val/ece", "val/loss", "val/perplexity"} <= set(trainer.callback_metrics)


# ---------------------------------------------------------------------------------- switching off, cost
def test_check_batches_zero_turns_the_checks_off_and_the_loss_guard_still_stops_nan(tmp_path):
    x, y = _digits()
    x[5, 0, 2, 3] = float("nan")
    torch.manual_seed(0)
    module = Classifier(DigitsMLP(), check_batches=0)
    before = _snapshot(module)
    with pytest.raises(NonFiniteLossError, match=r"the training loss is nan at global step 0 \(epoch 0\): objective "
                                                 r"'task' is nan"):
        _trainer(tmp_path, num_sanity_val_steps=0).fit(module, DataLoader(TensorDataset(x, y), batch_size=32))
    _assert_untouched(module, before, tmp_path)


def test_checks_run_on_the_first_batches_only(tmp_path, monkeypatch):
    calls = []

    def counting(batch, where, **kwargs):
        calls.append(where)

    monkeypatch.setattr(module_mod, "check_inputs", counting)
    module = _module("kd")
    trainer = _trainer(tmp_path, limit_train_batches=6, limit_val_batches=3, max_epochs=2, callbacks=None,
                       enable_checkpointing=False)
    trainer.fit(module, datamodule=DigitsDataModule(batch_size=32))
    assert calls == [
        "the example batch of the shape probe (run before training)",
        "validation batch 0 (sanity check before training)",
        "validation batch 1 (sanity check before training)",
        "training batch 0 (epoch 0)",
        "training batch 1 (epoch 0)",
    ]
    assert module._train_checks == module._val_checks == 0


def test_check_batches_is_validated():
    with pytest.raises(ValueError, match=r"`check_batches` must be an integer >= 0, got -1\. Use 0 to turn the checks off"):
        Classifier(DigitsMLP(), check_batches=-1)


# ------------------------------------------------------------------------------------------- properties
@settings(max_examples=60, deadline=None)
@given(
    shape=st.sampled_from([(7,), (3, 5)]),
    num_classes=st.integers(2, 6),
    data=st.data(),
)
def test_the_label_check_accepts_exactly_the_valid_labels(shape, num_classes, data):
    n = 1
    for d in shape:
        n *= d
    values = data.draw(st.lists(st.one_of(st.integers(-5, num_classes + 3), st.just(-100)), min_size=n, max_size=n))
    target = torch.tensor(values, dtype=torch.long).reshape(shape)
    valid = all(v == -100 or 0 <= v < num_classes for v in values)
    assert bool(invalid_labels(target, num_classes).any()) == (not valid)
    batch = Batch(torch.zeros(shape[0], 2), target)
    if valid:
        check_targets(batch, "training batch 0", num_classes)
    else:
        with pytest.raises(BadDataError) as info:
            check_targets(batch, "training batch 0", num_classes)
        first = next(v for v in values if not (v == -100 or 0 <= v < num_classes))
        kind = "token target" if len(shape) == 2 else "label"
        assert f"{kind} {first} of sample" in str(info.value)


@settings(max_examples=40, deadline=None)
@given(rows=st.lists(st.integers(0, 9), min_size=1, max_size=4, unique=True),
       value=st.sampled_from([float("nan"), float("inf"), float("-inf")]))
def test_the_input_check_names_the_first_bad_sample(rows, value):
    x = torch.rand(10, 3)
    x[rows, 1] = value
    with pytest.raises(BadDataError, match=rf"first: sample {min(rows)} \(dataset index {100 + min(rows)}\)"):
        check_inputs(Batch(x, index=torch.arange(100, 110)), "training batch 0")
    check_inputs(Batch(torch.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0)), "training batch 0")
