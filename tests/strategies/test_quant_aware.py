"""QuantAwareDistillation: latent weights, quantised forward, fit, checkpoints, export, argument errors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_distill.models import DigitsCNN, DigitsMLP
from lightning_distill.module import Batch, unpack_batch
from lightning_distill.quantization import fake_quantize, load_quantized, quantization_error, quantized_layers
from lightning_distill.strategies.quant_aware import QuantAwareDistillation

pytestmark = pytest.mark.usefixtures("single_thread")


def _qad(student=None, **kwargs) -> QuantAwareDistillation:
    kwargs.setdefault("ternary", True)
    return QuantAwareDistillation(student if student is not None else DigitsMLP(hidden=16), DigitsCNN(), **kwargs)


def _manual_forward(module: QuantAwareDistillation, x: torch.Tensor, **opts) -> torch.Tensor:
    lin1, head = module.student.block1[1], module.student.head
    w1 = fake_quantize(lin1.parametrizations.weight.original, **opts)
    w2 = fake_quantize(head.parametrizations.weight.original, **opts)
    return F.linear(F.relu(F.linear(x.flatten(1), w1, lin1.bias)), w2, head.bias)


def test_optimizer_holds_the_latent_float_weights_and_they_receive_ste_gradients(seeded):
    module = _qad(bits=4, ternary=False, per_channel=True)
    latent = module.student.block1[1].parametrizations.weight.original
    optimizer = module.configure_optimizers()
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert id(latent) in held and id(module.student.head.parametrizations.weight.original) in held
    assert latent.unique().numel() > 16  # float latent weights, not codes

    x, y = torch.rand(8, 1, 8, 8), torch.randint(0, 10, (8,))
    F.cross_entropy(module.student(x), y).backward()
    # STE: the latent weight's gradient is the gradient w.r.t. the quantised weight, computed here
    # with the quantised weight as an ordinary leaf
    w1 = fake_quantize(latent.detach(), bits=4, per_channel=True).requires_grad_(True)
    head = module.student.head
    w2 = fake_quantize(head.parametrizations.weight.original.detach(), bits=4, per_channel=True)
    logits = F.linear(F.relu(F.linear(x.flatten(1), w1, module.student.block1[1].bias)), w2, head.bias)
    F.cross_entropy(logits, y).backward()
    assert latent.grad is not None and latent.grad.abs().sum() > 0
    assert torch.allclose(latent.grad, w1.grad, atol=1e-7)


@pytest.mark.parametrize(
    "opts",
    [dict(ternary=True), dict(bits=3, symmetric=False, per_channel=True, error_diffusion=0.5)],
    ids=["ternary", "3bit_asym_diffusion"],
)
def test_student_forward_equals_a_manual_fake_quantised_forward(opts, seeded):
    module = _qad(**{"ternary": False, **opts})
    x = torch.rand(5, 1, 8, 8)
    expected = _manual_forward(module, x, **opts)
    assert torch.equal(module.student(x), expected)
    assert torch.equal(module(x), expected)


def test_loss_terms_are_kd_of_the_quantised_student(seeded):
    """alpha=0.5, temperature=5.0 (tau = 5) weight the terms as 0.5 CE + 0.5 tau^2 KL."""
    module = _qad(alpha=0.5, temperature=5.0)
    x, y = torch.rand(6, 1, 8, 8), torch.randint(0, 10, (6,))
    s, t = (out.logits for out in module.forward_models(x))
    assert torch.equal(s, _manual_forward(module, x, ternary=True))
    terms = module.distillation_losses(s, t, Batch(x, y))
    p_t = (t / 5.0).softmax(-1)
    kl = (p_t * (p_t.log() - (s / 5.0).log_softmax(-1))).sum(-1).mean() * 25.0
    expected = 0.5 * F.cross_entropy(s, y) + 0.5 * kl
    assert math.isclose(terms["loss"].item(), expected.item(), rel_tol=1e-5)
    assert math.isclose(terms["quant_error"].item(), module.quantization_error().item())  # logged, not optimised


def test_quantization_error_is_the_mean_over_layers(seeded):
    module = _qad(bits=4, ternary=False)
    module.student(torch.rand(2, 1, 8, 8))  # the forward records each layer's error
    layers = quantized_layers(module.student).values()
    expected = torch.stack([quantization_error(layer.parametrizations.weight.original, bits=4) for layer in layers]).mean()
    assert math.isclose(module.quantization_error().item(), expected.item(), rel_tol=1e-5)
    assert module.quantization_error() > 0


def test_fit_learns_and_logs_the_quantised_accuracy(digits_dm, make_trainer):
    torch.manual_seed(0)
    module = QuantAwareDistillation(
        DigitsMLP(hidden=32), DigitsCNN(), teacher_checkpoint="zoo:digits_cnn", ternary=True, alpha=0.5,
        temperature=5.0, optimizer=lambda params: torch.optim.Adam(params, lr=0.01),
    )
    trainer = make_trainer(max_epochs=2, limit_val_batches=2)
    trainer.fit(module, datamodule=digits_dm)
    metrics = trainer.callback_metrics
    assert {"train/loss", "train/kd_loss", "train/task_loss", "train/quant_error", "val/acc"} <= set(metrics)
    assert 0 < metrics["train/quant_error"] < 1
    assert metrics["val/acc"] > 0.5 and metrics["val/agreement"] > 0.5  # chance is 0.1

    # val/acc is the accuracy of the *quantised* student: recompute it by hand on the same batches
    module.eval()
    batches = [unpack_batch(b) for b in list(digits_dm.val_dataloader())[:2]]
    with torch.no_grad():
        correct = sum(int((module.student(b.input).argmax(-1) == b.target).sum()) for b in batches)
        total = sum(len(b.target) for b in batches)
        assert math.isclose(float(metrics["val/acc"]), correct / total, abs_tol=1e-6)
        # every quantised layer computes with at most 3 distinct weight values
        for layer in quantized_layers(module.student).values():
            assert layer.weight.unique().numel() <= 3


def test_checkpoint_round_trip_restores_the_latent_weights(digits_dm, make_trainer, tmp_path):
    torch.manual_seed(0)
    module = _qad(bits=4, ternary=False, per_channel=True, error_diffusion=0.5, teacher_checkpoint="zoo:digits_cnn")
    trainer = make_trainer(max_epochs=1, limit_train_batches=3, limit_val_batches=1)
    trainer.fit(module, datamodule=digits_dm)
    path = tmp_path / "qad.ckpt"
    trainer.save_checkpoint(path)
    state = torch.load(path, weights_only=True)["state_dict"]
    assert "student.block1.1.parametrizations.weight.original" in state
    assert not any(k.startswith("teacher.") for k in state)

    restored = QuantAwareDistillation.load_from_checkpoint(path, student=DigitsMLP(hidden=16), teacher=DigitsCNN())
    assert (restored.bits, restored.per_channel, restored.error_diffusion, restored.ternary) == (4, True, 0.5, False)
    for key, value in module.state_dict().items():
        assert torch.equal(restored.state_dict()[key], value), key
    x = torch.rand(4, 1, 8, 8)
    assert torch.equal(restored.student(x), module.student(x))


def test_export_after_fit_reloads_into_a_plain_model_with_identical_predictions(digits_dm, make_trainer, tmp_path):
    torch.manual_seed(0)
    module = _qad(activation_bits=8, error_diffusion=1.0)
    trainer = make_trainer(max_epochs=1, limit_train_batches=3, limit_val_batches=1)
    trainer.fit(module, datamodule=digits_dm)
    export = module.export_quantized(tmp_path / "student.pt")
    assert set(export["layers"]) == {"block1.1", "head"}
    plain = load_quantized(tmp_path / "student.pt", DigitsMLP(hidden=16))
    assert not quantized_layers(plain)
    module.eval()
    x = unpack_batch(next(iter(digits_dm.val_dataloader()))).input
    with torch.no_grad():
        assert torch.equal(plain(x), module.student(x))


def test_ternary_wins_over_bits_and_the_student_is_quantised_in_place(seeded):
    student = DigitsMLP()
    module = _qad(student, bits=8, ternary=True)
    assert module.student is student
    assert student.head.weight.unique().numel() <= 3
    assert module.hparams["ternary"] is True and module.hparams["bits"] == 8


def test_skip_keeps_named_layers_in_float(seeded):
    module = _qad(skip=["head"])
    assert sorted(quantized_layers(module.student)) == ["block1.1"]
    assert isinstance(module.student.head.weight, nn.Parameter)


BAD = {
    "bits": (dict(bits=9), ValueError, r"`bits` must be an integer in \[2, 8\].*got 9\."),
    "bits_zero": (dict(bits=0, ternary=True), ValueError, r"`bits` must be an integer in \[2, 8\].*got 0\."),
    "diffusion": (dict(error_diffusion=-0.1), ValueError, r"`error_diffusion` must be a number in \[0, 1\].*got -0\.1"),
    "activation_bits": (dict(activation_bits=1), ValueError, r"`activation_bits` must be an integer in \[2, 8\].*got 1\."),
    "per_channel": (dict(per_channel="no"), TypeError, r"`per_channel` must be True or False, got 'no'"),
    "skip": (dict(skip=["fc"]), ValueError, r"`skip` names layers.*\['fc'\].*Valid names: \['block1.1', 'head'\]"),
    "alpha": (dict(alpha=1.5), ValueError, r"`alpha` must be in \[0, 1\]"),
    "temperature": (dict(temperature=0.0), ValueError, r"`temperature` must be a finite number > 0"),
    "kl": (dict(kl="kullback"), ValueError, r"`kl` must be one of .*got 'kullback'"),
    "teacher_checkpoint": (dict(teacher_checkpoint="missing.pt"), FileNotFoundError, r"`teacher_checkpoint`='missing.pt'"),
}


@pytest.mark.parametrize("kwargs,error,match", list(BAD.values()), ids=list(BAD))
def test_bad_arguments_leave_the_student_untouched(kwargs, error, match):
    student = DigitsMLP()
    before = {name: (id(p), p.detach().clone()) for name, p in student.named_parameters()}
    with pytest.raises(error, match=match):
        _qad(student, **kwargs)
    assert not quantized_layers(student)
    after = dict(student.named_parameters())
    assert sorted(after) == sorted(before)
    for name, (ident, value) in before.items():
        assert id(after[name]) == ident and torch.equal(after[name], value), name


def test_missing_teacher_and_quantised_student_are_rejected():
    with pytest.raises(ValueError, match="needs a `teacher`"):
        QuantAwareDistillation(DigitsMLP(), None)
    module = _qad()
    with pytest.raises(ValueError, match="already fake-quantised"):
        QuantAwareDistillation(module.student, DigitsCNN())
