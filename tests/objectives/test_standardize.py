"""Logit standardisation (Sun et al., CVPR 2024, arXiv:2403.01427) and ``standardize=True`` on the logit objectives.

The reference is the authors' ``normalize`` re-typed: ``(logit - mean) / (1e-7 + std)`` with torch's default
(unbiased) standard deviation over the last dimension.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from lightning_distill.batch import Batch
from lightning_distill.losses import kd_loss
from lightning_distill.objectives import DKD, LogitKD, MultiTeacherKD, StepInfo, dkd_loss, standardize_logits
from lightning_distill.outputs import ModelOutputs

FAST = settings(max_examples=40, deadline=None)


def normalize(logit):
    """The authors' code (Sun et al. 2024, ``normalize``), re-typed."""
    mean = logit.mean(dim=-1, keepdims=True)
    stdv = logit.std(dim=-1, keepdims=True)
    return (logit - mean) / (1e-7 + stdv)


def kl_by_hand(student, teacher, temperature):
    """``T^2 * mean_i sum_c p_T log(p_T / p_S)`` for ``[N, C]`` logits, in float64."""
    log_p_t = torch.log_softmax(teacher.double() / temperature, -1)
    log_p_s = torch.log_softmax(student.double() / temperature, -1)
    return float((log_p_t.exp() * (log_p_t - log_p_s)).sum(-1).mean()) * temperature**2


def _close(actual, expected, rtol=1e-5, atol=1e-6):
    actual = float(actual.detach()) if isinstance(actual, torch.Tensor) else float(actual)
    expected = float(expected.detach()) if isinstance(expected, torch.Tensor) else float(expected)
    assert math.isfinite(actual), actual
    assert abs(actual - expected) <= atol + rtol * abs(expected), (actual, expected)


# --------------------------------------------------------------------------------------------
# strategies: logits on a half-integer grid (rows with a clear spread), per-sample shifts and scales
# --------------------------------------------------------------------------------------------

_grid = st.integers(-10, 10).map(lambda v: v / 2.0)


@st.composite
def _logits(draw, n=None, c=None):
    n = draw(st.integers(1, 6)) if n is None else n
    c = draw(st.integers(2, 10)) if c is None else c
    z = torch.tensor(draw(st.lists(_grid, min_size=n * c, max_size=n * c)), dtype=torch.float32).reshape(n, c)
    assume(bool((z.std(-1) > 0.3).all()))
    return z


@st.composite
def _affine(draw, n):
    shift = torch.tensor(draw(st.lists(st.floats(-50.0, 50.0), min_size=n, max_size=n)), dtype=torch.float32)
    scale = torch.tensor(draw(st.lists(st.floats(0.1, 10.0), min_size=n, max_size=n)), dtype=torch.float32)
    return shift.unsqueeze(-1), scale.unsqueeze(-1)


@st.composite
def _pair_with_affine(draw):
    s = draw(_logits())
    t = draw(_logits(n=s.shape[0], c=s.shape[1]))
    return s, t, draw(_affine(s.shape[0])), draw(st.floats(0.5, 8.0))


# --------------------------------------------------------------------------------------------
# standardize_logits
# --------------------------------------------------------------------------------------------


@FAST
@given(_logits())
def test_equals_the_authors_normalize(z):
    out = standardize_logits(z)
    assert out.dtype == torch.float32 and out.shape == z.shape
    torch.testing.assert_close(out, normalize(z), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.double(), normalize(z.double()), rtol=1e-5, atol=1e-5)


def test_equals_normalize_on_token_logits_and_reduced_precision():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(2, 3, 11, generator=g) * 4 + 2
    torch.testing.assert_close(standardize_logits(z), normalize(z))  # over the last dimension only
    out = standardize_logits(z.bfloat16())
    assert out.dtype == torch.float32  # computed in float32
    torch.testing.assert_close(out, normalize(z.bfloat16().float()))


def test_by_hand():
    # [1, 2, 3, 6]: mean 3, unbiased variance (4 + 1 + 0 + 9) / 3 = 14 / 3
    std = math.sqrt(14.0 / 3.0)
    expected = [(v - 3.0) / (std + 1e-7) for v in (1.0, 2.0, 3.0, 6.0)]
    torch.testing.assert_close(standardize_logits(torch.tensor([[1.0, 2.0, 3.0, 6.0]]))[0], torch.tensor(expected))


@FAST
@given(_logits())
def test_standardised_rows_have_zero_mean_and_unit_std(z):
    out = standardize_logits(z)
    torch.testing.assert_close(out.mean(-1), torch.zeros(z.shape[0]), rtol=0, atol=1e-5)
    torch.testing.assert_close(out.std(-1), torch.ones(z.shape[0]), rtol=0, atol=1e-5)


@FAST
@given(_pair_with_affine())
def test_invariant_to_per_sample_shift_and_positive_scale(case):
    z, _, (shift, scale), _ = case
    torch.testing.assert_close(standardize_logits(z * scale + shift), standardize_logits(z), rtol=0, atol=5e-4)


def test_negative_scale_flips_the_sign():
    z = torch.tensor([[1.0, 2.0, 4.0]])
    torch.testing.assert_close(standardize_logits(-2.0 * z), -standardize_logits(z))


# --------------------------------------------------------------------------------------------
# LogitKD(standardize=True)
# --------------------------------------------------------------------------------------------


def _kd_value(objective, s, t, batch=None):
    return objective(ModelOutputs(s), ModelOutputs(t), batch if batch is not None else Batch(None), StepInfo(0))["kd_loss"]


@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.0])
def test_logitkd_equals_kd_loss_of_the_standardised_logits(temperature):
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(6, 10, generator=g) * 3 + 1, torch.randn(6, 10, generator=g) * 0.3 - 4
    out = LogitKD(weight=0.8, temperature=temperature, standardize=True)(ModelOutputs(s), ModelOutputs(t), Batch(None), StepInfo(0))
    expected = kl_by_hand(normalize(s), normalize(t), temperature)  # includes T^2
    _close(out["kd_loss"], expected, rtol=1e-5)
    _close(out["kd_loss"], kd_loss(normalize(s), normalize(t), temperature), rtol=1e-5)
    _close(out["loss"], 0.8 * expected, rtol=1e-5)
    # and it is not the unstandardised value
    assert abs(float(out["kd_loss"]) - kl_by_hand(s, t, temperature)) > 1e-2


def test_logitkd_standardize_on_token_logits_with_a_mask():
    g = torch.Generator().manual_seed(2)
    s, t = torch.randn(2, 4, 7, generator=g) * 2, torch.randn(2, 4, 7, generator=g) * 5
    mask = torch.tensor([[True, True, False, False], [True, True, True, True]])
    out = _kd_value(LogitKD(temperature=2.0, standardize=True), s, t, Batch(None, mask=mask))
    _close(out, kl_by_hand(normalize(s[mask]), normalize(t[mask]), 2.0), rtol=1e-5)


@FAST
@given(_pair_with_affine())
def test_logitkd_standardize_is_invariant_to_either_models_shift_and_scale(case):
    s, t, (shift, scale), temperature = case
    kd = LogitKD(temperature=temperature, standardize=True)
    base = float(_kd_value(kd, s, t))
    _close(_kd_value(kd, s * scale + shift, t), base, rtol=1e-3, atol=1e-3)
    _close(_kd_value(kd, s, t * scale + shift), base, rtol=1e-3, atol=1e-3)
    _close(_kd_value(kd, s * scale + shift, t * scale.flip(0) - shift), base, rtol=1e-3, atol=1e-3)


@FAST
@given(_pair_with_affine())
def test_logitkd_without_standardize_is_shift_invariant_only(case):
    s, t, (shift, _), temperature = case
    kd = LogitKD(temperature=temperature)
    base = float(_kd_value(kd, s, t))
    _close(_kd_value(kd, s + shift, t - shift), base, rtol=1e-4, atol=1e-4)


def test_logitkd_without_standardize_is_not_scale_invariant():
    """The control of the invariance test above: scaling one model's logits changes the plain KD loss."""
    s, t = torch.tensor([[1.0, 0.0, -1.0]]), torch.tensor([[2.0, 0.5, 0.0]])
    plain, std = LogitKD(temperature=1.0), LogitKD(temperature=1.0, standardize=True)
    for scaled_s, scaled_t in ((3.0 * s, t), (s, 0.2 * t)):
        assert abs(float(_kd_value(plain, scaled_s, scaled_t)) - float(_kd_value(plain, s, t))) > 0.05
        _close(_kd_value(std, scaled_s, scaled_t), _kd_value(std, s, t), rtol=1e-4, atol=1e-6)


def test_logitkd_standardize_gradient_reaches_the_student():
    s = (torch.randn(4, 6) * 2).requires_grad_(True)
    out = LogitKD(temperature=2.0, standardize=True)(ModelOutputs(s), ModelOutputs(torch.randn(4, 6)), Batch(None), StepInfo(0))
    out["loss"].backward()
    assert torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0
    # a per-sample shift of the student's logits cannot change the loss: the gradient sums to 0 over the classes
    torch.testing.assert_close(s.grad.sum(-1), torch.zeros(4), rtol=0, atol=1e-6)


# --------------------------------------------------------------------------------------------
# DKD(standardize=True)
# --------------------------------------------------------------------------------------------


@FAST
@given(_pair_with_affine(), st.data())
def test_dkd_standardize_equals_dkd_of_normalized_logits_and_is_invariant(case, data):
    s, t, (shift, scale), temperature = case
    y = torch.tensor(data.draw(st.lists(st.integers(0, s.shape[1] - 1), min_size=s.shape[0], max_size=s.shape[0])))
    dkd = DKD(alpha=1.0, beta=8.0, temperature=temperature, warmup_epochs=0, standardize=True)

    def run(a, b):
        return dkd(ModelOutputs(a), ModelOutputs(b), Batch(None, y), StepInfo(0))

    out = run(s, t)
    tckd, nckd = dkd_loss(normalize(s), normalize(t), y, 1.0, 8.0, temperature)
    _close(out["tckd"], tckd, rtol=1e-5, atol=1e-6)
    _close(out["nckd"], nckd, rtol=1e-5, atol=1e-6)
    moved = run(s * scale + shift, t * scale.flip(0) - shift)
    _close(moved["dkd_loss"], out["dkd_loss"], rtol=1e-3, atol=1e-3)


# --------------------------------------------------------------------------------------------
# MultiTeacherKD(standardize=True)
# --------------------------------------------------------------------------------------------


def mixture_kl_by_hand(student, teachers, weights, temperature):
    """``T^2 * mean_i KL(sum_m w_im softmax(z_im / T) || softmax(z_Si / T))`` with explicit loops (float64)."""
    total = 0.0
    n = student.shape[0]
    for i in range(n):
        mix = sum(weights[i][m] * torch.softmax(teachers[m][i].double() / temperature, -1) for m in range(len(teachers)))
        log_q = torch.log_softmax(student[i].double() / temperature, -1)
        total += float((mix * (mix.log() - log_q)).sum())
    return temperature**2 * total / n


@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_multi_teacher_mean_standardize_by_hand(temperature):
    g = torch.Generator().manual_seed(4)
    s = torch.randn(5, 6, generator=g) * 3
    t = torch.stack([torch.randn(5, 6, generator=g) * 0.5 + 2, torch.randn(5, 6, generator=g) * 8])
    out = MultiTeacherKD(weight=0.9, weighting="mean", temperature=temperature, standardize=True)(
        ModelOutputs(s), ModelOutputs(t), Batch(None), StepInfo(0)
    )
    weights = [[0.5, 0.5]] * 5
    expected = mixture_kl_by_hand(normalize(s), [normalize(t[0]), normalize(t[1])], weights, temperature)
    _close(out["kd_loss"], expected, rtol=1e-5)
    _close(out["loss"], 0.9 * expected, rtol=1e-5)
    plain = mixture_kl_by_hand(s, [t[0], t[1]], weights, temperature)
    assert abs(float(out["kd_loss"]) - plain) > 1e-2


@FAST
@given(_pair_with_affine(), st.data())
def test_multi_teacher_mean_standardize_is_invariant_per_teacher(case, data):
    s, t0, (shift, scale), temperature = case
    t1 = data.draw(_logits(n=s.shape[0], c=s.shape[1]))
    kd = MultiTeacherKD(weighting="mean", temperature=temperature, standardize=True)

    def run(a, b0, b1):
        return kd(ModelOutputs(a), ModelOutputs(torch.stack([b0, b1])), Batch(None), StepInfo(0))["kd_loss"]

    base = float(run(s, t0, t1))
    _close(run(s * scale + shift, t0, t1), base, rtol=1e-3, atol=1e-3)
    _close(run(s, t0 * scale + shift, t1), base, rtol=1e-3, atol=1e-3)
    _close(run(s, t0, t1 * scale.flip(0) - shift), base, rtol=1e-3, atol=1e-3)


def test_multi_teacher_confidence_standardize_is_invariant_to_a_teachers_scale():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(4, 5, generator=g), torch.randn(2, 4, 5, generator=g)
    kd = MultiTeacherKD(weighting="confidence", temperature=2.0, standardize=True)
    base = kd(ModelOutputs(s), ModelOutputs(t), Batch(None), StepInfo(0))
    scaled = t.clone()
    scaled[0] = 5.0 * scaled[0]  # the same standardised logits
    torch.testing.assert_close(standardize_logits(scaled), standardize_logits(t), rtol=0, atol=1e-5)
    moved = kd(ModelOutputs(s), ModelOutputs(scaled), Batch(None), StepInfo(0))
    _close(moved["teacher0_weight"], base["teacher0_weight"], rtol=1e-4, atol=1e-5)
    _close(moved["kd_loss"], base["kd_loss"], rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------------------------
# The presets pass it on; bad values
# --------------------------------------------------------------------------------------------


def test_presets_pass_standardize_to_their_objective():
    from lightning_distill import KnowledgeDistillation, MultiTeacherDistillation
    from lightning_distill.models import DigitsCNN, DigitsMLP

    assert KnowledgeDistillation(DigitsMLP(), DigitsCNN(), standardize=True).objectives["kd"].standardize is True
    assert KnowledgeDistillation(DigitsMLP(), DigitsCNN()).objectives["kd"].standardize is False
    multi = MultiTeacherDistillation(DigitsMLP(), [DigitsCNN(), DigitsCNN()], standardize=True)
    assert multi.objectives["kd"].standardize is True


@pytest.mark.parametrize("bad", [1, 0, 1.0, "yes", "True", None])
@pytest.mark.parametrize(
    "build",
    [
        lambda v: LogitKD(standardize=v),
        lambda v: DKD(standardize=v),
        lambda v: MultiTeacherKD(standardize=v),
    ],
    ids=["LogitKD", "DKD", "MultiTeacherKD"],
)
def test_non_bool_standardize_is_refused(build, bad):
    with pytest.raises(TypeError, match=rf"`standardize` must be True or False, got {__import__('re').escape(repr(bad))}\."):
        build(bad)


@pytest.mark.parametrize("bad", [1, "yes"])
def test_presets_refuse_non_bool_standardize(bad):
    from lightning_distill import KnowledgeDistillation, MultiTeacherDistillation
    from lightning_distill.models import DigitsCNN, DigitsMLP

    with pytest.raises(TypeError, match=r"`standardize` must be True or False"):
        KnowledgeDistillation(DigitsMLP(), DigitsCNN(), standardize=bad)
    with pytest.raises(TypeError, match=r"`standardize` must be True or False"):
        MultiTeacherDistillation(DigitsMLP(), [DigitsCNN()], standardize=bad)
