"""MutualLearning: the DML loss, detached peers, one forward per model, metrics, best student, resume."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_distill.checkpoint import load_weights
from lightning_distill.data import DigitsDataModule
from lightning_distill.losses import mutual_loss
from lightning_distill.models import DigitsCNN, DigitsMLP, DigitsStudentCNN
from lightning_distill.module import Batch
from lightning_distill.strategies.mutual import MutualLearning


def _state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _trainer(root, max_epochs: int, **kwargs) -> L.Trainer:
    defaults = dict(
        default_root_dir=root, accelerator="cpu", devices=1, max_epochs=max_epochs, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, deterministic=True,
        limit_train_batches=3, limit_val_batches=2, num_sanity_val_steps=0,
    )
    defaults.update(kwargs)
    return L.Trainer(**defaults)


def _kl(p_logits: torch.Tensor, q_logits: torch.Tensor, t: float) -> torch.Tensor:
    """T^2 * KL(softmax(p/T) || softmax(q/T)), batch mean, written out."""
    p = (p_logits / t).softmax(-1)
    return (p * (p.log() - (q_logits / t).log_softmax(-1))).sum(-1).mean() * t**2


# ------------------------------------------------------------------ the loss
@pytest.mark.parametrize("with_teacher", [False, True])
def test_loss_matches_an_independent_computation(with_teacher):
    module = MutualLearning(students=[DigitsMLP(), DigitsMLP(), DigitsMLP()], temperature=2.0, alpha=0.3)
    g = torch.Generator().manual_seed(0)
    z = [torch.randn(6, 10, generator=g) for _ in range(3)]
    t = torch.randn(6, 10, generator=g) if with_teacher else None
    y = torch.randint(0, 10, (6,), generator=g)
    terms = module.distillation_losses(z, t, Batch(None, y))
    expected = []
    for k in range(3):
        peers = [z[j] for j in range(3) if j != k] + ([t] if with_teacher else [])
        mutual = sum(_kl(peer, z[k], 2.0) for peer in peers) / len(peers)
        ce = F.cross_entropy(z[k], y)
        expected.append((0.7 * ce + 0.3 * mutual, ce, mutual))
        assert terms[f"student{k}_loss"].item() == pytest.approx((0.7 * ce + 0.3 * mutual).item(), rel=1e-5)
    assert terms["loss"].item() == pytest.approx(sum(e[0] for e in expected).item(), rel=1e-5)
    assert terms["task_loss"].item() == pytest.approx((sum(e[1] for e in expected) / 3).item(), rel=1e-5)
    assert terms["kd_loss"].item() == pytest.approx((sum(e[2] for e in expected) / 3).item(), rel=1e-5)


def test_peers_are_detached():
    module = MutualLearning(DigitsMLP(), num_students=2, alpha=1.0, seed=0)
    s0, s1 = module.students
    x = torch.rand(8, 1, 8, 8)
    y = torch.randint(0, 10, (8,))
    terms = module.distillation_losses([s0(x), s1(x)], None, Batch(x, y))
    terms["student0_loss"].backward()  # alpha=1: student 0's loss is the mutual term alone
    assert all(p.grad is None or not p.grad.any() for p in s1.parameters()), "gradient reached the peer"
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in s0.parameters())
    # and the optimised sum gives each student exactly the gradient of its own loss
    module.zero_grad(set_to_none=True)
    module.distillation_losses([s0(x), s1(x)], None, Batch(x, y))["loss"].backward()
    total_grads = [p.grad.clone() for p in s1.parameters()]
    module.zero_grad(set_to_none=True)
    module.distillation_losses([s0(x), s1(x)], None, Batch(x, y))["student1_loss"].backward()
    assert all(torch.allclose(a, p.grad) for a, p in zip(total_grads, s1.parameters()))


def test_loss_function_needs_two_models():
    with pytest.raises(ValueError, match="at least two models"):
        mutual_loss([torch.zeros(2, 3)])
    # one student and a teacher is plain KD
    s, t = torch.randn(4, 5), torch.randn(4, 5)
    assert torch.allclose(mutual_loss([s], 1.0, teacher_logits=t)[0], _kl(t, s, 1.0), rtol=1e-5)


# ------------------------------------------------------------------ construction
def test_copies_are_seeded_and_different():
    base = DigitsMLP()
    a = MutualLearning(base, num_students=3, seed=0)
    b = MutualLearning(DigitsMLP(), num_students=3, seed=0)
    assert a.student is a.students[0] is base
    w = [s.head.weight for s in a.students]
    assert not torch.equal(w[0], w[1]) and not torch.equal(w[1], w[2]) and not torch.equal(w[0], w[2])
    assert torch.equal(a.students[1].head.weight, b.students[1].head.weight)  # same seed, same copies
    assert torch.equal(a.students[2].block1[1].weight, b.students[2].block1[1].weight)
    assert "students" not in a.hparams and a.hparams["num_students"] == 3


def test_bad_arguments_are_rejected():
    a, b = DigitsMLP(), DigitsMLP()
    with pytest.raises(ValueError, match="exactly one of `student`"):
        MutualLearning(a, students=[a, b])
    with pytest.raises(ValueError, match="exactly one of `student`"):
        MutualLearning()
    with pytest.raises(ValueError, match=r"`num_students` must be an integer >= 2, got 1"):
        MutualLearning(a, num_students=1)
    with pytest.raises(ValueError, match="at least 2 modules, got 1"):
        MutualLearning(students=[a])
    with pytest.raises(ValueError, match="same module object twice"):
        MutualLearning(students=[a, a])
    with pytest.raises(ValueError, match="`teacher` is also one of the students"):
        MutualLearning(students=[a, b], teacher=b)
    with pytest.raises(ValueError, match=r"`num_students`=3 disagrees with the 2 modules"):
        MutualLearning(students=[a, b], num_students=3)
    with pytest.raises(ValueError, match=r"`alpha` must be in \[0, 1\]"):
        MutualLearning(a, alpha=-0.1)
    with pytest.raises(ValueError, match="`temperature` must be a finite number > 0"):
        MutualLearning(a, temperature=-1.0)
    with pytest.raises(ValueError, match="the students disagree on the number of classes"):
        MutualLearning(students=[DigitsMLP(num_classes=10), DigitsMLP(num_classes=7)]).probe_outputs(torch.zeros(2, 1, 8, 8))


# ------------------------------------------------------------------ a fit with a frozen teacher
class _Recorder(L.Callback):
    """Forwards per model per step, teacher state at every use, losses, optimizer contents."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}
        self.per_step: list[dict[str, int]] = []
        self.teacher_calls: list[tuple[bool, bool, bool]] = []
        self.losses: list[float] = []
        self.optimizer_ids: set[int] = set()
        self.handles = []

    def on_train_start(self, trainer, pl_module):
        models = {f"student{k}": s for k, s in enumerate(pl_module.students)} | {"teacher": pl_module.teacher}
        for name, model in models.items():
            self.handles.append(model.register_forward_hook(lambda m, a, o, name=name: self._count(name)))
        self.handles.append(pl_module.teacher.register_forward_pre_hook(
            lambda m, a: self.teacher_calls.append((m.training, torch.is_grad_enabled(), torch.is_inference_mode_enabled()))
        ))
        self.optimizer_ids = {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}

    def _count(self, name: str) -> None:
        self.counts[name] = self.counts.get(name, 0) + 1

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.counts = {}
        pl_module.teacher.train()  # a hostile user

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.per_step.append(dict(self.counts))
        self.losses.append(float(outputs["loss"] if isinstance(outputs, dict) else outputs))

    def on_train_end(self, trainer, pl_module):
        for handle in self.handles:
            handle.remove()


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    root = tmp_path_factory.mktemp("dml")
    torch.manual_seed(0)
    teacher = DigitsCNN()  # BatchNorm + Dropout
    module = MutualLearning(
        DigitsStudentCNN(), num_students=2, teacher=teacher, teacher_checkpoint="zoo:digits_cnn",
        temperature=2.0, alpha=0.5, seed=0,
    )
    before = {"teacher": _state(teacher), "students": [_state(s) for s in module.students]}
    recorder = _Recorder()
    ckpt = L.pytorch.callbacks.ModelCheckpoint(dirpath=root / "ckpt", save_last=True)
    trainer = _trainer(root, 2, callbacks=[recorder, ckpt], enable_checkpointing=True)
    dm = DigitsDataModule(batch_size=32, shuffle_seed=0)
    with pytest.warns(UserWarning, match="teacher submodule was in train mode"):
        trainer.fit(module, datamodule=dm)
    return module, trainer, recorder, before, dm, root


def test_contract_after_fit(fitted):
    module, trainer, recorder, before, _, root = fitted
    # the frozen teacher: eval + no_grad at every use, bit-identical, no gradient, not optimised
    assert recorder.teacher_calls
    assert all(not training and not grad and not inf for training, grad, inf in recorder.teacher_calls)
    assert all(torch.equal(module.teacher.state_dict()[k], v) for k, v in before["teacher"].items())
    assert all(p.grad is None and not p.requires_grad for p in module.teacher.parameters())
    assert not recorder.optimizer_ids & {id(p) for p in module.teacher.parameters()}
    # every student: every parameter optimised and changed, BatchNorm statistics updated
    for k, student in enumerate(module.students):
        for name, p in student.named_parameters():
            assert id(p) in recorder.optimizer_ids, f"students.{k}.{name} is not optimised"
            assert not torch.equal(p.detach(), before["students"][k][name]), f"students.{k}.{name} did not change"
        key = "block1.0.1.running_mean"
        assert not torch.equal(student.state_dict()[key], before["students"][k][key])
    assert recorder.losses and all(math.isfinite(v) for v in recorder.losses)
    # the checkpoint holds every student and no teacher
    state = torch.load(root / "ckpt" / "last.ckpt", weights_only=True)["state_dict"]
    assert not [k for k in state if k.startswith("teacher.")]
    assert [k for k in state if k.startswith("students.1.")] and [k for k in state if k.startswith("students.0.")]


def test_one_forward_per_model_per_step(fitted):
    _, _, recorder, _, _, _ = fitted
    assert len(recorder.per_step) == 6
    assert all(step == {"student0": 1, "student1": 1, "teacher": 1} for step in recorder.per_step), recorder.per_step


def test_logged_keys(fitted):
    module, trainer, _, _, _, _ = fitted
    metrics = trainer.callback_metrics
    for key in ("train/loss", "train/task_loss", "train/kd_loss", "train/student0_loss", "train/student1_loss",
                "val/acc", "val/student0_acc", "val/student1_acc", "val/ensemble_acc", "val/teacher_acc",
                "val/agreement", "val/kl"):
        assert key in metrics, key
    assert metrics["val/student0_acc"] == metrics["val/acc"]
    mean = (metrics["train/student0_loss"] + metrics["train/student1_loss"]) / 2
    assert metrics["train/loss"].item() == pytest.approx(mean.item(), rel=1e-5)
    assert module.last_validation["val/student1_acc"] == pytest.approx(metrics["val/student1_acc"].item())


def test_ensemble_accuracy_matches_an_independent_computation(fitted, tmp_path):
    module, _, _, _, dm, _ = fitted
    trainer = _trainer(tmp_path, 1, limit_val_batches=3)
    result = trainer.validate(module, datamodule=dm, verbose=False)[0]
    module.eval()
    correct = [0, 0]
    ensemble = total = 0
    with torch.no_grad():
        for i, (x, y, _) in enumerate(dm.val_dataloader()):
            if i == 3:
                break
            logits = [s(x) for s in module.students]
            probs = (logits[0].softmax(-1) + logits[1].softmax(-1)) / 2
            ensemble += int((probs.argmax(-1) == y).sum())
            for k in range(2):
                correct[k] += int((logits[k].argmax(-1) == y).sum())
            total += len(y)
    assert result["val/ensemble_acc"] == pytest.approx(ensemble / total)
    assert result["val/student0_acc"] == pytest.approx(correct[0] / total) == pytest.approx(result["val/acc"])
    assert result["val/student1_acc"] == pytest.approx(correct[1] / total)


def test_best_student_and_export(fitted, tmp_path):
    module, _, _, _, _, _ = fitted
    module.last_validation = {"val/student0_acc": 0.5, "val/student1_acc": 0.75}
    assert module.best_student_index() == 1 and module.best_student() is module.students[1]
    path = tmp_path / "sub" / "best.pt"
    assert module.export_best_student(path) == 1
    saved = torch.load(path, weights_only=True)
    assert all(torch.equal(saved[k], v) for k, v in module.students[1].state_dict().items())
    copy = DigitsStudentCNN()
    load_weights(copy, str(path))  # usable as a teacher_checkpoint
    with pytest.raises(ValueError, match="no value of 'val/student0_f1' found"):
        module.best_student(metric="val/student{k}_f1")


def test_resume_restores_every_student(tmp_path):
    def build() -> MutualLearning:
        L.seed_everything(7, verbose=False)
        return MutualLearning(
            DigitsStudentCNN(), num_students=2, seed=3,
            optimizer=lambda params: torch.optim.SGD(params, lr=0.05, momentum=0.9),
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5),
        )

    fast = dict(limit_train_batches=3, limit_val_batches=1)
    straight = build()
    _trainer(tmp_path / "a", 3, **fast).fit(straight, datamodule=DigitsDataModule(shuffle_seed=3))
    first = build()
    ckpt = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    _trainer(tmp_path / "b", 1, callbacks=[ckpt], enable_checkpointing=True, **fast).fit(
        first, datamodule=DigitsDataModule(shuffle_seed=3)
    )
    resumed = build()
    trainer = _trainer(tmp_path / "c", 3, **fast)
    trainer.fit(resumed, datamodule=DigitsDataModule(shuffle_seed=3), ckpt_path=tmp_path / "ckpt" / "last.ckpt")
    assert trainer.global_step == 9
    for key, value in straight.state_dict().items():
        assert torch.equal(resumed.state_dict()[key], value), f"{key} differs after resume"
    assert not torch.equal(first.students[1].head.weight, straight.students[1].head.weight)
    assert resumed.last_validation == straight.last_validation
    with pytest.raises(ValueError, match="the checkpoint holds 2 students, this module has 3"):
        MutualLearning.load_from_checkpoint(tmp_path / "ckpt" / "last.ckpt", student=DigitsStudentCNN(), num_students=3)
