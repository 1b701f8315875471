"""``lightning_distill.features``: forward-hook capture, layer-name checks and TinyBERT / PKD layer mappings."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from lightning_distill.features import LAYER_MAPPINGS, FeatureCapture, check_layer_names, layer_names, map_layers
from lightning_distill.models import DigitsCNN, DigitsMLP, DigitsStudentCNN


def _x(n: int = 3) -> torch.Tensor:
    return torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(0))


class _TupleBlock(nn.Module):
    def forward(self, x):
        return x, x * 2


class _NonTensorBlock(nn.Module):
    def forward(self, x):
        return {"hidden": x}


class _Net(nn.Module):
    """``pair`` returns a tuple, ``odd`` a dict, ``unused`` is never called."""

    def __init__(self, use_odd: bool = False) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.pair = _TupleBlock()
        self.odd = _NonTensorBlock()
        self.unused = nn.Linear(4, 4)
        self.use_odd = use_odd

    def forward(self, x):
        h = self.lin(x)
        a, b = self.pair(h)
        if self.use_odd:
            h = self.odd(h)["hidden"]
        return a + b + h


# --------------------------------------------------------------------------------------------
# FeatureCapture
# --------------------------------------------------------------------------------------------


def test_captured_shapes_on_digits_cnn():
    model = DigitsCNN().eval()
    capture = FeatureCapture(model, ["block1", "block2", "block3", "block1.0"])
    with capture:
        logits = model(_x(3))
    shapes = {name: tuple(t.shape) for name, t in capture.outputs.items()}
    assert shapes == {"block1": (3, 16, 8, 8), "block2": (3, 32, 4, 4), "block3": (3, 64), "block1.0": (3, 16, 8, 8)}
    assert list(capture.outputs) == ["block1", "block2", "block3", "block1.0"]  # order of `layers`
    assert logits.shape == (3, 10)
    # the captured tensor is the module's output (same values as running the stages by hand)
    torch.testing.assert_close(capture.outputs["block2"], model.block2(model.block1(_x(3))))


def test_student_shapes():
    student = DigitsStudentCNN().eval()
    capture = FeatureCapture(student, ["block1", "block2", "block1.0"])
    with capture:
        student(_x(2))
    assert {k: tuple(v.shape) for k, v in capture.outputs.items()} == {
        "block1": (2, 4, 4, 4),
        "block2": (2, 8),
        "block1.0": (2, 4, 8, 8),
    }
    mlp = DigitsMLP()
    capture = FeatureCapture(mlp, ["block1"])
    with capture:
        mlp(_x(2))
    assert tuple(capture.outputs["block1"].shape) == (2, 16)


def test_records_only_inside_the_context():
    model = DigitsCNN().eval()
    capture = FeatureCapture(model, ["block2"])
    model(_x())
    assert capture.outputs == {}
    with capture:
        model(_x())
    first = capture.outputs["block2"]
    model(_x(5))  # outside again: nothing recorded, nothing overwritten
    assert capture.outputs["block2"] is first
    assert first.shape[0] == 3
    # start/stop work like the context manager, and start() forgets the previous outputs
    capture.start()
    assert capture.outputs == {}
    model(_x(4))
    out = capture.stop()
    assert out["block2"].shape[0] == 4


def test_keeps_the_graph_under_grad_and_none_under_no_grad():
    model = DigitsStudentCNN()
    capture = FeatureCapture(model, ["block1"])
    with capture:
        model(_x())
    assert capture.outputs["block1"].requires_grad
    with capture, torch.no_grad():
        model(_x())
    assert not capture.outputs["block1"].requires_grad


@pytest.mark.parametrize("select", [1, {"pair": 1}, -1])
def test_select_picks_an_element_of_a_tuple_output(select):
    net = _Net()
    capture = FeatureCapture(net, ["pair", "lin"], select=select)
    x = torch.randn(2, 4)
    with capture:
        net(x)
    h = net.lin(x)
    torch.testing.assert_close(capture.outputs["pair"], h * 2)
    torch.testing.assert_close(capture.outputs["lin"], h)  # a tensor output ignores select


def test_select_defaults_to_the_first_element():
    net = _Net()
    for select in (None, 0, {"other": 1}):
        capture = FeatureCapture(net, ["pair"], select=select)
        x = torch.randn(2, 4)
        with capture:
            net(x)
        torch.testing.assert_close(capture.outputs["pair"], net.lin(x))
        capture.remove()


@pytest.mark.parametrize("select", [2, {"pair": 5}, -3])
def test_out_of_range_select_is_rejected(select):
    net = _Net()
    capture = FeatureCapture(net, ["pair"], select=select, role="the student")
    with pytest.raises(
        ValueError, match=r"the student layer 'pair' returns 2 outputs; select index -?\d+ is out of range"
    ):
        with capture:
            net(torch.randn(2, 4))
    # the failed capture is no longer active: later forwards record nothing
    capture.outputs = {}
    net(torch.randn(2, 4))
    assert capture.outputs == {}


def test_non_tensor_output_is_rejected():
    net = _Net(use_odd=True)
    capture = FeatureCapture(net, ["odd"], role="the teacher")
    with pytest.raises(TypeError, match=r"the teacher layer 'odd' returned a dict, not a tensor"):
        with capture:
            net(torch.randn(2, 4))


def test_layer_not_called_during_forward_is_reported():
    net = _Net()
    capture = FeatureCapture(net, ["lin", "unused"], role="the student")
    with pytest.raises(RuntimeError, match=r"the student layers \['unused'\] were not called during the forward pass"):
        with capture:
            net(torch.randn(2, 4))


def test_unknown_layer_is_rejected_at_construction():
    with pytest.raises(ValueError, match="has no submodule named 'nope'"):
        FeatureCapture(DigitsCNN(), ["block1", "nope"], role="the teacher", argument="teacher_layers")


def test_duplicate_layers_are_captured_once():
    model = DigitsCNN().eval()
    capture = FeatureCapture(model, ["block2", "block1", "block2"])
    assert capture.layers == ["block2", "block1"]
    assert len(model.block2._forward_hooks) == 1


def test_pop_empties_the_capture():
    model = DigitsCNN().eval()
    capture = FeatureCapture(model, ["block1"])
    with capture:
        model(_x())
    out = capture.pop()
    assert set(out) == {"block1"} and out["block1"].shape == (3, 16, 8, 8)
    assert capture.outputs == {}
    assert capture.pop() == {}


def test_remove_unregisters_the_hooks():
    model = DigitsCNN().eval()
    capture = FeatureCapture(model, ["block1", "block2.0"])
    assert len(model.block1._forward_hooks) == 1 and len(model.block2[0]._forward_hooks) == 1
    capture.remove()
    assert len(model.block1._forward_hooks) == 0
    assert len(model.block2[0]._forward_hooks) == 0
    assert all(len(m._forward_hooks) == 0 for m in model.modules())
    capture.start()
    model(_x())
    assert capture.outputs == {}


def test_capture_refuses_an_output_changed_by_a_later_inplace_op():
    """DigitsCNN's ReLU(inplace=True) overwrites the BatchNorm output 'block1.1' after the hook saw it:
    the capture must not hand out post-ReLU values as if they were the BatchNorm's (it raises instead)."""
    model = DigitsCNN().eval()
    capture = FeatureCapture(model, ["block1.1"])
    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    with pytest.raises(RuntimeError, match=r"\['block1.1'\] had their output modified in place"):
        with capture, torch.no_grad():
            model(x)
    # hooking the module after the in-place op works
    capture = FeatureCapture(model, ["block1"])
    with capture, torch.no_grad():
        model(x)
    assert (capture.outputs["block1"] >= 0).all()


# --------------------------------------------------------------------------------------------
# check_layer_names / layer_names
# --------------------------------------------------------------------------------------------


def test_layer_names_lists_named_modules_without_the_root():
    names = layer_names(DigitsStudentCNN())
    assert "" not in names
    assert names[:2] == ["block1", "block1.0"]
    assert {"block2", "head", "block1.0.1"} <= set(names)


def test_check_layer_names_accepts_valid_names():
    check_layer_names(DigitsCNN(), ["block1", "block3.0.1", "head"], "the teacher", "layer_map")


def test_unknown_name_is_echoed_with_a_suggestion_and_the_valid_names():
    with pytest.raises(ValueError) as info:
        check_layer_names(DigitsCNN(), ["block1", "blok2"], "the teacher", "layer_map")
    msg = str(info.value)
    assert msg.startswith("`layer_map`: the teacher (DigitsCNN) has no submodule named 'blok2'")
    assert "(did you mean 'block2'" in msg  # the closest match comes first
    assert "Valid names (from named_modules()): ['block1', 'block1.0'" in msg
    for name in ("block3", "head", "dropout"):
        assert repr(name) in msg
    assert "'block1' (did" not in msg  # the valid name is not reported


def test_unknown_name_without_close_match_has_no_suggestion():
    with pytest.raises(ValueError, match=r"has no submodule named 'zzzzzzzz'\. Valid names") as info:
        check_layer_names(DigitsStudentCNN(), ["zzzzzzzz"], "the student", "student_layers")
    assert "did you mean" not in str(info.value)
    assert "`student_layers`: the student (DigitsStudentCNN)" in str(info.value)


def test_several_unknown_names_are_all_reported():
    with pytest.raises(ValueError) as info:
        check_layer_names(DigitsCNN(), ["blok1", "hed"], "the teacher", "teacher_layers")
    assert "'blok1'" in str(info.value) and "'hed'" in str(info.value)


# --------------------------------------------------------------------------------------------
# map_layers
# --------------------------------------------------------------------------------------------


def _names(prefix: str, n: int) -> list[str]:
    return [f"{prefix}{i}" for i in range(1, n + 1)]


def _teacher_indices(pairs: list[tuple[str, str]]) -> list[int]:
    return [int(t[1:]) for t, _ in pairs]


@pytest.mark.parametrize(
    ("n", "m", "expected"),
    [
        (12, 4, [3, 6, 9, 12]),
        (6, 3, [2, 4, 6]),
        (5, 2, [2, 5]),
        (4, 4, [1, 2, 3, 4]),
        (7, 1, [7]),
        (12, 6, [2, 4, 6, 8, 10, 12]),
    ],
)
def test_uniform_mapping(n, m, expected):
    pairs = map_layers(_names("t", n), _names("s", m), "uniform")
    assert _teacher_indices(pairs) == expected
    assert [s for _, s in pairs] == _names("s", m)


def test_uniform_is_the_default():
    assert map_layers(_names("t", 12), _names("s", 4)) == [("t3", "s1"), ("t6", "s2"), ("t9", "s3"), ("t12", "s4")]


@pytest.mark.parametrize(
    ("n", "m", "step", "expected"),
    [
        (12, 4, None, [3, 6, 9, 12]),
        (12, 4, 2, [2, 4, 6, 8]),
        (7, 2, None, [3, 6]),
        (6, 3, 1, [1, 2, 3]),
        (5, 5, None, [1, 2, 3, 4, 5]),
    ],
)
def test_skip_mapping(n, m, step, expected):
    assert _teacher_indices(map_layers(_names("t", n), _names("s", m), "skip", step)) == expected


@pytest.mark.parametrize("step", [4, 0, -1])
def test_skip_step_that_does_not_fit_is_rejected(step):
    with pytest.raises(ValueError, match=rf"`mapping_step`={step} does not fit"):
        map_layers(_names("t", 12), _names("s", 4), "skip", step)


@pytest.mark.parametrize(("n", "m", "expected"), [(12, 4, [9, 10, 11, 12]), (6, 3, [4, 5, 6]), (3, 3, [1, 2, 3])])
def test_last_mapping(n, m, expected):
    assert _teacher_indices(map_layers(_names("t", n), _names("s", m), "last")) == expected


@pytest.mark.parametrize("mapping", LAYER_MAPPINGS)
def test_more_student_than_teacher_layers_is_rejected(mapping):
    with pytest.raises(ValueError, match="`student_layers` has 4 names but `teacher_layers` only 3"):
        map_layers(_names("t", 3), _names("s", 4), mapping)


@pytest.mark.parametrize(("teacher", "student"), [([], ["s1"]), (["t1"], []), ([], [])])
def test_empty_layer_lists_are_rejected(teacher, student):
    with pytest.raises(ValueError, match="must be non-empty"):
        map_layers(teacher, student)


def test_unknown_mapping_is_rejected():
    with pytest.raises(ValueError, match=r"`mapping` must be one of \('uniform', 'skip', 'last'\), got 'middle'"):
        map_layers(_names("t", 4), _names("s", 2), "middle")


@settings(max_examples=150, deadline=None)
@given(data=st.data(), mapping=st.sampled_from(LAYER_MAPPINGS))
def test_mapping_properties(data, mapping):
    n = data.draw(st.integers(1, 24))
    m = data.draw(st.integers(1, n))
    teacher, student = _names("t", n), _names("s", m)
    pairs = map_layers(teacher, student, mapping)
    assert len(pairs) == m
    idx = _teacher_indices(pairs)
    assert all(1 <= i <= n for i in idx)
    assert all(a < b for a, b in zip(idx, idx[1:]))  # strictly increasing: no teacher layer used twice
    assert [s for _, s in pairs] == student  # student order kept
    if mapping in ("uniform", "last"):
        assert idx[-1] == n  # both end at the teacher's last layer
