"""CharTransformer: shapes, exact causality, padding, hookable blocks, it learns, argument checks."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from lightning_distill.models.char_transformer import CharTransformer

pytestmark = pytest.mark.usefixtures("single_thread")


def tiny(vocab_size: int = 30, **kwargs) -> CharTransformer:
    torch.manual_seed(0)
    defaults = dict(d_model=32, n_layers=2, n_heads=4, max_len=64)
    defaults.update(kwargs)
    return CharTransformer(vocab_size, **defaults).eval()


def test_output_shape_and_init():
    model = tiny(vocab_size=30)
    x = torch.randint(0, 30, (3, 17))
    assert model(x).shape == (3, 17, 30)
    assert model(x[:, :1]).shape == (3, 1, 30)
    assert isinstance(model.blocks, torch.nn.ModuleList) and len(model.blocks) == 2
    # GPT-2 init: std 0.02 embeddings / linears, zero biases, scaled residual projections
    assert abs(model.tok_emb.weight.std().item() - 0.02) < 0.004
    assert torch.all(model.head.bias == 0)
    assert abs(model.blocks[0].mlp[2].weight.std().item() - 0.02 / math.sqrt(4)) < 0.002
    # a fresh model is close to uniform: loss ~ ln(vocab)
    loss = F.cross_entropy(model(x).flatten(0, 1), x.flatten())
    assert abs(loss.item() - math.log(30)) < 0.1


@pytest.mark.parametrize("t", [0, 1, 9, 31])
def test_causal_exactly(t):
    model = tiny()
    x = torch.randint(1, 30, (2, 32))
    changed = x.clone()
    changed[:, t] = (changed[:, t] + 7) % 30
    with torch.no_grad():
        a, b = model(x), model(changed)
    assert torch.equal(a[:, :t], b[:, :t])  # bit-identical before t
    assert not torch.equal(a[:, t], b[:, t])  # the change is seen from t on


def test_right_padding_does_not_change_valid_positions():
    model = tiny()
    x = torch.randint(1, 30, (2, 20))
    padded = torch.cat([x, torch.zeros(2, 12, dtype=torch.long)], dim=1)
    other_pad = padded.clone()
    other_pad[:, 20:] = 5
    with torch.no_grad():
        short, a, b = model(x), model(padded), model(other_pad)
    assert torch.equal(a[:, :20], b[:, :20])  # same length: whatever the padding, exactly equal
    torch.testing.assert_close(a[:, :20], short, rtol=0, atol=1e-5)  # other length: matmul blocking only


def test_hooks_on_blocks_capture_hidden_states():
    model = tiny(d_model=32, n_layers=3)
    assert model.stage_names == ("blocks.0", "blocks.1", "blocks.2")
    modules = dict(model.named_modules())
    captured = {}
    handles = [
        modules[name].register_forward_hook(lambda _m, _i, out, name=name: captured.__setitem__(name, out))
        for name in model.stage_names
    ]
    model(torch.randint(0, 30, (4, 9)))
    for h in handles:
        h.remove()
    assert set(captured) == set(model.stage_names)
    assert all(isinstance(v, torch.Tensor) and v.shape == (4, 9, 32) for v in captured.values())


def test_learns_a_repeated_string():
    text = "the quick brown fox jumps over the lazy dog. " * 4
    chars = sorted(set(text))
    ids = torch.tensor([chars.index(c) for c in text])
    x, y = ids[:-1].unfold(0, 32, 8), ids[1:].unfold(0, 32, 8)  # [N, 32] windows
    torch.manual_seed(0)
    model = CharTransformer(len(chars), d_model=32, n_layers=1, n_heads=2, max_len=32)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(60):
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] > 0.9 * math.log(len(chars))  # starts near uniform (~3.3 nats)
    assert losses[-1] < 0.5  # ... and has learnt most of the (deterministic after a few chars) text


def test_dropout_only_in_train_mode():
    model = tiny(dropout=0.5)
    x = torch.randint(0, 30, (2, 8))
    with torch.no_grad():
        assert torch.equal(model(x), model(x))
        model.train()
        assert not torch.equal(model(x), model(x))


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"vocab_size": 0}, ValueError, r"`vocab_size` must be an integer >= 1, got 0"),
        (
            {"vocab_size": 10, "d_model": 30, "n_heads": 4},
            ValueError,
            r"`d_model` \(30\) must be divisible by `n_heads` \(4\).*Valid n_heads.*\[1, 2, 3, 5, 6, 10, 15, 30\]",
        ),
        ({"vocab_size": 10, "n_layers": 0}, ValueError, r"`n_layers` must be an integer >= 1, got 0"),
        ({"vocab_size": 10, "max_len": 2.5}, ValueError, r"`max_len` must be an integer >= 1, got 2.5"),
        ({"vocab_size": 10, "ffn_mult": True}, ValueError, r"`ffn_mult` must be an integer >= 1, got True"),
        ({"vocab_size": 10, "dropout": 1.0}, ValueError, r"`dropout` must be a probability in \[0, 1\), got 1.0"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        CharTransformer(**kwargs)


def test_bad_inputs():
    model = tiny(max_len=16)
    with pytest.raises(ValueError, match=r"input length 17 is longer than max_len=16.*max_len >= 17"):
        model(torch.zeros(1, 17, dtype=torch.long))
    with pytest.raises(TypeError, match=r"integer token ids, got dtype torch.float32"):
        model(torch.zeros(1, 4))
    with pytest.raises(ValueError, match=r"must be \[N, L\].*got shape \(4,\).*input_ids\[None\]"):
        model(torch.zeros(4, dtype=torch.long))
