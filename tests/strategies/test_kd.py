"""KnowledgeDistillation: loss composition, argument errors, class-count checks, learning from the teacher."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from lightning_distill import KnowledgeDistillation
from lightning_distill.models import DigitsCNN, DigitsMLP
from lightning_distill.module import Batch


def _kd(**kwargs) -> KnowledgeDistillation:
    return KnowledgeDistillation(DigitsMLP(), DigitsCNN(), **kwargs)


@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_loss_is_weighted_sum_of_ce_and_t2_kl(alpha, temperature):
    module = _kd(alpha=alpha, temperature=temperature)
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(6, 10, generator=g), torch.randn(6, 10, generator=g)
    y = torch.randint(0, 10, (6,), generator=g)
    terms = module.distillation_losses(s, t, Batch(None, y))
    # independent computation: per-sample KL written out, then batch mean, times T^2
    p_t = (t / temperature).softmax(-1)
    log_p_s = (s / temperature).log_softmax(-1)
    kl = (p_t * (p_t.log() - log_p_s)).sum(-1).mean() * temperature**2
    ce = F.cross_entropy(s, y)
    assert math.isclose(terms["kd_loss"].item(), kl.item(), rel_tol=1e-5)
    assert math.isclose(terms["task_loss"].item(), ce.item(), rel_tol=1e-5)
    assert math.isclose(terms["loss"].item(), ((1 - alpha) * ce + alpha * kl).item(), rel_tol=1e-5, abs_tol=1e-7)


def test_token_level_logits_use_the_mask_and_ignore_index():
    module = _kd(alpha=0.5, temperature=2.0)
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(2, 5, 7, generator=g), torch.randn(2, 5, 7, generator=g)
    y = torch.randint(0, 7, (2, 5), generator=g)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    y_masked = y.masked_fill(~mask, -100)
    terms = module.distillation_losses(s, t, Batch(None, y_masked, None, mask))
    valid_s, valid_t, valid_y = s[mask], t[mask], y[mask]  # the 8 valid tokens, flattened
    expected_ce = F.cross_entropy(valid_s, valid_y)
    expected_kd = F.kl_div((valid_s / 2).log_softmax(-1), (valid_t / 2).softmax(-1), reduction="batchmean") * 4
    assert math.isclose(terms["task_loss"].item(), expected_ce.item(), rel_tol=1e-5)
    assert math.isclose(terms["kd_loss"].item(), expected_kd.item(), rel_tol=1e-5)


@pytest.mark.parametrize("bad", [0, 0.0, -1.0, float("nan"), float("inf"), True, "4"])
def test_bad_temperature_is_rejected(bad):
    with pytest.raises(ValueError, match="`temperature` must be a finite number > 0"):
        _kd(temperature=bad)


@pytest.mark.parametrize("bad", [-0.1, 1.5, float("nan"), None])
def test_bad_alpha_is_rejected(bad):
    with pytest.raises(ValueError, match=r"`alpha` must be in \[0, 1\]"):
        _kd(alpha=bad)


def test_bad_kl_is_rejected():
    with pytest.raises(ValueError, match=r"`kl` must be one of \('forward', 'reverse', 'symmetric', 'js', 'skew_forward', 'skew_reverse'\), got 'kullback'"):
        _kd(kl="kullback")


def test_missing_teacher_is_rejected():
    with pytest.raises(ValueError, match="needs a `teacher`"):
        KnowledgeDistillation(DigitsMLP(), None)


def test_class_count_mismatch_fails_before_training(digits_dm, make_trainer, tmp_path):
    module = KnowledgeDistillation(DigitsMLP(num_classes=7), DigitsCNN(num_classes=10))
    before = {k: v.clone() for k, v in module.student.state_dict().items()}
    trainer = make_trainer(enable_checkpointing=True, max_epochs=1)
    with pytest.raises(ValueError, match=r"the teacher \(DigitsCNN\) outputs 10, the student \(DigitsMLP\) outputs 7"):
        trainer.fit(module, datamodule=digits_dm)
    assert trainer.global_step == 0
    assert all(torch.equal(module.student.state_dict()[k], v) for k, v in before.items())
    assert not list(tmp_path.rglob("*.ckpt")), "a checkpoint was written for a run that could not start"


def test_mismatch_with_datamodule_classes_fails_before_training(digits_dm, make_trainer):
    module = KnowledgeDistillation(DigitsMLP(num_classes=7), DigitsCNN(num_classes=7))
    trainer = make_trainer()
    with pytest.raises(ValueError, match="predicts 7 classes but the datamodule's num_classes is 10"):
        trainer.fit(module, datamodule=digits_dm)
    assert trainer.global_step == 0


def test_student_learns_from_the_teacher_alone(digits_dm, make_trainer):
    """alpha=1: the labels never enter the loss, yet the student learns to classify digits."""
    torch.manual_seed(0)
    module = KnowledgeDistillation(
        DigitsMLP(hidden=32), DigitsCNN(), teacher_checkpoint="zoo:digits_cnn", alpha=1.0, temperature=2.0,
        optimizer=lambda params: torch.optim.Adam(params, lr=0.01),
    )
    trainer = make_trainer(max_epochs=8, deterministic=False)
    trainer.fit(module, datamodule=digits_dm)
    result = trainer.test(module, datamodule=digits_dm, verbose=False)[0]
    assert result["test/teacher_acc"] > 0.97
    assert result["test/acc"] > 0.85  # chance is 0.10
    assert result["test/agreement"] > 0.85


def test_a_misspelled_argument_names_the_class_called_and_the_fix():
    with pytest.raises(TypeError, match=r"^KnowledgeDistillation\(\) got an unexpected keyword argument 'temprature'\. "
                                        r"Did you mean 'temperature'\?"):
        KnowledgeDistillation(DigitsMLP(), DigitsCNN(), temprature=3.0)
    from lightning_distill import Classifier

    with pytest.raises(TypeError, match=r"^Classifier\(\) got an unexpected keyword argument 'lr'\. Optimizer settings "
                                        r"go in `optimizer`"):
        Classifier(DigitsMLP(), lr=0.1)
