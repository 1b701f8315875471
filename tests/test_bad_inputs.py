"""Bad files and bad numbers: every refusal names the file or argument, the value and the fix.

* the loss guard (``check_finite_loss``): a NaN term stops training at its step, naming the objective, before
  the optimizer applies it -- the checkpoint written before it stays the last one, and none is written after;
* teacher weights holding NaN are refused when loaded, naming the tensors;
* ``teacher_checkpoint`` of random bytes is called unreadable, not "code execution";
* ``ckpt_path`` truncated, needing code execution, or written by another strategy -- through ``Trainer.fit``
  with :class:`~lightning_distill.checkpoint.AtomicCheckpointIO` and through the CLI;
* ``cka_loss`` where CKA is undefined (one sample, constant features), and ``pseudo_labels`` out of range.
"""

from __future__ import annotations

import contextlib
import io
import os
import pickle
import re
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch
from _state import IsolatedState
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_distill import Classifier, DistillationModule, FeatureDistillation, KnowledgeDistillation
from lightning_distill.checkpoint import AtomicCheckpointIO, checkpoint_class, load_weights, read_checkpoint
from lightning_distill.cli import DistillCLI
from lightning_distill.data import DigitsDataModule
from lightning_distill.data_checks import NonFiniteLossError
from lightning_distill.losses import cka_loss, linear_cka
from lightning_distill.models import DigitsCNN, DigitsMLP, DigitsStudentCNN
from lightning_distill.objectives import CrossEntropy, Objective

pytestmark = pytest.mark.usefixtures("restore_global_state", "single_thread")

REPO = Path(__file__).resolve().parents[1]
QUICK = ["--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1",
         "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
         "--test_after_fit", "false"]


def _trainer(root: Path, **kwargs) -> L.Trainer:
    defaults = dict(default_root_dir=root, accelerator="cpu", devices=1, max_epochs=1, limit_train_batches=2,
                    limit_val_batches=1, logger=False, enable_progress_bar=False, enable_model_summary=False)
    defaults.update(kwargs)
    return L.Trainer(**defaults)


def _snapshot(module: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _cli(root: Path, config: str, *args: str) -> DistillCLI:
    with IsolatedState(root), contextlib.redirect_stdout(io.StringIO()):
        os.chdir(root)
        return DistillCLI(args=["fit", "--config", str(REPO / "configs" / "digits" / config),
                                "--trainer.default_root_dir", str(root), *QUICK, *args])


# ----------------------------------------------------------------------------------------- the loss guard
class _NaNAfter(Objective):
    """A term that is 0.1 * mean logit until global step ``at``, then NaN."""

    name = "poison"
    needs_teacher = False

    def __init__(self, at: int) -> None:
        super().__init__(1.0)
        self.at = at

    def forward(self, student, teacher, batch, step):
        value = 0.1 * student.logits.float().mean()
        if step._module.trainer.global_step >= self.at:
            value = value * float("nan")
        return self.terms(value)


def test_nan_loss_stops_training_at_its_step_and_keeps_the_last_good_checkpoint(tmp_path):
    """Raising in the step hands control back to Lightning before this step's optimizer update and before the
    checkpoint callback's next save: last.ckpt stays the one of the step before, and the weights equal it."""
    torch.manual_seed(0)
    module = DistillationModule(DigitsMLP(), objectives={"task": CrossEntropy(), "poison": _NaNAfter(3)})
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, every_n_train_steps=1, save_top_k=0)
    trainer = _trainer(tmp_path, limit_train_batches=10, callbacks=[ckpt], num_sanity_val_steps=0)
    with pytest.raises(NonFiniteLossError) as info:
        trainer.fit(module, datamodule=DigitsDataModule(batch_size=32, shuffle_seed=0))
    message = str(info.value)
    assert message.startswith("the training loss is nan at global step 3 (epoch 0): objective 'poison' is nan "
                              "(the other terms are finite: task = "), message
    assert "before this step's optimizer update" in message and "check_finite_loss=False" in message
    last = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    assert last["global_step"] == 3
    assert all(torch.isfinite(v).all() for v in last["state_dict"].values() if v.is_floating_point())
    own = module.state_dict()
    assert all(torch.equal(own[k], v) for k, v in last["state_dict"].items()), "the NaN step changed the weights"
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["last.ckpt"]


def test_deferred_check_refuses_the_checkpoint_after_a_nan_step(tmp_path, monkeypatch):
    """The accelerator path, run on the CPU: no host read per step, the flag is read on logged steps and before
    every checkpoint save -- the save after the NaN step is refused, and last.ckpt stays the one before it."""
    monkeypatch.setattr(DistillationModule, "_loss_reads_without_sync", staticmethod(lambda loss: False))
    torch.manual_seed(0)
    module = DistillationModule(DigitsMLP(), objectives={"task": CrossEntropy(), "poison": _NaNAfter(3)})
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, every_n_train_steps=1, save_top_k=0)
    trainer = _trainer(tmp_path, limit_train_batches=10, callbacks=[ckpt], num_sanity_val_steps=0,
                       log_every_n_steps=5)
    with pytest.raises(NonFiniteLossError, match=r"^the training loss is nan at global step 3 \(epoch 0\)\. Training "
                                                 r"stopped, and no checkpoint is written from these weights"):
        trainer.fit(module, datamodule=DigitsDataModule(batch_size=32, shuffle_seed=0))
    last = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    assert last["global_step"] == 3
    assert all(torch.isfinite(v).all() for v in last["state_dict"].values() if v.is_floating_point())
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["last.ckpt"]


def test_deferred_check_reads_the_flag_on_logged_steps(tmp_path, monkeypatch):
    monkeypatch.setattr(DistillationModule, "_loss_reads_without_sync", staticmethod(lambda loss: False))
    torch.manual_seed(0)
    module = DistillationModule(DigitsMLP(), objectives={"task": CrossEntropy(), "poison": _NaNAfter(2)})
    trainer = _trainer(tmp_path, limit_train_batches=10, enable_checkpointing=False, num_sanity_val_steps=0,
                       log_every_n_steps=5)
    with pytest.raises(NonFiniteLossError, match=r"^the training loss is nan at a global step from 1 to 4 \(epoch 0; "
                                                 r"the steps between two checks\): objectives 'task' is nan, 'poison' "
                                                 r"is nan"):
        trainer.fit(module, datamodule=DigitsDataModule(batch_size=32, shuffle_seed=0))
    assert trainer.global_step == 4  # step 4 is the first logged step after the NaN (log_every_n_steps=5)


def test_a_nan_teacher_without_the_load_check_is_stopped_by_the_guard(tmp_path):
    """A teacher whose weights went NaN after loading (or that was passed without teacher_checkpoint): the KD
    term turns NaN at step 0 and is named."""
    torch.manual_seed(0)
    teacher = DigitsCNN()
    with torch.no_grad():
        teacher.head.weight[0, 0] = float("nan")
    module = KnowledgeDistillation(DigitsMLP(), teacher)
    before = _snapshot(module.student)
    with pytest.raises(NonFiniteLossError, match=r"global step 0 \(epoch 0\): objective 'kd' is nan \(the other "
                                                 r"terms are finite: task = "):
        _trainer(tmp_path, num_sanity_val_steps=0).fit(module, datamodule=DigitsDataModule(batch_size=32))
    assert all(torch.equal(module.student.state_dict()[k], v) for k, v in before.items())


def test_no_checkpoint_is_written_after_an_unread_non_finite_loss(tmp_path):
    """Accelerators read the loss flag every few steps: a checkpoint due before the next read reads it first."""
    module = Classifier(DigitsMLP())
    trainer = _trainer(tmp_path, num_sanity_val_steps=0, limit_val_batches=0)
    trainer.fit(module, datamodule=DigitsDataModule(batch_size=32))
    module._finite_pending = torch.tensor(False)  # what a device-side flag holds after a NaN step
    with pytest.raises(NonFiniteLossError, match=r"at a global step from 0 to 1 \(epoch 1; the steps between two "
                                                 r"checks\).*no checkpoint is written from these weights"):
        trainer.save_checkpoint(tmp_path / "after.ckpt")
    assert not (tmp_path / "after.ckpt").exists()
    trainer.save_checkpoint(tmp_path / "fine.ckpt")  # the flag was consumed: a later save goes through
    assert checkpoint_class(torch.load(tmp_path / "fine.ckpt", weights_only=True)) == \
        "lightning_distill.classifier.Classifier"


def test_check_finite_loss_false_trains_through(tmp_path):
    torch.manual_seed(0)
    module = DistillationModule(DigitsMLP(), objectives={"task": CrossEntropy(), "poison": _NaNAfter(0)},
                                check_finite_loss=False)
    _trainer(tmp_path, num_sanity_val_steps=0, limit_val_batches=0).fit(module, datamodule=DigitsDataModule())
    assert not all(torch.isfinite(p).all() for p in module.student.parameters())  # what the guard prevents


# --------------------------------------------------------------------------------------- teacher weights
def test_teacher_checkpoint_with_nan_is_refused_naming_the_tensors(tmp_path):
    state = DigitsCNN().state_dict()
    state["head.weight"][3, 1] = float("nan")
    state["block1.1.running_var"][0] = float("inf")
    path = tmp_path / "diverged.pt"
    torch.save(state, path)
    torch.manual_seed(1)
    teacher = DigitsCNN()
    before = _snapshot(teacher)
    with pytest.raises(ValueError) as info:
        KnowledgeDistillation(DigitsMLP(), teacher, teacher_checkpoint=str(path))
    message = str(info.value)
    assert f"`teacher_checkpoint`='{path}' holds non-finite values (NaN / Inf) in 2 tensor(s)" in message
    assert "head.weight (1 NaN, 0 Inf of 640 values)" in message
    assert "block1.1.running_var (0 NaN, 1 Inf of 16 values)" in message
    assert "use an earlier checkpoint" in message
    assert all(torch.equal(teacher.state_dict()[k], v) for k, v in before.items())


def test_random_bytes_are_unreadable_not_code_needing(tmp_path):
    path = tmp_path / "random.ckpt"
    path.write_bytes(bytes(torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0)).tolist()))
    with pytest.raises(ValueError) as info:
        read_checkpoint(path)
    message = str(info.value)
    assert f"`teacher_checkpoint`='{path}' is not a readable torch.save file (truncated, corrupt" in message
    assert "code execution" not in message
    with pytest.raises(ValueError, match=r"is not a readable torch\.save file"):
        load_weights(DigitsCNN(), path)


# ------------------------------------------------------------------------------------------- ckpt_path
class _RunsCode:
    """Unpickling this would create a marker directory: it must never happen."""

    marker: Path

    def __reduce__(self):
        return (os.makedirs, (str(self.marker),))


@pytest.fixture(scope="module")
def bad_ckpts(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bad_ckpts")
    module = Classifier(DigitsMLP(hidden=8))
    trainer = _trainer(root, num_sanity_val_steps=0, limit_val_batches=0, enable_checkpointing=False)
    with IsolatedState():
        trainer.fit(module, datamodule=DigitsDataModule(batch_size=32))
    good = root / "good.ckpt"
    trainer.save_checkpoint(good)
    data = good.read_bytes()
    (root / "truncated.ckpt").write_bytes(data[: len(data) // 2])
    payload = _RunsCode()
    payload.marker = root / "code-ran"
    checkpoint = torch.load(good, weights_only=True)
    checkpoint["extra"] = payload
    with open(root / "unsafe.ckpt", "wb") as handle:
        torch.save(checkpoint, handle, pickle_module=pickle)
    return {"good": good, "truncated": root / "truncated.ckpt", "unsafe": root / "unsafe.ckpt",
            "marker": payload.marker}


def _resume(root: Path, path: Path) -> None:
    trainer = _trainer(root, max_epochs=2, num_sanity_val_steps=0, limit_val_batches=0, enable_checkpointing=False,
                       plugins=[AtomicCheckpointIO()])
    trainer.fit(Classifier(DigitsMLP(hidden=8)), datamodule=DigitsDataModule(batch_size=32), ckpt_path=path)


def test_truncated_ckpt_path_names_the_file(bad_ckpts, tmp_path):
    path = bad_ckpts["truncated"]
    with pytest.raises(ValueError) as info:
        _resume(tmp_path, path)
    message = str(info.value)
    assert message.startswith(f"`ckpt_path`='{path}' is not a complete checkpoint: torch cannot read it ("), message
    assert "truncated" in message and "Resume from another checkpoint of the run" in message
    _resume(tmp_path, bad_ckpts["good"])  # the same writer reads a complete one


def test_code_needing_ckpt_path_is_refused_naming_the_file(bad_ckpts, tmp_path):
    path = bad_ckpts["unsafe"]
    with pytest.raises(ValueError) as info:
        _resume(tmp_path, path)
    message = str(info.value)
    assert message.startswith(f"`ckpt_path`='{path}' was refused: it contains Python objects that would need code "
                              "execution to unpickle (it refers to os.makedirs)"), message
    assert "Do not load this file unless you trust its source" in message
    assert not bad_ckpts["marker"].exists()


def test_cli_refuses_truncated_and_unsafe_ckpt_path(bad_ckpts, tmp_path):
    for kind, expected in (("truncated", "is not a complete checkpoint"), ("unsafe", "was refused: it contains "
                                                                                      "Python objects")):
        path = bad_ckpts[kind]
        with pytest.raises(ValueError, match=re.escape(f"`--ckpt_path`='{path}' {expected}")):
            _cli(tmp_path, "baseline.yaml", "--ckpt_path", str(path))
    assert not bad_ckpts["marker"].exists()


@pytest.fixture(scope="module")
def at_ckpt(tmp_path_factory) -> Path:
    """``last.ckpt`` of ``lightning-distill fit --config configs/digits/at.yaml`` (1 epoch, 2 batches)."""
    root = tmp_path_factory.mktemp("at_run")
    _cli(root, "at.yaml")
    path = root / "runs" / "digits" / "at" / "version_0" / "checkpoints" / "last.ckpt"
    assert path.is_file()
    return path


def test_cli_resume_with_another_strategys_config_names_both(at_ckpt, tmp_path):
    config = at_ckpt.parent.parent / "config.yaml"
    with pytest.raises(ValueError) as info:
        _cli(tmp_path, "kd.yaml", "--ckpt_path", str(at_ckpt), "--trainer.max_epochs", "2")
    message = str(info.value)
    assert message.startswith(f"`--ckpt_path`='{at_ckpt}' was written by FeatureDistillation "
                              "(lightning_distill.strategies.feature.FeatureDistillation), but the config builds "
                              "KnowledgeDistillation (lightning_distill.KnowledgeDistillation)"), message
    assert f"Resume with the config that wrote it (the run saved it as {config})" in message
    assert not (tmp_path / "runs").exists()  # refused before any trainer was built
    # a checkpoint written before modules recorded their class: LightningCLI's hyper_parameters["_class_path"]
    older = torch.load(at_ckpt, weights_only=True)
    del older["lightning_distill"]["module"]
    torch.save(older, tmp_path / "older.ckpt")
    with pytest.raises(ValueError, match=r"was written by FeatureDistillation \(lightning_distill\.FeatureDistillation\), "
                                         r"but the config builds KnowledgeDistillation"):
        _cli(tmp_path, "kd.yaml", "--ckpt_path", str(tmp_path / "older.ckpt"))


def test_python_resume_with_another_strategy_names_both(at_ckpt, tmp_path):
    module = KnowledgeDistillation(DigitsMLP(), DigitsCNN(), teacher_checkpoint="zoo:digits_cnn")
    before = _snapshot(module.student)
    with pytest.raises(ValueError, match=r"was written by FeatureDistillation .* but this module is "
                                         r"KnowledgeDistillation"):
        _trainer(tmp_path, max_epochs=2).fit(module, datamodule=DigitsDataModule(), ckpt_path=at_ckpt)
    assert all(torch.equal(module.student.state_dict()[k], v) for k, v in before.items())
    # the same strategy resumes it
    resumed = FeatureDistillation(DigitsStudentCNN(width=8), DigitsCNN(), teacher_checkpoint="zoo:digits_cnn",
                                  layer_map={"block1": "block1.0", "block2": "block1"}, feature_loss="attention",
                                  feature_weight=1000.0, projection="none", alpha=0.0, temperature=2.0)
    trainer = _trainer(tmp_path, max_epochs=2, enable_checkpointing=False, num_sanity_val_steps=0)
    trainer.fit(resumed, datamodule=DigitsDataModule(), ckpt_path=at_ckpt)
    assert trainer.global_step == 4


# ------------------------------------------------------------------------------------------------ CKA
def test_cka_is_defined_where_it_is_undefined():
    """One sample, or constant features on either side: CKA 0, loss 1, no gradient, never NaN."""
    s = torch.randn(1, 6, requires_grad=True)
    loss = cka_loss(s, torch.randn(1, 4))
    loss.backward()
    assert loss.item() == 1.0 and s.grad.abs().sum().item() == 0.0
    dead = torch.zeros(8, 6, requires_grad=True)
    loss = cka_loss(dead, torch.randn(8, 4))
    loss.backward()
    assert loss.item() == 1.0 and torch.isfinite(dead.grad).all() and dead.grad.abs().sum().item() == 0.0
    assert linear_cka(torch.randn(8, 6), torch.full((8, 3), 2.5)).item() == 0.0
    x = torch.randn(8, 6)
    assert cka_loss(x, 2 * x).item() == pytest.approx(0.0, abs=1e-6)


def _cka_module() -> FeatureDistillation:
    return FeatureDistillation(DigitsMLP(), DigitsCNN(), teacher_checkpoint="zoo:digits_cnn",
                               layer_map={"block3": "block1"}, feature_loss="cka", projection="none")


def test_cka_with_batches_of_one_is_refused_before_training(tmp_path):
    x = torch.rand(8, 1, 8, 8)
    y = torch.randint(0, 10, (8,))
    module = _cka_module()
    before = _snapshot(module.student)
    with pytest.raises(ValueError, match=r"feature_loss \['cka'\] compares the samples of a batch with each other and "
                                         r"needs at least 2 per batch, but the first training batch has 1.*"
                                         r"batch_size >= 2"):
        _trainer(tmp_path, num_sanity_val_steps=0, limit_val_batches=0).fit(
            module, DataLoader(TensorDataset(x, y), batch_size=1))
    assert all(torch.equal(module.student.state_dict()[k], v) for k, v in before.items())


def test_cka_warns_about_a_constant_probed_layer():
    module = _cka_module()
    with torch.no_grad():
        module.student.block1[1].weight.zero_()  # block1 = Flatten, Linear, ReLU: every sample maps to relu(bias)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        module.build(torch.rand(4, 1, 8, 8))
    assert any("the student's layer 'block1' gives the same features for every sample" in str(w.message)
               for w in caught)


# ---------------------------------------------------------------------------------------------- pseudo_labels
@pytest.mark.parametrize("value", [2, -0.5, float("nan")])
def test_pseudo_labels_out_of_range_is_explained_as_a_threshold(value):
    with pytest.raises(ValueError) as info:
        KnowledgeDistillation(DigitsMLP(), DigitsCNN(), teacher_checkpoint="zoo:digits_cnn", pseudo_labels=value)
    message = str(info.value)
    assert message.startswith(f"`pseudo_labels` must be in [0, 1], got {value!r}.")
    assert "confidence threshold, not a weight" in message and "weight of the distillation term" not in message


def test_another_class_resumes_a_checkpoint_whose_weights_fit(tmp_path):
    """The general DistillationModule built with a preset's objectives resumes that preset's run, parts built by the
    probe included: a different class alone is no reason to refuse."""
    def build() -> FeatureDistillation:
        torch.manual_seed(0)
        return FeatureDistillation(DigitsMLP(), DigitsCNN(), teacher_checkpoint="zoo:digits_cnn",
                                   layer_map={"block3": "block1"}, feature_loss="mse")

    trained = build()
    trainer = _trainer(tmp_path, num_sanity_val_steps=0, limit_val_batches=0, enable_checkpointing=False)
    trainer.fit(trained, datamodule=DigitsDataModule(batch_size=32))
    trainer.save_checkpoint(tmp_path / "fd.ckpt")
    twin = build()
    general = DistillationModule(twin.student, twin.teacher_source, objectives=dict(twin.objectives))
    trainer = _trainer(tmp_path, max_epochs=2, num_sanity_val_steps=0, limit_val_batches=0, enable_checkpointing=False)
    trainer.fit(general, datamodule=DigitsDataModule(batch_size=32), ckpt_path=tmp_path / "fd.ckpt")
    assert trainer.global_step == 4
