"""Feature losses of :mod:`lightning_distill.losses` (everything after ``kd_loss``).

Every loss is compared with an independent float64 reference written below as explicit Python
loops over samples / pairs / triplets (``math.sqrt``, ``math.exp``; no torch reductions, no
``F.normalize`` / ``F.cosine_similarity`` / ``F.smooth_l1_loss``). Linear CKA is checked against
the HSIC formulation with an explicit centering matrix ``H = I - 11^T / N`` (the code uses the
column-centred Gram form instead). Hypothesis then checks the invariants each paper relies on.
Behaviours first found as bugs here (cosine < 0 by rounding, CKA's absolute eps) are fixed; their
tests stay.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from lightning_distill.losses import (
    attention_map,
    attention_transfer_loss,
    cka_loss,
    cosine_feature_loss,
    info_nce_loss,
    linear_cka,
    mse_feature_loss,
    rkd_angle_loss,
    rkd_distance_loss,
    similarity_preserving_loss,
)

pytestmark = pytest.mark.usefixtures("single_thread")


def _randn(*shape, seed: int, scale: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).float()


def _close(actual: torch.Tensor, expected: float, rtol: float = 1e-4, atol: float = 1e-6) -> None:
    assert actual.dtype == torch.float32
    assert actual.ndim == 0
    assert math.isclose(actual.item(), expected, rel_tol=rtol, abs_tol=atol), (actual.item(), expected)


# --------------------------------------------------------------------------------------------
# Independent float64 references: Python loops, math.* only.
# --------------------------------------------------------------------------------------------


def _rows(x: torch.Tensor) -> list[list[float]]:
    return x.double().reshape(x.shape[0], -1).tolist()


def _dot(a: list[float], b: list[float]) -> float:
    total = 0.0
    for u, v in zip(a, b):
        total += u * v
    return total


def _norm(a: list[float]) -> float:
    return math.sqrt(_dot(a, a))


def _cos(a: list[float], b: list[float]) -> float:
    return _dot(a, b) / (_norm(a) * _norm(b))


def _smooth_l1(a: float, b: float) -> float:
    d = abs(a - b)
    return 0.5 * d * d if d < 1.0 else d - 0.5


def _matmul(a: list[list[float]], b: list[list[float]]) -> list[list[float]]:
    n, k, m = len(a), len(b), len(b[0])
    return [[sum(a[i][p] * b[p][j] for p in range(k)) for j in range(m)] for i in range(n)]


def _transpose(a: list[list[float]]) -> list[list[float]]:
    return [list(col) for col in zip(*a)]


def _trace(a: list[list[float]]) -> float:
    return sum(a[i][i] for i in range(len(a)))


def ref_mse(student, teacher, mask=None) -> float:
    s, t = student.double().tolist(), teacher.double().tolist()
    if mask is None:
        flat_s, flat_t = student.double().reshape(-1).tolist(), teacher.double().reshape(-1).tolist()
        return sum((a - b) ** 2 for a, b in zip(flat_s, flat_t)) / len(flat_s)
    m = mask.bool().tolist()
    total, count = 0.0, 0
    for n in range(len(s)):
        for pos in range(len(s[n])):
            if m[n][pos]:
                d = len(s[n][pos])
                total += sum((s[n][pos][k] - t[n][pos][k]) ** 2 for k in range(d)) / d
                count += 1
    return total / count if count else 0.0


def ref_cosine(student, teacher, mask=None) -> float:
    values = []
    if student.ndim == 4:  # along channels, per (sample, h, w)
        s, t = student.double().tolist(), teacher.double().tolist()
        n, c, h, w = student.shape
        for i in range(n):
            for y in range(h):
                for x in range(w):
                    a = [s[i][ch][y][x] for ch in range(c)]
                    b = [t[i][ch][y][x] for ch in range(c)]
                    values.append(1.0 - _cos(a, b))
    elif student.ndim == 3:
        s, t = student.double().tolist(), teacher.double().tolist()
        m = mask.bool().tolist() if mask is not None else None
        for i in range(len(s)):
            for pos in range(len(s[i])):
                if m is None or m[i][pos]:
                    values.append(1.0 - _cos(s[i][pos], t[i][pos]))
    else:
        for a, b in zip(_rows(student), _rows(teacher)):
            values.append(1.0 - _cos(a, b))
    return sum(values) / len(values) if values else 0.0


def ref_cka(x, y) -> float:
    """HSIC form: tr(KHLH) / sqrt(tr(KHKH) tr(LHLH)), K = XX^T, L = YY^T (uncentred), H = I - 11^T/N."""
    xs, ys = _rows(x), _rows(y)
    n = len(xs)
    k = _matmul(xs, _transpose(xs))
    lm = _matmul(ys, _transpose(ys))
    h = [[(1.0 if i == j else 0.0) - 1.0 / n for j in range(n)] for i in range(n)]
    kh, lh = _matmul(k, h), _matmul(lm, h)
    hsic_kl = _trace(_matmul(kh, lh))
    hsic_kk = _trace(_matmul(kh, kh))
    hsic_ll = _trace(_matmul(lh, lh))
    return hsic_kl / math.sqrt(hsic_kk * hsic_ll)


def _avg_pool(f: list, out_h: int, out_w: int) -> list:
    """[N][C][H][W] nested lists, integer factors only."""
    h, w = len(f[0][0]), len(f[0][0][0])
    fh, fw = h // out_h, w // out_w
    assert fh * out_h == h and fw * out_w == w
    out = []
    for sample in f:
        chans = []
        for ch in sample:
            grid = []
            for oy in range(out_h):
                row = []
                for ox in range(out_w):
                    vals = [ch[oy * fh + dy][ox * fw + dx] for dy in range(fh) for dx in range(fw)]
                    row.append(sum(vals) / len(vals))
                grid.append(row)
            chans.append(grid)
        out.append(chans)
    return out


def ref_attention_maps(f: list) -> list[list[float]]:
    """RepDistiller's ``at``: normalize(mean_c f_c^2), flattened per sample."""
    maps = []
    for sample in f:
        c, h, w = len(sample), len(sample[0]), len(sample[0][0])
        a = [sum(sample[ch][y][x] ** 2 for ch in range(c)) / c for y in range(h) for x in range(w)]
        nrm = _norm(a)
        maps.append([v / nrm for v in a])
    return maps


def ref_attention(student, teacher) -> float:
    s, t = student.double().tolist(), teacher.double().tolist()
    sh, sw = student.shape[-2:]
    th, tw = teacher.shape[-2:]
    oh, ow = min(sh, th), min(sw, tw)
    if (sh, sw) != (oh, ow):
        s = _avg_pool(s, oh, ow)
    if (th, tw) != (oh, ow):
        t = _avg_pool(t, oh, ow)
    a_s, a_t = ref_attention_maps(s), ref_attention_maps(t)
    total, count = 0.0, 0
    for rs, rt in zip(a_s, a_t):
        for u, v in zip(rs, rt):
            total += (u - v) ** 2
            count += 1
    return total / count


def _ref_psi_d(x) -> list[list[float]]:
    rows = _rows(x)
    n = len(rows)
    d = [[0.0 if i == j else _norm([a - b for a, b in zip(rows[i], rows[j])]) for j in range(n)] for i in range(n)]
    mu = sum(d[i][j] for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    return [[d[i][j] / mu for j in range(n)] for i in range(n)]


def ref_rkd_distance(student, teacher) -> float:
    ps, pt = _ref_psi_d(student), _ref_psi_d(teacher)
    n = len(ps)
    return sum(_smooth_l1(ps[i][j], pt[i][j]) for i in range(n) for j in range(n)) / (n * n)


def _ref_psi_a(x) -> dict[tuple[int, int, int], float]:
    rows = _rows(x)
    n = len(rows)

    def e(i: int, j: int) -> list[float]:  # unit vector from x_j to x_i; 0 when i == j
        diff = [a - b for a, b in zip(rows[i], rows[j])]
        nrm = _norm(diff)
        return [0.0] * len(diff) if nrm == 0.0 else [v / nrm for v in diff]

    return {(i, j, k): _dot(e(i, j), e(k, j)) for i in range(n) for j in range(n) for k in range(n)}


def ref_rkd_angle(student, teacher) -> float:
    ps, pt = _ref_psi_a(student), _ref_psi_a(teacher)
    return sum(_smooth_l1(ps[key], pt[key]) for key in ps) / len(ps)


def ref_sp(student, teacher) -> float:
    def normalised_gram(x):
        q = _rows(x)
        g = [[_dot(a, b) for b in q] for a in q]
        return [[v / _norm(row) for v in row] for row in g]

    gs, gt = normalised_gram(student), normalised_gram(teacher)
    n = len(gs)
    return sum((gt[i][j] - gs[i][j]) ** 2 for i in range(n) for j in range(n)) / (n * n)


def ref_info_nce(anchor, positive, negatives, temperature) -> float:
    a_rows, p_rows = anchor.double().tolist(), positive.double().tolist()
    n_rows = negatives.double().tolist()
    total = 0.0
    for a, p, negs in zip(a_rows, p_rows, n_rows):
        logits = [_cos(a, p) / temperature] + [_cos(a, neg) / temperature for neg in negs]
        top = max(logits)
        lse = top + math.log(sum(math.exp(v - top) for v in logits))
        total += lse - logits[0]
    return total / len(a_rows)


def test_references_on_hand_computed_cases():
    """The references themselves, on cases small enough to work out by hand."""
    s = torch.tensor([[0.0, 0.0], [3.0, 4.0]])
    t = torch.tensor([[0.0, 0.0], [6.0, 8.0]])
    assert ref_mse(s, t) == pytest.approx((9 + 16) / 4)
    assert ref_rkd_distance(s, t) == 0.0  # psi_D is scale-free: both are [[0, 1], [1, 0]]
    assert ref_cosine(torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 2.0]])) == pytest.approx(1.0)
    # right angle at vertex 1 between points 0 and 2
    tri = torch.tensor([[1.0, 0.0], [0.0, 0.0], [0.0, 1.0]])
    assert _ref_psi_a(tri)[(0, 1, 2)] == pytest.approx(0.0, abs=1e-12)
    assert _ref_psi_a(tri)[(0, 1, 0)] == pytest.approx(1.0)
    x = _randn(6, 3, seed=0)
    assert ref_cka(x, x) == pytest.approx(1.0)
    assert ref_sp(x, 2 * x) == pytest.approx(0.0, abs=1e-12)


# --------------------------------------------------------------------------------------------
# Values vs the references
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(5, 7), (3, 4, 6), (2, 3, 4, 5)])
def test_mse_matches_reference(shape):
    s, t = _randn(*shape, seed=1), _randn(*shape, seed=2)
    _close(mse_feature_loss(s, t), ref_mse(s, t))


def test_mse_with_token_mask_averages_the_per_token_mean_over_valid_tokens():
    s, t = _randn(3, 5, 4, seed=3), _randn(3, 5, 4, seed=4)
    mask = torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 1, 1], [0, 1, 0, 1, 0]], dtype=torch.bool)
    s_garbage = s.clone()
    s_garbage[~mask] = 1e3  # masked tokens do not count
    _close(mse_feature_loss(s_garbage, t, mask=mask), ref_mse(s, t, mask))
    # the mask changes the value (it is not ignored) and 0/1 ints work like bools
    assert not math.isclose(mse_feature_loss(s, t, mask=mask).item(), ref_mse(s, t), rel_tol=1e-3)
    _close(mse_feature_loss(s, t, mask=mask.long()), ref_mse(s, t, mask))


@pytest.mark.parametrize("shape", [(6, 5), (3, 4, 6), (2, 5, 3, 4)])
def test_cosine_matches_reference(shape):
    s, t = _randn(*shape, seed=5), _randn(*shape, seed=6)
    _close(cosine_feature_loss(s, t), ref_cosine(s, t))


def test_cosine_on_feature_maps_is_along_channels_not_flattened():
    s, t = _randn(2, 3, 4, 4, seed=7), _randn(2, 3, 4, 4, seed=8)
    flattened = ref_cosine(s.reshape(2, -1), t.reshape(2, -1))
    assert not math.isclose(cosine_feature_loss(s, t).item(), flattened, rel_tol=1e-3)


def test_cosine_with_token_mask():
    s, t = _randn(2, 4, 3, seed=9), _randn(2, 4, 3, seed=10)
    mask = torch.tensor([[1, 0, 1, 0], [1, 1, 1, 0]], dtype=torch.bool)
    _close(cosine_feature_loss(s, t, mask=mask), ref_cosine(s, t, mask))


@pytest.mark.parametrize(("s_shape", "t_shape"), [((8, 5), (8, 5)), ((7, 3), (7, 11)), ((6, 2, 3, 3), (6, 4, 2, 2))])
def test_linear_cka_matches_hsic_formula(s_shape, t_shape):
    x, y = _randn(*s_shape, seed=11), _randn(*t_shape, seed=12)
    # give y some linear dependence on x so CKA is far from 0
    y = y + 0.5 * torch.cat([x.reshape(x.shape[0], -1)] * 4, 1)[:, : y[0].numel()].reshape(y.shape)
    expected = ref_cka(x, y)
    _close(linear_cka(x, y), expected, rtol=1e-5)
    _close(cka_loss(x, y), 1.0 - expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("s_shape", "t_shape"),
    [
        ((3, 4, 4, 4), (3, 6, 4, 4)),
        ((2, 3, 8, 8), (2, 5, 4, 4)),
        ((2, 5, 2, 2), (2, 3, 4, 4)),
        ((2, 2, 6, 3), (2, 3, 3, 6)),
    ],
)
def test_attention_transfer_matches_repdistiller(s_shape, t_shape):
    s, t = _randn(*s_shape, seed=13), _randn(*t_shape, seed=14)
    _close(attention_transfer_loss(s, t), ref_attention(s, t), rtol=1e-4, atol=1e-7)


def test_attention_map_matches_reference():
    f = _randn(3, 4, 2, 5, seed=15)
    expected = torch.tensor(ref_attention_maps(f.double().tolist()), dtype=torch.float64)
    got = attention_map(f)
    assert got.shape == (3, 10)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize(("s_shape", "t_shape"), [((6, 5), (6, 5)), ((5, 3), (5, 9)), ((4, 2, 3, 3), (4, 7))])
def test_rkd_distance_matches_reference(s_shape, t_shape):
    s, t = _randn(*s_shape, seed=16), _randn(*t_shape, seed=17, scale=3.0)
    _close(rkd_distance_loss(s, t), ref_rkd_distance(s, t), rtol=1e-4, atol=1e-6)


def test_rkd_distance_uses_huber_above_one():
    """Teacher with one outlier: some |psi_S - psi_T| > 1, so the linear branch of smooth-L1 counts."""
    s = _randn(5, 3, seed=18)
    t = _randn(5, 3, seed=19)
    t[0] += 40.0
    ps, pt = _ref_psi_d(s), _ref_psi_d(t)
    assert any(abs(ps[i][j] - pt[i][j]) > 1 for i in range(5) for j in range(5))
    _close(rkd_distance_loss(s, t), ref_rkd_distance(s, t))


@pytest.mark.parametrize(("s_shape", "t_shape"), [((5, 4), (5, 4)), ((6, 2), (6, 7)), ((4, 2, 2, 2), (4, 3))])
def test_rkd_angle_matches_reference(s_shape, t_shape):
    s, t = _randn(*s_shape, seed=20), _randn(*t_shape, seed=21)
    _close(rkd_angle_loss(s, t), ref_rkd_angle(s, t), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(("s_shape", "t_shape"), [((6, 4), (6, 4)), ((5, 3), (5, 12)), ((4, 2, 3, 3), (4, 5))])
def test_similarity_preserving_matches_reference(s_shape, t_shape):
    s, t = _randn(*s_shape, seed=22), _randn(*t_shape, seed=23)
    _close(similarity_preserving_loss(s, t), ref_sp(s, t), rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("temperature", [0.07, 0.5, 1.0])
def test_info_nce_matches_reference(temperature):
    a, p, n = _randn(5, 6, seed=24), _randn(5, 6, seed=25), _randn(5, 4, 6, seed=26)
    p = p + a  # the positive is closer than the negatives on average
    _close(info_nce_loss(a, p, n, temperature=temperature), ref_info_nce(a, p, n, temperature), rtol=1e-4)


# --------------------------------------------------------------------------------------------
# Invariants (hypothesis)
# --------------------------------------------------------------------------------------------

FAST = settings(max_examples=25, deadline=None)

_wide = st.floats(-100.0, 100.0, allow_nan=False, allow_infinity=False, width=32)
_grid = st.integers(-10, 10).map(lambda v: v / 2.0)  # distinct values differ by >= 0.5: no fp32 cancellation
_scale = st.floats(0.1, 10.0, allow_nan=False)


@st.composite
def _matrix(draw, n: int, d: int, elements=_grid) -> torch.Tensor:
    values = draw(st.lists(elements, min_size=n * d, max_size=n * d))
    return torch.tensor(values, dtype=torch.float32).reshape(n, d)


@st.composite
def _pair(draw, same_dim: bool = True, elements=_grid) -> tuple[torch.Tensor, torch.Tensor]:
    n = draw(st.integers(2, 8))
    d1 = draw(st.integers(1, 10))
    d2 = d1 if same_dim else draw(st.integers(1, 10))
    return draw(_matrix(n, d1, elements)), draw(_matrix(n, d2, elements))


@st.composite
def _maps(draw, elements=_grid) -> tuple[torch.Tensor, torch.Tensor]:
    n, cs, ct = draw(st.integers(2, 4)), draw(st.integers(1, 4)), draw(st.integers(1, 4))
    h, w = draw(st.sampled_from([(2, 2), (4, 4), (2, 4)]))
    s = draw(_matrix(n, cs * h * w, elements)).reshape(n, cs, h, w)
    t = draw(_matrix(n, ct * h * w, elements)).reshape(n, ct, h, w)
    return s, t


def _centred_gram_norm(x: torch.Tensor) -> float:
    x = x.double().reshape(x.shape[0], -1)
    x = x - x.mean(0, keepdim=True)
    return float((x @ x.T).norm())


def _distinct_rows(x: torch.Tensor) -> bool:
    rows = [tuple(r) for r in x.reshape(x.shape[0], -1).tolist()]
    return len(set(rows)) == len(rows)


PAIR_LOSSES = {
    "mse": mse_feature_loss,
    "cosine": cosine_feature_loss,
    "cka": cka_loss,
    "rkd_distance": rkd_distance_loss,
    "rkd_angle": rkd_angle_loss,
    "sp": similarity_preserving_loss,
}


@pytest.mark.parametrize("name", sorted(PAIR_LOSSES))
@FAST
@given(data=st.data())
def test_loss_is_nonnegative_and_finite(name, data):
    """Every feature loss is >= 0 and finite, for any values."""
    same = name in ("mse", "cosine")
    s, t = data.draw(_pair(same_dim=same, elements=_wide))
    value = PAIR_LOSSES[name](s, t)
    assert value.dtype == torch.float32 and value.ndim == 0
    assert torch.isfinite(value)
    assert value.item() >= 0.0  # cosine included: 1 - cos is clamped against rounding above 1


@FAST
@given(maps=_maps(elements=_wide))
def test_attention_loss_is_nonnegative_and_finite(maps):
    value = attention_transfer_loss(*maps)
    assert torch.isfinite(value) and value.item() >= 0.0


@FAST
@given(data=st.data())
def test_info_nce_is_nonnegative_and_finite(data):
    n, d, k = data.draw(st.integers(2, 8)), data.draw(st.integers(1, 10)), data.draw(st.integers(1, 5))
    a = data.draw(_matrix(n, d, _wide))
    p = data.draw(_matrix(n, d, _wide))
    negs = data.draw(_matrix(n, k * d, _wide)).reshape(n, k, d)
    tau = data.draw(st.floats(0.05, 2.0))
    value = info_nce_loss(a, p, negs, temperature=tau)
    assert torch.isfinite(value) and value.item() >= 0.0


def test_cosine_of_identical_inputs_is_not_negative():
    x = torch.tensor([[0.1, 0.2]])
    assert cosine_feature_loss(x, x).item() >= 0.0


@pytest.mark.parametrize("name", ["mse", "cosine", "cka", "rkd_distance", "rkd_angle", "sp"])
@FAST
@given(data=st.data())
def test_loss_is_zero_for_identical_inputs(name, data):
    s, _ = data.draw(_pair())
    if name == "cosine":
        assume(bool((s.norm(dim=1) > 0).all()))  # the cosine of a zero vector is undefined
    if name == "cka":
        assume(_centred_gram_norm(s) > 1e-2)  # CKA of a constant feature set is undefined
    value = PAIR_LOSSES[name](s, s.clone())
    assert abs(value.item()) <= 1e-6


@FAST
@given(maps=_maps())
def test_attention_loss_is_zero_for_identical_inputs(maps):
    s, _ = maps
    assert attention_transfer_loss(s, s.clone()).item() <= 1e-12


@FAST
@given(pair=_pair(same_dim=False, elements=_wide))
def test_cka_is_in_unit_interval(pair):
    value = linear_cka(*pair).item()
    assert 0.0 <= value <= 1.0
    assert 0.0 <= cka_loss(*pair).item() <= 1.0


@FAST
@given(pair=_pair(same_dim=False), seed=st.integers(0, 2**16), c=_scale, which=st.sampled_from(["x", "y"]))
def test_cka_invariant_to_orthogonal_transform_and_isotropic_scaling(pair, seed, c, which):
    x, y = pair
    assume(_centred_gram_norm(x) > 1e-2 and _centred_gram_norm(y) > 1e-2)
    base = linear_cka(x, y).item()
    assert base == pytest.approx(ref_cka(x, y), abs=1e-5)  # also: dims may differ
    g = torch.Generator().manual_seed(seed)
    if which == "x":
        q, _ = torch.linalg.qr(torch.randn(x.shape[1], x.shape[1], generator=g, dtype=torch.float64))
        x2, y2 = (x.double() @ q).float() * c, y
    else:
        q, _ = torch.linalg.qr(torch.randn(y.shape[1], y.shape[1], generator=g, dtype=torch.float64))
        x2, y2 = x, (y.double() @ q).float() * c
    assert linear_cka(x2, y2).item() == pytest.approx(base, abs=1e-5)
    assert linear_cka(y, x).item() == pytest.approx(base, abs=1e-6)  # symmetric


def test_cka_invariant_to_small_isotropic_scaling():
    x, y = _randn(8, 4, seed=30), _randn(8, 6, seed=31)
    assert linear_cka(1e-3 * x, 1e-3 * x).item() == pytest.approx(1.0, abs=1e-5)
    assert linear_cka(1e-3 * x, 1e-3 * y).item() == pytest.approx(linear_cka(x, y).item(), abs=1e-5)


@FAST
@given(pair=_pair(same_dim=False), c=_scale, which=st.sampled_from(["s", "t"]))
def test_rkd_distance_invariant_to_scaling_either_input(pair, c, which):
    s, t = pair
    assume(_distinct_rows(s) and _distinct_rows(t))
    base = rkd_distance_loss(s, t).item()
    scaled = rkd_distance_loss(c * s, t) if which == "s" else rkd_distance_loss(s, c * t)
    assert scaled.item() == pytest.approx(base, rel=1e-4, abs=1e-5)


@FAST
@given(data=st.data(), c=_scale)
def test_rkd_angle_invariant_to_scaling_and_translation(data, c):
    s, t = data.draw(_pair(same_dim=False))
    shift_s = data.draw(_matrix(1, s.shape[1], _wide))
    shift_t = data.draw(_matrix(1, t.shape[1], _wide))
    base = rkd_angle_loss(s, t).item()
    assert rkd_angle_loss(c * s + shift_s / 10, t).item() == pytest.approx(base, rel=1e-3, abs=1e-5)
    assert rkd_angle_loss(s, c * t + shift_t / 10).item() == pytest.approx(base, rel=1e-3, abs=1e-5)


@FAST
@given(pair=_pair(same_dim=False), c=_scale)
def test_sp_invariant_to_scaling_either_input(pair, c):
    s, t = pair
    base = similarity_preserving_loss(s, t).item()
    assert similarity_preserving_loss(c * s, t).item() == pytest.approx(base, rel=1e-4, abs=1e-6)
    assert similarity_preserving_loss(s, c * t).item() == pytest.approx(base, rel=1e-4, abs=1e-6)


@FAST
@given(data=st.data())
def test_cosine_invariant_to_positive_per_vector_scaling(data):
    s, t = data.draw(_pair())
    assume(bool((s.norm(dim=1) > 0).all()) and bool((t.norm(dim=1) > 0).all()))
    c_s = torch.tensor(data.draw(st.lists(_scale, min_size=s.shape[0], max_size=s.shape[0]))).unsqueeze(1)
    c_t = torch.tensor(data.draw(st.lists(_scale, min_size=s.shape[0], max_size=s.shape[0]))).unsqueeze(1)
    base = cosine_feature_loss(s, t).item()
    assert cosine_feature_loss(c_s * s, c_t * t).item() == pytest.approx(base, abs=1e-5)


@FAST
@given(data=st.data())
def test_info_nce_is_log_k_plus_one_when_all_similarities_are_equal(data):
    n, d, k = data.draw(st.integers(2, 8)), data.draw(st.integers(1, 10)), data.draw(st.integers(1, 6))
    a = data.draw(_matrix(n, d))
    v = data.draw(_matrix(n, d))
    assume(bool((v.norm(dim=1) > 0).all()))
    scales = torch.tensor(data.draw(st.lists(_scale, min_size=k, max_size=k)))
    negs = v.unsqueeze(1) * scales.reshape(1, k, 1)  # same direction as the positive: same cosine
    tau = data.draw(st.floats(0.05, 2.0))
    assert info_nce_loss(a, v, negs, temperature=tau).item() == pytest.approx(math.log(k + 1), rel=1e-4)


# --------------------------------------------------------------------------------------------
# Gradients
# --------------------------------------------------------------------------------------------

GRAD_CASES = {
    "mse": (mse_feature_loss, (6, 5), (6, 5)),
    "cosine": (cosine_feature_loss, (6, 3, 2, 2), (6, 3, 2, 2)),
    "cka": (cka_loss, (6, 4), (6, 9)),
    "attention": (attention_transfer_loss, (4, 3, 4, 4), (4, 5, 2, 2)),
    "rkd_distance": (rkd_distance_loss, (6, 4), (6, 7)),
    "rkd_angle": (rkd_angle_loss, (6, 4), (6, 7)),
    "sp": (similarity_preserving_loss, (6, 4), (6, 7)),
}


@pytest.mark.parametrize("name", sorted(GRAD_CASES))
@pytest.mark.parametrize("identical", [False, True])
def test_student_gradient_is_finite(name, identical):
    fn, s_shape, t_shape = GRAD_CASES[name]
    teacher = _randn(*t_shape, seed=40)
    base = teacher.clone() if identical else _randn(*s_shape, seed=41)
    student = base.clone().requires_grad_(True)
    loss = fn(student, teacher)
    (grad,) = torch.autograd.grad(loss, student)
    assert torch.isfinite(grad).all(), name
    if not identical:
        assert grad.abs().sum() > 0, name


def test_info_nce_gradient_is_finite():
    a = _randn(4, 5, seed=42).requires_grad_(True)
    loss = info_nce_loss(a, _randn(4, 5, seed=43), _randn(4, 3, 5, seed=44))
    (grad,) = torch.autograd.grad(loss, a)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0


@pytest.mark.parametrize("fn", [rkd_distance_loss, rkd_angle_loss], ids=["rkd_distance", "rkd_angle"])
@pytest.mark.parametrize(
    "student",
    [
        torch.zeros(5, 3),  # every pairwise distance is 0
        torch.tensor([[1.0, 2.0], [1.0, 2.0], [3.0, -1.0], [1.0, 2.0]]),  # duplicated samples
    ],
    ids=["all-equal", "duplicates"],
)
def test_rkd_gradient_has_no_nan_when_distances_are_zero(fn, student):
    s = student.clone().requires_grad_(True)
    t = _randn(student.shape[0], 4, seed=45)
    for teacher in (t, student.clone()):
        loss = fn(s, teacher)
        (grad,) = torch.autograd.grad(loss, s)
        assert torch.isfinite(loss) and torch.isfinite(grad).all()


@pytest.mark.parametrize("fn", [rkd_distance_loss, rkd_angle_loss], ids=["rkd_distance", "rkd_angle"])
def test_rkd_teacher_side_gets_no_gradient(fn):
    s = _randn(5, 3, seed=46).requires_grad_(True)
    t = _randn(5, 6, seed=47).requires_grad_(True)
    loss = fn(s, t)
    grad_s, grad_t = torch.autograd.grad(loss, [s, t], allow_unused=True)
    assert grad_t is None  # the teacher's relations are computed under no_grad
    assert grad_s is not None and grad_s.abs().sum() > 0


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("fn", "name"), [(mse_feature_loss, "mse"), (cosine_feature_loss, "cosine")])
def test_shape_mismatch_names_both_shapes_and_suggests_a_projection(fn, name):
    with pytest.raises(ValueError, match=rf"{name} feature loss needs equal shapes") as info:
        fn(torch.zeros(4, 3), torch.zeros(4, 5))
    msg = str(info.value)
    assert "student (4, 3)" in msg and "teacher (4, 5)" in msg
    assert "projection" in msg


@pytest.mark.parametrize("shape", [(4, 5), (4, 3, 5)])
def test_attention_map_rejects_features_without_spatial_dims(shape):
    with pytest.raises(ValueError, match=r"attention transfer needs \[N, C, H, W\] features, got shape"):
        attention_map(torch.zeros(shape))
    with pytest.raises(ValueError, match="attention transfer needs"):
        attention_transfer_loss(torch.zeros(shape), torch.zeros(shape))
