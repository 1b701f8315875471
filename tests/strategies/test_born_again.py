"""BornAgain: generation hand-over, optimizer / schedule restart, frozen previous generation, BANE, resume."""

from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import CSVLogger
from torch import nn

from lightning_distill.data import DigitsDataModule
from lightning_distill.models import DigitsCNN, DigitsMLP, DigitsStudentCNN
from lightning_distill.module import Batch
from lightning_distill.strategies.born_again import BornAgain

LR = 0.01


def _state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _trainer(root, max_epochs: int, **kwargs) -> L.Trainer:
    defaults = dict(
        default_root_dir=root, accelerator="cpu", devices=1, max_epochs=max_epochs, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, deterministic=True,
        limit_train_batches=3, limit_val_batches=2, num_sanity_val_steps=0,
    )
    defaults.update(kwargs)
    return L.Trainer(**defaults)


class _Watcher(L.Callback):
    """Records the hand-over from generation 1 to generation 2 (2 epochs per generation)."""

    def __init__(self, epochs_per_generation: int) -> None:
        self.e = epochs_per_generation
        self.end_of_gen1: dict = {}
        self.start_of_gen2: dict = {}
        self.teacher_calls: list[tuple[bool, bool, bool]] = []
        self.losses: list[float] = []
        self.handle = None

    def on_train_epoch_end(self, trainer, pl_module):
        if trainer.current_epoch == self.e - 1:
            opt = trainer.optimizers[0]
            self.end_of_gen1 = dict(
                student=_state(pl_module.student), optimizer=opt, state_size=len(opt.state),
                lr=opt.param_groups[0]["lr"],
            )

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.current_epoch == self.e and batch_idx == 0:  # first step of generation 2
            opt = trainer.optimizers[0]
            configs = trainer.lr_scheduler_configs
            self.start_of_gen2 = dict(
                teacher=_state(pl_module.teacher), student=_state(pl_module.student), optimizer=opt,
                state_size=len(opt.state), lr=opt.param_groups[0]["lr"],
                scheduler_epoch=configs[0].scheduler.last_epoch if configs else None,
                optimizer_ids={id(p) for g in opt.param_groups for p in g["params"]},
                generation=pl_module.generation,
            )

            def hook(module, args):
                self.teacher_calls.append((module.training, torch.is_grad_enabled(), torch.is_inference_mode_enabled()))

            self.handle = pl_module.teacher.register_forward_pre_hook(hook)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"] if isinstance(outputs, dict) else outputs))
        if trainer.current_epoch >= self.e:
            pl_module.teacher.train()  # a hostile user: the teacher must be back in eval mode at its next use

    def on_train_end(self, trainer, pl_module):
        if self.handle is not None:
            self.handle.remove()


@pytest.fixture(scope="module")
def two_generations(tmp_path_factory):
    """One fit: 2 generations x 2 epochs of a BatchNorm student, Adam + StepLR(gamma=0.5)."""
    root = tmp_path_factory.mktemp("ban")
    L.seed_everything(0, verbose=False)
    module = BornAgain(
        DigitsStudentCNN(), generations=2, epochs_per_generation=2, temperature=2.0, alpha=0.5, seed=1,
        optimizer=lambda params: torch.optim.Adam(params, lr=LR),
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5),
    )
    watcher = _Watcher(epochs_per_generation=2)
    trainer = _trainer(root, 4, callbacks=[watcher], logger=CSVLogger(root, name="", version=""))  # log_dir = root
    with pytest.warns(UserWarning, match="teacher submodule was in train mode"):
        trainer.fit(module, datamodule=DigitsDataModule(batch_size=64, shuffle_seed=0))
    return module, trainer, watcher, root


def test_generation_hand_over(two_generations):
    module, trainer, watcher, root = two_generations
    gen1, start = watcher.end_of_gen1["student"], watcher.start_of_gen2
    assert start["generation"] == 2 and module.generation == 2
    # the teacher of generation 2 is exactly the finished generation-1 student
    assert _same(start["teacher"], gen1)
    assert module.teacher is module.generation_models[0] and len(module.generation_models) == 1
    # the new student was re-initialised: every parameter differs from generation 1 (= the teacher)
    for name, _ in module.student.named_parameters():
        assert not torch.equal(start["student"][name], gen1[name]), f"{name} was not re-initialised"
    assert not torch.equal(start["student"]["block1.0.1.running_mean"], gen1["block1.0.1.running_mean"])
    # generation files: generation 1 at the hand-over, generation 2 (the final student) at the end
    saved1 = torch.load(Path(root) / "generation_1.pt", weights_only=True)
    saved2 = torch.load(Path(root) / "generation_2.pt", weights_only=True)
    assert _same(saved1, gen1) and _same(saved2, _state(module.student))
    assert module.generation_paths == [str(Path(root) / "generation_1.pt"), str(Path(root) / "generation_2.pt")]
    assert trainer.callback_metrics["train/generation"] == 2.0


def test_optimizer_and_schedule_restart(two_generations):
    module, trainer, watcher, _ = two_generations
    end, start = watcher.end_of_gen1, watcher.start_of_gen2
    # generation 1 ended with optimizer state and a decayed LR (StepLR stepped after each of its 2 epochs)
    assert end["state_size"] > 0 and math.isclose(end["lr"], LR * 0.25)
    # generation 2 starts with a new optimizer: empty Adam state, initial LR, fresh schedule
    assert start["optimizer"] is not end["optimizer"]
    assert start["state_size"] == 0 and start["lr"] == LR and start["scheduler_epoch"] == 0
    assert start["optimizer_ids"] == {id(p) for p in module.student.parameters()}
    # and the schedule then runs again within generation 2
    assert math.isclose(trainer.optimizers[0].param_groups[0]["lr"], LR * 0.25)


def test_previous_generation_is_a_frozen_bit_identical_teacher(two_generations):
    module, trainer, watcher, _ = two_generations
    teacher = module.teacher
    assert watcher.teacher_calls, "the generation-1 teacher was never used in generation 2"
    assert all(not training and not grad and not inf for training, grad, inf in watcher.teacher_calls)
    assert _same(_state(teacher), watcher.start_of_gen2["teacher"])  # weights and BatchNorm statistics
    assert all(not p.requires_grad and p.grad is None for p in teacher.parameters())
    optimised = {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}
    assert not optimised & {id(p) for p in module.generation_models.parameters()}
    module.train()
    assert not any(m.training for m in module.generation_models.modules()) and module.student.training
    assert watcher.losses and all(math.isfinite(v) for v in watcher.losses)


def test_generation_checkpoint_round_trip(two_generations, tmp_path):
    module, trainer, _, _ = two_generations
    path = tmp_path / "gen2.ckpt"
    trainer.save_checkpoint(path)
    ckpt = torch.load(path, weights_only=True)
    state = ckpt["state_dict"]
    assert ckpt["born_again"]["generation"] == 2 and ckpt["born_again"]["finished"] == 1
    assert any(k.startswith("teacher.") for k in state) and any(k.startswith("generation_models.0.") for k in state)
    restored = BornAgain.load_from_checkpoint(path, student=DigitsStudentCNN())
    assert restored.generation == 2 and restored.seed == 1 and restored.teacher is restored.generation_models[0]
    assert _same(_state(restored), _state(module))
    assert not restored.teacher.training and not any(p.requires_grad for p in restored.teacher.parameters())


def _independent_ensemble_accuracy(root: Path, loader, batches: int) -> float:
    members = []
    for k in (1, 2):
        model = DigitsMLP(hidden=8)
        model.load_state_dict(torch.load(root / f"generation_{k}.pt", weights_only=True))
        members.append(model.eval())
    correct = total = 0
    with torch.no_grad():
        for i, (x, y, _) in enumerate(loader):
            if i == batches:
                break
            probs = sum(F.softmax(m(x), dim=-1) for m in members) / len(members)
            correct += int((probs.argmax(-1) == y).sum())
            total += len(y)
    return correct / total


def test_bane_accuracy_matches_an_independent_ensemble(tmp_path):
    L.seed_everything(0, verbose=False)
    module = BornAgain(DigitsMLP(hidden=8), generations=2, epochs_per_generation=1, seed=0)
    dm = DigitsDataModule(batch_size=32, shuffle_seed=0)
    trainer = _trainer(
        tmp_path, 2, limit_val_batches=3, limit_test_batches=3, logger=CSVLogger(tmp_path, name="", version="")
    )
    trainer.fit(module, datamodule=dm)
    val = trainer.validate(module, datamodule=dm, verbose=False)[0]
    test = trainer.test(module, datamodule=dm, verbose=False)[0]
    assert val["val/ensemble_acc"] == pytest.approx(_independent_ensemble_accuracy(tmp_path, dm.val_dataloader(), 3))
    assert test["test/ensemble_acc"] == pytest.approx(_independent_ensemble_accuracy(tmp_path, dm.test_dataloader(), 3))
    assert val["val/gen2_acc"] == val["val/acc"]


def test_resume_mid_generation_reproduces_the_uninterrupted_run(tmp_path):
    def build() -> BornAgain:
        L.seed_everything(7, verbose=False)
        return BornAgain(
            DigitsStudentCNN(), generations=2, epochs_per_generation=2, teacher=DigitsCNN(),
            teacher_checkpoint="zoo:digits_cnn", temperature=2.0, alpha=0.7,
            optimizer=lambda params: torch.optim.SGD(params, lr=0.05, momentum=0.9),
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5),
        )

    fast = dict(limit_train_batches=2, limit_val_batches=0)
    straight = build()
    every_epoch = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", filename="{epoch}", save_top_k=-1)
    _trainer(tmp_path / "a", 4, callbacks=[every_epoch], enable_checkpointing=True, **fast).fit(
        straight, datamodule=DigitsDataModule(shuffle_seed=3)
    )
    # epoch=1: end of generation 1 (hand-over not yet done); epoch=2: in the middle of generation 2
    for epoch in (1, 2):
        resumed = build()  # a fresh process rebuilds everything from the config (with the user's teacher)
        trainer = _trainer(tmp_path / f"r{epoch}", 4, **fast)
        trainer.fit(resumed, datamodule=DigitsDataModule(shuffle_seed=3), ckpt_path=tmp_path / "ckpt" / f"epoch={epoch}.ckpt")
        assert trainer.current_epoch == 4 and resumed.generation == 2
        assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.05 * 0.25)
        expected, got = straight.state_dict(), resumed.state_dict()
        assert expected.keys() == got.keys()
        for key, value in expected.items():
            assert torch.equal(got[key], value), f"{key} differs after resuming from epoch {epoch}"
    # the interruption mattered: the generation-2 student changed after epoch 2
    mid = torch.load(tmp_path / "ckpt" / "epoch=2.ckpt", weights_only=True)["state_dict"]
    assert not torch.equal(mid["student.head.weight"], straight.student.head.weight)


def test_contract_with_a_user_teacher(tmp_path):
    """Generation 1 distills from a frozen user teacher (untouched), generation 2 from generation 1."""
    torch.manual_seed(0)
    teacher = DigitsCNN()
    module = BornAgain(DigitsStudentCNN(), generations=2, teacher=teacher, teacher_checkpoint="zoo:digits_cnn", seed=0)
    teacher_before = _state(teacher)
    calls: list[tuple[bool, bool]] = []
    teacher.register_forward_pre_hook(lambda m, a: calls.append((m.training, torch.is_grad_enabled())))
    watcher = _Watcher(epochs_per_generation=1)
    ckpt = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", filename="{epoch}", save_top_k=-1)
    trainer = _trainer(tmp_path, 2, callbacks=[watcher, ckpt], enable_checkpointing=True, limit_val_batches=1)
    with pytest.warns(UserWarning, match="teacher submodule was in train mode"):
        trainer.fit(module, datamodule=DigitsDataModule(shuffle_seed=0))
    # the user's teacher: used in generation 1 only, eval + no_grad, bit-identical, never optimised
    assert calls and all(not training and not grad for training, grad in calls)
    assert _same(_state(teacher), teacher_before)
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    assert module.teacher is module.generation_models[0]
    # every parameter of the final student moved away from its generation-2 initialisation and is optimised
    optimised = {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}
    for name, p in module.student.named_parameters():
        assert id(p) in optimised, name
        assert not torch.equal(p.detach(), watcher.start_of_gen2["student"][name]), f"{name} did not change"
    assert watcher.losses and all(math.isfinite(v) for v in watcher.losses)
    # checkpoints: generation 1's leaves the user's teacher out; generation 2's holds the previous generation
    first = torch.load(tmp_path / "ckpt" / "epoch=0.ckpt", weights_only=True)["state_dict"]
    second = torch.load(tmp_path / "ckpt" / "epoch=1.ckpt", weights_only=True)["state_dict"]
    assert not [k for k in first if k.startswith(("teacher.", "generation_models."))]
    assert [k for k in second if k.startswith("teacher.")] and [k for k in second if k.startswith("generation_models.0.")]


def test_distillation_losses():
    module = BornAgain(DigitsMLP(), generations=2, epochs_per_generation=1, temperature=2.0, alpha=0.3)
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(5, 10, generator=g), torch.randn(5, 10, generator=g)
    y = torch.randint(0, 10, (5,), generator=g)
    ce = F.cross_entropy(s, y)
    labels_only = module.distillation_losses(s, None, Batch(None, y))
    assert torch.allclose(labels_only["loss"], ce) and labels_only["kd_loss"].item() == 0.0
    terms = module.distillation_losses(s, t, Batch(None, y))
    kl = F.kl_div((s / 2).log_softmax(-1), (t / 2).softmax(-1), reduction="batchmean") * 4
    assert torch.allclose(terms["kd_loss"], kl, rtol=1e-5)
    assert torch.allclose(terms["loss"], 0.7 * ce + 0.3 * kl, rtol=1e-5)


def test_reinitialisation_is_seeded_by_seed_and_generation():
    def init(seed: int, generation: int) -> dict[str, torch.Tensor]:
        module = BornAgain(DigitsMLP(), generations=3, seed=seed)
        before = torch.get_rng_state()
        module.reinitialize_student(generation)
        assert torch.equal(before, torch.get_rng_state())  # the global random stream is untouched
        return _state(module.student)

    assert _same(init(0, 2), init(0, 2))
    assert not torch.equal(init(0, 2)["head.weight"], init(0, 3)["head.weight"])
    assert not torch.equal(init(0, 2)["head.weight"], init(1, 2)["head.weight"])


def test_max_epochs_must_match_the_generations(tmp_path):
    module = BornAgain(DigitsMLP(), generations=2, epochs_per_generation=2)
    with pytest.raises(ValueError, match=r"`trainer.max_epochs` must equal generations x epochs_per_generation = 2 x 2 = 4, got max_epochs=3"):
        _trainer(tmp_path, 3).fit(module, datamodule=DigitsDataModule())
    derived = BornAgain(DigitsMLP(), generations=2)
    with pytest.raises(ValueError, match=r"positive multiple of `generations`=2, got max_epochs=3"):
        _trainer(tmp_path, 3).fit(derived, datamodule=DigitsDataModule())


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "3"])
def test_generations_must_be_a_positive_integer(bad):
    with pytest.raises(ValueError, match=r"`generations` must be an integer >= 1, got"):
        BornAgain(DigitsMLP(), generations=bad)


def test_bad_arguments_are_rejected():
    with pytest.raises(ValueError, match=r"`epochs_per_generation` must be an integer >= 1, got 0"):
        BornAgain(DigitsMLP(), epochs_per_generation=0)
    with pytest.raises(ValueError, match=r"`alpha` must be in \[0, 1\]"):
        BornAgain(DigitsMLP(), alpha=1.5)
    with pytest.raises(ValueError, match="`temperature` must be a finite number > 0"):
        BornAgain(DigitsMLP(), temperature=0.0)
    with pytest.raises(ValueError, match=r"`kl` must be one of"):
        BornAgain(DigitsMLP(), kl="mse")
    with pytest.raises(ValueError, match=r"`seed` must be an integer >= 0 or None, got -1"):
        BornAgain(DigitsMLP(), seed=-1)


def test_bare_trainer_writes_no_generation_files(tmp_path, monkeypatch):
    """Without a logger or checkpoint callback there is no run directory: nothing lands in the cwd."""
    monkeypatch.chdir(tmp_path)
    module = BornAgain(DigitsMLP(hidden=8), generations=2, alpha=0.5, temperature=2.0)
    L.Trainer(
        max_epochs=2, logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        limit_train_batches=2, limit_val_batches=1,
    ).fit(module, datamodule=DigitsDataModule())
    assert len(module.generation_models) == 1 and module.generation_paths == []
    assert not list(tmp_path.rglob("generation_*.pt"))
