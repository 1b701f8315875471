"""Token-level distillation of causal language models: masks, vocab check, perplexity, DistilBERT loss."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from lightning_distill import Classifier, FeatureDistillation, KnowledgeDistillation
from lightning_distill.data import TextDataModule
from lightning_distill.models import CharTransformer
from lightning_distill.module import Batch

SEQ = 16


@pytest.fixture
def text_dm():
    # the real corpus, truncated: the vocabulary is still the full corpus' (104 ids)
    return TextDataModule(seq_len=SEQ, batch_size=8, max_chars=6000, shuffle_seed=0)


def _lm(vocab: int, d: int = 16, layers: int = 1) -> CharTransformer:
    return CharTransformer(vocab, d_model=d, n_layers=layers, n_heads=2, max_len=SEQ)


def _fit_kwargs():
    return dict(max_epochs=1, limit_train_batches=2, limit_val_batches=2, num_sanity_val_steps=0)


def test_masked_token_kd_averages_over_valid_tokens_only(seeded):
    vocab = 11
    module = KnowledgeDistillation(_lm(vocab), _lm(vocab, d=32), temperature=2.0, alpha=0.6, kl="forward")
    module.num_classes = vocab
    n, length = 3, 5
    student = torch.randn(n, length, vocab)
    teacher = torch.randn(n, length, vocab)
    mask = torch.ones(n, length, dtype=torch.bool)
    mask[1] = False  # a fully masked (padding-only) sequence
    mask[2, 3:] = False  # right padding
    target = torch.randint(0, vocab, (n, length))
    target[~mask] = -100
    student[1] = float("inf")  # garbage at masked positions must not leak
    terms = module.distillation_losses(student, teacher, Batch(torch.zeros(n, length, dtype=torch.long), target, None, mask))
    # explicit loop over the valid tokens
    kd_sum, ce_sum, count = 0.0, 0.0, 0
    for i in range(n):
        for t in range(length):
            if not mask[i, t]:
                continue
            p_t = F.softmax(teacher[i, t].double() / 2.0, -1)
            log_p_s = F.log_softmax(student[i, t].double() / 2.0, -1)
            kd_sum += float((p_t * (p_t.log() - log_p_s)).sum()) * 4.0
            ce_sum += float(F.cross_entropy(student[i, t].double()[None], target[i, t][None]))
            count += 1
    assert count == 8
    assert math.isclose(float(terms["kd_loss"]), kd_sum / count, rel_tol=1e-5)
    assert math.isclose(float(terms["task_loss"]), ce_sum / count, rel_tol=1e-5)
    assert math.isclose(float(terms["loss"]), 0.4 * ce_sum / count + 0.6 * kd_sum / count, rel_tol=1e-5)


def test_every_sequence_masked_gives_zero_not_nan():
    vocab = 7
    module = KnowledgeDistillation(_lm(vocab), _lm(vocab), kl="skew_reverse")
    logits = torch.randn(2, 4, vocab, requires_grad=True)
    batch = Batch(torch.zeros(2, 4, dtype=torch.long), torch.full((2, 4), -100), None, torch.zeros(2, 4, dtype=torch.bool))
    terms = module.distillation_losses(logits, torch.randn(2, 4, vocab), batch)
    assert float(terms["loss"].detach()) == 0.0 and float(terms["kd_loss"].detach()) == 0.0
    terms["loss"].backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))


def test_vocab_mismatch_is_rejected_before_training(text_dm, make_trainer, tmp_path):
    vocab = text_dm.vocab_size
    module = KnowledgeDistillation(_lm(vocab + 3), _lm(vocab))
    trainer = make_trainer(**_fit_kwargs())
    with pytest.raises(ValueError, match=rf"different vocabulary sizes: the teacher .* outputs {vocab} logits per token, "
                                         rf"the student .* outputs {vocab + 3}"):
        trainer.fit(module, datamodule=text_dm)
    assert trainer.global_step == 0
    assert not list(tmp_path.rglob("*.ckpt"))


def test_data_vocab_mismatch_is_rejected(text_dm, make_trainer):
    module = Classifier(_lm(text_dm.vocab_size - 1))
    with pytest.raises(ValueError, match=rf"predicts {text_dm.vocab_size - 1} classes but the datamodule's num_classes is "
                                         rf"{text_dm.vocab_size}"):
        make_trainer(**_fit_kwargs()).fit(module, datamodule=text_dm)


def test_lm_kd_fit_logs_perplexity_equal_to_exp_of_the_token_loss(text_dm, make_trainer, seeded):
    vocab = text_dm.vocab_size
    module = KnowledgeDistillation(_lm(vocab), _lm(vocab, d=32, layers=2), temperature=2.0, alpha=0.5)
    trainer = make_trainer(**_fit_kwargs())
    trainer.fit(module, datamodule=text_dm)
    m = trainer.callback_metrics
    for key in ("val/perplexity", "val/teacher_perplexity", "val/agreement", "val/kl", "train/kd_loss"):
        assert key in m and math.isfinite(float(m[key])), key
    # both are averages over the same valid tokens: perplexity = exp(mean token cross-entropy)
    assert math.isclose(float(m["val/perplexity"]), math.exp(float(m["val/loss"])), rel_tol=1e-4)
    # an untrained teacher is close to uniform over the vocabulary
    assert 0.5 * vocab < float(m["val/teacher_perplexity"]) < 2.0 * vocab


def test_distilbert_triple_loss_on_hidden_states(text_dm, make_trainer, seeded):
    vocab = text_dm.vocab_size
    module = FeatureDistillation(
        _lm(vocab), _lm(vocab, d=32, layers=2), layer_map={"blocks.1": "blocks.0"}, feature_loss="cosine",
        feature_weight=0.143, projection="student_to_teacher", temperature=2.0, alpha=0.714,
    )
    trainer = make_trainer(**_fit_kwargs(), log_every_n_steps=1)
    trainer.fit(module, datamodule=text_dm)
    assert tuple(module.projections[0].map.weight.shape) == (32, 16)  # student 16 -> teacher 32
    m = trainer.callback_metrics
    total = 0.286 * float(m["train/task_loss"]) + 0.714 * float(m["train/kd_loss"]) + float(m["train/feature_loss"])
    assert math.isclose(float(m["train/loss"]), total, rel_tol=1e-4)
    assert 0.0 < float(m["train/feature_loss"]) <= 0.143 * 2.0  # weight * (1 - cos), cos in [-1, 1]


def test_cosine_hidden_state_term_ignores_padding(seeded):
    vocab = 9
    module = FeatureDistillation(_lm(vocab), _lm(vocab, d=32), layer_map={"blocks.0": "blocks.0"}, feature_loss="cosine")
    x = torch.randint(1, vocab, (2, 6))
    module.build(x)  # the probe builds the projection
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[1, 2:] = False
    target = torch.randint(0, vocab, (2, 6)).masked_fill(~mask, -100)
    module.eval()
    s, t = module.forward_models(x)
    loss_a = module.distillation_losses(s, t, Batch(x, target, None, mask))["feature_loss"]
    x2 = x.clone()
    x2[1, 2:] = 1  # change only padded positions (causal model: valid positions are unaffected)
    s, t = module.forward_models(x2)
    loss_b = module.distillation_losses(s, t, Batch(x2, target, None, mask))["feature_loss"]
    assert torch.allclose(loss_a, loss_b, atol=1e-6)
