"""Batch augmentation: affine jitter, mixup / CutMix, FunctionMatching and the fixed AugmentedDataset."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_distill.augment import AugmentedDataset, FunctionMatching, cutmix, mixup, random_affine, sample_beta


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------ random_affine
def test_random_affine_with_zero_ranges_is_the_identity():
    x = torch.rand(5, 3, 7, 9)  # non-square on purpose
    y = random_affine(x, degrees=0.0, translate=0.0, scale=(1.0, 1.0), generator=_gen())
    assert y.shape == x.shape and torch.allclose(y, x, atol=1e-6, rtol=0)


def test_random_affine_is_reproducible_per_sample_and_leaves_input_alone():
    x = torch.rand(6, 1, 8, 8)
    before = x.clone()
    a = random_affine(x, 20.0, 0.2, (0.8, 1.2), generator=_gen(1))
    b = random_affine(x, 20.0, 0.2, (0.8, 1.2), generator=_gen(1))
    c = random_affine(x, 20.0, 0.2, (0.8, 1.2), generator=_gen(2))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(x, before)
    # per-sample parameters: the same image repeated gets different jitters
    same = random_affine(x[:1].repeat(4, 1, 1, 1), 20.0, 0.2, (0.8, 1.2), generator=_gen(3))
    assert not torch.equal(same[0], same[1])


def test_random_affine_shift_moves_content_by_the_fraction_of_the_image():
    x = torch.zeros(1, 1, 8, 8)
    x[0, 0, 3, 2] = 1.0
    # translate=0.25 with a shift drawn in [-0.25, 0.25]: the bright pixel stays on its row for a pure x/y
    # shift; check the centre of mass moves by shift * size (bilinear keeps the mass).
    y = random_affine(x, 0.0, 0.25, (1.0, 1.0), generator=_gen(0))
    g = _gen(0)
    torch.rand(1, generator=g, dtype=torch.float64)  # angle
    torch.rand(1, generator=g, dtype=torch.float64)  # zoom
    shift = (torch.rand(1, 2, generator=g, dtype=torch.float64) * 2 - 1) * 0.25
    rows, cols = torch.meshgrid(torch.arange(8.0), torch.arange(8.0), indexing="ij")
    mass = y[0, 0].sum()
    assert mass == pytest.approx(1.0, abs=1e-5)  # content stays inside the image
    assert (y[0, 0] * cols).sum() / mass == pytest.approx(2 + shift[0, 0].item() * 8, abs=1e-4)
    assert (y[0, 0] * rows).sum() / mass == pytest.approx(3 + shift[0, 1].item() * 8, abs=1e-4)


# ------------------------------------------------------------------ mixup / cutmix / beta
def test_mixup_is_the_convex_combination():
    x = torch.randn(4, 2, 3, 3)
    perm = torch.tensor([2, 0, 3, 1])
    out = mixup(x, 0.3, perm)
    for i in range(4):
        assert torch.allclose(out[i], 0.3 * x[i] + 0.7 * x[perm[i]])


def test_cutmix_effective_lambda_is_the_share_of_own_pixels():
    n, h, w = 4, 10, 12
    x = torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1).expand(n, 2, h, w).clone()  # sample i is all i
    perm = torch.tensor([1, 2, 3, 0])
    for seed in range(20):
        out, lam = cutmix(x, 0.6, perm, _gen(seed))
        for i in range(n):
            pasted = (out[i] == perm[i]).sum().item() / out[i].numel()
            own = (out[i] == i).sum().item() / out[i].numel()
            assert pasted + own == 1.0
            assert lam == pytest.approx(1.0 - pasted) and lam == pytest.approx(own)
        assert lam >= 0.6  # int() and clipping at the border only make the box smaller


def test_sample_beta_moments_and_reproducibility():
    g = _gen(5)
    draws = torch.tensor([sample_beta(0.5, g) for _ in range(3000)])
    assert draws.min() >= 0 and draws.max() <= 1
    assert draws.mean().item() == pytest.approx(0.5, abs=0.03)
    assert draws.var().item() == pytest.approx(1 / (4 * (2 * 0.5 + 1)), abs=0.02)
    assert sample_beta(2.0, _gen(1)) == sample_beta(2.0, _gen(1))


# ------------------------------------------------------------------ FunctionMatching
@pytest.mark.parametrize("kwargs", [{"mixup_alpha": 1.0}, {"mixup_alpha": 0.0, "cutmix_alpha": 1.0}])
def test_function_matching_marks_exactly_the_mixed_samples(kwargs):
    fm = FunctionMatching(seed=0, **kwargs)
    x, y = torch.rand(16, 1, 8, 8), torch.arange(16) % 10
    seen_unmixed = False
    for _ in range(10):
        out, target, info = fm(x, y)
        perm, lam = info["perm"], info["lam"]
        mixed = (perm != torch.arange(16)) & (lam < 1.0)
        assert torch.equal(info["mixed"], mixed)
        assert torch.equal(target[mixed], torch.full((int(mixed.sum()),), -100))
        assert torch.equal(target[~mixed], y[~mixed])
        seen_unmixed |= bool((~mixed).any())
        assert info["mode"] == ("mixup" if kwargs["mixup_alpha"] else "cutmix")
    assert seen_unmixed  # fixed points of the permutation keep their label


def test_function_matching_without_mixing_keeps_every_label():
    fm = FunctionMatching(mixup_alpha=0.0, cutmix_alpha=0.0, seed=0)
    x, y = torch.rand(8, 1, 8, 8), torch.arange(8)
    out, target, info = fm(x, y, ignore_index=-1)
    assert info["mode"] == "none" and info["lam"] == 1.0 and torch.equal(target, y)
    assert not torch.equal(out, x)  # still jittered


def test_function_matching_does_not_modify_its_input():
    fm = FunctionMatching(mixup_alpha=1.0, cutmix_alpha=1.0, seed=0)
    x, y = torch.rand(8, 3, 8, 8), torch.arange(8)
    x0, y0 = x.clone(), y.clone()
    for _ in range(4):
        out, target, _ = fm(x, y)
        assert out.data_ptr() != x.data_ptr() and target.data_ptr() != y.data_ptr()
    assert torch.equal(x, x0) and torch.equal(y, y0)


def test_function_matching_lambda_is_shared_by_the_batch():
    # identity jitter, then mixup: out = lam * x + (1 - lam) * x[perm] with one lam for all samples
    fm = FunctionMatching(degrees=0.0, translate=0.0, scale=(1.0, 1.0), mixup_alpha=1.0, seed=3)
    x = torch.randn(12, 1, 4, 4)
    lams = set()
    for _ in range(5):
        out, _, info = fm(x)
        lam, perm = info["lam"], info["perm"]
        assert torch.allclose(out, lam * x + (1 - lam) * x[perm], atol=1e-5)
        lams.add(round(lam, 6))
    assert len(lams) == 5  # a fresh lambda per batch


def test_function_matching_both_alphas_picks_one_mode_per_batch_and_respects_mix_prob():
    fm = FunctionMatching(mixup_alpha=1.0, cutmix_alpha=1.0, seed=0)
    modes = [fm(torch.rand(4, 1, 8, 8))[2]["mode"] for _ in range(40)]
    assert {"mixup", "cutmix"} <= set(modes) and "none" not in modes
    never = FunctionMatching(mix_prob=0.0, seed=0)
    assert all(never(torch.rand(4, 1, 8, 8))[2]["mode"] == "none" for _ in range(5))


def test_function_matching_is_reproducible_and_resumes_from_its_state_dict():
    a, b = FunctionMatching(seed=7), FunctionMatching(seed=7)
    x = torch.rand(8, 1, 8, 8)
    assert torch.equal(a(x)[0], b(x)[0])
    state = a.state_dict()
    expected = a(x)[0]
    c = FunctionMatching(seed=123)
    c.load_state_dict(state)
    assert torch.equal(c(x)[0], expected)


def test_function_matching_seed_none_uses_the_global_seed():
    torch.manual_seed(11)
    a = FunctionMatching()
    x = torch.rand(4, 1, 8, 8)
    assert torch.equal(a(x)[0], FunctionMatching(seed=11)(x)[0])


def test_function_matching_is_a_pass_through_in_eval_mode():
    fm = FunctionMatching(seed=0).eval()
    x, y = torch.rand(4, 1, 8, 8), torch.arange(4)
    out, target, info = fm(x, y)
    assert out is x and target is y and info["mode"] == "none"


# ------------------------------------------------------------------ AugmentedDataset
def _base(n: int = 6):
    torch.manual_seed(0)
    return [(torch.rand(1, 8, 8), i % 3, i) for i in range(n)]


@pytest.mark.parametrize("mixup_alpha", [0.0, 0.4])
def test_augmented_dataset_is_deterministic_and_copies_differ(mixup_alpha):
    base = _base()
    ds = AugmentedDataset(base, copies=3, mixup_alpha=mixup_alpha, seed=1)
    assert len(ds) == 18
    x, y, index = ds[7]
    assert index == 7 and int(y) == -100 and x.shape == (1, 8, 8)
    assert torch.equal(ds[7][0], x)  # same item twice
    assert torch.equal(AugmentedDataset(base, copies=3, mixup_alpha=mixup_alpha, seed=1)[7][0], x)
    assert ds.base_index(7) == ds.base_index(1) == ds.base_index(13) == 1
    assert not torch.equal(ds[1][0], ds[7][0]) and not torch.equal(ds[7][0], ds[13][0])  # copies differ
    assert not torch.equal(AugmentedDataset(base, copies=3, mixup_alpha=mixup_alpha, seed=2)[7][0], x)


def test_augmented_dataset_jitter_only_stays_close_to_its_base_sample():
    base = _base()
    ds = AugmentedDataset(base, copies=2, degrees=0.0, translate=0.0, scale=(1.0, 1.0), seed=0)
    for i in range(len(ds)):
        assert torch.allclose(ds[i][0], base[ds.base_index(i)][0], atol=1e-6)


# ------------------------------------------------------------------ errors
@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"degrees": -1.0}, ValueError, r"`degrees` must be a number in \[0, 180\].*got -1.0"),
        ({"translate": 1.5}, ValueError, r"`translate` must be a number in \[0, 1\].*got 1.5"),
        ({"scale": (1.2, 0.8)}, ValueError, r"`scale` must be a pair \(low, high\).*got \(1.2, 0.8\)"),
        ({"mixup_alpha": -0.5}, ValueError, r"`mixup_alpha` must be a finite number >= 0.*got -0.5"),
        ({"cutmix_alpha": math.inf}, ValueError, r"`cutmix_alpha` must be a finite number >= 0.*got inf"),
        ({"mix_prob": 2}, ValueError, r"`mix_prob` must be a number in \[0, 1\].*got 2"),
        ({"seed": "0"}, TypeError, r"`seed` must be an int or None.*got '0'"),
    ],
)
def test_function_matching_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        FunctionMatching(**kwargs)


def test_bad_inputs():
    with pytest.raises(TypeError, match=r"`inputs` must be a floating-point image batch \[N, C, H, W\], got a 3-D"):
        FunctionMatching()(torch.rand(1, 8, 8))
    with pytest.raises(ValueError, match=r"`target` must be None or a tensor whose first dimension is the batch size 4"):
        FunctionMatching()(torch.rand(4, 1, 8, 8), torch.arange(3))
    with pytest.raises(TypeError, match=r"`x` must be a floating-point image batch.*torch.int64"):
        random_affine(torch.zeros(2, 1, 4, 4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"`lam` must be a number in \[0, 1\].*got 1.5"):
        mixup(torch.rand(2, 3), 1.5, torch.tensor([1, 0]))
    with pytest.raises(ValueError, match=r"`perm` must be a long tensor of shape \(2,\)"):
        cutmix(torch.rand(2, 1, 4, 4), 0.5, torch.tensor([0, 1, 2]))


@pytest.mark.parametrize(
    ("base", "kwargs", "error", "match"),
    [
        (_base(), {"copies": 0}, ValueError, r"`copies` must be an integer >= 1.*got 0"),
        ([], {}, ValueError, r"`base` is empty"),
        (iter([1]), {}, TypeError, r"`base` must be a map-style dataset.*got list_iterator"),
        ([("not a tensor", 0)], {}, TypeError, r"needs base samples with a floating-point image tensor.*got str"),
        (_base(), {"mixup_alpha": -1}, ValueError, r"`mixup_alpha` must be a finite number >= 0"),
    ],
)
def test_augmented_dataset_bad_arguments(base, kwargs, error, match):
    with pytest.raises(error, match=match):
        AugmentedDataset(base, **kwargs)
