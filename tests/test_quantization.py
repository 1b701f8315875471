"""lightning_distill.quantization: grids, exact idempotence of fake_quantize, error diffusion,
the straight-through estimator, quantize_model / QuantizedModel, and the integer export."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from lightning_distill.models import DigitsMLP, DigitsStudentCNN
from lightning_distill.quantization import (
    QuantizedModel,
    export_quantized,
    fake_quantize,
    load_quantized,
    pack_ternary,
    quantization_error,
    quantize_model,
    quantized_layers,
    save_quantized,
    ste_fake_quantize,
    unpack_ternary,
)

pytestmark = pytest.mark.usefixtures("single_thread")

FAST = settings(max_examples=60, deadline=None)

# |x| in {0} u [1e-6, 1e4]: every nonzero scale is a float32 normal number (the documented domain)
_value = st.floats(-1e4, 1e4, allow_nan=False, allow_infinity=False, allow_subnormal=False, width=32).map(
    lambda v: 0.0 if abs(v) < 1e-6 else v
)
# few distinct values: ties, repeated extremes and constant channels are common
_coarse = st.integers(-4, 4).map(lambda v: v / 4.0)


@st.composite
def _weights(draw, elements=None) -> torch.Tensor:
    shape = draw(st.sampled_from([(5,), (1, 1), (3, 4), (4, 9), (2, 3, 2, 2)]))
    elements = elements or st.one_of(_value, _coarse)
    values = draw(st.lists(elements, min_size=math.prod(shape), max_size=math.prod(shape)))
    return torch.tensor(values, dtype=torch.float32).reshape(shape)


_modes = st.fixed_dictionaries(
    {
        "bits": st.integers(2, 8),
        "symmetric": st.booleans(),
        "per_channel": st.booleans(),
        "ternary": st.booleans(),
        "error_diffusion": st.one_of(st.sampled_from([0.0, 0.5, 1.0]), st.floats(0.0, 1.0)),
    }
)


def _rows(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(t.shape[0], -1) if t.ndim >= 2 else t.reshape(1, -1)


# ----------------------------------------------------------------------------- idempotence and grids
@FAST
@given(w=_weights(), mode=_modes)
def test_fake_quantize_is_idempotent_bit_for_bit(w, mode):
    """fake_quantize(fake_quantize(w)) == fake_quantize(w) in every mode, with tolerance 0 (the guarantee
    documented in lightning_distill.quantization.grid for float32)."""
    q = fake_quantize(w, **mode)
    assert q.shape == w.shape and q.dtype == w.dtype and torch.isfinite(q).all()
    assert torch.equal(fake_quantize(q, **mode), q)


@settings(max_examples=25, deadline=None)
@given(w=_weights(), mode=_modes)
def test_fake_quantize_is_idempotent_in_float64(w, mode):
    q = fake_quantize(w.double(), **mode)
    assert q.dtype == torch.float64 and torch.equal(fake_quantize(q, **mode), q)


@FAST
@given(w=_weights(), mode=_modes)
def test_values_lie_on_the_grid(w, mode):
    q = fake_quantize(w, **mode)
    groups = list(_rows(q)) if mode["per_channel"] else [q.reshape(-1)]
    for g in groups:
        g = g.double()
        if mode["ternary"]:
            a = g.abs().max()
            assert set(g.abs().unique().tolist()) <= {0.0, a.item()}  # exactly {-a, 0, a}
        elif mode["symmetric"]:
            qmax = 2 ** (mode["bits"] - 1) - 1
            s = g.abs().max() / qmax
            if s > 0:
                k = g / s
                assert torch.equal(k, k.round()) and k.abs().max() <= qmax
        else:
            levels = 2 ** mode["bits"] - 1
            lo, hi = g.min().clamp(max=0), g.max().clamp(min=0)
            s = (hi - lo) / levels
            if s > 0:
                k = (g - lo) / s
                assert torch.equal(k, k.round()) and 0 <= k.min() and k.max() <= levels
                assert torch.equal(lo / s, (lo / s).round())  # zero is a grid point
        assert g.unique().numel() <= (3 if mode["ternary"] else 2 ** mode["bits"])


@FAST
@given(w=_weights(), mode=_modes)
def test_quantization_error_is_nonnegative_and_zero_on_the_grid(w, mode):
    err = quantization_error(w, **mode)
    expected = (w.double() - fake_quantize(w, **mode).double()).pow(2).mean()
    assert err >= 0 and math.isclose(err.item(), expected.item(), rel_tol=1e-6, abs_tol=1e-30)
    assert quantization_error(fake_quantize(w, **mode), **mode).item() == 0.0


@settings(max_examples=30, deadline=None)
@given(w=_weights(), mode=_modes, k=st.integers(-8, 8))
def test_scaling_by_a_power_of_two_commutes(w, mode, k):
    c = 2.0**k
    assert torch.equal(fake_quantize(w * c, **mode), fake_quantize(w, **mode) * c)


@settings(max_examples=30, deadline=None)
@given(w=_weights(), mode=_modes)
def test_per_channel_rows_are_quantised_independently(w, mode):
    if w.ndim < 2:
        return
    mode = {**mode, "per_channel": True}
    q = fake_quantize(w, **mode)
    for i in range(w.shape[0]):
        assert torch.equal(q[i : i + 1], fake_quantize(w[i : i + 1], **mode))


@pytest.mark.parametrize("fill", [0.0, 2.5, -3.0])
@pytest.mark.parametrize(
    "mode",
    [dict(bits=2), dict(bits=8, per_channel=True), dict(bits=4, symmetric=False), dict(ternary=True),
     dict(ternary=True, per_channel=True, error_diffusion=1.0), dict(bits=3, symmetric=False, error_diffusion=0.5)],
)
def test_zero_and_constant_tensors_give_no_nan(fill, mode):
    w = torch.full((3, 5), fill)
    w[1] = 0.0  # an all-zero channel next to constant ones
    q = fake_quantize(w, **mode)
    assert torch.isfinite(q).all()
    assert torch.allclose(q, w, rtol=1e-4, atol=0)  # constants sit on (or within 2^-15 of) their own grid
    assert torch.equal(fake_quantize(q, **mode), q)


def test_channel_axis_selects_the_rows():
    w = torch.randn(3, 5, generator=torch.Generator().manual_seed(0))
    expected = fake_quantize(w, bits=3, per_channel=True).T
    assert torch.equal(fake_quantize(w.T, bits=3, per_channel=True, ch_axis=1), expected)


# ----------------------------------------------------------------------------- hand-computed cases
def test_two_bit_symmetric_by_hand():
    # Q = 2^(2-1) - 1 = 1, s = max|w| / 1 = 2: the grid is {-2, 0, 2}
    w = torch.tensor([[-2.0, -0.75, 0.5, 1.25]])
    assert fake_quantize(w, bits=2).tolist() == [[-2.0, 0.0, 0.0, 2.0]]
    # per channel: row 2 has its own scale 0.5
    w2 = torch.tensor([[-2.0, 1.25], [0.5, -0.125]])
    assert fake_quantize(w2, bits=2, per_channel=True).tolist() == [[-2.0, 2.0], [0.5, 0.0]]


def test_two_bit_asymmetric_by_hand():
    # [lo, hi] = [-0.5, 1], s = 1.5 / 3 = 0.5, z = round(0.5 / 0.5) = 1: grid {-0.5, 0, 0.5, 1}
    w = torch.tensor([-0.5, 0.0, 0.375, 1.0])
    assert fake_quantize(w, bits=2, symmetric=False).tolist() == [-0.5, 0.0, 0.5, 1.0]
    # all positive: lo = 0, z = 0, s = 3 / 3 = 1: grid {0, 1, 2, 3}
    assert fake_quantize(torch.tensor([0.75, 1.25, 3.0]), bits=2, symmetric=False).tolist() == [1.0, 1.0, 3.0]
    # [lo, hi] = [-0.2, 1]: s = 0.4 truncated to 16 significant bits, z = round(0.2 / s) = 1,
    # grid (q - 1) * s: the zero point costs range, 1.0 lands on 2s
    s = math.ldexp(math.floor(math.frexp(0.4)[0] * 2**16) / 2**16, math.frexp(0.4)[1])
    out = fake_quantize(torch.tensor([-0.2, 1.0], dtype=torch.float64), bits=2, symmetric=False)
    assert out.tolist() == [-s, 2 * s]


def test_ternary_uses_absmean_codes_and_the_least_squares_scale():
    w = torch.tensor([0.125, -0.5, 1.0, 0.0])
    # gamma = mean|w| = 0.40625 -> codes round(w / gamma) = [0, -1, 1, 0]; alpha = mean(0.5, 1.0) = 0.75
    q = fake_quantize(w, ternary=True)
    assert q.tolist() == [0.0, -0.75, 0.75, 0.0]
    codes = torch.tensor([0.0, -1.0, 1.0, 0.0])
    # alpha minimises ||w - alpha * codes||^2 ...
    for other in (0.7, 0.74, 0.76, 0.8, 0.40625):
        assert (w - 0.75 * codes).pow(2).sum() < (w - other * codes).pow(2).sum()

    # ... while BitNet's dequantisation (gamma * codes) is not idempotent
    def bitnet(x):
        gamma = x.abs().mean()
        return (x / gamma).round().clamp(-1, 1) * gamma

    once = bitnet(w)
    assert once.tolist() == [0.0, -0.40625, 0.40625, 0.0]
    assert bitnet(once).tolist() == [0.0, -0.203125, 0.203125, 0.0]  # shrinks by the share of nonzeros
    assert torch.equal(fake_quantize(q, ternary=True), q)


def test_ternary_ignores_bits():
    w = torch.randn(4, 6, generator=torch.Generator().manual_seed(1))
    assert torch.equal(fake_quantize(w, bits=8, ternary=True), fake_quantize(w, bits=2, ternary=True))


# ----------------------------------------------------------------------------- error diffusion
def test_error_diffusion_on_a_hand_computed_row():
    # 2 bits, s = 1 (grid {-1, 0, 1}); walk with v_j = w_j + strength * e_{j-1}, e_j = v_j - Q(v_j)
    w = torch.tensor([[0.375, 0.25, 0.25, 1.0]])
    assert fake_quantize(w, bits=2).tolist() == [[0.0, 0.0, 0.0, 1.0]]
    # strength 1: v = .375 -> 0 (e .375); .625 -> 1 (e -.375); -.125 -> 0 (e -.125); .875 -> 1
    assert fake_quantize(w, bits=2, error_diffusion=1.0).tolist() == [[0.0, 1.0, 0.0, 1.0]]
    # strength 0.5: v = .375 -> 0; .4375 -> 0; .46875 -> 0; 1.234375 -> 1 (clipped)
    assert fake_quantize(w, bits=2, error_diffusion=0.5).tolist() == [[0.0, 0.0, 0.0, 1.0]]


def _reference_diffusion(rows: list[list[float]], bits: int, strength: float) -> list[list[float]]:
    """Explicit scalar loop: symmetric per-tensor grid, Floyd-Steinberg walk along each row."""
    qmax = 2 ** (bits - 1) - 1
    amax = max(abs(v) for row in rows for v in row)
    mantissa, exponent = math.frexp(amax / qmax)
    s = math.ldexp(math.floor(mantissa * 2**16) / 2**16, exponent)  # 16 significant bits, truncated
    out = []
    for row in rows:
        carry, qrow = 0.0, []
        for value in row:
            v = value + carry
            code = -qmax if abs(value) == amax and value < 0 else qmax if abs(value) == amax else round(v / s)
            code = max(-qmax, min(qmax, code))
            qrow.append(code * s)
            carry = strength * (v - code * s)
        out.append(qrow)
    return out


@pytest.mark.parametrize("bits,strength", [(2, 1.0), (4, 0.5), (8, 0.25)])
def test_error_diffusion_matches_an_explicit_loop(bits, strength):
    w = torch.randn(3, 12, generator=torch.Generator().manual_seed(bits), dtype=torch.float64)
    expected = torch.tensor(_reference_diffusion(w.tolist(), bits, strength), dtype=torch.float64)
    assert torch.allclose(fake_quantize(w, bits=bits, error_diffusion=strength), expected, rtol=0, atol=1e-12)


@FAST
@given(w=_weights(), bits=st.integers(2, 8), per_channel=st.booleans())
def test_full_diffusion_keeps_each_row_sum_within_half_a_step(w, bits, per_channel):
    """With strength 1 the errors telescope: |sum(q) - sum(w)| = |last carried error| <= step / 2
    (plus 2^-15 * max|w| per element for the truncated scale)."""
    q = fake_quantize(w, bits=bits, per_channel=per_channel, error_diffusion=1.0)
    qmax = 2 ** (bits - 1) - 1
    wr, qr = _rows(w).double(), _rows(q).double()
    amax = wr.abs().amax(1) if per_channel else wr.abs().max().expand(wr.shape[0])
    step = (qr.abs().amax(1) if per_channel else qr.abs().max().expand(wr.shape[0])) / qmax
    bound = 0.5 * step + wr.shape[1] * amax * 2.0**-14 + 1e-9 * wr.abs().sum(1)
    assert ((qr.sum(1) - wr.sum(1)).abs() <= bound).all()


@pytest.mark.parametrize("mode", [dict(bits=4), dict(bits=3, symmetric=False, per_channel=True), dict(ternary=True)])
def test_diffusion_shrinks_the_row_sum_error_on_random_weights(mode):
    w = torch.randn(64, 48, generator=torch.Generator().manual_seed(0))
    plain = (fake_quantize(w, **mode).sum(1) - w.sum(1)).abs().mean()
    diffused = (fake_quantize(w, **mode, error_diffusion=1.0).sum(1) - w.sum(1)).abs().mean()
    assert diffused < 0.5 * plain


# ----------------------------------------------------------------------------- straight-through estimator
@settings(max_examples=25, deadline=None)
@given(w=_weights(), mode=_modes)
def test_ste_forward_is_fake_quantize_and_backward_is_identity(w, mode):
    w = w.clone().requires_grad_(True)
    g = torch.arange(w.numel(), dtype=torch.float32).reshape(w.shape) - 3.0
    out = ste_fake_quantize(w, **mode)
    assert torch.equal(out.detach(), fake_quantize(w.detach(), **mode))
    (out * g).sum().backward()
    assert torch.equal(w.grad, g)


def test_quantised_linear_gradient_reaches_the_latent_weight_unchanged():
    torch.manual_seed(0)
    layer = nn.Linear(5, 3)
    quantize_model(layer, bits=3, per_channel=True)
    latent = layer.parametrizations.weight.original
    x = torch.randn(4, 5)
    layer(x).pow(2).sum().backward()
    # expectation written out: y = x Q(W)^T + b, dL/dy = 2y, dL/dQ(W) = (2y)^T x, STE: dL/dW = dL/dQ(W)
    q = fake_quantize(latent.detach(), bits=3, per_channel=True)
    y = x @ q.T + layer.bias.detach()
    assert torch.allclose(latent.grad, (2 * y).T @ x, atol=1e-5)


# ----------------------------------------------------------------------------- quantize_model / QuantizedModel
def test_quantize_model_quantises_linear_and_conv_weights_only():
    torch.manual_seed(0)
    model = quantize_model(DigitsStudentCNN(), bits=4, per_channel=True, skip=["head"])
    assert sorted(quantized_layers(model)) == ["block1.0.0", "block2.0.0"]
    names = dict(model.named_parameters())
    assert "block1.0.0.parametrizations.weight.original" in names and "head.weight" in names
    assert "block1.0.1.weight" in names  # BatchNorm stays float
    conv = model.block1[0][0]
    assert torch.equal(conv.weight, fake_quantize(conv.parametrizations.weight.original, bits=4, per_channel=True))
    assert isinstance(model.head.weight, nn.Parameter)  # skipped: a plain float parameter


def test_quantized_model_forward_equals_a_manual_fake_quantised_forward():
    torch.manual_seed(0)
    net = QuantizedModel(DigitsMLP(hidden=8), bits=4, symmetric=False, error_diffusion=0.5, activation_bits=8)
    x = torch.rand(6, 1, 8, 8)
    lin1, lin2 = net.model.block1[1], net.model.head
    opts = dict(bits=4, symmetric=False, error_diffusion=0.5)
    w1 = fake_quantize(lin1.parametrizations.weight.original, **opts)
    w2 = fake_quantize(lin2.parametrizations.weight.original, **opts)
    h = F.relu(F.linear(fake_quantize(x.flatten(1), bits=8, symmetric=False), w1, lin1.bias))
    expected = F.linear(fake_quantize(h, bits=8, symmetric=False), w2, lin2.bias)
    assert torch.equal(net(x), expected)


# ----------------------------------------------------------------------------- export / reload
EXPORT_MODES = {
    "ternary": dict(ternary=True),
    "4bit_per_channel": dict(bits=4, per_channel=True),
    "8bit_asymmetric": dict(bits=8, symmetric=False),
    "diffusion": dict(bits=3, per_channel=True, error_diffusion=0.5),
    "ternary_diffusion_activations": dict(ternary=True, error_diffusion=1.0, activation_bits=8),
}


@pytest.mark.parametrize("mode", list(EXPORT_MODES.values()), ids=list(EXPORT_MODES))
def test_export_reloads_into_a_plain_model_with_identical_outputs(mode, tmp_path):
    torch.manual_seed(0)
    quantised = DigitsStudentCNN()
    for bn in (quantised.block1[0][1], quantised.block2[0][1]):  # non-default float state to carry over
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
    quantize_model(quantised, **mode).eval()
    x = torch.rand(16, 1, 8, 8)
    expected = quantised(x)

    plain = load_quantized(export_quantized(quantised), DigitsStudentCNN()).eval()
    assert not quantized_layers(plain) and all(isinstance(p, nn.Parameter) for p in plain.parameters())
    assert torch.equal(plain(x), expected)

    path = save_quantized(quantised, tmp_path / "q.pt")
    saved = torch.load(path, weights_only=True)  # tensors, numbers and strings only
    from_file = load_quantized(path, DigitsStudentCNN()).eval()
    assert torch.equal(from_file(x), expected)
    for name, entry in saved["layers"].items():
        latent = quantised.get_submodule(name).parametrizations.weight.original
        assert entry["shape"] == list(latent.shape)
        if mode.get("ternary"):
            assert "codes" not in entry and entry["packed"].dtype == torch.uint8
        else:
            assert entry["codes"].dtype == (torch.uint8 if mode.get("symmetric") is False else torch.int8)


def test_export_codes_times_scales_give_the_fake_quantised_weights():
    torch.manual_seed(0)
    model = quantize_model(DigitsMLP(), bits=5, symmetric=False, per_channel=True)
    entry = export_quantized(model)["layers"]["block1.1"]
    assert entry["scale"].shape == (16,) and entry["zero_point"].shape == (16,)
    rebuilt = (entry["codes"].double() - entry["zero_point"][:, None]) * entry["scale"].double()[:, None]
    assert int(entry["codes"].max()) <= 31
    assert torch.equal(rebuilt.float(), model.block1[1].weight)


def test_packed_ternary_codes_take_a_quarter_of_the_int8_bytes():
    torch.manual_seed(0)
    model = quantize_model(DigitsMLP(hidden=16), ternary=True)
    for entry in export_quantized(model)["layers"].values():
        codes, packed = entry["codes"], entry["packed"]
        assert set(codes.unique().tolist()) <= {-1, 0, 1}
        assert packed.numel() * packed.element_size() == math.ceil(codes.numel() / 4)
        assert torch.equal(unpack_ternary(packed, codes.numel()).reshape(codes.shape), codes)
    compact = export_quantized(model, compact=True)["layers"]["block1.1"]
    assert "codes" not in compact


@settings(max_examples=30, deadline=None)
@given(codes=st.lists(st.sampled_from([-1, 0, 1]), max_size=23))
def test_pack_ternary_round_trips(codes):
    t = torch.tensor(codes, dtype=torch.int8)
    packed = pack_ternary(t)
    assert packed.numel() == math.ceil(len(codes) / 4)
    assert torch.equal(unpack_ternary(packed, len(codes)), t)


# ----------------------------------------------------------------------------- errors
def _quantised_mlp():
    return quantize_model(DigitsMLP(), bits=4)


BAD_CALLS = {
    "bits_low": (lambda: fake_quantize(torch.ones(3), bits=1), ValueError, r"`bits` must be an integer in \[2, 8\].*got 1\."),
    "bits_high": (lambda: fake_quantize(torch.ones(3), bits=9), ValueError, r"`bits` must be an integer in \[2, 8\].*got 9\."),
    "bits_float": (lambda: fake_quantize(torch.ones(3), bits=4.0), ValueError, r"`bits` must be an integer.*got 4\.0"),
    "bits_bool": (lambda: fake_quantize(torch.ones(3), bits=True), ValueError, r"`bits` must be an integer.*got True"),
    "diffusion_high": (
        lambda: fake_quantize(torch.ones(3), error_diffusion=1.5),
        ValueError,
        r"`error_diffusion` must be a number in \[0, 1\].*got 1\.5",
    ),
    "diffusion_nan": (
        lambda: fake_quantize(torch.ones(3), error_diffusion=float("nan")), ValueError, r"`error_diffusion`.*got nan"
    ),
    "symmetric_str": (
        lambda: fake_quantize(torch.ones(3), symmetric="yes"), TypeError, r"`symmetric` must be True or False, got 'yes'"
    ),
    "ch_axis": (
        lambda: fake_quantize(torch.ones(2, 3), per_channel=True, ch_axis=2),
        ValueError,
        r"`ch_axis` must index a dimension of the 2-d tensor.*got 2",
    ),
    "int_tensor": (
        lambda: fake_quantize(torch.ones(3, dtype=torch.int64)), TypeError, r"`w` must be a floating-point tensor.*int64"
    ),
    "not_tensor": (lambda: fake_quantize([1.0, 2.0]), TypeError, r"`w` must be a torch.Tensor, got list"),
    "activation_bits": (
        lambda: quantize_model(DigitsMLP(), activation_bits=16),
        ValueError,
        r"`activation_bits` must be an integer in \[2, 8\].*got 16",
    ),
    "skip_unknown": (
        lambda: quantize_model(DigitsMLP(), skip=["fc9"]),
        ValueError,
        r"`skip` names layers.*\['fc9'\].*Valid names: \['block1.1', 'head'\]",
    ),
    "skip_everything": (
        lambda: quantize_model(DigitsMLP(), skip=["block1.1", "head"]), ValueError, r"nothing to quantise in DigitsMLP"
    ),
    "twice": (lambda: quantize_model(_quantised_mlp()), ValueError, r"already fake-quantised"),
    "not_module": (lambda: quantize_model("DigitsMLP"), TypeError, r"`model` must be a torch.nn.Module, got str"),
    "export_plain": (
        lambda: export_quantized(DigitsMLP()), ValueError, r"DigitsMLP has no fake-quantised layer to export"
    ),
    "load_not_export": (
        lambda: load_quantized({"state_dict": {}}, DigitsMLP()), ValueError, r"not a lightning_distill quantised export"
    ),
    "load_wrong_shape": (
        lambda: load_quantized(export_quantized(_quantised_mlp()), DigitsMLP(hidden=8)),
        ValueError,
        r"layer 'block1.1'.*shape \(16, 64\).*\(8, 64\)",
    ),
    "pack_not_ternary": (
        lambda: pack_ternary(torch.tensor([2], dtype=torch.int8)), ValueError, r"ternary values in \{-1, 0, 1\}"
    ),
    "unpack_bad_field": (
        lambda: unpack_ternary(torch.tensor([255], dtype=torch.uint8), 4), ValueError, r"invalid 2-bit field 3"
    ),
}


@pytest.mark.parametrize("call,error,match", list(BAD_CALLS.values()), ids=list(BAD_CALLS))
def test_bad_arguments_raise_documented_errors(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_load_missing_file_names_the_argument(tmp_path):
    with pytest.raises(FileNotFoundError, match="`path_or_dict`="):
        load_quantized(tmp_path / "missing.pt", DigitsMLP())
