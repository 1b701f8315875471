"""Transformer objectives (``lightning_distill.objectives.transformer``) and their losses.

Every loss is checked against a reference written here independently -- explicit Python loops over
samples, heads and positions in float64 / Python floats, or (DistilBERT) the authors' ``Distiller.step``
re-typed -- plus cases computed by hand and invariants (non-negativity, permutations, padding). Every
objective then trains for two steps inside ``DistillationModule`` on the tiny Hugging Face pairs of
``tests/_hf.py`` (a GPT-2 causal pair and a BERT teacher with a DistilBERT student on masked-LM batches),
with its trained parts (projections, the learned layer map's gate) receiving gradients, in the optimizer,
and restored from a checkpoint.
"""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from lightning_distill import DistillationModule
from lightning_distill.batch import Batch
from lightning_distill.losses import (
    attention_kl_loss,
    attention_mse_loss,
    distilbert_loss,
    hidden_state_dynamics_loss,
    relation_kl_loss,
    resolve_layer_map,
    split_heads,
)
from lightning_distill.objectives import (
    DistilBERTLoss,
    HiddenStateDynamics,
    LayerMap,
    MiniLMLoss,
    TinyBERTLoss,
)
from lightning_distill.outputs import ModelOutputs
from lightning_distill.probe import Probe

FAST = settings(max_examples=25, deadline=None)


# --------------------------------------------------------------------------------------------
# References (Python floats, explicit loops)
# --------------------------------------------------------------------------------------------
def _real(mask, n, length):
    return [[True] * length for _ in range(n)] if mask is None else mask.bool().tolist()


def ref_attention_mse(s, t, mask=None):
    n, h, length, _ = s.shape
    real, s, t = _real(mask, n, length), s.double().tolist(), t.double().tolist()
    total, count = 0.0, 0
    for i in range(n):
        pos = [p for p in range(length) if real[i][p]]
        for head in range(h):
            for q in pos:
                for k in pos:
                    total += (s[i][head][q][k] - t[i][head][q][k]) ** 2
                    count += 1
    return total / count if count else 0.0


def _kl(p, q):
    return math.fsum(pi * math.log(pi / qi) for pi, qi in zip(p, q) if pi > 0)


def ref_attention_kl(s, t, mask=None):
    """KL(teacher row || student row) over the real keys, rows renormalised there; mean over heads and real queries."""
    n, h, length, _ = s.shape
    real, s, t = _real(mask, n, length), s.double().tolist(), t.double().tolist()
    values = []
    for i in range(n):
        pos = [p for p in range(length) if real[i][p]]
        for head in range(h):
            for q in pos:
                ps, pt = [s[i][head][q][k] for k in pos], [t[i][head][q][k] for k in pos]
                zs, zt = math.fsum(ps), math.fsum(pt)
                values.append(_kl([v / zt for v in pt], [v / zs for v in ps]))
    return math.fsum(values) / len(values) if values else 0.0


def _softmax(row):
    m = max(row)
    e = [math.exp(v - m) for v in row]
    z = math.fsum(e)
    return [v / z for v in e]


def ref_relation_kl(xs, xt, heads, mask=None, causal=False):
    """MiniLM(v2) relation KL: per relation head h, query i: softmax_j(x_i . x_j / sqrt(d_h)) over allowed keys j."""
    n, length, _ = xs.shape
    real = _real(mask, n, length)
    values = []
    for i in range(n):
        pos = [p for p in range(length) if real[i][p]]
        for h in range(heads):
            rows = []
            for x in (xs, xt):
                d = x.shape[-1] // heads
                v = x[i, :, h * d:(h + 1) * d].double().tolist()
                rows.append({q: _softmax([math.fsum(a * b for a, b in zip(v[q], v[k])) / math.sqrt(d)
                                          for k in pos if not causal or k <= q]) for q in pos})
            for q in pos:
                values.append(_kl(rows[1][q], rows[0][q]))
    return math.fsum(values) / len(values) if values else 0.0


def ref_masked_mse(a, b, mask=None):
    """Mean over real tokens of the mean over features of (a - b)^2."""
    n, length, _ = a.shape
    real = _real(mask, n, length)
    rows = [((a[i, p].double() - b[i, p].double()) ** 2).mean().item()
            for i in range(n) for p in range(length) if real[i][p]]
    return math.fsum(rows) / len(rows) if rows else 0.0


def ref_masked_cosine(a, b, mask=None):
    n, length, _ = a.shape
    real = _real(mask, n, length)
    rows = []
    for i in range(n):
        for p in range(length):
            if real[i][p]:
                x, y = a[i, p].double().tolist(), b[i, p].double().tolist()
                dot = math.fsum(u * v for u, v in zip(x, y))
                norm = math.sqrt(math.fsum(u * u for u in x)) * math.sqrt(math.fsum(v * v for v in y))
                rows.append(1.0 - dot / max(norm, 1e-8))
    return math.fsum(rows) / len(rows) if rows else 0.0


def ref_distiller(s_logits, t_logits, s_hidden, t_hidden, lm_labels, attention_mask, temperature, restrict_ce_to_mask):
    """The DistilBERT authors' ``Distiller.step`` loss terms (Hugging Face's distillation example), re-typed."""
    ce_loss_fct = nn.KLDivLoss(reduction="batchmean")
    lm_loss_fct = nn.CrossEntropyLoss(ignore_index=-100)
    cosine_loss_fct = nn.CosineEmbeddingLoss(reduction="mean")
    if restrict_ce_to_mask:
        mask = (lm_labels > -1).unsqueeze(-1).expand_as(s_logits)
    else:
        mask = attention_mask.bool().unsqueeze(-1).expand_as(s_logits)
    s_logits_slct = torch.masked_select(s_logits, mask).view(-1, s_logits.size(-1))
    t_logits_slct = torch.masked_select(t_logits, mask).view(-1, s_logits.size(-1))
    loss_ce = ce_loss_fct(
        F.log_softmax(s_logits_slct / temperature, dim=-1), F.softmax(t_logits_slct / temperature, dim=-1)
    ) * temperature**2
    loss_mlm = lm_loss_fct(s_logits.view(-1, s_logits.size(-1)), lm_labels.view(-1))
    mask = attention_mask.bool().unsqueeze(-1).expand_as(s_hidden)
    dim = s_hidden.size(-1)
    s_hidden_slct = torch.masked_select(s_hidden, mask).view(-1, dim)
    t_hidden_slct = torch.masked_select(t_hidden, mask).view(-1, dim)
    target = s_hidden_slct.new(s_hidden_slct.size(0)).fill_(1)
    loss_cos = cosine_loss_fct(s_hidden_slct, t_hidden_slct, target)
    return loss_ce, loss_mlm, loss_cos


def _close(actual, expected, rtol=1e-4, atol=1e-6):
    actual = float(actual.detach()) if isinstance(actual, torch.Tensor) else float(actual)
    assert math.isfinite(actual), actual
    assert abs(actual - float(expected)) <= atol + rtol * abs(float(expected)), (actual, expected)


# --------------------------------------------------------------------------------------------
# Random inputs
# --------------------------------------------------------------------------------------------
@st.composite
def _maps(draw, max_len=5):
    """(student probs, teacher probs, mask) of shape [N, H, L, L] / [N, L], from random logits."""
    n, h, length = draw(st.integers(1, 3)), draw(st.integers(1, 3)), draw(st.integers(1, max_len))
    seed = draw(st.integers(0, 10_000))
    g = torch.Generator().manual_seed(seed)
    scale = draw(st.sampled_from([0.1, 1.0, 5.0]))
    s = (scale * torch.randn(n, h, length, length, generator=g)).softmax(-1)
    t = (scale * torch.randn(n, h, length, length, generator=g)).softmax(-1)
    mask = torch.rand(n, length, generator=g) > draw(st.sampled_from([0.0, 0.3, 0.6]))
    return s, t, mask


@st.composite
def _projections(draw):
    """(student x [N, L, D_S], teacher x [N, L, D_T], relation heads, mask, causal)."""
    n, length, heads = draw(st.integers(1, 3)), draw(st.integers(1, 5)), draw(st.integers(1, 3))
    d_s, d_t = heads * draw(st.integers(1, 3)), heads * draw(st.integers(1, 3))
    g = torch.Generator().manual_seed(draw(st.integers(0, 10_000)))
    xs, xt = torch.randn(n, length, d_s, generator=g), 2 * torch.randn(n, length, d_t, generator=g)
    mask = torch.rand(n, length, generator=g) > draw(st.sampled_from([0.0, 0.4]))
    return xs, xt, heads, mask, draw(st.booleans())


def _garbage_in_padding(x, mask, dims):
    """``x`` with every padded position (along ``dims``: the token axes) overwritten by large random values."""
    y = x.clone()
    pad = ~mask.bool()
    for d in dims:
        shape = [pad.shape[0]] + [1] * (x.ndim - 1)
        shape[d] = pad.shape[1]
        y = torch.where(pad.reshape(shape), 1e4 * torch.rand_like(y), y)
    return y


# --------------------------------------------------------------------------------------------
# attention_mse_loss (TinyBERT)
# --------------------------------------------------------------------------------------------
@FAST
@given(_maps())
def test_attention_mse_matches_the_loop(case):
    s, t, mask = case
    _close(attention_mse_loss(s, t, mask), ref_attention_mse(s, t, mask), atol=1e-7)
    _close(attention_mse_loss(s, t), ref_attention_mse(s, t), atol=1e-7)


def test_attention_mse_two_tokens_by_hand():
    s = torch.tensor([[[[0.5, 0.5], [0.2, 0.8]]], [[[0.9, 0.1], [0.0, 1.0]]]])
    t = torch.tensor([[[[1.0, 0.0], [0.4, 0.6]]], [[[0.9, 0.1], [0.5, 0.5]]]])
    # all real: (0.25 + 0.25 + 0.04 + 0.04 + 0 + 0 + 0.25 + 0.25) / 8
    _close(attention_mse_loss(s, t), 1.08 / 8)
    # second token of the first sample padded: its row and column drop out -> (0.25) + sample 2's four entries
    _close(attention_mse_loss(s, t, torch.tensor([[True, False], [True, True]])), (0.25 + 0.5) / 5)
    assert attention_mse_loss(s, s).item() == 0.0
    assert attention_mse_loss(s, t, torch.zeros(2, 2, dtype=torch.bool)).item() == 0.0  # nothing real: 0, not NaN


@FAST
@given(_maps())
def test_attention_losses_ignore_padding_and_head_order(case):
    s, t, mask = case
    for fn in (attention_mse_loss, attention_kl_loss):
        value = fn(s, t, mask)
        garbage = fn(_garbage_in_padding(s, mask, (2, 3)), _garbage_in_padding(t, mask, (2, 3)), mask)
        _close(garbage, value, atol=1e-7)
        perm = torch.randperm(s.shape[1])
        _close(fn(s[:, perm], t[:, perm], mask), value, atol=1e-7)


def test_attention_losses_refuse_different_head_counts_and_point_to_relation_heads():
    s, t = torch.rand(1, 2, 3, 3), torch.rand(1, 4, 3, 3)
    for fn in (attention_mse_loss, attention_kl_loss):
        with pytest.raises(ValueError, match=r"student has 2 heads and the teacher 4.*MiniLMv2 relation heads"):
            fn(s, t)


# --------------------------------------------------------------------------------------------
# attention_kl_loss (MiniLM)
# --------------------------------------------------------------------------------------------
@FAST
@given(_maps())
def test_attention_kl_matches_the_loop_and_is_non_negative(case):
    s, t, mask = case
    value = attention_kl_loss(s, t, mask)
    _close(value, ref_attention_kl(s, t, mask), atol=1e-6)
    assert value.item() >= 0.0 and attention_kl_loss(t, t, mask).item() == pytest.approx(0.0, abs=1e-6)


def test_attention_kl_two_keys_by_hand():
    t = torch.tensor([[[[0.5, 0.5], [1.0, 0.0]]]])
    s = torch.tensor([[[[0.25, 0.75], [0.6, 0.4]]]])
    row0 = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    row1 = 1.0 * math.log(1.0 / 0.6)  # the teacher's 0 adds nothing
    _close(attention_kl_loss(s, t), (row0 + row1) / 2)
    # key 1 padded: both rows renormalised onto key 0 -> KL 0; query 1 padded too
    assert attention_kl_loss(s, t, torch.tensor([[True, False]])).item() == pytest.approx(0.0, abs=1e-7)


def test_attention_kl_stays_finite_where_the_student_gives_zero():
    t = torch.tensor([[[[0.5, 0.5], [0.5, 0.5]]]])
    s = torch.tensor([[[[1.0, 0.0], [0.5, 0.5]]]], requires_grad=True)
    value = attention_kl_loss(s, t)
    value.backward()
    assert math.isfinite(value.item()) and value.item() > 10 and torch.isfinite(s.grad).all()


# --------------------------------------------------------------------------------------------
# relation_kl_loss (MiniLM value relation, MiniLMv2 relation heads)
# --------------------------------------------------------------------------------------------
@FAST
@given(_projections())
def test_relation_kl_matches_the_loop(case):
    xs, xt, heads, mask, causal = case
    value = relation_kl_loss(xs, xt, heads, mask, causal)
    _close(value, ref_relation_kl(xs, xt, heads, mask, causal), atol=1e-6)
    assert value.item() >= 0.0


@FAST
@given(_projections())
def test_relation_kl_invariances(case):
    xs, xt, heads, mask, causal = case
    value = relation_kl_loss(xs, xt, heads, mask, causal)
    # padding: whatever padded tokens hold
    _close(relation_kl_loss(_garbage_in_padding(xs, mask, (1,)), _garbage_in_padding(xt, mask, (1,)), heads, mask,
                            causal), value, atol=1e-6)
    # an orthogonal transform within every student head leaves x_i . x_j unchanged
    d = xs.shape[-1] // heads
    q = torch.linalg.qr(torch.randn(d, d, dtype=torch.float64))[0].float()
    rotated = (split_heads(xs, heads) @ q).transpose(1, 2).reshape(xs.shape)
    _close(relation_kl_loss(rotated, xt, heads, mask, causal), value, atol=1e-5)
    if not causal:  # the token order does not matter (the same permutation on both sides and the mask)
        perm = torch.randperm(xs.shape[1])
        _close(relation_kl_loss(xs[:, perm], xt[:, perm], heads, mask[:, perm]), value, atol=1e-6)


def test_relation_kl_two_tokens_by_hand():
    xs = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])      # x0.x0 = 1, x0.x1 = 0, x1.x1 = 1
    xt = torch.tensor([[[2.0, 0.0], [2.0, 0.0]]])      # every dot product 4
    r = 1 / math.sqrt(2)
    student_row0 = _softmax([1 * r, 0.0])
    student_row1 = _softmax([0.0, 1 * r])
    expected = (_kl([0.5, 0.5], student_row0) + _kl([0.5, 0.5], student_row1)) / 2
    _close(relation_kl_loss(xs, xt, heads=1), expected)
    # causal: query 0 sees only itself (KL 0), query 1 sees both
    _close(relation_kl_loss(xs, xt, heads=1, causal=True), _kl([0.5, 0.5], student_row1) / 2)
    assert relation_kl_loss(xs, xs.clone(), heads=2).item() == 0.0


def test_relation_heads_must_divide_the_width():
    with pytest.raises(ValueError, match=r"cannot split a width of 6 into 4 relation heads"):
        relation_kl_loss(torch.randn(1, 3, 8), torch.randn(1, 3, 6), heads=4)


# --------------------------------------------------------------------------------------------
# hidden_state_dynamics_loss
# --------------------------------------------------------------------------------------------
@FAST
@given(st.integers(2, 4), st.integers(0, 10_000), st.sampled_from(["mse", "cosine"]))
def test_dynamics_matches_the_loop_and_ignores_offsets(points, seed, loss):
    g = torch.Generator().manual_seed(seed)
    s = [torch.randn(2, 4, 3, generator=g) for _ in range(points)]
    t = [torch.randn(2, 4, 3, generator=g) for _ in range(points)]
    mask = torch.tensor([[True, True, False, True], [True, False, False, False]])
    ref = ref_masked_mse if loss == "mse" else ref_masked_cosine
    expected = math.fsum(ref(s[k + 1] - s[k], t[k + 1] - t[k], mask) for k in range(points - 1)) / (points - 1)
    value = hidden_state_dynamics_loss(s, t, mask, loss)
    _close(value, expected, atol=1e-6)
    offset = torch.randn(2, 4, 3, generator=g)
    _close(hidden_state_dynamics_loss([x + offset for x in s], t, mask, loss), value, atol=1e-5)
    _close(hidden_state_dynamics_loss(s, [_garbage_in_padding(x, mask, (1,)) for x in t], mask, loss), value,
           atol=1e-6)
    assert hidden_state_dynamics_loss(t, t, mask, loss).item() == pytest.approx(0.0, abs=1e-6)


def test_dynamics_projects_the_differences_and_needs_two_points():
    s = [torch.zeros(1, 2, 2), torch.ones(1, 2, 2)]
    t = [torch.zeros(1, 2, 4), torch.full((1, 2, 4), 2.0)]
    proj = nn.Linear(2, 4, bias=False)
    nn.init.constant_(proj.weight, 1.0)  # (1, 1) -> (2, 2, 2, 2): exactly the teacher's move
    assert hidden_state_dynamics_loss(s, t, project=proj).item() == 0.0
    with pytest.raises(ValueError, match=r"a difference needs two layers"):
        hidden_state_dynamics_loss(s[:1], t[:1])


# --------------------------------------------------------------------------------------------
# layer maps
# --------------------------------------------------------------------------------------------
def test_named_layer_maps_follow_the_papers():
    # TinyBERT: g(m) = 3m for a 4-layer student of BERT-base; the embeddings (0) are a separate term
    assert resolve_layer_map("uniform", 4, 12) == [(1, 3), (2, 6), (3, 9), (4, 12)]
    # PKD-skip / PKD-last for a 6-layer student of BERT-base
    assert resolve_layer_map("skip", 6, 12) == [(m, 2 * m) for m in range(1, 7)]
    assert resolve_layer_map("skip", 3, 12, step=3) == [(1, 3), (2, 6), (3, 9)]
    assert resolve_layer_map("last", 6, 12) == [(m, 6 + m) for m in range(1, 7)]
    assert resolve_layer_map({"2": "5", 0: 0}, 2, 6) == [(0, 0), (2, 5)]


def test_layer_map_errors_name_the_ranges():
    with pytest.raises(ValueError, match=r"out of range \[\(3, 1\)\].*indices 0..2 and the teacher 0..6"):
        resolve_layer_map({3: 1}, 2, 6)
    with pytest.raises(ValueError, match=r"`layer_map` must be one of .*'learned'.*got 'middle'.*dict"):
        LayerMap("middle")
    with pytest.raises(ValueError, match=r"`layer_step` only applies to layer_map='skip'"):
        LayerMap("uniform", step=2)
    with pytest.raises(ValueError, match=r"4 student layers x step 4 > 12"):
        resolve_layer_map("skip", 4, 12, step=4)


def test_learned_layer_map_mixes_teacher_layers_by_the_softmax_of_its_gate():
    lm = LayerMap("learned")
    lm.build(student_layers=2, teacher_layers=3)
    assert lm.pairs == [(1, None), (2, None)] and tuple(lm.gate.shape) == (2, 3)
    with torch.no_grad():
        lm.gate.copy_(torch.tensor([[0.0, 1.0, -1.0], [2.0, 0.5, 0.0]]))
    teacher = [torch.randn(2, 4, 5) for _ in range(4)]  # hidden_states 0..3
    targets = lm.teacher_targets(teacher)
    for m in range(2):
        w = _softmax(lm.gate[m].tolist())
        expected = sum(w[j - 1] * teacher[j] for j in range(1, 4))  # layers 1..3, never the embeddings
        torch.testing.assert_close(targets[m], expected)
    # attention maps start at layer 1: the same weights over teacher[j - 1]
    maps = [torch.rand(2, 1, 4, 4) for _ in range(3)]
    torch.testing.assert_close(lm.teacher_targets(maps, first=1, which=[1])[0],
                               sum(_softmax(lm.gate[1].tolist())[j] * maps[j] for j in range(3)))
    sum(t.sum() for t in targets).backward()
    assert lm.gate.grad is not None and torch.isfinite(lm.gate.grad).all()


# --------------------------------------------------------------------------------------------
# DistilBERT's triple loss against the authors' code
# --------------------------------------------------------------------------------------------
@FAST
@given(st.integers(0, 10_000), st.sampled_from([1.0, 2.0, 4.0]), st.booleans())
def test_distilbert_loss_matches_the_authors_distiller(seed, temperature, restrict):
    g = torch.Generator().manual_seed(seed)
    n, length, vocab, dim = 3, 6, 7, 4
    s_logits, t_logits = torch.randn(n, length, vocab, generator=g), 3 * torch.randn(n, length, vocab, generator=g)
    s_hidden, t_hidden = torch.randn(n, length, dim, generator=g), torch.randn(n, length, dim, generator=g)
    lengths = torch.randint(1, length + 1, (n,), generator=g)
    attention_mask = (torch.arange(length)[None] < lengths[:, None]).long()
    labels = torch.randint(0, vocab, (n, length), generator=g)
    chosen = (torch.rand(n, length, generator=g) < 0.3) & attention_mask.bool()
    chosen[:, 0] = True
    labels = labels.masked_fill(~chosen, -100)
    ce, mlm, cos = distilbert_loss(s_logits, t_logits, labels, s_hidden, t_hidden, attention_mask, temperature,
                                   "labelled" if restrict else "tokens")
    ref_ce, ref_mlm, ref_cos = ref_distiller(s_logits, t_logits, s_hidden, t_hidden, labels, attention_mask,
                                             temperature, restrict)
    for value, ref in ((ce, ref_ce), (mlm, ref_mlm), (cos, ref_cos)):
        _close(value, ref, rtol=1e-5, atol=1e-6)


def test_distilbert_loss_positions_differ_and_padding_is_ignored():
    z_t = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [9.0, -9.0]]])
    z_s = torch.tensor([[[0.0, 0.0], [0.0, 1.0], [-9.0, 9.0]]])  # the third token is padding
    labels, mask = torch.tensor([[-100, 1, -100]]), torch.tensor([[True, True, False]])
    kd_first = _kl(_softmax([1.0, 0.0]), [0.5, 0.5])  # the second token agrees: KL 0
    ce, _, cos = distilbert_loss(z_s, z_t, labels, mask=mask, temperature=1.0)
    _close(ce, kd_first / 2)  # every real token
    assert cos.item() == 0.0  # no hidden states: no cosine term
    ce_labelled, mlm, _ = distilbert_loss(z_s, z_t, labels, mask=mask, temperature=1.0, kd_positions="labelled")
    assert ce_labelled.item() == pytest.approx(0.0, abs=1e-7)  # the only labelled token agrees
    _close(mlm, -math.log(_softmax([0.0, 1.0])[1]))


# --------------------------------------------------------------------------------------------
# Objectives on hand-made outputs
# --------------------------------------------------------------------------------------------
def _outputs(layers, width, heads=2, n=2, length=5, seed=0, features=None):
    g = torch.Generator().manual_seed(seed)
    return ModelOutputs(
        torch.randn(n, length, 7, generator=g),
        features=features or {},
        hidden_states=tuple(torch.randn(n, length, width, generator=g) for _ in range(layers + 1)),
        attentions=tuple(torch.randn(n, heads, length, length, generator=g).softmax(-1) for _ in range(layers)),
    )


MASK = torch.tensor([[True, True, True, True, True], [True, True, True, False, False]])


@pytest.mark.parametrize("layer_map", ["uniform", "learned", {0: 0, 2: 3}])
@pytest.mark.parametrize("shared", [False, True])
def test_tinybert_equals_its_formula(layer_map, shared):
    student, teacher = _outputs(2, 4, seed=1), _outputs(4, 6, seed=2)
    loss = TinyBERTLoss(layer_map=layer_map, embedding_weight=0.5, hidden_weight=2.0, attention_weight=3.0,
                        shared_projection=shared, weight=0.1)
    assert loss.needs_probe
    loss.build(Probe(Batch(None), student, teacher))
    assert not loss.needs_probe
    if layer_map == "learned":
        with torch.no_grad():
            loss.layer_map.gate.normal_()
    terms = loss(student, teacher, Batch(None, mask=MASK), None)
    hs_s, hs_t, att_s, att_t = student.hidden_states, teacher.hidden_states, student.attentions, teacher.attentions
    pe = loss.embedding_projection
    emb = ref_masked_mse(pe(hs_s[0]).detach(), hs_t[0], MASK)
    pairs = {"uniform": [(1, 2), (2, 4)], "learned": [(1, None), (2, None)], "{0: 0, 2: 3}": [(0, 0), (2, 3)]}[
        str(layer_map)]
    assert loss.layer_map.pairs == pairs

    def teacher_side(seq, t, m, first):
        if t is not None:
            return seq[t - first]
        w = _softmax(loss.layer_map.gate[m - 1].tolist())
        return sum(w[j - 1] * seq[j - first] for j in range(1, 5))

    hidden = attention = 0.0
    for k, (s, t) in enumerate(pairs):
        proj = loss.hidden_projections[0 if shared else k]
        hidden += ref_masked_mse(proj(hs_s[s]).detach(), teacher_side(hs_t, t, s, 0), MASK)
        if s >= 1 and (t is None or t >= 1):
            attention += ref_attention_mse(att_s[s - 1], teacher_side(att_t, t, s, 1), MASK)
    _close(terms["tinybert_embedding"], emb)
    _close(terms["tinybert_hidden"], hidden)
    _close(terms["tinybert_attention"], attention)
    _close(terms["tinybert_loss"], 0.5 * emb + 2.0 * hidden + 3.0 * attention)
    _close(terms["loss"], 0.1 * (0.5 * emb + 2.0 * hidden + 3.0 * attention))
    assert len(loss.hidden_projections) == (1 if shared else 2)


def test_tinybert_vanishes_for_identical_models_and_ignores_padding():
    student = _outputs(2, 4, seed=3)
    loss = TinyBERTLoss(projection="none")
    loss.build(Probe(Batch(None), student, student))
    assert loss(student, student, Batch(None, mask=MASK), None)["loss"].item() == 0.0
    teacher = _outputs(2, 4, seed=4)
    value = loss(student, teacher, Batch(None, mask=MASK), None)["loss"]
    padded = ModelOutputs(teacher.logits, hidden_states=tuple(_garbage_in_padding(h, MASK, (1,))
                                                               for h in teacher.hidden_states),
                          attentions=tuple(_garbage_in_padding(a, MASK, (2, 3)) for a in teacher.attentions))
    _close(loss(student, padded, Batch(None, mask=MASK), None)["loss"], value, atol=1e-6)


def test_tinybert_refuses_different_head_counts_naming_both_and_minilmv2():
    with pytest.raises(ValueError, match=r"student has 2 attention heads and the teacher 4.*attention_weight=0.*"
                                         r"MiniLMLoss\(.*relation_heads.*head counts may differ"):
        TinyBERTLoss().build(Probe(Batch(None), _outputs(1, 4, heads=2), _outputs(2, 8, heads=4)))
    TinyBERTLoss(attention_weight=0.0).build(Probe(Batch(None), _outputs(1, 4, heads=2), _outputs(2, 8, heads=4)))


def test_minilm_equals_its_formula_with_fused_and_separate_projections():
    g = torch.Generator().manual_seed(5)
    fused_s, fused_t = torch.randn(2, 5, 3 * 4, generator=g), torch.randn(2, 5, 3 * 6, generator=g)
    student = _outputs(1, 4, seed=6, features={"qkv": fused_s})
    teacher = _outputs(2, 6, seed=7, features={"q": fused_t[..., :6], "k": fused_t[..., 6:12], "v": fused_t[..., 12:]})
    loss = MiniLMLoss("qkv", ("q", "k", "v"), relations={"query": 1.0, "key": 0.5, "value": 2.0}, relation_heads=2)
    assert loss.student_layers() == {"qkv": 0} and loss.teacher_layers() == {"q": 0, "k": 0, "v": 0}
    assert loss.model_outputs == ()  # relation heads given, no attention maps: nothing extra asked of the models
    loss.build(Probe(Batch(None), student, teacher))
    terms = loss(student, teacher, Batch(None, mask=MASK), None)
    expected = {r: ref_relation_kl(fused_s[..., 4 * i:4 * (i + 1)], fused_t[..., 6 * i:6 * (i + 1)], 2, MASK)
                for i, r in enumerate(("query", "key", "value"))}
    for r, v in expected.items():
        _close(terms[f"minilm_{r}"], v)
    _close(terms["minilm_loss"], expected["query"] + 0.5 * expected["key"] + 2.0 * expected["value"])


def test_minilm_v1_reads_the_last_attention_maps_and_the_models_heads():
    g = torch.Generator().manual_seed(8)
    v_s, v_t = torch.randn(2, 5, 4, generator=g), torch.randn(2, 5, 6, generator=g)
    student, teacher = _outputs(1, 4, seed=9, features={"v": v_s}), _outputs(3, 6, seed=10, features={"tv": v_t})
    loss = MiniLMLoss({"value": "v"}, {"value": "tv"})
    assert set(loss.model_outputs) == {"attentions"}
    loss.build(Probe(Batch(None), student, teacher))
    terms = loss(student, teacher, Batch(None, mask=MASK), None)
    _close(terms["minilm_attention"], ref_attention_kl(student.attentions[-1], teacher.attentions[-1], MASK))
    _close(terms["minilm_value"], ref_relation_kl(v_s, v_t, 2, MASK))  # the models' 2 heads
    with pytest.raises(ValueError, match=r"student has 2 heads and the teacher 3.*relation_heads=H"):
        loss.build(Probe(Batch(None), student, _outputs(3, 6, heads=3, features={"tv": v_t})))


def test_hidden_state_dynamics_equals_its_formula():
    student, teacher = _outputs(2, 4, seed=11), _outputs(4, 6, seed=12)
    loss = HiddenStateDynamics(layer_map="learned", loss="cosine", weight=2.0)
    loss.build(Probe(Batch(None), student, teacher))
    with torch.no_grad():
        loss.layer_map.gate.normal_()
    value = loss(student, teacher, Batch(None, mask=MASK), None)
    hs_s, hs_t = student.hidden_states, teacher.hidden_states
    t_points = [hs_t[0]] + [sum(_softmax(loss.layer_map.gate[m].tolist())[j - 1] * hs_t[j] for j in range(1, 5))
                            for m in range(2)]
    s_points = [hs_s[0], hs_s[1], hs_s[2]]
    expected = math.fsum(ref_masked_cosine(loss.projections[k](s_points[k + 1] - s_points[k]).detach(),
                                           t_points[k + 1] - t_points[k], MASK) for k in range(2)) / 2
    _close(value["dynamics_loss"], expected)
    _close(value["loss"], 2 * expected)
    assert all(p.bias is None for p in loss.projections)  # a bias would not cancel in a difference


@pytest.mark.parametrize(("build", "match"), [
    (lambda: TinyBERTLoss(embedding_weight=0, hidden_weight=0, attention_weight=0), r"nothing to compare"),
    (lambda: TinyBERTLoss(attention_weight=-1.0), r"`attention_weight` must be a finite number >= 0, got -1.0"),
    (lambda: TinyBERTLoss(projection="mlp"), r"`projection` must be one of \('auto', 'always', 'none'\)"),
    (lambda: TinyBERTLoss(layer_map={1: -2}), r"non-negative integers \{student_index: teacher_index\}"),
    (lambda: MiniLMLoss(relations=("attention", "values")), r"`relations` must be a non-empty subset of .*'value'"),
    (lambda: MiniLMLoss(relation_heads=0), r"`relation_heads` must be an integer >= 1, got 0"),
    (lambda: MiniLMLoss("s.qkv", None, relations=("value",)), r"read the \['value'\] projection\(s\).*`teacher_qkv`"),
    (lambda: MiniLMLoss({"query": "a", "kee": "b"}), r"`student_qkv` keys must be among \('query', 'key', 'value'\)"),
    (lambda: MiniLMLoss(["a", "b"]), r"`student_qkv` must name the layers .*GPT-2's"),
    (lambda: DistilBERTLoss(temperature=0.0), r"`temperature` must be a finite number > 0, got 0.0. DistilBERT uses 2"),
    (lambda: DistilBERTLoss(kd_positions="masked"), r"`kd_positions` must be one of \('tokens', 'labelled'\)"),
    (lambda: DistilBERTLoss(alpha_ce=0, alpha_mlm=0, alpha_cos=0), r"all 0"),
    (lambda: HiddenStateDynamics(loss="l1"), r"`loss` must be one of \('mse', 'cosine'\), got 'l1'"),
    (lambda: HiddenStateDynamics(projection_lr=0.0), r"`projection_lr` must be > 0 or None, got 0.0"),
])
def test_hyperparameters_are_validated(build, match):
    with pytest.raises(ValueError, match=match):
        build()


def test_dynamics_needs_two_trajectory_points_and_projection_none_needs_equal_widths():
    with pytest.raises(ValueError, match=r"gives 1 point\(s\) of the trajectory"):
        HiddenStateDynamics(include_embeddings=False).build(Probe(Batch(None), _outputs(1, 4), _outputs(2, 4)))
    with pytest.raises(ValueError, match=r"student's width is 4 and the teacher's 6.*projection='auto'"):
        HiddenStateDynamics(projection="none").build(Probe(Batch(None), _outputs(1, 4), _outputs(2, 6)))


def test_objectives_without_a_teacher_contribute_zero_and_need_a_build_first():
    student = _outputs(1, 4)
    for objective in (TinyBERTLoss(), MiniLMLoss({"value": "v"}, {"value": "v"}), DistilBERTLoss(),
                      HiddenStateDynamics()):
        terms = objective(student, None, Batch(None), None)
        assert terms["loss"].item() == 0.0 and terms[f"{objective.name}_loss"].item() == 0.0
        if objective.needs_probe:
            with pytest.raises(RuntimeError, match=r"built by the probe"):
                objective(student, student, Batch(None), None)


def test_missing_hidden_states_are_explained():
    with pytest.raises(ValueError, match=r"reads the student's hidden_states, but the student returned none.*"
                                         r"output_hidden_states"):
        TinyBERTLoss().build(Probe(Batch(None), ModelOutputs(torch.zeros(1, 2, 3)), _outputs(1, 4)))


# --------------------------------------------------------------------------------------------
# Inside DistillationModule on tiny Hugging Face pairs
# --------------------------------------------------------------------------------------------
transformers = pytest.importorskip("transformers")

from _hf import HFDictDataModule, tiny_bert_mlm, tiny_distilbert_mlm, tiny_gpt2  # noqa: E402

BERT_QKV = {p: f"bert.encoder.layer.1.attention.self.{p}" for p in ("query", "key", "value")}
DISTILBERT_QKV = [f"distilbert.transformer.layer.0.attention.{p}_lin" for p in "qkv"]


def _causal_pair():
    return tiny_gpt2(seed=1), tiny_gpt2(n_layer=2, n_embd=24, seed=2)  # widths 16 / 24, 1 / 2 layers, 2 heads


def _masked_pair():
    return tiny_distilbert_mlm(dim=8, seed=3), tiny_bert_mlm(n_layer=2, seed=4)  # widths 8 / 16, 1 / 2 layers


def _linear(name):
    return {f"{name}.weight", f"{name}.bias"}


#: (pair, objective factory, names of the objective's trained parameters)
CASES = {
    "causal-tinybert-learned": ("causal", lambda: TinyBERTLoss(layer_map="learned", attention_weight=10.0),
                                {"layer_map.gate", *_linear("embedding_projection"), *_linear("hidden_projections.0")}),
    "masked-tinybert-uniform": ("masked", lambda: TinyBERTLoss(shared_projection=True, projection_lr=0.01),
                                {*_linear("embedding_projection"), *_linear("hidden_projections.0")}),
    "causal-minilmv2-fused": ("causal", lambda: MiniLMLoss(
        "transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn", relations=("query", "key", "value"),
        relation_heads=4, causal=True), set()),
    "masked-minilmv2": ("masked", lambda: MiniLMLoss(
        DISTILBERT_QKV, BERT_QKV, relations=("query", "key", "value"), relation_heads=2), set()),
    "causal-distilbert": ("causal", lambda: DistilBERTLoss(), _linear("cos_projection")),
    "masked-distilbert-labelled": ("masked", lambda: DistilBERTLoss(kd_positions="labelled"), _linear("cos_projection")),
    "causal-dynamics-learned": ("causal", lambda: HiddenStateDynamics(layer_map="learned", loss="cosine"),
                                {"layer_map.gate", "projections.0.weight"}),
    "masked-dynamics": ("masked", lambda: HiddenStateDynamics(), {"projections.0.weight"}),
}


def _module(pair, factory):
    student, teacher = _causal_pair() if pair == "causal" else _masked_pair()
    objective = factory()
    return DistillationModule(student, teacher, objectives={objective.name: objective}), objective.name


class _Gradients(L.Callback):
    """Records, per step, the loss and which objective parameters received a non-zero gradient."""

    def __init__(self, key):
        self.key, self.losses, self.with_grad, self.optimized, self.initial = key, [], set(), set(), {}

    def on_train_start(self, trainer, pl_module):
        params = {id(p) for opt in trainer.optimizers for group in opt.param_groups for p in group["params"]}
        objective = pl_module.objectives[self.key]
        self.optimized = {n for n, p in objective.named_parameters() if id(p) in params}
        self.initial = {n: p.detach().clone() for n, p in objective.named_parameters()}

    def on_after_backward(self, trainer, pl_module):
        for n, p in pl_module.objectives[self.key].named_parameters():
            if p.grad is not None and bool(p.grad.abs().sum() > 0) and bool(torch.isfinite(p.grad).all()):
                self.with_grad.add(n)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"] if isinstance(outputs, dict) else outputs))


@pytest.mark.parametrize("case", list(CASES))
def test_objective_trains_on_a_hugging_face_pair_and_restores_from_a_checkpoint(case, make_trainer, tmp_path):
    pair, factory, trained = CASES[case]
    torch.manual_seed(0)
    module, key = _module(pair, factory)
    recorder = _Gradients(key)
    trainer = make_trainer(max_epochs=1, limit_train_batches=2, limit_val_batches=0, callbacks=[recorder])
    # TinyBERT reads the student's attention maps, which its attention dropout perturbs in train mode: it says so
    with pytest.warns(UserWarning, match="TinyBERTLoss reads the student's attention maps") if "tinybert" in case \
            else _no_warning():
        trainer.fit(module, datamodule=HFDictDataModule("causal" if pair == "causal" else "masked", n=16))
    objective = module.objectives[key]
    assert len(recorder.losses) == 2 and all(math.isfinite(v) for v in recorder.losses)
    names = {n for n, _ in objective.named_parameters()}
    assert names == trained, names
    assert recorder.optimized == trained and recorder.with_grad == trained
    for n, p in objective.named_parameters():
        assert not torch.equal(p.detach(), recorder.initial[n]), f"{n} did not move"
    if getattr(objective, "projection_lr", None) is not None:  # its own optimizer group
        lrs = [g["lr"] for opt in trainer.optimizers for g in opt.param_groups if len(g["params"]) == len(trained)]
        assert objective.projection_lr in lrs

    path = tmp_path / "module.ckpt"
    trainer.save_checkpoint(path)
    ckpt = torch.load(path, weights_only=True)
    fresh, _ = _module(pair, factory)
    fresh.on_load_checkpoint(ckpt)  # what Lightning calls before load_state_dict: rebuilds the parts from the probe
    fresh.load_state_dict(ckpt["state_dict"])
    restored = fresh.objectives[key]
    assert {n for n, _ in restored.named_parameters()} == trained
    for n, value in objective.state_dict().items():
        assert torch.equal(restored.state_dict()[n], value), f"{n} not restored"
    if hasattr(objective, "layer_map"):
        assert restored.layer_map.pairs == objective.layer_map.pairs
    # the restored module computes the same terms (eval mode: no dropout)
    batch = next(iter(HFDictDataModule("causal" if pair == "causal" else "masked", n=8).train_dataloader()))
    module.eval(), fresh.eval()
    with torch.no_grad():
        a, _ = module.training_terms(batch)
        b, _ = fresh.training_terms(batch)
    torch.testing.assert_close(a[f"{key}_loss"], b[f"{key}_loss"])


class _no_warning:
    """Fails when a UserWarning of this package is raised inside."""

    def __enter__(self):
        import warnings

        self._catch = warnings.catch_warnings(record=True)
        self._records = self._catch.__enter__()
        warnings.simplefilter("always")
        return self

    def __exit__(self, *exc):
        self._catch.__exit__(*exc)
        ours = [str(r.message) for r in self._records if "attention dropout" in str(r.message)]
        assert not ours, ours


def test_minilm_v1_on_a_dropout_free_gpt2_pair_and_the_dropout_warning(make_trainer):
    def build(dropout):
        objective = MiniLMLoss({"value": "transformer.h.0.attn.c_attn"}, {"value": "transformer.h.1.attn.c_attn"},
                               relations=("attention",))
        return DistillationModule(tiny_gpt2(seed=1, dropout=dropout), tiny_gpt2(n_layer=2, n_embd=24, seed=2),
                                  objectives={"minilm": objective})

    module = build(0.0)
    assert module.student.config.output_attentions and module.teacher.config.output_attentions
    trainer = make_trainer(max_epochs=1, limit_train_batches=2, limit_val_batches=0)
    with _no_warning():
        trainer.fit(module, datamodule=HFDictDataModule(n=16))
    value = float(trainer.callback_metrics["train/minilm_attention"])
    assert 0.0 <= value < 1.0  # near-uniform attention of two untrained models
    with pytest.warns(UserWarning, match=r"MiniLMLoss reads the student's attention maps.*attn_pdrop=0.1.*"
                                         r"after dropout.*Build the student with attn_pdrop=0"):
        make_trainer(max_epochs=1, limit_train_batches=1, limit_val_batches=0).fit(
            build(0.1), datamodule=HFDictDataModule(n=8))


def test_only_the_outputs_an_objective_reads_are_requested():
    student, teacher = _masked_pair()
    DistillationModule(student, teacher, objectives={"tinybert": TinyBERTLoss(attention_weight=0.0)})
    assert student.config.output_hidden_states and not student.config.output_attentions
    student, teacher = _masked_pair()
    DistillationModule(student, teacher, objectives={"minilm": MiniLMLoss(
        DISTILBERT_QKV, BERT_QKV, relations=("query", "key", "value"), relation_heads=2)})
    assert not student.config.output_hidden_states and not teacher.config.output_attentions


def test_wrong_projection_names_list_the_valid_ones():
    student, teacher = _masked_pair()
    wrong = dict(BERT_QKV, key="bert.encoder.layer.1.attention.self.kye")
    with pytest.raises(ValueError, match=r"`teacher_qkv`: the teacher \(BertForMaskedLM\) has no submodule named "
                                         r"'bert.encoder.layer.1.attention.self.kye' \(did you mean "
                                         r"'bert.encoder.layer.1.attention.self.key'.*Valid names"):
        DistillationModule(student, teacher, objectives={"minilm": MiniLMLoss(
            DISTILBERT_QKV, wrong, relations=("key",), relation_heads=2)})
    student, teacher = _masked_pair()
    with pytest.raises(ValueError, match=r"`student_qkv`: the student \(DistilBertForMaskedLM\) has no submodule "
                                         r"named 'distilbert.transformer.layer.0.attention.query'.*Valid names"):
        DistillationModule(student, teacher, objectives={"minilm": MiniLMLoss(
            {"query": "distilbert.transformer.layer.0.attention.query"}, BERT_QKV, relations=("query",),
            relation_heads=2)})


def test_tinybert_head_mismatch_between_real_models_fails_at_the_probe():
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(0)
    teacher = BertForMaskedLM(BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=4,
                                         intermediate_size=32, max_position_embeddings=32, pad_token_id=0))
    student = tiny_distilbert_mlm(dim=8)  # 2 heads
    module = DistillationModule(student, teacher, objectives={"tinybert": TinyBERTLoss()})
    batch = next(iter(HFDictDataModule("masked", n=8).train_dataloader()))
    with pytest.raises(ValueError, match=r"student has 2 attention heads and the teacher 4.*MiniLMLoss\(relations="
                                         r"\('query', 'key', 'value'\), relation_heads=\.\.\.\).*relation heads"):
        module.build(module.read_batch(batch))
