"""The shape probe: where its batch comes from, what it builds, how it is replayed from a checkpoint, and the
errors before training (an empty training set, plain DataLoaders without an example under DDP)."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

from lightning_distill import FeatureDistillation, KnowledgeDistillation
from lightning_distill.batch import Batch
from lightning_distill.data import DigitsDataModule
from lightning_distill.models import DigitsCNN, DigitsMLP, DigitsStudentCNN
from lightning_distill.probe import PROBE_SAMPLES, batch_from_spec, batch_spec

pytestmark = pytest.mark.usefixtures("single_thread", "seeded")


def _feature() -> FeatureDistillation:
    return FeatureDistillation(
        DigitsStudentCNN(), DigitsCNN(), teacher_checkpoint="zoo:digits_cnn", layer_map={"block2": "block1"}
    )


def _digits(n: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    dm = DigitsDataModule()
    dm.setup("fit")
    return dm.train_dataset.inputs[:n], dm.train_dataset.targets[:n]


class _Optimized(L.Callback):
    """The ids of the parameters the optimizer holds at the first training step, and the projections then."""

    def __init__(self) -> None:
        self.ids: set[int] = set()
        self.projection_before: list[torch.Tensor] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if not self.ids:
            self.ids = {id(p) for group in optimizer.param_groups for p in group["params"]}
            self.projection_before = [p.detach().clone() for p in pl_module.projections[0].parameters()]


@pytest.mark.parametrize("sanity_steps", [0, 2])
def test_plain_loaders_probe_the_first_batch_and_the_optimizer_holds_the_new_parts(sanity_steps, make_trainer):
    x, y = _digits()
    module = _feature()
    assert len(module.projections) == 0 and not module.probed
    watch = _Optimized()
    trainer = make_trainer(limit_train_batches=2, limit_val_batches=1, num_sanity_val_steps=sanity_steps,
                           callbacks=[watch])
    trainer.fit(module, DataLoader(TensorDataset(x, y), batch_size=32), DataLoader(TensorDataset(x, y), batch_size=32))
    projection = list(module.projections[0].parameters())
    assert projection and all(id(p) in watch.ids for p in projection)  # optimised from the first step on
    assert all(not torch.equal(p.detach(), q) for p, q in zip(projection, watch.projection_before))  # they moved
    assert module.projections[0].training  # built during a validation batch, it still trains


def test_example_input_array_and_datamodule_are_probed_in_setup():
    module = _feature()
    module.example_input_array = torch.zeros(5, 1, 8, 8)
    module.setup("fit")
    assert module.probed and len(module.projections) == 1
    assert module._probe_spec["batch"]["input"]["shape"] == [PROBE_SAMPLES, 1, 8, 8]


def test_checkpoint_replays_the_probe_spec(digits_dm, make_trainer, tmp_path):
    module = _feature()
    trainer = make_trainer(limit_train_batches=2, limit_val_batches=0)
    trainer.fit(module, datamodule=digits_dm)
    path = tmp_path / "m.ckpt"
    trainer.save_checkpoint(path)
    ckpt = torch.load(path, weights_only=True)
    spec = ckpt["lightning_distill"]["probe"]
    assert spec["batch"]["input"] == {"shape": [PROBE_SAMPLES, 1, 8, 8], "dtype": "float32"}
    fresh = _feature()
    fresh.on_load_checkpoint(ckpt)  # what Lightning calls before load_state_dict
    assert len(fresh.projections) == 1 and fresh.probed
    fresh.load_state_dict(ckpt["state_dict"])
    for key, value in module.projections.state_dict().items():
        assert torch.equal(fresh.projections.state_dict()[key], value), key


def test_batch_spec_round_trip_keeps_named_inputs_and_marks_every_token_valid():
    batch = Batch(torch.ones(4, 6, dtype=torch.long), mask=torch.zeros(4, 6, dtype=torch.bool),
                  inputs={"input_ids": torch.ones(4, 6, dtype=torch.long), "attention_mask": torch.zeros(4, 6)})
    rebuilt = batch_from_spec(batch_spec(batch))
    assert rebuilt.input.shape == (PROBE_SAMPLES, 6) and rebuilt.input.dtype == torch.long
    assert rebuilt.mask.all() and rebuilt.inputs["attention_mask"].eq(1).all()
    assert rebuilt.inputs["input_ids"].shape == (PROBE_SAMPLES, 6)


class _Empty(Dataset):
    def __len__(self) -> int:
        return 0

    def __getitem__(self, i):
        raise IndexError(i)


class _EmptyDigits(DigitsDataModule):
    def setup(self, stage=None):
        super().setup(stage)
        self.train_dataset = _Empty()

    example_input = None  # type: ignore[assignment]  # no example: the probe reads the training loader


def test_empty_training_set_from_a_datamodule_is_its_own_error(make_trainer):
    module = KnowledgeDistillation(DigitsMLP(), DigitsCNN(), teacher_checkpoint="zoo:digits_cnn")
    trainer = make_trainer()
    with pytest.raises(ValueError, match=r"the training set is empty: its DataLoader yields no batch \(dataset of 0 samples\)"):
        trainer.fit(module, datamodule=_EmptyDigits())
    assert trainer.global_step == 0


def test_empty_plain_training_loader_is_its_own_error(make_trainer):
    module = KnowledgeDistillation(DigitsMLP(), DigitsCNN(), teacher_checkpoint="zoo:digits_cnn")
    empty = DataLoader(TensorDataset(torch.zeros(0, 1, 8, 8), torch.zeros(0, dtype=torch.long)), batch_size=8)
    with pytest.raises(ValueError, match=r"the training set is empty"):
        make_trainer(limit_val_batches=0).fit(module, empty)
    assert not module.probed  # nothing was built from a batch that never came


def test_num_classes_without_parts_to_build_needs_no_probe(make_trainer):
    # plain loaders, num_classes given, nothing shape-dependent: metrics from num_classes, no extra forward
    x, y = _digits(64)
    module = KnowledgeDistillation(DigitsMLP(), DigitsCNN(), teacher_checkpoint="zoo:digits_cnn", num_classes=10)
    calls = []
    module.teacher.register_forward_pre_hook(lambda m, a: calls.append(1))
    make_trainer(limit_train_batches=1, limit_val_batches=0).fit(module, DataLoader(TensorDataset(x, y), batch_size=64))
    assert module.probed and len(calls) == 1  # the one training step's teacher forward, no probe
