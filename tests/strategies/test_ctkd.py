"""CTKD: gradient reversal, the lambda ramp, temperature bounds, THE SIGN of the min-max game,
the anchor term, instance mode, optimizer groups, the teacher under no_grad, feature terms,
argument errors and checkpoints.

Expected values are recomputed here from the models called by hand and the pure functions of
:mod:`lightning_distill.losses` (``kd_loss``, ``mse_feature_loss``), never read back from the module.
"""

from __future__ import annotations

import csv
import functools
import math
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from lightning.pytorch.loggers import CSVLogger

from lightning_distill import CTKD
from lightning_distill.data import DigitsDataModule
from lightning_distill.losses import kd_loss, mse_feature_loss
from lightning_distill.models import DigitsCNN, DigitsMLP
from lightning_distill.module import Batch
from lightning_distill.objectives import FeatureMatch
from lightning_distill.strategies.ctkd import (
    GlobalTemperature,
    GradientReversal,
    InstanceTemperature,
    cosine_ramp,
    grad_reverse,
)

pytestmark = pytest.mark.usefixtures("single_thread", "seeded")

SIGMA_1 = 1.0 / (1.0 + math.exp(-1.0))


@pytest.fixture(scope="module")
def digits_batch() -> tuple[torch.Tensor, torch.Tensor]:
    dm = DigitsDataModule(batch_size=64, shuffle_seed=0)
    dm.setup("fit")
    return dm.train_dataset.inputs[:64].clone(), dm.train_dataset.targets[:64].clone()


def _ctkd(**kwargs) -> CTKD:
    kwargs.setdefault("teacher_checkpoint", "zoo:digits_cnn")
    return CTKD(DigitsMLP(), DigitsCNN(), **kwargs)


def _sgd(lr: float, **kwargs):
    return functools.partial(torch.optim.SGD, lr=lr, **kwargs)


def _tau(theta: torch.Tensor, t_start: float = 1.0, t_range: float = 20.0) -> torch.Tensor:
    return t_start + t_range * torch.sigmoid(theta)


def _csv_rows(logger: CSVLogger) -> list[dict[str, str]]:
    with open(Path(logger.log_dir) / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def _student_params(module: CTKD) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.student.named_parameters()}


# ---------------------------------------------------------------------------------------------
# gradient reversal
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("lam", [0.0, 0.5, 1.0, 2.0])
def test_gradient_reversal_is_identity_forward_and_negates_backward(lam):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, dtype=torch.float64, generator=g, requires_grad=True)
    weights = torch.randn(3, 4, dtype=torch.float64, generator=g)
    y = grad_reverse(x, lam)
    assert torch.equal(y, x.detach())
    assert y.shape == x.shape and y.dtype == x.dtype
    (y * weights).sum().backward()
    assert torch.equal(x.grad, -lam * weights)
    # the autograd Function directly, through a non-linear downstream op
    x2 = x.detach().clone().requires_grad_(True)
    GradientReversal.apply(x2, lam).pow(2).sum().backward()
    assert torch.allclose(x2.grad, -lam * 2 * x2.detach())


# ---------------------------------------------------------------------------------------------
# cosine ramp of lambda
# ---------------------------------------------------------------------------------------------


def test_cosine_ramp_values():
    length, lam_max = 8.0, 1.5
    assert cosine_ramp(0.0, length, lam_max) == 0.0
    assert cosine_ramp(length, length, lam_max) == pytest.approx(lam_max, abs=1e-12)
    for after in (length + 1e-9, length + 1, 10 * length):
        assert cosine_ramp(after, length, lam_max) == pytest.approx(lam_max, abs=1e-12)
    # E/4: 1/2 (1 - cos(pi/4)) = 1/2 - sqrt(2)/4 ;  E/2: 1/2 (1 - cos(pi/2)) = 1/2
    assert cosine_ramp(length / 4, length, lam_max) == pytest.approx(lam_max * (0.5 - math.sqrt(2) / 4), rel=1e-12)
    assert cosine_ramp(length / 2, length, lam_max) == pytest.approx(lam_max * 0.5, rel=1e-12)
    assert cosine_ramp(-3.0, length, lam_max) == 0.0  # before the start: no reversal


@pytest.mark.parametrize("progress", [0.0, 0.3, 5.0])
def test_cosine_ramp_zero_length_is_full_strength(progress):
    assert cosine_ramp(progress, 0.0, 0.7) == 0.7


@settings(max_examples=60, deadline=None)
@given(
    p1=st.floats(-2.0, 30.0),
    p2=st.floats(-2.0, 30.0),
    length=st.floats(0.0, 20.0),
    lam_max=st.floats(0.0, 5.0),
)
def test_cosine_ramp_is_monotone_and_bounded(p1, p2, length, lam_max):
    lo, hi = min(p1, p2), max(p1, p2)
    a, b = cosine_ramp(lo, length, lam_max), cosine_ramp(hi, length, lam_max)
    assert a <= b + 1e-12
    assert -1e-12 <= a <= lam_max + 1e-12 and -1e-12 <= b <= lam_max + 1e-12


# ---------------------------------------------------------------------------------------------
# temperature bounds and initialisation
# ---------------------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(theta=st.floats(-15.0, 15.0), t_start=st.floats(0.05, 5.0), t_range=st.floats(0.5, 40.0))
def test_temperature_stays_strictly_inside_the_bounds(theta, t_start, t_range):
    module = CTKD(DigitsMLP(), DigitsCNN(), t_start=t_start, t_range=t_range)
    with torch.no_grad():
        module.temperature_module.theta.fill_(theta)
    tau = module.temperature
    assert t_start < tau < t_start + t_range
    expected = t_start + t_range / (1.0 + math.exp(-theta))
    assert tau == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("theta", [-200.0, -40.0, 40.0, 200.0])
def test_extreme_theta_stays_within_closed_bounds(theta):
    # float32 sigmoid saturates at |theta| >~ 17: the value may reach a bound, never cross it
    module = CTKD(DigitsMLP(), DigitsCNN())
    with torch.no_grad():
        module.temperature_module.theta.fill_(theta)
    assert 1.0 <= module.temperature <= 21.0


@pytest.mark.parametrize(
    ("t_start", "t_range", "init"), [(1.0, 20.0, 4.0), (1.0, 20.0, 1.5), (1.0, 20.0, 20.5), (2.0, 3.0, 4.5), (0.5, 1.0, 0.6)]
)
def test_init_temperature_gives_exactly_that_tau(t_start, t_range, init, digits_batch):
    module = _ctkd(t_start=t_start, t_range=t_range, init_temperature=init)
    assert module.temperature == pytest.approx(init, rel=1e-6)
    # the inverse sigmoid is exact in float64; theta itself is a float32 parameter
    assert t_start + t_range / (1.0 + math.exp(-module.theta_init)) == pytest.approx(init, rel=1e-12)
    assert module.temperature_module.theta.item() == pytest.approx(module.theta_init, rel=1e-6, abs=1e-7)
    # and the tau actually used in the first step
    x, _ = digits_batch
    s, t = module.forward_models(x)
    tau = module.distillation_temperature(s.logits, t.logits)
    assert tau.item() == pytest.approx(init, rel=1e-6)


def test_default_init_is_theta_one():
    module = CTKD(DigitsMLP(), DigitsCNN())
    assert isinstance(module.temperature_module, GlobalTemperature)
    assert module.temperature_module.theta.item() == 1.0
    assert module.temperature == pytest.approx(1.0 + 20.0 * SIGMA_1, rel=1e-6)
    assert module.temperature == pytest.approx(15.6212, abs=1e-3)


# ---------------------------------------------------------------------------------------------
# THE SIGN: the temperature ascends the KD loss, the student descends it
# ---------------------------------------------------------------------------------------------


class _FirstStep(L.Callback):
    """Records the batch, the student's logits, theta and the student's weights before the first step."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == 0:
            self.x = batch[0].detach().clone()
            with torch.no_grad():
                self.student_logits = pl_module.student(self.x).detach().clone()
                self.teacher_logits = pl_module.teacher(self.x).detach().clone()
            self.theta = pl_module.temperature_module.theta.detach().clone()
            self.student = _student_params(pl_module)


def test_the_sign_one_trainer_step(digits_dm, make_trainer):
    lr_t = 0.1
    module = _ctkd(alpha=1.0, lambda_epochs=0, lambda_max=1.0, temperature_lr=lr_t, optimizer=_sgd(0.1))
    rec = _FirstStep()
    make_trainer(max_steps=1, limit_val_batches=0, callbacks=[rec]).fit(module, datamodule=digits_dm)

    s0, t = rec.student_logits, rec.teacher_logits
    theta0, theta1 = rec.theta, module.temperature_module.theta.detach().clone()
    tau0, tau1 = float(_tau(theta0)), float(_tau(theta1))
    assert module.current_lambda == 1.0
    assert theta1 != theta0

    # the temperature moved UP the KD loss (student logits held fixed)
    assert kd_loss(s0, t, tau1).item() > kd_loss(s0, t, tau0).item()
    # ... and exactly by SGD *ascent*: theta1 = theta0 + lr * lambda * d KD / d theta
    theta = theta0.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(kd_loss(s0, t, _tau(theta)), theta)
    assert (theta1 - theta0).item() == pytest.approx(lr_t * 1.0 * grad.item(), rel=1e-4)

    # the student moved DOWN the KD loss (temperature held fixed)
    with torch.no_grad():
        s1 = module.student(rec.x)
    assert any(not torch.equal(p, rec.student[n]) for n, p in module.student.named_parameters())
    assert kd_loss(s1, t, tau0).item() < kd_loss(s0, t, tau0).item()


def _manual_step(module: CTKD, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    """forward_models + distillation_losses + backward + one step of configure_optimizers()'s optimizer."""
    optimizer = module.configure_optimizers()
    s, t = module.forward_models(x)
    terms = module.distillation_losses(s, t, Batch(x, y))
    optimizer.zero_grad()
    terms["loss"].backward()
    optimizer.step()
    return terms


def test_lambda_zero_freezes_theta_while_the_student_learns(digits_batch):
    x, y = digits_batch
    # weight decay on the student group: the temperature group must not get it (own group, wd 0)
    module = _ctkd(alpha=1.0, lambda_max=0.0, lambda_epochs=0, temperature_lr=0.1, optimizer=_sgd(0.1, weight_decay=0.01))
    theta0, student0 = module.temperature_module.theta.detach().clone(), _student_params(module)
    _manual_step(module, x, y)
    assert module.current_lambda == 0.0
    assert torch.equal(module.temperature_module.theta.detach(), theta0)
    assert any(not torch.equal(p, student0[n]) for n, p in module.student.named_parameters())


@pytest.mark.parametrize("init", [10.0, 2.0])
def test_lambda_zero_with_anchor_moves_theta_towards_the_anchor(init, digits_batch):
    x, y = digits_batch
    anchor, weight, lr_t = 4.0, 0.1, 0.05
    module = _ctkd(
        alpha=1.0, lambda_max=0.0, lambda_epochs=0, init_temperature=init, anchor=anchor, anchor_weight=weight,
        temperature_lr=lr_t, optimizer=_sgd(0.1),
    )
    theta0 = module.temperature_module.theta.detach().clone()
    _manual_step(module, x, y)
    theta1 = module.temperature_module.theta.detach().clone()
    tau0, tau1 = float(_tau(theta0)), float(_tau(theta1))
    assert tau0 == pytest.approx(init, rel=1e-6)
    assert abs(tau1 - anchor) < abs(tau0 - anchor)
    # plain gradient descent on w (tau - a)^2 (not reversed): theta1 = theta0 - lr * 2 w (tau - a) dtau/dtheta
    dtau = 20.0 * torch.sigmoid(theta0) * (1 - torch.sigmoid(theta0))
    expected = theta0 - lr_t * 2 * weight * (tau0 - anchor) * dtau
    assert theta1.item() == pytest.approx(expected.item(), rel=1e-5)


# ---------------------------------------------------------------------------------------------
# the anchor term
# ---------------------------------------------------------------------------------------------


def test_anchor_term_value_and_total(digits_batch):
    x, y = digits_batch
    module = _ctkd(alpha=0.7, init_temperature=6.0, anchor=3.0, anchor_weight=0.3)
    s, t = module.forward_models(x)
    terms = module.distillation_losses(s, t, Batch(x, y))
    assert terms["anchor_loss"].item() == pytest.approx(0.3 * (6.0 - 3.0) ** 2, rel=1e-5)
    expected = 0.3 * F.cross_entropy(s.logits, y) + 0.7 * kd_loss(s.logits, t.logits, 6.0) + 0.3 * 9.0
    assert terms["loss"].item() == pytest.approx(expected.item(), rel=1e-5)
    assert terms["temperature"].item() == pytest.approx(6.0, rel=1e-6)


def test_no_anchor_term_without_weight(digits_batch):
    x, y = digits_batch
    module = _ctkd(alpha=0.7, init_temperature=6.0)
    s, t = module.forward_models(x)
    terms = module.distillation_losses(s, t, Batch(x, y))
    assert "anchor_loss" not in terms
    expected = 0.3 * F.cross_entropy(s.logits, y) + 0.7 * kd_loss(s.logits, t.logits, 6.0)
    assert terms["loss"].item() == pytest.approx(expected.item(), rel=1e-5)


def test_anchor_loss_is_logged(digits_dm, make_trainer, tmp_path):
    module = _ctkd(alpha=0.9, init_temperature=8.0, anchor=2.0, anchor_weight=0.1, lambda_epochs=0, temperature_lr=0.05)
    logger = CSVLogger(tmp_path)
    make_trainer(logger=logger, log_every_n_steps=1, limit_train_batches=3, limit_val_batches=0).fit(module, datamodule=digits_dm)
    rows = [r for r in _csv_rows(logger) if r.get("train/anchor_loss")]
    assert len(rows) == 3
    for row in rows:
        tau = float(row["train/temperature"])
        assert float(row["train/anchor_loss"]) == pytest.approx(0.1 * (tau - 2.0) ** 2, rel=1e-4)
    assert float(rows[0]["train/temperature"]) == pytest.approx(8.0, rel=1e-6)


# ---------------------------------------------------------------------------------------------
# instance mode
# ---------------------------------------------------------------------------------------------


def _instance(x: torch.Tensor, **kwargs) -> CTKD:
    module = _ctkd(temperature_mode="instance", **kwargs)
    module.build(x[:8])  # the probe creates the MLP (number of classes known)
    return module


def test_instance_mode_one_tau_per_sample_within_bounds(digits_batch):
    x, y = digits_batch
    module = _instance(x, init_temperature=5.0, t_start=1.0, t_range=20.0, lambda_epochs=0, temperature_lr=0.05,
                       optimizer=_sgd(0.05))
    assert isinstance(module.temperature_module, InstanceTemperature)
    assert torch.count_nonzero(module.temperature_module.mlp[2].weight) == 0  # zero-initialised last layer
    s, t = module.forward_models(x)
    tau = module.distillation_temperature(s.logits, t.logits)
    assert tau.shape == (64,)
    # at initialisation every sample sits at the same temperature: init_temperature
    assert torch.equal(tau, tau[0].expand_as(tau))
    assert tau[0].item() == pytest.approx(5.0, rel=1e-5)
    # after a step the MLP gives different temperatures per sample, all inside (1, 21)
    module2 = _instance(x, lambda_epochs=0, temperature_lr=0.05, optimizer=_sgd(0.05))
    _manual_step(module2, x, y)
    s, t = module2.forward_models(x)
    tau = module2.distillation_temperature(s.logits, t.logits)
    assert tau.shape == (64,)
    assert ((tau > 1.0) & (tau < 21.0)).all()
    assert tau.std().item() > 0
    used = module2.used_temperature()
    assert used.shape == (64,) and not used.requires_grad
    assert module2.temperature == pytest.approx(tau.mean().item(), rel=1e-6)


def test_instance_mode_inputs_are_detached(digits_batch):
    x, y = digits_batch
    module = _instance(x, alpha=1.0, lambda_epochs=0)
    with torch.no_grad():  # non-zero last layer, so a non-detached input WOULD get a gradient
        module.temperature_module.mlp[2].weight.normal_(0.0, 0.5)
    seen = []
    module.temperature_module.mlp.register_forward_pre_hook(lambda mod, args: seen.append(args[0].requires_grad))

    _, t = module.forward_models(x)
    t = t.logits
    s = module.student(x).detach().requires_grad_(True)  # a leaf: the student's logits
    terms = module.distillation_losses(s, t, Batch(x, y))
    (g_module,) = torch.autograd.grad(terms["loss"], s, retain_graph=True)
    assert seen == [False]
    assert module.used_temperature().std().item() > 0  # really per-sample

    # independent: the same loss with the temperature as a constant
    tau = module.used_temperature()
    (g_const,) = torch.autograd.grad(kd_loss(s, t, tau), s)
    assert torch.allclose(g_module, g_const, rtol=1e-5, atol=1e-8)

    # control: without detaching, the gradient through the MLP differs (so the check has power)
    mlp = module.temperature_module.mlp
    tau_nd = 1.0 + 20.0 * torch.sigmoid(mlp(torch.cat([s, t], dim=-1)).squeeze(-1))
    (g_nd,) = torch.autograd.grad(kd_loss(s, t, tau_nd), s)
    assert not torch.allclose(g_nd, g_const, rtol=1e-5, atol=1e-8)

    # the temperature MLP itself does get a gradient (through the reversal)
    terms["loss"].backward()
    assert module.temperature_module.mlp[2].bias.grad is not None
    assert module.temperature_module.mlp[2].bias.grad.abs().item() > 0


# ---------------------------------------------------------------------------------------------
# optimizer groups
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["global", "instance"])
def test_temperature_parameters_form_their_own_group(mode, digits_batch):
    x, _ = digits_batch
    module = _ctkd(temperature_mode=mode, temperature_lr=0.3, optimizer=_sgd(0.01, weight_decay=5e-4))
    module.build(x[:8])
    optimizer = module.configure_optimizers()
    temp_ids = {id(p) for p in module.temperature_module.parameters()}
    assert temp_ids
    groups = optimizer.param_groups
    temp_groups = [g for g in groups if any(id(p) in temp_ids for p in g["params"])]
    assert len(temp_groups) == 1
    (group,) = temp_groups
    assert {id(p) for p in group["params"]} == temp_ids
    assert group["lr"] == 0.3 and group["weight_decay"] == 0.0
    others = [g for g in groups if g is not group]
    assert others and all(g["lr"] == 0.01 and g["weight_decay"] == 5e-4 for g in others)
    other_ids = [id(p) for g in others for p in g["params"]]
    assert len(other_ids) == len(set(other_ids))
    assert {id(p) for p in module.student.parameters()} <= set(other_ids)
    assert not {id(p) for p in module.teacher.parameters()} & (set(other_ids) | temp_ids)


def test_temperature_group_default_lr_and_projection_group(digits_batch):
    x, _ = digits_batch
    module = _ctkd(features=FeatureMatch(layer_map={"block3": "block1"}, projection_lr=0.2), optimizer=_sgd(0.01))
    module.build(x[:8])
    groups = module.configure_optimizers().param_groups
    temp_ids = {id(p) for p in module.temperature_module.parameters()}
    proj_ids = {id(p) for p in module.objectives["feature"].projections.parameters()}
    assert proj_ids
    (temp_group,) = [g for g in groups if any(id(p) in temp_ids for p in g["params"])]
    assert {id(p) for p in temp_group["params"]} == temp_ids
    assert temp_group["lr"] == 0.01  # no temperature_lr: the optimizer's
    (proj_group,) = [g for g in groups if any(id(p) in proj_ids for p in g["params"])]
    assert {id(p) for p in proj_group["params"]} == proj_ids and proj_group["lr"] == 0.2


# ---------------------------------------------------------------------------------------------
# lambda schedule during training
# ---------------------------------------------------------------------------------------------


def test_lambda_schedule_per_epoch(digits_dm, make_trainer, tmp_path):
    module = _ctkd(lambda_epochs=2, lambda_max=1.0)
    logger = CSVLogger(tmp_path)
    trainer = make_trainer(logger=logger, log_every_n_steps=1, max_epochs=4, limit_train_batches=2, limit_val_batches=0)
    trainer.fit(module, datamodule=digits_dm)
    by_epoch: dict[int, list[float]] = {}
    for row in _csv_rows(logger):
        if row.get("train/lambda"):
            by_epoch.setdefault(int(row["epoch"]), []).append(float(row["train/lambda"]))
    assert sorted(by_epoch) == [0, 1, 2, 3]
    independent = {0: 0.0, 1: 0.5, 2: 1.0, 3: 1.0}  # 1/2 (1 - cos(pi min(e, 2) / 2))
    for epoch, values in by_epoch.items():
        assert len(values) == 2
        for value in values:
            assert value == pytest.approx(cosine_ramp(epoch, 2, 1.0), abs=1e-7)
            assert value == pytest.approx(independent[epoch], abs=1e-7)


def test_lambda_schedule_per_step(digits_dm, make_trainer, tmp_path):
    module = _ctkd(lambda_epochs=2, lambda_max=1.0, lambda_per_step=True)
    logger = CSVLogger(tmp_path)
    trainer = make_trainer(logger=logger, log_every_n_steps=1, max_epochs=2, limit_train_batches=3, limit_val_batches=0)
    trainer.fit(module, datamodule=digits_dm)
    by_epoch: dict[int, list[float]] = {}
    for row in _csv_rows(logger):
        if row.get("train/lambda"):
            by_epoch.setdefault(int(row["epoch"]), []).append(float(row["train/lambda"]))
    assert sorted(by_epoch) == [0, 1]
    for epoch, values in by_epoch.items():
        assert len(values) == 3
        assert all(b > a for a, b in zip(values, values[1:]))  # increases within the epoch
        for b, value in enumerate(values):
            progress = epoch + b / 3
            assert value == pytest.approx(0.5 * (1 - math.cos(math.pi * progress / 2)), abs=1e-6)


# ---------------------------------------------------------------------------------------------
# teacher under no_grad, not inference_mode
# ---------------------------------------------------------------------------------------------


def test_teacher_runs_under_no_grad_not_inference_mode(digits_dm, make_trainer):
    module = _ctkd()
    records = []

    def hook(mod, args):
        records.append((module.training, torch.is_inference_mode_enabled(), torch.is_grad_enabled()))

    module.teacher.register_forward_pre_hook(hook)
    make_trainer(limit_train_batches=3, limit_val_batches=1).fit(module, datamodule=digits_dm)
    during_training = [(inf, grad) for training, inf, grad in records if training]
    assert len(during_training) == 3
    assert all(state == (False, False) for state in during_training)


# ---------------------------------------------------------------------------------------------
# feature terms compose with the learned temperature
# ---------------------------------------------------------------------------------------------


def test_composes_with_feature_terms(digits_batch):
    x, y = digits_batch
    alpha, fw = 0.6, 2.0
    module = _ctkd(
        features=FeatureMatch(layer_map={"block3": "block1"}, loss="mse", pair_weights=fw), alpha=alpha,
        init_temperature=5.0, anchor=3.0, anchor_weight=0.2,
    )
    module.build(x[:8])
    assert module.objectives["feature"].pairs == [("block3", "block1")]
    s, t = module.forward_models(x)
    terms = module.distillation_losses(s, t, Batch(x, y))

    teacher, student = module.teacher, module.student
    with torch.no_grad():
        f_t = teacher.block3(teacher.block2(teacher.block1(x)))  # [N, 64]
        f_s = module.objectives["feature"].projections[0](student.block1(x))  # [N, 16] -> [N, 64]
        s_ind, t_ind = student(x), teacher(x)
    assert f_t.shape == (64, 64) and f_s.shape == (64, 64)
    feature = fw * mse_feature_loss(f_s, f_t)
    tau = 5.0
    expected = (1 - alpha) * F.cross_entropy(s_ind, y) + alpha * kd_loss(s_ind, t_ind, tau) + feature + 0.2 * (tau - 3.0) ** 2
    assert terms["feature_loss"].item() == pytest.approx(feature.item(), rel=1e-5)
    assert terms["loss"].item() == pytest.approx(expected.item(), rel=1e-5)


def test_feature_loss_is_logged_during_training(digits_dm, make_trainer, tmp_path):
    module = _ctkd(features=FeatureMatch(layer_map={"block3": "block1"}, loss="mse"), anchor=4.0, anchor_weight=0.1)
    logger = CSVLogger(tmp_path)
    make_trainer(logger=logger, log_every_n_steps=1, limit_train_batches=2, limit_val_batches=0).fit(module, datamodule=digits_dm)
    rows = [r for r in _csv_rows(logger) if r.get("train/feature_loss")]
    assert len(rows) == 2
    for row in rows:
        value = float(row["train/feature_loss"])
        assert math.isfinite(value) and value > 0
        assert {"train/kd_loss", "train/anchor_loss", "train/temperature", "train/lambda"} <= {k for k, v in row.items() if v}


# ---------------------------------------------------------------------------------------------
# read-only temperature and argument errors
# ---------------------------------------------------------------------------------------------


def test_setting_the_temperature_moves_theta_and_learning_continues_from_there():
    # one temperature interface: a curriculum (or a user) can set CTKD's global tau; theta moves there
    module = CTKD(DigitsMLP(), DigitsCNN())
    assert module.temperature == pytest.approx(1.0 + 20.0 * SIGMA_1, rel=1e-6)
    module.temperature = 3.0
    assert module.temperature == pytest.approx(3.0, rel=1e-6)
    assert float(_tau(module.temperature_module.theta.detach())) == pytest.approx(3.0, rel=1e-6)
    assert module.temperature_module.theta.requires_grad  # still learned
    with pytest.raises(ValueError, match=r"learned temperature lives in \(1.0, 21.0\)"):
        module.temperature = 25.0
    instance = CTKD(DigitsMLP(), DigitsCNN(), temperature_mode="instance")
    with pytest.raises(ValueError, match="an instance-wise learned temperature has one value per sample"):
        instance.temperature = 3.0


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"temperature_mode": "per_class"}, r"`temperature_mode` must be one of \('global', 'instance'\), got 'per_class'"),
        ({"t_start": 0.0}, r"`t_start` must be > 0"),
        ({"t_start": -1.0}, r"`t_start` must be > 0"),
        ({"t_range": 0.0}, r"`t_range` must be > 0"),
        ({"t_range": -5.0}, r"`t_range` must be > 0"),
        ({"init_temperature": 1.0}, r"`init_temperature` must lie strictly inside \(1.0, 21.0\)"),
        ({"init_temperature": 21.0}, r"`init_temperature` must lie strictly inside"),
        ({"init_temperature": 30.0}, r"`init_temperature` must lie strictly inside"),
        ({"t_start": 2.0, "t_range": 2.0, "init_temperature": 1.5}, r"strictly inside \(2.0, 4.0\)"),
        ({"lambda_max": -0.1}, r"`lambda_max` must be >= 0"),
        ({"lambda_epochs": -1.0}, r"`lambda_epochs` must be >= 0"),
        ({"anchor_weight": -0.1}, r"`anchor_weight` must be >= 0"),
        ({"anchor_weight": 0.1}, r"`anchor` must be a temperature > 0 when anchor_weight > 0, got None"),
        ({"anchor_weight": 0.1, "anchor": 0.0}, r"`anchor` must be a temperature > 0"),
        ({"temperature_lr": 0.0}, r"`temperature_lr` must be > 0 or None"),
        ({"temperature_lr": -0.01}, r"`temperature_lr` must be > 0 or None"),
    ],
)
def test_bad_arguments_are_rejected(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CTKD(DigitsMLP(), DigitsCNN(), **kwargs)


# ---------------------------------------------------------------------------------------------
# checkpoints
# ---------------------------------------------------------------------------------------------


def _fit_and_save(mode, digits_dm, make_trainer, tmp_path) -> tuple[CTKD, Path, dict[str, torch.Tensor]]:
    module = _ctkd(temperature_mode=mode, lambda_epochs=0, temperature_lr=0.2, optimizer=_sgd(0.1), init_temperature=6.0)
    trainer = make_trainer(limit_train_batches=3, limit_val_batches=0)
    trainer.fit(module, datamodule=digits_dm)
    path = tmp_path / f"ctkd_{mode}.ckpt"
    trainer.save_checkpoint(path)
    return module, path, {k: v.detach().clone() for k, v in module.temperature_module.state_dict().items()}


@pytest.mark.parametrize("mode", ["global", "instance"])
def test_checkpoint_round_trip_restores_the_temperature(mode, digits_dm, make_trainer, tmp_path):
    trained, path, state = _fit_and_save(mode, digits_dm, make_trainer, tmp_path)
    fresh = _ctkd(temperature_mode=mode, init_temperature=6.0)
    if mode == "instance":
        fresh.build(digits_dm.example_input())
    # training moved the temperature, so equality below is not the initial value by chance
    fresh_state = fresh.temperature_module.state_dict()
    assert any(not torch.equal(v, fresh_state[k]) for k, v in state.items())

    loaded = CTKD.load_from_checkpoint(path, student=DigitsMLP(), teacher=DigitsCNN())
    expected_type = InstanceTemperature if mode == "instance" else GlobalTemperature
    assert isinstance(loaded.temperature_module, expected_type)
    loaded_state = loaded.temperature_module.state_dict()
    assert loaded_state.keys() == state.keys()
    for key, value in state.items():
        assert torch.equal(loaded_state[key], value), key
    for (name, p), q in zip(trained.student.named_parameters(), loaded.student.parameters()):
        assert torch.equal(p.detach(), q.detach()), name
    assert loaded.temperature_mode == mode and loaded.t_start == 1.0 and loaded.t_range == 20.0


def test_global_temperature_property_reflects_current_theta(digits_dm, make_trainer, tmp_path):
    trained, path, _ = _fit_and_save("global", digits_dm, make_trainer, tmp_path)
    current = float(_tau(trained.temperature_module.theta.detach()))
    loaded = CTKD.load_from_checkpoint(path, student=DigitsMLP(), teacher=DigitsCNN())
    assert loaded.temperature == pytest.approx(current, rel=1e-6)
    assert trained.temperature == pytest.approx(current, rel=1e-6)
