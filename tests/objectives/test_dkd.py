"""Decoupled KD (Zhao et al., CVPR 2022, arXiv:2203.08679): ``dkd_loss`` and the ``DKD`` objective.

``dkd_loss`` is checked against two independent references written here:

* ``ref_mdistiller`` -- the official code (mdistiller ``mdistiller/distillers/DKD.py``) re-typed in
  float64: binary distributions ``[p_t, 1 - p_t]`` built with gt / other masks, ``F.kl_div`` summed
  (``size_average=False``) times ``T**2`` over the batch size, NCKD from ``softmax(z / T - 1000 * gt_mask)``;
* ``ref_loop`` -- the paper's definitions evaluated sample by sample in Python floats, in log space
  (stays exact where the official code over/underflows: logits of magnitude 1e3 at T = 1).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_distill.batch import Batch
from lightning_distill.objectives import DKD, StepInfo, dkd_loss
from lightning_distill.outputs import ModelOutputs

FAST = settings(max_examples=40, deadline=None)


# --------------------------------------------------------------------------------------------
# References
# --------------------------------------------------------------------------------------------


def ref_mdistiller(logits_student, logits_teacher, target, alpha, beta, temperature, mask_value=1000.0):
    """mdistiller's ``dkd_loss`` re-typed (float64), returning ``(alpha * tckd, beta * nckd)`` separately."""
    logits_student, logits_teacher = logits_student.double(), logits_teacher.double()
    target = target.reshape(-1)
    gt_mask = torch.zeros_like(logits_student).scatter_(1, target.unsqueeze(1), 1).bool()
    other_mask = torch.ones_like(logits_student).scatter_(1, target.unsqueeze(1), 0).bool()

    def cat_mask(t, mask1, mask2):
        t1 = (t * mask1).sum(dim=1, keepdims=True)
        t2 = (t * mask2).sum(1, keepdims=True)
        return torch.cat([t1, t2], dim=1)

    pred_student = F.softmax(logits_student / temperature, dim=1)
    pred_teacher = F.softmax(logits_teacher / temperature, dim=1)
    pred_student = cat_mask(pred_student, gt_mask, other_mask)
    pred_teacher = cat_mask(pred_teacher, gt_mask, other_mask)
    log_pred_student = torch.log(pred_student)
    tckd_loss = F.kl_div(log_pred_student, pred_teacher, reduction="sum") * (temperature**2) / target.shape[0]
    pred_teacher_part2 = F.softmax(logits_teacher / temperature - mask_value * gt_mask, dim=1)
    log_pred_student_part2 = F.log_softmax(logits_student / temperature - mask_value * gt_mask, dim=1)
    nckd_loss = F.kl_div(log_pred_student_part2, pred_teacher_part2, reduction="sum") * (temperature**2) / target.shape[0]
    return alpha * tckd_loss, beta * nckd_loss


def _logsumexp(values):
    m = max(values)
    return m + math.log(math.fsum(math.exp(v - m) for v in values))


def _kl(log_p, log_q):
    return math.fsum(math.exp(lp) * (lp - lq) for lp, lq in zip(log_p, log_q) if lp > -math.inf)


def ref_loop(student, teacher, target, alpha, beta, temperature):
    """The paper's TCKD / NCKD, one sample at a time, in log space (Python floats)."""
    tckd, nckd = [], []
    for s_row, t_row, y in zip(student.double().tolist(), teacher.double().tolist(), target.tolist()):
        s_row = [v / temperature for v in s_row]
        t_row = [v / temperature for v in t_row]
        others = [c for c in range(len(s_row)) if c != y]
        log_bin = []
        for row in (s_row, t_row):
            z = _logsumexp(row)
            log_target = row[y] - z
            log_rest = _logsumexp([row[c] for c in others]) - z
            log_bin.append([log_target, log_rest])
        tckd.append(_kl(log_bin[1], log_bin[0]))
        log_nt = []
        for row in (s_row, t_row):
            z = _logsumexp([row[c] for c in others])
            log_nt.append([row[c] - z for c in others])
        nckd.append(_kl(log_nt[1], log_nt[0]))
    n = len(tckd)
    return alpha * temperature**2 * math.fsum(tckd) / n, beta * temperature**2 * math.fsum(nckd) / n


def ref_standardize(logit):
    """The logit-standardisation authors' ``normalize`` (Sun et al., CVPR 2024)."""
    mean = logit.mean(dim=-1, keepdims=True)
    stdv = logit.std(dim=-1, keepdims=True)
    return (logit - mean) / (1e-7 + stdv)


def _close(actual, expected, rtol=1e-5, atol=1e-6):
    actual = float(actual.detach()) if isinstance(actual, torch.Tensor) else float(actual)
    expected = float(expected.detach()) if isinstance(expected, torch.Tensor) else float(expected)
    assert math.isfinite(actual), actual
    assert abs(actual - expected) <= atol + rtol * abs(expected), (actual, expected)


# --------------------------------------------------------------------------------------------
# dkd_loss against the references
# --------------------------------------------------------------------------------------------


@st.composite
def _case(draw, magnitude=20.0, temperatures=(0.5, 10.0)):
    n = draw(st.integers(1, 6))
    c = draw(st.integers(2, 12))
    values = st.floats(-magnitude, magnitude, allow_nan=False, allow_infinity=False, width=32)
    s = torch.tensor(draw(st.lists(values, min_size=n * c, max_size=n * c)), dtype=torch.float32).reshape(n, c)
    t = torch.tensor(draw(st.lists(values, min_size=n * c, max_size=n * c)), dtype=torch.float32).reshape(n, c)
    y = torch.tensor(draw(st.lists(st.integers(0, c - 1), min_size=n, max_size=n)))
    temperature = draw(st.floats(*temperatures, allow_nan=False))
    alpha = draw(st.floats(0.0, 2.0, allow_nan=False))
    beta = draw(st.floats(0.0, 10.0, allow_nan=False))
    return s, t, y, alpha, beta, temperature


@FAST
@given(_case())
def test_dkd_loss_matches_the_official_code(case):
    s, t, y, alpha, beta, temperature = case
    tckd, nckd = dkd_loss(s, t, y, alpha=alpha, beta=beta, temperature=temperature)
    ref_tckd, ref_nckd = ref_mdistiller(s, t, y, alpha, beta, temperature)
    assert tckd.dtype == nckd.dtype == torch.float32 and tckd.ndim == nckd.ndim == 0
    _close(tckd, ref_tckd, rtol=1e-4, atol=1e-5 * temperature**2)
    _close(nckd, ref_nckd, rtol=1e-4, atol=1e-5 * temperature**2)


@FAST
@given(_case())
def test_dkd_loss_matches_the_per_sample_loop(case):
    s, t, y, alpha, beta, temperature = case
    tckd, nckd = dkd_loss(s, t, y, alpha=alpha, beta=beta, temperature=temperature)
    ref_tckd, ref_nckd = ref_loop(s, t, y, alpha, beta, temperature)
    _close(tckd, ref_tckd, rtol=1e-4, atol=1e-5 * temperature**2)
    _close(nckd, ref_nckd, rtol=1e-4, atol=1e-5 * temperature**2)


@FAST
@given(_case(magnitude=1e3, temperatures=(3.0, 10.0)))
def test_large_logits_stay_finite_and_match_the_official_code(case):
    # |z| <= 1e3 and T >= 3: |z / T| <= 334, where the float64 official code neither underflows nor lets the
    # "- 1000" target mask leak mass back onto the target class -- so it is an exact reference here
    s, t, y, alpha, beta, temperature = case
    tckd, nckd = dkd_loss(s, t, y, alpha=alpha, beta=beta, temperature=temperature)
    ref_tckd, ref_nckd = ref_mdistiller(s, t, y, alpha, beta, temperature)
    assert math.isfinite(float(ref_tckd)) and math.isfinite(float(ref_nckd))
    _close(tckd, ref_tckd, rtol=1e-4, atol=1e-3 * temperature**2)
    _close(nckd, ref_nckd, rtol=1e-4, atol=1e-3 * temperature**2)


@FAST
@given(_case(magnitude=1e3, temperatures=(0.5, 2.0)))
def test_large_logits_at_low_temperature_stay_finite_and_exact(case):
    # here the official code itself breaks (p underflows to 0 -> log 0; the -1000 mask is too small), the
    # log-space loop does not
    s, t, y, alpha, beta, temperature = case
    s_leaf = s.clone().requires_grad_(True)
    tckd, nckd = dkd_loss(s_leaf, t, y, alpha=alpha, beta=beta, temperature=temperature)
    ref_tckd, ref_nckd = ref_loop(s, t, y, alpha, beta, temperature)
    _close(tckd, ref_tckd, rtol=1e-4, atol=1e-2 * temperature**2)
    _close(nckd, ref_nckd, rtol=1e-4, atol=1e-2 * temperature**2)
    (tckd + nckd).backward()
    assert torch.isfinite(s_leaf.grad).all()


def test_official_code_breaks_where_dkd_loss_does_not():
    """The case that motivates the log-space implementation (so the tests above compare different code)."""
    s = torch.tensor([[1000.0, -1000.0, 0.0]])
    t = torch.tensor([[-1000.0, 1000.0, 0.0]])
    y = torch.tensor([0])
    ref_tckd, _ = ref_mdistiller(s, t, y, 1.0, 8.0, 1.0)
    assert not math.isfinite(float(ref_tckd))  # log(0) in float64
    tckd, nckd = dkd_loss(s, t, y, 1.0, 8.0, 1.0)
    exact_tckd, exact_nckd = ref_loop(s, t, y, 1.0, 8.0, 1.0)
    _close(tckd, exact_tckd, rtol=1e-5)
    _close(nckd, exact_nckd, rtol=1e-5)
    # on paper: the teacher's binary distribution is [~0, 1], the student's [1 - e^-1000, e^-1000]: TCKD = 1000;
    # over classes {1, 2} the teacher has [1, e^-1000], the student [e^-1000, 1]: NCKD = 1000 (times beta = 8)
    _close(tckd, 1000.0, rtol=1e-5)
    _close(nckd, 8000.0, rtol=1e-5)


# --------------------------------------------------------------------------------------------
# A case computed on paper
# --------------------------------------------------------------------------------------------


def test_two_classes_by_hand():
    # s = [0, 0] -> p_S = [1/2, 1/2]; t = [ln 3, 0] -> p_T = [3/4, 1/4]; target 0
    # TCKD = 3/4 ln(3/2) + 1/4 ln(1/2); one non-target class: NCKD = KL([1] || [1]) = 0
    s = torch.tensor([[0.0, 0.0]])
    t = torch.tensor([[math.log(3.0), 0.0]])
    tckd, nckd = dkd_loss(s, t, torch.tensor([0]), alpha=1.0, beta=8.0, temperature=1.0)
    _close(tckd, 0.75 * math.log(1.5) + 0.25 * math.log(0.5))
    assert float(nckd) == 0.0


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_three_classes_by_hand(temperature):
    # t / T = [0, ln 3, 0] -> p_T = [1/5, 3/5, 1/5]; s = 0 -> p_S = [1/3, 1/3, 1/3]; target 0
    # TCKD = KL([1/5, 4/5] || [1/3, 2/3]) = 1/5 ln(3/5) + 4/5 ln(6/5)
    # NCKD = KL([3/4, 1/4] || [1/2, 1/2]) = 3/4 ln(3/2) + 1/4 ln(1/2); both times T^2
    s = torch.zeros(1, 3)
    t = torch.tensor([[0.0, temperature * math.log(3.0), 0.0]])
    tckd, nckd = dkd_loss(s, t, torch.tensor([0]), alpha=0.5, beta=8.0, temperature=temperature)
    expected_tckd = 0.2 * math.log(0.6) + 0.8 * math.log(1.2)
    expected_nckd = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
    _close(tckd, 0.5 * temperature**2 * expected_tckd)
    _close(nckd, 8.0 * temperature**2 * expected_nckd)


def test_the_docstring_example_by_hand():
    s, t = [2.0, 0.5, -1.0], [3.0, 0.0, -2.0]

    def softmax(z):
        e = [math.exp(v) for v in z]
        return [v / sum(e) for v in e]

    ps, pt = softmax(s), softmax(t)
    tckd = pt[0] * math.log(pt[0] / ps[0]) + (1 - pt[0]) * math.log((1 - pt[0]) / (1 - ps[0]))
    qs, qt = softmax(s[1:]), softmax(t[1:])
    nckd = sum(a * math.log(a / b) for a, b in zip(qt, qs))
    out = dkd_loss(torch.tensor([s]), torch.tensor([t]), torch.tensor([0]), alpha=1.0, beta=8.0, temperature=1.0)
    _close(out[0], tckd)
    _close(out[1], 8.0 * nckd)


# --------------------------------------------------------------------------------------------
# Invariants
# --------------------------------------------------------------------------------------------


@FAST
@given(_case())
def test_terms_are_non_negative(case):
    s, t, y, alpha, beta, temperature = case
    tckd, nckd = dkd_loss(s, t, y, alpha=1.0, beta=1.0, temperature=temperature)
    assert float(tckd) >= 0.0 and float(nckd) >= 0.0


@FAST
@given(_case(magnitude=1e3))
def test_terms_vanish_when_student_equals_teacher(case):
    s, _, y, _, _, temperature = case
    tckd, nckd = dkd_loss(s, s.clone(), y, alpha=1.0, beta=8.0, temperature=temperature)
    assert float(tckd) == 0.0 and float(nckd) == 0.0


@FAST
@given(_case(), st.floats(0.0, 5.0), st.floats(0.0, 5.0))
def test_alpha_and_beta_scale_their_terms_linearly(case, a, b):
    s, t, y, _, _, temperature = case
    tckd1, nckd1 = dkd_loss(s, t, y, alpha=1.0, beta=1.0, temperature=temperature)
    tckd, nckd = dkd_loss(s, t, y, alpha=a, beta=b, temperature=temperature)
    _close(tckd, a * float(tckd1), rtol=1e-6, atol=1e-7)
    _close(nckd, b * float(nckd1), rtol=1e-6, atol=1e-7)
    # alpha does not touch NCKD, beta does not touch TCKD
    _, nckd_other_alpha = dkd_loss(s, t, y, alpha=a + 1.0, beta=b, temperature=temperature)
    tckd_other_beta, _ = dkd_loss(s, t, y, alpha=a, beta=b + 1.0, temperature=temperature)
    assert float(nckd_other_alpha) == float(nckd) and float(tckd_other_beta) == float(tckd)


def test_gradient_is_finite_and_reaches_the_student_only():
    g = torch.Generator().manual_seed(0)
    s = (torch.randn(8, 10, generator=g) * 300).requires_grad_(True)
    t_leaf = (torch.randn(8, 10, generator=g) * 300).requires_grad_(True)
    y = torch.randint(0, 10, (8,), generator=g)
    dkd = DKD(alpha=1.0, beta=8.0, temperature=1.0, warmup_epochs=0)
    with torch.no_grad():  # how the module runs a teacher
        teacher = ModelOutputs(t_leaf * 1.0)
    out = dkd(ModelOutputs(s), teacher, Batch(None, y), StepInfo(0))
    out["loss"].backward()
    assert torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0
    assert t_leaf.grad is None


def test_gradient_is_finite_for_identical_models():
    s = torch.randn(4, 5).requires_grad_(True)
    tckd, nckd = dkd_loss(s, s.detach().clone(), torch.tensor([0, 1, 2, 3]))
    (tckd + nckd).backward()
    assert torch.isfinite(s.grad).all()
    assert s.grad.abs().max() < 1e-5  # the minimum


def test_dkd_loss_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match=r"DKD needs \[N, C\] student and teacher logits of the same shape, got \(2, 3\) and \(2, 4\)"):
        dkd_loss(torch.zeros(2, 3), torch.zeros(2, 4), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"got \(2, 3, 4\) and \(2, 3, 4\)"):
        dkd_loss(torch.zeros(2, 3, 4), torch.zeros(2, 3, 4), torch.zeros(2, 3, dtype=torch.long))


# --------------------------------------------------------------------------------------------
# The DKD objective
# --------------------------------------------------------------------------------------------


def _pair(n=6, c=10, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    s, t = torch.randn(n, c, generator=g) * scale, torch.randn(n, c, generator=g) * scale
    y = torch.randint(0, c, (n,), generator=g)
    return s, t, y


@pytest.mark.parametrize("epoch, factor", [(0, 1 / 20), (1, 2 / 20), (19, 1.0), (25, 1.0)])
def test_warmup_factor(epoch, factor):
    s, t, y = _pair()
    dkd = DKD(weight=0.7, alpha=1.0, beta=8.0, temperature=4.0, warmup_epochs=20)
    out = dkd(ModelOutputs(s), ModelOutputs(t), Batch(None, y), StepInfo(epoch))
    ref_tckd, ref_nckd = ref_mdistiller(s, t, y, 1.0, 8.0, 4.0)
    _close(out["dkd_loss"], ref_tckd + ref_nckd, rtol=1e-5)  # logged before warm-up and weight
    _close(out["loss"], 0.7 * factor * float(ref_tckd + ref_nckd), rtol=1e-5)
    assert dkd.warmup(epoch) == pytest.approx(factor)


def test_no_warmup_and_no_step_info():
    s, t, y = _pair()
    dkd = DKD(weight=1.0, warmup_epochs=0)
    ref = sum(ref_mdistiller(s, t, y, 1.0, 8.0, 4.0))
    for step in (StepInfo(0), StepInfo(3), None):
        _close(dkd(ModelOutputs(s), ModelOutputs(t), Batch(None, y), step)["loss"], ref, rtol=1e-5)
    # without a StepInfo the warm-up reads epoch 0
    _close(DKD(warmup_epochs=4)(ModelOutputs(s), ModelOutputs(t), Batch(None, y), None)["loss"], ref / 4, rtol=1e-5)


def test_logged_terms():
    s, t, y = _pair()
    out = DKD(alpha=0.5, beta=2.0, temperature=2.0, warmup_epochs=0)(ModelOutputs(s), ModelOutputs(t), Batch(None, y), StepInfo(0))
    assert set(out) == {"loss", "dkd_loss", "tckd", "nckd"}
    ref_tckd, ref_nckd = ref_mdistiller(s, t, y, 0.5, 2.0, 2.0)
    _close(out["tckd"], ref_tckd, rtol=1e-5)  # weighted by alpha
    _close(out["nckd"], ref_nckd, rtol=1e-5)  # weighted by beta
    _close(out["dkd_loss"], float(out["tckd"]) + float(out["nckd"]), rtol=1e-6)


def test_without_a_teacher_every_term_is_zero():
    s, _, y = _pair()
    out = DKD()(ModelOutputs(s), None, Batch(None, y), StepInfo(0))
    assert set(out) >= {"loss", "dkd_loss", "tckd", "nckd"}
    assert all(float(v) == 0.0 for v in out.values())


@pytest.mark.parametrize("target, missing", [(torch.tensor([0, -100, 2, -100]), 2), (None, 4)])
def test_unlabelled_samples_are_refused(target, missing):
    s, t, _ = _pair(n=4)
    with pytest.raises(ValueError, match=rf"DKD needs the target class of every sample .* but {missing} of 4 samples in this batch have no label\. Give them the teacher's class with pseudo_labels=0\.0, or use LogitKD"):
        DKD()(ModelOutputs(s), ModelOutputs(t), Batch(None, target), StepInfo(0))


def test_custom_ignore_index_marks_unlabelled_samples():
    s, t, _ = _pair(n=3)
    with pytest.raises(ValueError, match="but 1 of 3 samples"):
        DKD(ignore_index=-1)(ModelOutputs(s), ModelOutputs(t), Batch(None, torch.tensor([0, -1, 2])), StepInfo(0))


def test_token_logits_use_only_labelled_tokens():
    g = torch.Generator().manual_seed(3)
    n, length, vocab = 2, 5, 7
    s, t = torch.randn(n, length, vocab, generator=g) * 2, torch.randn(n, length, vocab, generator=g) * 2
    y = torch.randint(0, vocab, (n, length), generator=g)
    y[0, 3:] = -100
    y[1, 0] = -100
    valid = y != -100
    dkd = DKD(alpha=1.0, beta=8.0, temperature=2.0, warmup_epochs=0)
    out = dkd(ModelOutputs(s), ModelOutputs(t), Batch(None, y), StepInfo(0))
    ref_tckd, ref_nckd = ref_mdistiller(s[valid], t[valid], y[valid], 1.0, 8.0, 2.0)  # the 7 labelled tokens
    _close(out["tckd"], ref_tckd, rtol=1e-5)
    _close(out["nckd"], ref_nckd, rtol=1e-5)
    # what the padded tokens hold does not matter
    s2, t2 = s.clone(), t.clone()
    s2[~valid], t2[~valid] = 1e4, -1e4
    out2 = dkd(ModelOutputs(s2), ModelOutputs(t2), Batch(None, y), StepInfo(0))
    _close(out2["loss"], out["loss"], rtol=1e-6)


def test_token_logits_without_labelled_tokens_give_zero_with_a_gradient():
    s = torch.randn(2, 3, 5, requires_grad=True)
    out = DKD(warmup_epochs=0)(ModelOutputs(s), ModelOutputs(torch.randn(2, 3, 5)), Batch(None, torch.full((2, 3), -100)), StepInfo(0))
    assert float(out["loss"]) == 0.0
    out["loss"].backward()
    assert torch.equal(s.grad, torch.zeros_like(s))


def test_token_logits_need_labels():
    with pytest.raises(ValueError, match=r"DKD on token logits \[N, L, V\] needs the batch's labels"):
        DKD()(ModelOutputs(torch.zeros(2, 3, 5)), ModelOutputs(torch.zeros(2, 3, 5)), Batch(None), StepInfo(0))


@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_standardize_uses_the_authors_normalize(temperature):
    s, t, y = _pair(scale=5.0)
    s, t = s * 3 + 7, t * 0.2 - 1  # different scales and shifts
    dkd = DKD(alpha=1.0, beta=8.0, temperature=temperature, warmup_epochs=0, standardize=True)
    out = dkd(ModelOutputs(s), ModelOutputs(t), Batch(None, y), StepInfo(0))
    ref_tckd, ref_nckd = ref_mdistiller(ref_standardize(s), ref_standardize(t), y, 1.0, 8.0, temperature)
    _close(out["tckd"], ref_tckd, rtol=1e-4, atol=1e-6)
    _close(out["nckd"], ref_nckd, rtol=1e-4, atol=1e-6)
    plain = DKD(alpha=1.0, beta=8.0, temperature=temperature, warmup_epochs=0)(ModelOutputs(s), ModelOutputs(t), Batch(None, y), StepInfo(0))
    assert abs(float(plain["loss"]) - float(out["loss"])) > 1e-2  # standardisation changes the value here


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"alpha": -1.0}, ValueError, r"`alpha` must be .*>= 0.*got -1\.0"),
        ({"beta": float("nan")}, ValueError, r"`beta` must be"),
        ({"temperature": 0.0}, ValueError, r"`temperature` must be a finite number > 0, got 0\.0"),
        ({"temperature": float("inf")}, ValueError, r"`temperature` must be a finite number > 0"),
        ({"warmup_epochs": -1}, ValueError, r"`warmup_epochs` must be an integer >= 0, got -1"),
        ({"warmup_epochs": 2.5}, ValueError, r"`warmup_epochs` must be an integer >= 0, got 2\.5"),
        ({"weight": -0.5}, ValueError, r"`weight` must be"),
        ({"standardize": 1}, TypeError, r"`standardize` must be True or False, got 1\."),
    ],
)
def test_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        DKD(**kwargs)


# --------------------------------------------------------------------------------------------
# In a module: a short fit on digits
# --------------------------------------------------------------------------------------------


def test_short_fit_on_digits(digits_dm, make_trainer, single_thread, seeded):
    from lightning_distill import DistillationModule
    from lightning_distill.models import DigitsCNN, DigitsMLP
    from lightning_distill.objectives import CrossEntropy
    from lightning_distill.teachers import FrozenTeacher

    teacher = DigitsCNN()
    module = DistillationModule(
        DigitsMLP(hidden=16), FrozenTeacher(teacher, checkpoint="zoo:digits_cnn"),
        objectives={"task": CrossEntropy(1.0), "dkd": DKD(warmup_epochs=1)},
        optimizer=lambda params: torch.optim.Adam(params, lr=0.01),
    )
    teacher_before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student_before = {k: v.clone() for k, v in module.student.state_dict().items()}
    losses = []

    class Record(__import__("lightning").Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append(float(outputs["loss"]))

    trainer = make_trainer(max_epochs=2, limit_train_batches=4, limit_val_batches=1, num_sanity_val_steps=0,
                           log_every_n_steps=1, callbacks=[Record()])
    trainer.fit(module, datamodule=digits_dm)
    assert trainer.global_step == 8
    assert len(losses) == 8 and all(math.isfinite(v) for v in losses)
    for name in ("train/loss", "train/task_loss", "train/dkd_loss", "train/tckd", "train/nckd"):
        assert name in trainer.callback_metrics and math.isfinite(float(trainer.callback_metrics[name])), name
    assert all(torch.equal(teacher.state_dict()[k], v) for k, v in teacher_before.items())  # incl. BN statistics
    assert not any(m.training for m in teacher.modules())
    assert not any(p.requires_grad for p in teacher.parameters())
    assert any(not torch.equal(module.student.state_dict()[k], v) for k, v in student_before.items())

    # the logged DKD term of one batch equals the reference on the models' logits
    module.eval()
    x, y, _ = next(iter(digits_dm.train_dataloader()))
    terms, b = module.training_terms((x, y))
    with torch.no_grad():
        ref_tckd, ref_nckd = ref_mdistiller(module.student(x), teacher(x), y, 1.0, 8.0, 4.0)
    _close(terms["tckd"], ref_tckd, rtol=1e-4, atol=1e-6)
    _close(terms["nckd"], ref_nckd, rtol=1e-4, atol=1e-6)
    # epoch 1 of a 1-epoch warm-up: factor 1; the total is CE + DKD
    _close(terms["loss"], float(F.cross_entropy(module.student(x), y)) + float(ref_tckd + ref_nckd), rtol=1e-4)
