"""MultiTeacherDistillation: weighting schemes, the mixture loss, the frozen teachers, the gate, errors, resume."""

from __future__ import annotations

import itertools
import math

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_distill.checkpoint import load_weights
from lightning_distill.losses import confidence_weights, multi_teacher_kd_loss, teacher_mixture_log_probs
from lightning_distill.models import DigitsCNN, DigitsMLP, DigitsStudentCNN
from lightning_distill.module import Batch
from lightning_distill.strategies.multi_teacher import MultiTeacherDistillation


def _state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _teachers(n: int = 2, **kwargs) -> list[torch.nn.Module]:
    return [DigitsCNN(width=4, **kwargs) for _ in range(n)]


def _module(weighting: str = "mean", n: int = 2, **kwargs) -> MultiTeacherDistillation:
    torch.manual_seed(0)
    return MultiTeacherDistillation(DigitsMLP(hidden=8), _teachers(n), weighting=weighting, **kwargs)


def _randomise_gate(module: MultiTeacherDistillation, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.gate.parameters():
            p.copy_(torch.randn(p.shape, generator=g))


def _ref_kd(student, teacher_list, weights, temperature) -> float:
    """Explicit loops in float64: T^2 * mean_i sum_c p_ic log(p_ic / q_ic), p_i = sum_m w_im softmax(z_im / T)."""
    s = student.double()
    total = 0.0
    for i in range(s.shape[0]):
        p = sum(float(weights[i, m]) * (teacher_list[m][i].double() / temperature).softmax(-1) for m in range(len(teacher_list)))
        q = (s[i] / temperature).softmax(-1)
        total += float(sum(p[c] * math.log(p[c] / q[c]) for c in range(s.shape[1]) if p[c] > 0))
    return temperature**2 * total / s.shape[0]


# --------------------------------------------------------------------------------------------
# weighting schemes
# --------------------------------------------------------------------------------------------


@settings(max_examples=30, deadline=None)
@given(
    data=st.data(),
    m=st.integers(1, 4),
    n=st.integers(1, 5),
    c=st.integers(2, 6),
    temperature=st.floats(0.5, 10.0),
    weighting=st.sampled_from(["mean", "confidence", "learned"]),
)
def test_weights_sum_to_one_per_sample(data, m, n, c, temperature, weighting):
    values = st.lists(st.sampled_from([-1e4, 1e4, 0.0]) | st.floats(-50.0, 50.0, width=32), min_size=m * n * c, max_size=m * n * c)
    logits = torch.tensor(data.draw(values), dtype=torch.float32).reshape(m, n, c)
    module = MultiTeacherDistillation(
        DigitsMLP(num_classes=c), [DigitsCNN(num_classes=c, width=2) for _ in range(m)], weighting=weighting,
        temperature=temperature, num_classes=c, gate_hidden=4,
    )
    if weighting == "learned":
        _randomise_gate(module, seed=data.draw(st.integers(0, 100)))
    weights = module.teacher_weights(logits)
    assert weights.shape == (n, m)
    assert torch.isfinite(weights).all() and (weights >= 0).all()
    torch.testing.assert_close(weights.sum(-1), torch.ones(n), rtol=0, atol=1e-5)
    assert torch.isfinite(teacher_mixture_log_probs(logits, weights, temperature)).all()


def test_mean_mixture_is_the_plain_average_of_softmaxes():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 7, generator=g) * 3
    weights = _module("mean", n=3).teacher_weights(logits)
    assert torch.equal(weights, torch.full((5, 3), 1 / 3))
    expected = sum((logits[m] / 2.0).softmax(-1) for m in range(3)) / 3
    torch.testing.assert_close(teacher_mixture_log_probs(logits, weights, 2.0).exp(), expected)


def test_confidence_favours_the_sharper_teacher_by_inverse_entropy():
    g = torch.Generator().manual_seed(1)
    base = torch.randn(6, 10, generator=g)
    logits = torch.stack([0.2 * base, 5.0 * base])  # teacher 1 is the sharp one
    weights = confidence_weights(logits, temperature=2.0)
    assert (weights[:, 1] > weights[:, 0]).all()
    # against the formula written out: w ∝ 1 / (H + eps)
    p = (logits.double() / 2.0).softmax(-1)
    inv = 1.0 / (-(p * p.log()).sum(-1) + 1e-6)  # [M, N]
    torch.testing.assert_close(weights.double(), (inv / inv.sum(0)).T, rtol=1e-5, atol=1e-6)
    # equal entropies -> the plain mean; one-hot teachers stay finite
    assert torch.allclose(confidence_weights(torch.stack([base, base.flip(-1)])), torch.full((6, 2), 0.5))
    one_hot = torch.stack([1e4 * F.one_hot(torch.arange(6) % 10, 10).float(), base])
    w = confidence_weights(one_hot)
    assert torch.isfinite(w).all() and (w[:, 0] > 0.99).all()


# --------------------------------------------------------------------------------------------
# the loss
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_multi_teacher_kd_matches_explicit_loop(temperature):
    g = torch.Generator().manual_seed(2)
    s = torch.randn(4, 5, generator=g)
    teachers = [torch.randn(4, 5, generator=g) * 2 for _ in range(3)]
    weights = torch.rand(4, 3, generator=g)
    weights = weights / weights.sum(-1, keepdim=True)
    loss = multi_teacher_kd_loss(s, teachers, weights, temperature)
    assert loss.dtype == torch.float32
    assert math.isclose(loss.item(), _ref_kd(s, teachers, weights, temperature), rel_tol=1e-5)
    # a stacked tensor is the same as the list; identical student and mixture give 0
    assert torch.equal(multi_teacher_kd_loss(s, torch.stack(teachers), weights, temperature), loss)
    same = multi_teacher_kd_loss(s, [s, s], torch.full((4, 2), 0.5), temperature)
    assert abs(same.item()) < 1e-6


def test_multi_teacher_kd_token_level_uses_the_mask():
    g = torch.Generator().manual_seed(3)
    s = torch.randn(2, 3, 5, generator=g)
    teachers = torch.randn(2, 2, 3, 5, generator=g)
    weights = torch.softmax(torch.randn(2, 3, 2, generator=g), -1)
    mask = torch.tensor([[True, True, False], [True, False, True]])
    loss = multi_teacher_kd_loss(s, teachers, weights, 2.0, mask=mask)
    flat_w = weights[mask]
    expected = _ref_kd(s[mask], [teachers[0][mask], teachers[1][mask]], flat_w, 2.0)
    assert math.isclose(loss.item(), expected, rel_tol=1e-5)


@pytest.mark.parametrize("weighting", ["mean", "confidence", "learned"])
def test_module_loss_equals_independent_computation(weighting):
    module = _module(weighting, n=3, temperature=3.0, alpha=0.6, num_classes=10)
    if weighting == "learned":
        _randomise_gate(module)
    g = torch.Generator().manual_seed(4)
    s, t = torch.randn(6, 10, generator=g), torch.randn(3, 6, 10, generator=g) * 2
    y = torch.randint(0, 10, (6,), generator=g)
    terms = module.distillation_losses(s, t, Batch(None, y))
    if weighting == "mean":
        weights = torch.full((6, 3), 1 / 3)
    elif weighting == "confidence":
        p = (t.double() / 3.0).softmax(-1)
        inv = 1.0 / (-(p * p.log()).sum(-1) + 1e-6)
        weights = (inv / inv.sum(0)).T
    else:  # the gate written out: MLP on the concatenated softened predictions, softmax over teachers
        feats = (t / 3.0).softmax(-1).permute(1, 0, 2).reshape(6, 30)
        weights = (F.relu(feats @ module.gate.fc1.weight.T + module.gate.fc1.bias) @ module.gate.fc2.weight.T + module.gate.fc2.bias).softmax(-1)
    kd = _ref_kd(s, list(t), weights.detach(), 3.0)
    ce = F.cross_entropy(s, y).item()
    assert math.isclose(terms["kd_loss"].item(), kd, rel_tol=1e-5)
    assert math.isclose(terms["task_loss"].item(), ce, rel_tol=1e-5)
    assert math.isclose(terms["loss"].item(), 0.4 * ce + 0.6 * kd, rel_tol=1e-5)
    for m in range(3):
        assert math.isclose(terms[f"teacher{m}_weight"].item(), weights[:, m].mean().item(), rel_tol=1e-5)


def test_loss_is_finite_for_extreme_teacher_logits():
    module = _module("learned", n=2, num_classes=10)
    _randomise_gate(module)
    t = torch.stack([1e4 * F.one_hot(torch.arange(4) % 10, 10).float(), -1e4 * torch.ones(4, 10)])
    s = (1e4 * torch.randn(4, 10)).requires_grad_()
    terms = module.distillation_losses(s, t, Batch(None, torch.arange(4)))
    terms["loss"].backward()
    assert torch.isfinite(terms["loss"]) and torch.isfinite(s.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in module.gate.parameters())


# --------------------------------------------------------------------------------------------
# training: frozen teachers, the learned gate, metrics
# --------------------------------------------------------------------------------------------


class _Recorder(L.Callback):
    def __init__(self) -> None:
        self.calls: list[tuple[bool, bool]] = []

    def on_train_start(self, trainer, pl_module):
        for teacher in pl_module.teachers:
            teacher.register_forward_pre_hook(lambda mod, args: self.calls.append((mod.training, torch.is_grad_enabled())))
        self.optimizer_ids = {id(p) for opt in trainer.optimizers for g in opt.param_groups for p in g["params"]}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        pl_module.teachers[batch_idx % 2].train()  # hostile: one member at a time


def test_teachers_are_frozen_and_bit_identical_and_the_gate_is_optimised(digits_dm, make_trainer):
    module = _module("learned", teacher_checkpoints=None)
    module.teachers[0].load_state_dict(_state(DigitsCNN(width=4)))  # different weights per teacher
    teachers_before = [_state(t) for t in module.teachers]
    recorder = _Recorder()
    trainer = make_trainer(max_epochs=2, limit_train_batches=3, limit_val_batches=1, callbacks=[recorder])
    with pytest.warns(UserWarning, match="teacher submodule was in train mode"):
        trainer.fit(module, datamodule=digits_dm)
    assert len(recorder.calls) == 2 * (6 + 2)  # each teacher at every train step and val batch, eval mode, no grad
    assert all(not training and not grad for training, grad in recorder.calls)
    for teacher, before in zip(module.teachers, teachers_before):
        assert not teacher.training
        for key, value in before.items():
            assert torch.equal(teacher.state_dict()[key], value), key
        assert all(not p.requires_grad and p.grad is None for p in teacher.parameters())
        assert not ({id(p) for p in teacher.parameters()} & recorder.optimizer_ids)
    # the gate exists (built by the probe), is optimised and moved
    assert module.gate is not None
    gate_ids = {id(p) for p in module.gate.parameters()}
    assert gate_ids <= recorder.optimizer_ids
    fresh_fc2 = torch.zeros_like(module.gate.fc2.weight)
    assert not torch.equal(module.gate.fc2.weight, fresh_fc2)


def test_learned_gate_receives_gradients():
    module = _module("learned", num_classes=10)
    g = torch.Generator().manual_seed(5)
    s, t = torch.randn(6, 10, generator=g), torch.randn(2, 6, 10, generator=g) * 3
    module.distillation_losses(s.requires_grad_(), t, Batch(None, torch.randint(0, 10, (6,), generator=g)))["loss"].backward()
    # the last layer starts at zero (uniform weights) and receives the gradient first
    assert module.gate.fc2.weight.grad is not None and module.gate.fc2.weight.grad.abs().sum() > 0
    assert module.gate.fc2.bias.grad.abs().sum() > 0


def test_validation_logs_each_teacher_and_agreement_with_the_mixture(digits_dm, make_trainer):
    module = MultiTeacherDistillation(DigitsMLP(hidden=8), [DigitsCNN(), DigitsCNN(width=4)], teacher_checkpoints=["zoo:digits_cnn", None],
                                      weighting="confidence", temperature=2.0)
    trainer = make_trainer(max_epochs=1, limit_train_batches=2, limit_val_batches=2)
    trainer.fit(module, datamodule=digits_dm)
    logged = trainer.callback_metrics
    for key in ("train/loss", "train/task_loss", "train/kd_loss", "train/teacher0_weight", "train/teacher1_weight",
                "val/acc", "val/teacher0_acc", "val/teacher1_acc", "val/teacher_acc", "val/agreement", "val/kl"):
        assert key in logged, key
    assert float(logged["train/teacher0_weight"]) > float(logged["train/teacher1_weight"])  # the trained one is sharper
    hits, total = {"t0": 0, "t1": 0, "mix": 0, "agree": 0}, 0
    with torch.no_grad():
        for x, y, _ in itertools.islice(digits_dm.val_dataloader(), 2):  # the batches validation used
            z = torch.stack([t(x) for t in module.teachers])
            w = confidence_weights(z, 2.0)
            mix = sum(w[:, m, None] * z[m].softmax(-1) for m in range(2)).argmax(-1)
            s = module.student.eval()(x).argmax(-1)
            hits["t0"] += int((z[0].argmax(-1) == y).sum())
            hits["t1"] += int((z[1].argmax(-1) == y).sum())
            hits["mix"] += int((mix == y).sum())
            hits["agree"] += int((s == mix).sum())
            total += len(y)
    assert float(logged["val/teacher0_acc"]) > 0.9  # the zoo teacher
    for key, name in (("t0", "val/teacher0_acc"), ("t1", "val/teacher1_acc"), ("mix", "val/teacher_acc"), ("agree", "val/agreement")):
        assert math.isclose(float(logged[name]), hits[key] / total, abs_tol=1e-6), name


# --------------------------------------------------------------------------------------------
# checkpoints and resume
# --------------------------------------------------------------------------------------------


def test_checkpoint_drops_teachers_keeps_gate_and_round_trips(digits_dm, make_trainer, tmp_path):
    module = _module("learned")
    trainer = make_trainer(max_epochs=1, limit_train_batches=2, limit_val_batches=1)
    trainer.fit(module, datamodule=digits_dm)
    path = tmp_path / "multi.ckpt"
    trainer.save_checkpoint(path)
    ckpt = torch.load(path, weights_only=True)
    assert not [k for k in ckpt["state_dict"] if k.startswith("teacher.")]
    assert "objectives.kd.gate.fc1.weight" in ckpt["state_dict"]
    assert "teachers" not in ckpt["hyper_parameters"] and ckpt["hyper_parameters"]["weighting"] == "learned"
    torch.manual_seed(0)
    restored = MultiTeacherDistillation.load_from_checkpoint(path, student=DigitsMLP(hidden=8), teachers=_teachers(2))
    for key, value in module.state_dict().items():  # teachers re-attached from the modules given
        assert torch.equal(restored.state_dict()[key], value), key
    assert all(not m.training for m in restored.teachers.modules())


def _resume_module() -> MultiTeacherDistillation:
    L.seed_everything(7, verbose=False)
    return MultiTeacherDistillation(
        DigitsStudentCNN(), [DigitsCNN(), DigitsCNN(width=4)], teacher_checkpoints=["zoo:digits_cnn", None],
        weighting="learned", gate_hidden=8,
        optimizer=lambda params: torch.optim.SGD(params, lr=0.05, momentum=0.9),
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5),
    )


def test_resume_matches_uninterrupted_run(resume_runs):
    straight, first, resumed, trainer = resume_runs(_resume_module, 2, 1)

    assert trainer.global_step == 8 and trainer.current_epoch == 2
    assert trainer.lr_scheduler_configs[0].scheduler.get_last_lr()[0] == 0.05 * 0.5**2
    for key, value in straight.state_dict().items():
        assert torch.equal(resumed.state_dict()[key], value), f"{key} differs after resume"
    assert not torch.equal(first.gate.fc2.weight, straight.gate.fc2.weight)


# --------------------------------------------------------------------------------------------
# errors
# --------------------------------------------------------------------------------------------


def test_teachers_with_different_class_counts_fail_before_any_step(digits_dm, make_trainer):
    module = MultiTeacherDistillation(DigitsMLP(), [DigitsCNN(width=4), DigitsCNN(num_classes=7, width=4)])
    before = _state(module.student)
    trainer = make_trainer(max_epochs=1)
    with pytest.raises(ValueError, match=r"teacher 0 \(DigitsCNN\) outputs 10, teacher 1 \(DigitsCNN\) outputs 7"):
        trainer.fit(module, datamodule=digits_dm)
    assert trainer.global_step == 0
    assert all(torch.equal(module.student.state_dict()[k], v) for k, v in before.items())


def test_student_with_different_class_count_fails_before_any_step(digits_dm, make_trainer):
    module = MultiTeacherDistillation(DigitsMLP(num_classes=7), _teachers(2))
    trainer = make_trainer(max_epochs=1)
    with pytest.raises(ValueError, match=r"outputs 10, the student \(DigitsMLP\) outputs 7"):
        trainer.fit(module, datamodule=digits_dm)
    assert trainer.global_step == 0


def test_teacher_checkpoints_are_loaded_per_teacher():
    module = MultiTeacherDistillation(DigitsMLP(), [DigitsCNN(), DigitsCNN()], teacher_checkpoints=[None, "zoo:digits_cnn"])
    reference = DigitsCNN()
    load_weights(reference, "zoo:digits_cnn")
    assert all(torch.equal(module.teachers[1].state_dict()[k], v) for k, v in reference.state_dict().items())
    assert not torch.equal(module.teachers[0].head.weight, reference.head.weight)


@pytest.mark.parametrize("checkpoints", [["zoo:digits_cnn"], [None, None, None], "zoo:digits_cnn"])
def test_teacher_checkpoints_of_the_wrong_length_are_rejected(checkpoints):
    with pytest.raises(ValueError, match="`teacher_checkpoints` must have one entry per teacher: got"):
        MultiTeacherDistillation(DigitsMLP(), _teachers(2), teacher_checkpoints=checkpoints)


def test_bad_arguments_are_rejected():
    with pytest.raises(ValueError, match=r"`weighting` must be one of \('mean', 'confidence', 'learned'\), got 'max'"):
        _module("max")
    with pytest.raises(ValueError, match="at least one teacher"):
        MultiTeacherDistillation(DigitsMLP(), [])
    with pytest.raises(TypeError, match="must be a list of modules"):
        MultiTeacherDistillation(DigitsMLP(), DigitsCNN())
    with pytest.raises(ValueError, match="takes `teachers`"):
        MultiTeacherDistillation(DigitsMLP(), _teachers(1), teacher=DigitsCNN())
    with pytest.raises(ValueError, match="takes `teacher_checkpoints`"):
        MultiTeacherDistillation(DigitsMLP(), _teachers(1), teacher_checkpoint="zoo:digits_cnn")
    shared = DigitsCNN()
    with pytest.raises(ValueError, match="same module object as an earlier teacher"):
        MultiTeacherDistillation(DigitsMLP(), [shared, shared])
    with pytest.raises(ValueError, match="`gate_hidden` must be an integer >= 1"):
        _module("learned", gate_hidden=0)
    with pytest.raises(ValueError, match="`temperature` must be a finite number > 0"):
        _module(temperature=-1.0)
    with pytest.raises(ValueError, match=r"`alpha` must be in \[0, 1\]"):
        _module(alpha=2.0)
