"""DeepInversion data-free distillation (``lightning_distill.data_free``)."""

from __future__ import annotations

import math
import os
import runpy
import sys
import warnings

import pytest
import torch
from torch import nn

from lightning_distill.data_free import (
    BNStatisticsHook,
    bn_statistics_loss,
    deep_inversion,
    input_l2_prior,
    load_transfer_set,
    main,
    save_transfer_set,
    total_variation_prior,
)

pytestmark = pytest.mark.usefixtures("single_thread")

def _tiny_teacher(seed: int = 0) -> nn.Module:
    """Conv-BN-ReLU x2 -> pool -> Linear-BN1d -> Linear on [1, 8, 8], with non-trivial running stats."""
    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1, bias=False),
        nn.BatchNorm2d(4, momentum=None),  # momentum=None: cumulative average of the batches below
        nn.ReLU(),
        nn.Conv2d(4, 8, 3, padding=1),
        nn.BatchNorm2d(8, momentum=None),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 8),
        nn.BatchNorm1d(8, momentum=None),
        nn.ReLU(),
        nn.Linear(8, 3),
    )
    net.train()
    with torch.no_grad():
        for _ in range(4):  # "training data": sparse bright strokes on a dark background
            net((torch.rand(64, 1, 8, 8) > 0.7).float())
    return net.eval()


@pytest.fixture
def teacher() -> nn.Module:
    return _tiny_teacher()


@pytest.fixture(scope="module")
def digits_teacher() -> nn.Module:
    """The shipped digits teacher (``zoo:digits_cnn``, 3 BatchNorm layers)."""
    from lightning_distill.checkpoint import load_weights
    from lightning_distill.models import get_model

    net = get_model("digits_cnn", 10)
    load_weights(net, "zoo:digits_cnn")
    return net.eval()


def _run(teacher: nn.Module, **kwargs):
    options = dict(num_samples=12, input_shape=(1, 8, 8), num_classes=3, batch_size=12, steps=8, progress=False)
    options.update(kwargs)
    return deep_inversion(teacher, **options)


# ------------------------------------------------------------------------------------------
# the objective
# ------------------------------------------------------------------------------------------


def test_objective_decreases(teacher):
    out = _run(teacher, num_samples=32, batch_size=32, steps=60, tv_weight=0.01, l2_weight=0.01)
    history, bn = out["loss_history"], out["loss_terms"]["bn"]
    assert len(history) == len(bn) == 60
    assert all(math.isfinite(v) for v in history)
    # over 60 Adam steps the total objective falls at least 5x and its BatchNorm term at least 10x
    # (measured on 4 teachers x 2 seeds: >= 7x and >= 25x); the CE to the targets at least 1.5x (>= 2.1x)
    assert history[-1] < history[0] / 5, (history[0], history[-1])
    assert bn[-1] < bn[0] / 10, (bn[0], bn[-1])
    assert out["loss_terms"]["ce"][-1] < out["loss_terms"]["ce"][0] / 1.5


def test_bn_term_alone_decreases(teacher):
    """With only the BatchNorm prior (no CE, no image priors) the feature statistics still get matched."""
    out = _run(teacher, num_samples=32, batch_size=32, steps=60, ce_weight=0.0)
    bn = out["loss_terms"]["bn"]
    assert out["loss_history"] == pytest.approx([out["meta"]["bn_weight"] * v for v in bn])
    assert bn[-1] < bn[0] / 20, (bn[0], bn[-1])  # measured: >= 58x


def test_shipped_digits_teacher_is_inverted(digits_teacher):
    out = deep_inversion(digits_teacher, 20, (1, 8, 8), 10, batch_size=20, steps=40, progress=False)
    assert out["teacher_acc"] >= 0.9
    assert out["loss_terms"]["bn"][-1] < out["loss_terms"]["bn"][0] / 5
    assert out["meta"]["bn_layers"] == ["block1.1", "block2.0.1", "block3.0.1"]


def test_bn_hook_matches_explicit_statistics():
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 3, 3, padding=1)
    bn2d = nn.BatchNorm2d(3)
    lin = nn.Linear(3, 5)
    bn1d = nn.BatchNorm1d(5)
    seq_bn = nn.BatchNorm1d(2)  # [N, C, L] input
    for bn in (bn2d, bn1d, seq_bn):
        with torch.no_grad():
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.5, 2)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.seq_bn, self.conv, self.bn2d, self.lin, self.bn1d = seq_bn, conv, bn2d, lin, bn1d

        def forward(self, x):
            x = self.seq_bn(x.flatten(2)).view_as(x)
            h = torch.relu(self.bn2d(self.conv(x)))
            return self.bn1d(self.lin(h.mean((2, 3))))

    net = Net().eval()
    x = torch.randn(6, 2, 4, 4, requires_grad=True)
    with BNStatisticsHook(net) as hook:
        net(x)
        assert hook.names == ["seq_bn", "bn2d", "bn1d"]
        loss = hook.loss(layer_weights=[2.0, 1.0, 0.5])
    # explicit statistics of each BatchNorm's input
    with torch.no_grad():
        a = x.flatten(2)  # [N, C, L]
        c = conv(seq_bn(a).view_as(x))  # [N, C, H, W]
        f = lin(torch.relu(bn2d(c)).mean((2, 3)))  # [N, C]
    inputs = [a.transpose(0, 1).reshape(2, -1), c.transpose(0, 1).reshape(3, -1), f.t()]
    expected = 0.0
    for i, (rows, bn, w) in enumerate(zip(inputs, (seq_bn, bn2d, bn1d), (2.0, 1.0, 0.5))):
        mean = rows.mean(1)
        var = ((rows - mean[:, None]) ** 2).mean(1)  # biased
        torch.testing.assert_close(hook.means[i].detach(), mean)
        torch.testing.assert_close(hook.variances[i].detach(), var)
        torch.testing.assert_close(hook.variances[i].detach(), rows.var(1, unbiased=False))
        expected += w * (torch.sqrt(((mean - bn.running_mean) ** 2).sum()) + torch.sqrt(((var - bn.running_var) ** 2).sum()))
    torch.testing.assert_close(loss.detach(), expected)
    (grad,) = torch.autograd.grad(loss, x)  # the statistics carry gradients to the input
    assert grad.abs().sum() > 0
    # hooks are gone after the context
    assert all(len(m._forward_pre_hooks) == 0 for m in net.modules())


def test_bn_statistics_loss_reference_values():
    loss = bn_statistics_loss(
        [torch.tensor([1.0, 1.0]), torch.tensor([0.0])],
        [torch.tensor([2.0, 1.0]), torch.tensor([5.0])],
        [torch.tensor([0.0, 0.0]), torch.tensor([0.0])],
        [torch.tensor([1.0, 1.0]), torch.tensor([1.0])],
        layer_weights=[10.0, 1.0],
    )
    # layer 1: 10 * (sqrt(2) + 1); layer 2: 0 + 4 -- norms, not squared norms
    assert float(loss) == pytest.approx(10 * (math.sqrt(2) + 1) + 4)


def test_priors_match_the_official_formulas():
    torch.manual_seed(0)
    x = torch.rand(1, 3, 5, 6)
    d1 = x[:, :, :, :-1] - x[:, :, :, 1:]
    d2 = x[:, :, :-1, :] - x[:, :, 1:, :]
    d3 = x[:, :, 1:, :-1] - x[:, :, :-1, 1:]
    d4 = x[:, :, :-1, :-1] - x[:, :, 1:, 1:]
    official = torch.norm(d1) + torch.norm(d2) + torch.norm(d3) + torch.norm(d4)  # get_image_prior_losses, N=1
    torch.testing.assert_close(total_variation_prior(x), official)
    # per sample, averaged over the batch
    batch = torch.cat([x, 2 * x])
    torch.testing.assert_close(total_variation_prior(batch), 1.5 * official)
    torch.testing.assert_close(input_l2_prior(batch), 1.5 * torch.norm(x))
    seq = torch.tensor([[[0.0, 3.0, 3.0, -1.0]]])  # [N, C, L]: neighbour differences only
    assert float(total_variation_prior(seq)) == pytest.approx(5.0)
    with pytest.raises(ValueError, match="at least one spatial dimension"):
        total_variation_prior(torch.zeros(2, 3))


# ------------------------------------------------------------------------------------------
# the teacher contract and the result
# ------------------------------------------------------------------------------------------


def test_teacher_untouched(teacher):
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    _run(teacher, steps=5, jitter=1)
    after = teacher.state_dict()
    assert before.keys() == after.keys()
    for key in before:
        assert before[key].dtype == after[key].dtype and torch.equal(before[key], after[key]), key
    assert not any(m.training for m in teacher.modules())
    assert all(p.grad is None for p in teacher.parameters())
    assert all(p.requires_grad for p in teacher.parameters())  # flags restored
    assert all(len(m._forward_pre_hooks) == 0 for m in teacher.modules())


def test_train_mode_teacher_runs_in_eval_and_is_restored(teacher):
    """A teacher handed over in train mode is still inverted in eval mode (running stats never updated)."""
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    teacher.train()
    teacher[0].requires_grad_(False)
    seen = []
    handle = teacher[1].register_forward_hook(lambda m, i, o: seen.append(m.training))
    _run(teacher, steps=3)
    handle.remove()
    assert seen and not any(seen)
    assert all(m.training for m in teacher.modules())
    assert not teacher[0].weight.requires_grad and teacher[3].weight.requires_grad
    for key, value in teacher.state_dict().items():
        assert torch.equal(before[key], value), key


def test_result_layout_and_default_targets_are_balanced(teacher):
    out = _run(teacher, num_samples=25, batch_size=6, steps=2)
    assert out["inputs"].shape == (25, 1, 8, 8) and out["inputs"].dtype == torch.float32
    assert out["targets"].dtype == torch.long
    assert out["targets"].tolist() == [i % 3 for i in range(25)]
    assert torch.bincount(out["targets"], minlength=3).tolist() == [9, 8, 8]
    assert 0.0 <= out["teacher_acc"] <= 1.0
    assert len(out["loss_history"]) == 2  # first batch only
    meta = out["meta"]
    assert meta["num_samples"] == 25 and meta["batch_size"] == 6 and meta["input_shape"] == [1, 8, 8]
    assert meta["bn_layers"] == ["1", "4", "9"] and meta["bn_layer_weights"][0] == meta["first_bn_multiplier"]


def test_custom_targets_are_used(digits_teacher):
    targets = torch.tensor([7, 7, 7, 3])
    out = deep_inversion(digits_teacher, 4, (1, 8, 8), 10, steps=30, targets=targets, progress=False)
    assert torch.equal(out["targets"], targets)
    assert out["teacher_acc"] == 1.0


@pytest.mark.parametrize("input_range", [(0.0, 1.0), (0.2, 0.7)])
def test_outputs_within_input_range(teacher, input_range):
    out = _run(teacher, steps=10, lr=0.5, input_range=input_range)
    low, high = input_range
    assert out["inputs"].min() >= low and out["inputs"].max() <= high
    assert out["meta"]["input_range"] == list(input_range)


def test_no_input_range_leaves_inputs_unconstrained(teacher):
    out = _run(teacher, steps=3, input_range=None)
    assert out["inputs"].min() < 0  # N(0, 1) start, never clamped
    assert out["meta"]["input_range"] is None


def test_reproducible_with_seed(teacher):
    state = torch.random.get_rng_state()
    a = _run(teacher, steps=5, jitter=2, flip=True, tv_weight=0.1, seed=3)
    assert torch.equal(torch.random.get_rng_state(), state)  # the global RNG is not used
    b = _run(teacher, steps=5, jitter=2, flip=True, tv_weight=0.1, seed=3)
    c = _run(teacher, steps=5, jitter=2, flip=True, tv_weight=0.1, seed=4)
    assert torch.equal(a["inputs"], b["inputs"]) and a["loss_history"] == b["loss_history"]
    assert not torch.equal(a["inputs"], c["inputs"])


def test_bn_weight_zero_needs_no_batchnorm():
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 3))
    out = deep_inversion(net, 6, (1, 8, 8), 3, steps=20, bn_weight=0.0, progress=False)
    assert out["meta"]["bn_layers"] == [] and set(out["loss_terms"]["bn"]) == {0.0}
    assert out["loss_history"][-1] < out["loss_history"][0]


def test_progress_bar(teacher, capsys):
    _run(teacher, steps=2, progress=True)
    assert "DeepInversion" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------
# files and the command line
# ------------------------------------------------------------------------------------------


def test_save_load_round_trip(teacher, tmp_path):
    out = _run(teacher, steps=3)
    path = save_transfer_set(out, tmp_path / "sub" / "set.pt")
    loaded = load_transfer_set(path)
    assert torch.equal(loaded["inputs"], out["inputs"]) and torch.equal(loaded["targets"], out["targets"])
    assert loaded["meta"] == out["meta"] and loaded["teacher_acc"] == out["teacher_acc"]
    assert loaded["loss_history"] == out["loss_history"]
    # plain torch.load with weights_only=True, "inputs" key for the transfer-data readers
    raw = torch.load(path, weights_only=True)
    assert {"inputs", "targets", "meta"} <= set(raw) and raw["inputs"].shape == (12, 1, 8, 8)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        save_transfer_set(out, path, overwrite=False)
    assert sorted(os.listdir(path.parent)) == ["set.pt"]  # no temporary file left behind


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_transfer_set(tmp_path / "missing.pt")
    torch.save({"x": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="'inputs' tensor"):
        load_transfer_set(tmp_path / "other.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="weights_only"):
        load_transfer_set(tmp_path / "junk.pt")
    with pytest.raises(ValueError, match="'inputs' tensor"):
        save_transfer_set({"targets": torch.zeros(2)}, tmp_path / "x.pt")


CLI_ARGS = [
    "--teacher-model", "digits_cnn", "--teacher", "zoo:digits_cnn", "--num-classes", "10",
    "--input-shape", "1", "8", "8", "--num-samples", "12", "--steps", "3", "--batch-size", "8",
]  # fmt: skip


def test_cli_writes_a_transfer_set(tmp_path, monkeypatch, capsys):
    """``python -m lightning_distill.data_free ...`` (run in-process with runpy: a subprocess would re-import torch)."""
    out = tmp_path / "data" / "digits_deepinversion.pt"
    monkeypatch.setattr(sys, "argv", ["data_free", *CLI_ARGS, "--out", str(out), "--no-progress"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # "found in sys.modules": the module is imported above
        with pytest.raises(SystemExit) as exit_info:
            runpy.run_module("lightning_distill.data_free", run_name="__main__")
    assert exit_info.value.code == 0
    stdout = capsys.readouterr().out
    assert "teacher accuracy on the synthetic set" in stdout and str(out) in stdout
    data = load_transfer_set(out)
    assert data["inputs"].shape == (12, 1, 8, 8) and data["targets"].shape == (12,)
    assert data["meta"]["steps"] == 3 and data["meta"]["teacher_weights"] == "zoo:digits_cnn"
    assert sorted(os.listdir(out.parent)) == [out.name]  # no temporary file left behind


def test_cli_refuses_to_overwrite(tmp_path, capsys):
    out = tmp_path / "set.pt"
    out.write_bytes(b"precious")
    assert main([*CLI_ARGS, "--out", str(out), "--no-progress"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert out.read_bytes() == b"precious"
    assert main([*CLI_ARGS, "--out", str(out), "--no-progress", "--overwrite", "--seed", "1"]) == 0
    assert load_transfer_set(out)["meta"]["seed"] == 1


def test_cli_reports_errors_without_writing(tmp_path, capsys):
    out = str(tmp_path / "x.pt")
    assert main([CLI_ARGS[0], "digits_student_cnn", *CLI_ARGS[2:], "--out", out, "--no-progress"]) == 2
    assert "error: `--teacher`='zoo:digits_cnn' does not match the architecture" in capsys.readouterr().err
    assert main([*CLI_ARGS, "--out", out, "--no-progress", "--jitter", "9"]) == 2
    assert "`jitter`=9" in capsys.readouterr().err
    assert main([*CLI_ARGS, "--out", out, "--no-progress", "--num-threads", "-1"]) == 2
    assert "`--num-threads` must be >= 0" in capsys.readouterr().err
    assert os.listdir(tmp_path) == []


# ------------------------------------------------------------------------------------------
# errors
# ------------------------------------------------------------------------------------------


def test_teacher_without_batchnorm_is_refused():
    net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2, 3))
    with pytest.raises(ValueError, match="DeepInversion needs BN statistics"):
        deep_inversion(net, 4, (1, 8, 8), 3, steps=1, progress=False)


def test_batchnorm_without_running_stats_is_refused():
    net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2, track_running_stats=False), nn.Flatten())
    with pytest.raises(ValueError, match="track_running_stats=False"):
        BNStatisticsHook(net)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(num_samples=0), ValueError, "`num_samples` must be an int >= 1, got 0"),
        (dict(num_samples=2.5), TypeError, "`num_samples`"),
        (dict(input_shape=()), ValueError, "`input_shape` must be a non-empty tuple"),
        (dict(input_shape="1 8 8"), TypeError, "`input_shape` must be a tuple of ints"),
        (dict(input_shape=(1, 0, 8)), ValueError, r"got \(1, 0, 8\)"),
        (dict(input_shape=(2, 8, 8)), ValueError, r"`input_shape`=\(2, 8, 8\) does not fit"),
        (dict(num_classes=5), ValueError, "`num_classes`=5 does not fit"),
        (dict(num_classes=1), ValueError, "`num_classes`"),
        (dict(batch_size=0), ValueError, "`batch_size`"),
        (dict(steps=-1), ValueError, "`steps`"),
        (dict(lr=0.0), ValueError, "`lr` must be a finite number > 0"),
        (dict(lr_schedule="step"), ValueError, "`lr_schedule` must be one of"),
        (dict(bn_weight=-1.0), ValueError, "`bn_weight`"),
        (dict(tv_weight=float("nan")), ValueError, "`tv_weight`"),
        (dict(bn_weight=0.0, ce_weight=0.0), ValueError, "nothing to optimise"),
        (dict(jitter=8), ValueError, "`jitter`=8"),
        (dict(jitter=True), TypeError, "`jitter`"),
        (dict(flip=1), TypeError, "`flip` must be a bool"),
        (dict(input_range=(1.0, 0.0)), ValueError, "`input_range`"),
        (dict(input_range=(0.0,)), ValueError, "`input_range`"),
        (dict(targets=torch.zeros(3, dtype=torch.long)), ValueError, r"shape \[num_samples\]"),
        (dict(targets=torch.full((12,), 3)), ValueError, r"class indices in \[0, num_classes=3\)"),
        (dict(targets=torch.zeros(12)), TypeError, "integer class indices"),
        (dict(targets=[0] * 12), TypeError, "`targets`"),
        (dict(bn_layer_weights=[1.0, 1.0]), ValueError, "`bn_layer_weights` has 2 entries"),
        (dict(bn_layer_weights=[1.0, -1.0, 1.0]), ValueError, r"`bn_layer_weights\[1\]`"),
        (dict(seed=-1), ValueError, "`seed`"),
        (dict(progress="yes"), TypeError, "`progress`"),
        (dict(device="meta"), ValueError, "never moves the teacher"),
    ],
)
def test_argument_errors(teacher, kwargs, error, match):
    with pytest.raises(error, match=match):
        _run(teacher, **kwargs)
    # a refused call leaves no hook behind and the teacher as it was
    assert all(len(m._forward_pre_hooks) == 0 for m in teacher.modules())
    assert not any(m.training for m in teacher.modules())


def test_teacher_must_be_a_module():
    with pytest.raises(TypeError, match="`teacher` must be a torch.nn.Module"):
        deep_inversion(lambda x: x, 4, (1, 8, 8), 3, progress=False)


def test_spatial_options_need_spatial_inputs():
    net = nn.Sequential(nn.Linear(5, 5), nn.BatchNorm1d(5), nn.Linear(5, 3)).eval()
    for kwargs, match in ((dict(tv_weight=0.1), "`tv_weight`"), (dict(flip=True), "`flip`"), (dict(jitter=1), "`jitter`")):
        with pytest.raises(ValueError, match=match):
            deep_inversion(net, 4, (5,), 3, steps=1, progress=False, **kwargs)
    out = deep_inversion(net, 4, (5,), 3, steps=3, progress=False)  # feature vectors work without them
    assert out["inputs"].shape == (4, 5)
