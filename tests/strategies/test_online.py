"""OnlineDistillation: EMA update rule, frozen EMA copy, finite loss for extreme logits, detached target, resume."""

from __future__ import annotations

import itertools
import math

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from lightning_distill.models import DigitsCNN, DigitsMLP, DigitsStudentCNN
from lightning_distill.module import Batch
from lightning_distill.strategies.online import OnlineDistillation


def _state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _small(**kwargs) -> OnlineDistillation:
    torch.manual_seed(0)
    # a teacher with BatchNorm (float running stats + integer num_batches_tracked) and no dropout
    return OnlineDistillation(DigitsMLP(hidden=8), DigitsStudentCNN(width=4), **kwargs)


# --------------------------------------------------------------------------------------------
# the EMA update rule
# --------------------------------------------------------------------------------------------


def test_update_ema_follows_the_recursion_by_hand():
    module = _small(ema_decay=0.75)
    d = 0.75
    expected = {k: v.double() for k, v in _state(module.ema_teacher).items()}
    g = torch.Generator().manual_seed(1)
    for _ in range(4):
        with torch.no_grad():  # the "optimizer" moves every teacher tensor somewhere new
            for v in module.online_teacher.state_dict().values():
                v.copy_(torch.randint(0, 50, v.shape, generator=g) if not v.is_floating_point() else torch.randn(v.shape, generator=g))
        live = _state(module.online_teacher)
        module.update_ema()
        for k, v in live.items():
            expected[k] = d * expected[k] + (1 - d) * v.double() if v.is_floating_point() else v.double()
    for k, v in _state(module.ema_teacher).items():
        torch.testing.assert_close(v.double(), expected[k], rtol=1e-6, atol=1e-6, msg=k)
    assert _state(module.ema_teacher)["block1.0.1.num_batches_tracked"] == live["block1.0.1.num_batches_tracked"]


class _RecordTeacher(L.Callback):
    """Teacher tensors after every optimizer step, keyed by global step."""

    def __init__(self) -> None:
        self.by_step: dict[int, dict[str, torch.Tensor]] = {}
        self.ema_trained_calls: list[tuple[bool, bool]] = []

    def on_train_start(self, trainer, pl_module):
        self.by_step[0] = _state(pl_module.online_teacher)
        self.ema_initial = _state(pl_module.ema_teacher)

        def hook(module, args):
            self.ema_trained_calls.append((module.training, torch.is_grad_enabled()))

        pl_module.ema_teacher.register_forward_pre_hook(hook)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        pl_module.ema_teacher.train()  # hostile: the EMA copy must still run in eval mode

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        # first record of a step = the state right after that optimizer step (a batch that only
        # accumulates still changes the BatchNorm statistics, so later records would differ)
        self.by_step.setdefault(trainer.global_step, _state(pl_module.online_teacher))
        self.optimizer_ids = {id(p) for opt in trainer.optimizers for g in opt.param_groups for p in g["params"]}


def test_ema_during_fit_is_the_recursion_over_optimizer_steps(digits_dm, make_trainer):
    d = 0.8
    module = _small(ema_decay=d)
    recorder = _RecordTeacher()
    # 6 batches with accumulation 2 -> 3 optimizer steps: one EMA update per step, not per batch
    trainer = make_trainer(max_epochs=1, limit_train_batches=6, limit_val_batches=1, accumulate_grad_batches=2, callbacks=[recorder])
    trainer.fit(module, datamodule=digits_dm)
    assert trainer.global_step == 3 and sorted(recorder.by_step) == [0, 1, 2, 3]
    expected = {k: v.double() for k, v in recorder.ema_initial.items()}
    assert all(torch.equal(recorder.ema_initial[k], v) for k, v in recorder.by_step[0].items())  # starts as a copy
    for step in (1, 2, 3):
        for k, v in recorder.by_step[step].items():
            expected[k] = d * expected[k] + (1 - d) * v.double() if v.is_floating_point() else v.double()
    ema = _state(module.ema_teacher)
    for k, v in ema.items():
        torch.testing.assert_close(v.double(), expected[k], rtol=1e-6, atol=1e-6, msg=k)
    assert not torch.equal(ema["head.weight"], recorder.by_step[3]["head.weight"])  # it lags behind the teacher

    # frozen: eval + no_grad at every use although a callback switched it to train mode; never a gradient
    assert recorder.ema_trained_calls and all(not training and not grad for training, grad in recorder.ema_trained_calls)
    assert all(not p.requires_grad and p.grad is None for p in module.ema_teacher.parameters())
    assert not ({id(p) for p in module.ema_teacher.parameters()} & recorder.optimizer_ids)
    # ... while the online teacher and the student are both optimised
    for p in list(module.online_teacher.parameters()) + list(module.student.parameters()):
        assert id(p) in recorder.optimizer_ids


def test_ema_copy_is_frozen_and_stays_in_eval_mode():
    module = _small(ema_decay=0.9)
    module.train()
    assert module.online_teacher.training and module.student.training
    assert not any(m.training for m in module.ema_teacher.modules())
    frozen = {id(p) for p in module.frozen_parameters()}
    assert frozen == {id(p) for p in module.ema_teacher.parameters()}
    grouped = {id(p) for g in module.parameter_groups() for p in g["params"]}
    assert not (grouped & frozen)
    assert {id(p) for p in module.online_teacher.parameters()} <= grouped


# --------------------------------------------------------------------------------------------
# the loss
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ema", [False, True])
def test_loss_is_teacher_ce_plus_student_ce_plus_t2_kl(ema):
    module = _small(ema_decay=0.9 if ema else None, temperature=2.0, alpha=0.3, teacher_loss_weight=0.5)
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(6, 1, 8, 8, generator=g), torch.randint(0, 10, (6,), generator=g)
    s, t = torch.randn(6, 10, generator=g), torch.randn(6, 10, generator=g)
    terms = module.distillation_losses(s, t, Batch(x, y))
    target = module.ema_teacher.eval()(x).detach() if ema else t
    p_t = (target / 2.0).softmax(-1)
    kl = (p_t * (p_t.log() - (s / 2.0).log_softmax(-1))).sum(-1).mean() * 4.0
    expected = {"teacher_loss": F.cross_entropy(t, y), "task_loss": F.cross_entropy(s, y), "kd_loss": kl}
    for name, value in expected.items():
        assert math.isclose(terms[name].item(), value.item(), rel_tol=1e-5), name
    total = 0.5 * expected["teacher_loss"] + 0.7 * expected["task_loss"] + 0.3 * kl
    assert math.isclose(terms["loss"].item(), total.item(), rel_tol=1e-5)


_EXTREME = st.sampled_from([-1e4, 1e4, 0.0]) | st.floats(-1e4, 1e4, width=32)


@settings(max_examples=40, deadline=None)
@given(
    data=st.data(),
    n=st.integers(1, 4),
    c=st.integers(2, 6),
    temperature=st.floats(0.5, 20.0),
    alpha=st.floats(0.0, 1.0),
    ema=st.booleans(),
)
def test_loss_and_gradient_finite_for_extreme_logits(data, n, c, temperature, alpha, ema):
    """The online loss and its gradient are finite for extreme logits."""
    values = st.lists(_EXTREME, min_size=n * c, max_size=n * c)
    s = torch.tensor(data.draw(values), dtype=torch.float32).reshape(n, c).requires_grad_()
    t = torch.tensor(data.draw(values), dtype=torch.float32).reshape(n, c).requires_grad_()
    x = torch.tensor(data.draw(values), dtype=torch.float32).reshape(n, c)  # the EMA teacher's logits
    y = torch.tensor(data.draw(st.lists(st.integers(0, c - 1), min_size=n, max_size=n)))
    # identity "networks": the EMA copy of an identity returns its input, so x is the EMA target
    module = OnlineDistillation(nn.Identity(), nn.Identity(), ema_decay=0.9 if ema else None, temperature=temperature, alpha=alpha)
    terms = module.distillation_losses(s, t, Batch(x, y))
    assert all(torch.isfinite(v) for v in terms.values()), terms
    terms["loss"].backward()
    assert torch.isfinite(s.grad).all() and torch.isfinite(t.grad).all()


@pytest.mark.parametrize("ema", [False, True])
def test_kd_term_never_reaches_the_teacher(ema):
    module = _small(ema_decay=0.9 if ema else None, alpha=0.9)
    module.train()
    g = torch.Generator().manual_seed(2)
    x, y = torch.rand(8, 1, 8, 8, generator=g), torch.randint(0, 10, (8,), generator=g)
    student_logits, teacher_logits = module.forward_models(x)
    terms = module.distillation_losses(student_logits, teacher_logits, Batch(x, y))
    assert teacher_logits.extras["online_logits"].requires_grad  # the teacher does train (through its own CE)
    terms["kd_loss"].backward(retain_graph=True)
    assert all(p.grad is None or not p.grad.any() for p in module.online_teacher.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.student.parameters())
    # the full loss gives the teacher exactly the gradient of its own weighted cross-entropy
    module.zero_grad(set_to_none=True)
    terms["loss"].backward(retain_graph=True)
    full = [p.grad.clone() for p in module.online_teacher.parameters()]
    module.zero_grad(set_to_none=True)
    (module.teacher_loss_weight * terms["teacher_loss"]).backward()
    for a, b in zip(full, (p.grad for p in module.online_teacher.parameters())):
        torch.testing.assert_close(a, b)


# --------------------------------------------------------------------------------------------
# validation metrics, checkpoints, resume
# --------------------------------------------------------------------------------------------


def test_validation_logs_student_teacher_ema_and_agreement_with_the_ema_target(digits_dm, make_trainer):
    module = _small(ema_decay=0.9)
    trainer = make_trainer(max_epochs=1, limit_train_batches=3, limit_val_batches=2)
    trainer.fit(module, datamodule=digits_dm)
    logged = trainer.callback_metrics
    for key in ("train/loss", "train/teacher_loss", "train/task_loss", "train/kd_loss", "val/acc", "val/teacher_acc",
                "val/ema_teacher_acc", "val/agreement", "val/kl", "val/loss"):
        assert key in logged, key
    module.eval()
    hits = {"acc": 0, "teacher": 0, "ema": 0, "agree": 0}
    total = 0
    with torch.no_grad():
        for x, y, _ in itertools.islice(digits_dm.val_dataloader(), 2):  # the batches validation used
            s, t, e = module.student(x).argmax(-1), module.online_teacher(x).argmax(-1), module.ema_teacher(x).argmax(-1)
            hits["acc"] += int((s == y).sum())
            hits["teacher"] += int((t == y).sum())
            hits["ema"] += int((e == y).sum())
            hits["agree"] += int((s == e).sum())
            total += len(y)
    for key, name in (("acc", "val/acc"), ("teacher", "val/teacher_acc"), ("ema", "val/ema_teacher_acc"), ("agree", "val/agreement")):
        assert math.isclose(float(logged[name]), hits[key] / total, abs_tol=1e-6), name


def test_checkpoint_holds_both_teachers_and_round_trips(digits_dm, make_trainer, tmp_path):
    module = _small(ema_decay=0.9)
    trainer = make_trainer(max_epochs=1, limit_train_batches=2, limit_val_batches=1)
    trainer.fit(module, datamodule=digits_dm)
    path = tmp_path / "online.ckpt"
    trainer.save_checkpoint(path)
    state = torch.load(path, weights_only=True)["state_dict"]
    assert any(k.startswith("online_teacher.") for k in state) and any(k.startswith("ema_teacher.") for k in state)
    restored = OnlineDistillation.load_from_checkpoint(path, student=DigitsMLP(hidden=8), teacher=DigitsStudentCNN(width=4))
    assert restored.ema_decay == 0.9 and restored.temperature == 3.0
    for key, value in module.state_dict().items():
        assert torch.equal(restored.state_dict()[key], value), key
    assert not restored.ema_teacher.training and not any(p.requires_grad for p in restored.ema_teacher.parameters())


def _resume_module() -> OnlineDistillation:
    L.seed_everything(7, verbose=False)
    # no dropout anywhere: Lightning does not checkpoint the global RNG, so dropout masks would differ
    return OnlineDistillation(
        DigitsStudentCNN(), DigitsCNN(width=4, dropout=0.0), ema_decay=0.8,
        optimizer=lambda params: torch.optim.SGD(params, lr=0.05, momentum=0.9),
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5),
    )


def test_resume_matches_uninterrupted_run_including_ema(resume_runs):
    straight, first, resumed, trainer = resume_runs(_resume_module, 2, 1)

    assert trainer.global_step == 8 and trainer.current_epoch == 2
    assert trainer.lr_scheduler_configs[0].scheduler.get_last_lr()[0] == 0.05 * 0.5**2
    for key, value in straight.state_dict().items():
        assert torch.equal(resumed.state_dict()[key], value), f"{key} differs after resume"
    assert not torch.equal(first.ema_teacher.head.weight, straight.ema_teacher.head.weight)


# --------------------------------------------------------------------------------------------
# arguments and class counts
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [1.0, 1.5, -0.1, True, "0.9"])
def test_bad_ema_decay_is_rejected(bad):
    with pytest.raises(ValueError, match=r"`ema_decay` must be in \[0, 1\) or None"):
        _small(ema_decay=bad)


@pytest.mark.parametrize("bad", [-1.0, float("inf"), float("nan"), None])
def test_bad_teacher_loss_weight_is_rejected(bad):
    with pytest.raises(ValueError, match="`teacher_loss_weight` must be a finite number >= 0"):
        _small(teacher_loss_weight=bad)


def test_missing_or_shared_teacher_is_rejected():
    with pytest.raises(ValueError, match="needs a `teacher` module"):
        OnlineDistillation(DigitsMLP(), None)
    student = DigitsMLP()
    with pytest.raises(ValueError, match="same module object"):
        OnlineDistillation(student, student)


def test_bad_temperature_alpha_kl_are_rejected():
    with pytest.raises(ValueError, match="`temperature` must be a finite number > 0"):
        _small(temperature=0.0)
    with pytest.raises(ValueError, match=r"`alpha` must be in \[0, 1\]"):
        _small(alpha=1.5)
    with pytest.raises(ValueError, match="`kl` must be one of"):
        _small(kl="kullback")


def test_teacher_checkpoint_warm_starts_teacher_and_ema():
    module = OnlineDistillation(DigitsMLP(), DigitsCNN(), ema_decay=0.99, teacher_checkpoint="zoo:digits_cnn")
    reference = DigitsCNN()
    from lightning_distill.checkpoint import load_weights

    load_weights(reference, "zoo:digits_cnn")
    for key, value in reference.state_dict().items():
        assert torch.equal(module.online_teacher.state_dict()[key], value)
        assert torch.equal(module.ema_teacher.state_dict()[key], value)


def test_class_count_mismatch_fails_before_training(digits_dm, make_trainer):
    module = OnlineDistillation(DigitsMLP(num_classes=10), DigitsStudentCNN(num_classes=7))
    trainer = make_trainer(max_epochs=1)
    with pytest.raises(ValueError, match=r"the online teacher \(DigitsStudentCNN\) outputs 7, the student \(DigitsMLP\) outputs 10"):
        trainer.fit(module, datamodule=digits_dm)
    assert trainer.global_step == 0
