"""FeatureDistillation: layer pairs, argument errors, projections from the probe, loss composition, hint stage.

Loss values are recomputed here from the models' stages called by hand (no hooks) and the pure
functions of :mod:`lightning_distill.losses`, then compared with what the module returns.
"""

from __future__ import annotations

import functools
import math

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_distill import FeatureDistillation
from lightning_distill.losses import (
    cosine_feature_loss,
    kd_loss,
    mse_feature_loss,
    rkd_angle_loss,
    rkd_distance_loss,
    similarity_preserving_loss,
)
from lightning_distill.models import DigitsCNN, DigitsMLP, DigitsStudentCNN
from lightning_distill.module import Batch
from lightning_distill.strategies.feature import FEATURE_LOSSES

pytestmark = pytest.mark.usefixtures("single_thread")


def _module(student: nn.Module | None = None, teacher: nn.Module | None = None, **kwargs) -> FeatureDistillation:
    kwargs.setdefault("layer_map", {"block2": "block1"})
    return FeatureDistillation(student or DigitsStudentCNN(), teacher or DigitsCNN(), **kwargs)


def _batch(n: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g)


def _fit_kwargs(**overrides):
    kwargs = dict(limit_train_batches=1, limit_val_batches=0, max_epochs=1)
    kwargs.update(overrides)
    return kwargs


# --------------------------------------------------------------------------------------------
# Layer pairs from YAML-like arguments
# --------------------------------------------------------------------------------------------


def test_explicit_layer_map_gives_the_pairs_in_order():
    module = _module(layer_map={"block2": "block1", "block3": "block2"})
    assert module.pairs == [("block2", "block1"), ("block3", "block2")]


@pytest.mark.parametrize(
    ("mapping", "step", "expected"),
    [
        ("uniform", None, [("block1", "block1"), ("block3", "block2")]),  # floor(j * 3 / 2) = 1, 3
        ("last", None, [("block2", "block1"), ("block3", "block2")]),
        ("skip", None, [("block1", "block1"), ("block2", "block2")]),  # k = 3 // 2 = 1
        ("skip", 1, [("block1", "block1"), ("block2", "block2")]),
    ],
)
def test_layer_lists_with_a_mapping_give_the_pairs(mapping, step, expected):
    module = _module(
        layer_map=None,
        teacher_layers=["block1", "block2", "block3"],
        student_layers=["block1", "block2"],
        mapping=mapping,
        mapping_step=step,
        feature_loss="cka",
    )
    assert module.pairs == expected


def test_layer_map_wins_over_layer_lists():
    module = _module(layer_map={"block3": "block2"}, teacher_layers=["block1"], student_layers=["block1"])
    assert module.pairs == [("block3", "block2")]


def test_missing_layers_are_rejected():
    with pytest.raises(ValueError, match="FeatureDistillation needs layers: pass `layer_map`"):
        _module(layer_map=None)
    with pytest.raises(ValueError, match="FeatureDistillation needs layers"):
        _module(layer_map={}, teacher_layers=["block1"], student_layers=None)


# --------------------------------------------------------------------------------------------
# Errors at construction
# --------------------------------------------------------------------------------------------


def test_bad_teacher_layer_is_rejected_at_construction():
    with pytest.raises(ValueError) as info:
        _module(layer_map={"blok2": "block1"})
    msg = str(info.value)
    assert "`layer_map`: the teacher (DigitsCNN) has no submodule named 'blok2' (did you mean 'block2'" in msg
    assert "Valid names (from named_modules()): ['block1'" in msg and "'block3'" in msg and "'head'" in msg


def test_bad_student_layer_is_rejected_at_construction():
    with pytest.raises(ValueError) as info:
        _module(layer_map={"block2": "block9"})
    msg = str(info.value)
    assert "the student (DigitsStudentCNN) has no submodule named 'block9'" in msg
    assert "Valid names" in msg and "'block1.0'" in msg and "'head'" in msg
    assert "'block3'" not in msg  # the student's names, not the teacher's


def test_bad_layer_from_a_mapping_names_the_layer_lists():
    with pytest.raises(
        ValueError,
        match=r"`teacher_layers / student_layers`: the teacher \(DigitsCNN\) has no submodule named 'layer4'",
    ):
        _module(
            layer_map=None, teacher_layers=["block1", "layer4"], student_layers=["block1", "block2"], mapping="last"
        )


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (
            dict(feature_weight=[1.0, 2.0]),
            r"`feature_weight` has 2 values for 1 layer pairs \[\('block2', 'block1'\)\]",
        ),
        (
            dict(layer_map={"block2": "block1", "block3": "block2"}, feature_weight=[1.0]),
            "`feature_weight` has 1 values for 2",
        ),
        (dict(feature_weight=-1.0), r"`feature_weight` values must be >= 0, got \[-1.0\]"),
        (
            dict(feature_weight=[0.5, -0.1], layer_map={"block2": "block1", "block3": "block2"}),
            "`feature_weight` values must be >= 0",
        ),
        (dict(feature_weight=float("nan")), "`feature_weight` values must be >= 0"),
        (
            dict(feature_loss="l1"),
            r"`feature_loss` must be one of \('mse', 'cosine', 'cka', 'attention', 'rkd_distance'",
        ),
        (
            dict(projection="both"),
            r"`projection` must be one of \('auto', 'student_to_teacher', 'teacher_to_student', 'none'\), got 'both'",
        ),
        (dict(hint_epochs=-1), r"`hint_epochs` must be an integer >= 0, got -1"),
        (dict(hint_epochs=1.5), r"`hint_epochs` must be an integer >= 0, got 1.5"),
        (dict(hint_epochs=True), r"`hint_epochs` must be an integer >= 0, got True"),
        (dict(projection_lr=0.0), r"`projection_lr` must be > 0 or None, got 0.0"),
        (dict(projection_lr=-0.1), r"`projection_lr` must be > 0 or None, got -0.1"),
        (dict(projection_lr=float("nan")), r"`projection_lr` must be > 0 or None"),
    ],
    ids=lambda v: "" if isinstance(v, str) else "-".join(f"{k}={v[k]}" for k in v),
)
def test_bad_arguments_are_rejected(kwargs, match):
    with pytest.raises(ValueError, match=match):
        _module(**kwargs)


def test_logit_term_arguments_are_still_checked():
    with pytest.raises(ValueError, match=r"`alpha` must be in \[0, 1\]"):
        _module(alpha=1.5)
    with pytest.raises(ValueError, match="`temperature` must be a finite number > 0"):
        _module(temperature=0.0)


# --------------------------------------------------------------------------------------------
# Errors found by the probe, before any training step
# --------------------------------------------------------------------------------------------


def test_incompatible_shapes_without_projection_fail_in_fit_before_training(digits_dm, make_trainer, tmp_path):
    module = _module(layer_map={"block2": "block1"}, projection="none", feature_loss="mse")
    before = {k: v.clone() for k, v in module.student.state_dict().items()}
    trainer = make_trainer(enable_checkpointing=True, max_epochs=1)
    with pytest.raises(ValueError) as info:
        trainer.fit(module, datamodule=digits_dm)
    msg = str(info.value)
    assert "feature_loss 'mse' with projection 'none' needs equal shapes" in msg
    assert "teacher 'block2' (8, 32, 4, 4) -> student 'block1' (8, 4, 4, 4)" in msg  # both shapes and the pair
    assert "student_to_teacher" in msg  # the fix
    assert trainer.global_step == 0
    assert list(tmp_path.rglob("*.ckpt")) == []
    after = module.student.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_rank_mismatch_cannot_be_projected():
    # student block1 is [N, 4, 4, 4], teacher block3 is [N, 64]
    module = _module(layer_map={"block3": "block1"}, projection="student_to_teacher", feature_loss="mse")
    with pytest.raises(ValueError, match="cannot project between features of different rank") as info:
        module.build(_batch()[0])
    assert "teacher 'block3' (16, 64) -> student 'block1' (16, 4, 4, 4)" in str(info.value)


def test_rank_mismatch_also_fails_with_auto_projection_for_mse():
    module = _module(layer_map={"block3": "block1"}, feature_loss="mse")
    with pytest.raises(ValueError, match="cannot project between features of different rank"):
        module.build(_batch()[0])


def test_relational_losses_accept_any_ranks():
    module = _module(layer_map={"block3": "block1", "block2": "block2"}, feature_loss="rkd_distance")
    module.build(_batch()[0])
    assert all(isinstance(p, nn.Identity) for p in module.projections)


@pytest.mark.parametrize("layer_map", [{"block3": "block1"}, {"block2": "block2"}], ids=["teacher-2d", "student-2d"])
def test_attention_with_a_2d_layer_is_rejected(layer_map):
    module = _module(layer_map=layer_map, feature_loss="attention")
    with pytest.raises(ValueError, match=r"feature_loss 'attention' needs \[N, C, H, W\] features on both sides"):
        module.build(_batch()[0])


# --------------------------------------------------------------------------------------------
# Projections: built in setup from the probe
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("layer_map", "c_in", "c_out", "s_shape", "t_shape"),
    [
        ({"block2": "block1"}, 4, 32, (4, 4), (4, 4)),  # student [N,4,4,4] -> teacher [N,32,4,4]
        ({"block1": "block1.0"}, 4, 16, (8, 8), (8, 8)),  # student [N,4,8,8] -> teacher [N,16,8,8]
        ({"block1": "block1"}, 4, 16, (4, 4), (8, 8)),  # student [N,4,4,4] -> teacher [N,16,8,8]: resize
    ],
    ids=["channels", "channels-8x8", "resize"],
)
def test_projection_is_built_in_setup_from_the_probe(layer_map, c_in, c_out, s_shape, t_shape, digits_dm, make_trainer):
    module = _module(layer_map=layer_map, feature_loss="mse")
    assert len(module.projections) == 0  # nothing before the probe
    make_trainer(**_fit_kwargs()).fit(module, datamodule=digits_dm)
    assert len(module.projections) == 1
    proj = module.projections[0]
    conv, bn = proj.map[0], proj.map[1]
    assert isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d)
    assert conv.kernel_size == (1, 1) and conv.in_channels == c_in and conv.out_channels == c_out
    assert tuple(conv.weight.shape) == (c_out, c_in, 1, 1)
    assert bn.num_features == c_out
    # applied to a student feature, the projection gives the teacher feature's shape
    ((t_name, s_name),) = layer_map.items()
    x = _batch(5)[0]
    with torch.no_grad():
        student_feature = dict(module.student.named_modules())[s_name](x)
    assert student_feature.shape[-2:] == s_shape
    proj.eval()
    with torch.no_grad():
        out = proj(student_feature)
        expected = bn(conv(student_feature))
        if s_shape != t_shape:
            expected = F.interpolate(expected, size=t_shape, mode="bilinear", align_corners=False)
    assert tuple(out.shape) == (5, c_out, *t_shape)
    torch.testing.assert_close(out, expected)


def test_linear_projection_for_vector_features():
    module = _module(DigitsMLP(), layer_map={"block3": "block1"}, feature_loss="cosine")  # [N, 16] -> [N, 64]
    module.build(_batch()[0])
    proj = module.projections[0].map
    assert isinstance(proj, nn.Linear) and proj.in_features == 16 and proj.out_features == 64


@pytest.mark.parametrize("feature_loss", ["cka", "rkd_angle", "sp", "attention"])
def test_auto_projection_is_none_for_losses_that_accept_different_shapes(feature_loss):
    module = _module(layer_map={"block2": "block1"}, feature_loss=feature_loss)
    module.build(_batch()[0])
    assert len(module.projections) == 1 and isinstance(module.projections[0], nn.Identity)
    assert list(module.projections.parameters()) == []


def test_teacher_to_student_projects_the_teacher_and_never_trains_it():
    # teacher block1 [N, 16, 8, 8] -> student block1.0 [N, 4, 8, 8]
    module = _module(layer_map={"block1": "block1.0"}, projection="teacher_to_student", feature_loss="mse")
    x, y = _batch()
    module.build(x)
    conv = module.projections[0].map[0]
    assert tuple(conv.weight.shape) == (4, 16, 1, 1)  # 16 -> 4: on the teacher side
    module.teacher.requires_grad_(True)  # even an unfrozen teacher must get nothing from the feature term
    s_logits, t_logits = module.forward_models(x)
    terms = module.distillation_losses(s_logits, t_logits, Batch(x, y))
    # the loss compares the raw student feature with the projected teacher feature
    with torch.no_grad():
        f_t = module.teacher.block1(x)
    expected = mse_feature_loss(module.student.block1[0](x), module.projections[0](f_t))
    assert math.isclose(terms["feature_loss"].item(), expected.item(), rel_tol=1e-5)
    terms["feature_loss"].backward()
    assert conv.weight.grad is not None and conv.weight.grad.abs().sum() > 0
    assert module.student.block1[0][0].weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in module.teacher.parameters())


# --------------------------------------------------------------------------------------------
# Projections in the optimizer and in checkpoints
# --------------------------------------------------------------------------------------------


def _ids(params) -> set[int]:
    return {id(p) for p in params}


def test_projections_are_optimised(digits_dm, make_trainer):
    module = _module(layer_map={"block2": "block1", "block3": "block2"}, feature_loss="mse")
    trainer = make_trainer(**_fit_kwargs())
    trainer.fit(module, datamodule=digits_dm)
    groups = trainer.optimizers[0].param_groups
    optimised = set().union(*(_ids(g["params"]) for g in groups))
    proj = _ids(module.projections.parameters())
    assert len(proj) == 3 + 2  # conv + BN (weight, bias), linear (weight, bias)
    assert proj <= optimised
    assert _ids(module.student.parameters()) <= optimised
    assert not (_ids(module.teacher.parameters()) & optimised)


def test_projection_lr_gives_the_projections_their_own_group(digits_dm, make_trainer):
    module = _module(
        layer_map={"block2": "block1"},
        feature_loss="mse",
        projection_lr=0.123,
        optimizer=functools.partial(torch.optim.SGD, lr=0.01),
    )
    trainer = make_trainer(**_fit_kwargs())
    trainer.fit(module, datamodule=digits_dm)
    groups = trainer.optimizers[0].param_groups
    assert len(groups) == 2
    proj_group = [g for g in groups if _ids(g["params"]) == _ids(module.projections.parameters())]
    assert len(proj_group) == 1 and proj_group[0]["lr"] == 0.123
    (rest,) = [g for g in groups if g is not proj_group[0]]
    assert rest["lr"] == 0.01
    assert _ids(rest["params"]) == _ids(module.student.parameters())


def test_projection_weights_are_checkpointed_and_restored(digits_dm, make_trainer, tmp_path):
    module = _module(layer_map={"block2": "block1", "block3": "block2"}, feature_loss="mse", feature_weight=[1.0, 0.5])
    trainer = make_trainer(**_fit_kwargs(limit_train_batches=2, enable_checkpointing=True))
    trainer.fit(module, datamodule=digits_dm)
    (path,) = list(tmp_path.rglob("*.ckpt"))
    state = torch.load(path, map_location="cpu", weights_only=False)["state_dict"]
    prefix = "objectives.feature.projections."  # the FeatureMatch objective's projections
    proj_keys = sorted(k for k in state if k.startswith(prefix))
    assert set(proj_keys) == {f"{prefix}{k}" for k in module.projections.state_dict()}
    assert f"{prefix}0.map.0.weight" in proj_keys and f"{prefix}1.map.weight" in proj_keys
    assert not any(k.startswith("teacher.") for k in state)  # the teacher is not saved by default

    restored = FeatureDistillation.load_from_checkpoint(path, student=DigitsStudentCNN(), teacher=DigitsCNN())
    assert restored.pairs == module.pairs and restored.feature_weights == [1.0, 0.5]
    expected = module.projections.state_dict()
    got = restored.projections.state_dict()
    assert set(got) == set(expected)
    for key, value in expected.items():
        assert torch.equal(got[key], value), key
    # trained weights, not a fresh initialisation
    # the restored weights are the trained ones, not a fresh initialisation
    fresh = _module(layer_map={"block2": "block1", "block3": "block2"}, feature_loss="mse", feature_weight=[1.0, 0.5])
    fresh.build(_batch()[0])
    assert not torch.equal(got["0.map.0.weight"], fresh.projections[0].map[0].weight)


# --------------------------------------------------------------------------------------------
# The objective
# --------------------------------------------------------------------------------------------


def _expected_terms(module: FeatureDistillation, x, y, losses_fn):
    """(1 - a) CE + a kd_loss + sum_i beta_i l_i, from the models' stages called by hand."""
    student, teacher = module.student, module.teacher
    with torch.no_grad():
        t1 = teacher.block1(x)
        t2 = teacher.block2(t1)
        t3 = teacher.block3(t2)
        t_logits = teacher.head(teacher.dropout(t3))
    teacher_feats = {"block1": t1, "block2": t2, "block3": t3}
    s1 = student.block1(x)
    s2 = student.block2(s1)
    s_logits = student.head(s2)
    student_feats = {"block1": s1, "block2": s2}
    feature = 0.0
    for (t_name, s_name), proj, beta in zip(module.pairs, module.projections, module.feature_weights):
        feature = feature + beta * losses_fn(proj(student_feats[s_name]), teacher_feats[t_name])
    ce = F.cross_entropy(s_logits, y)
    kd = kd_loss(s_logits, t_logits, temperature=module.temperature)
    return {
        "loss": (1 - module.alpha) * ce + module.alpha * kd + feature,
        "task_loss": ce,
        "kd_loss": kd,
        "feature_loss": feature,
    }


@pytest.mark.parametrize(
    ("feature_loss", "fn"),
    [
        ("mse", mse_feature_loss),
        ("cosine", cosine_feature_loss),
        ("sp", similarity_preserving_loss),
        ("rkd_distance", rkd_distance_loss),
    ],
)
def test_total_loss_is_ce_plus_kd_plus_weighted_feature_terms(feature_loss, fn):
    module = _module(
        teacher=DigitsCNN(),
        layer_map={"block2": "block1", "block3": "block2"},
        feature_loss=feature_loss,
        feature_weight=[2.0, 0.5],
        alpha=0.3,
        temperature=2.0,
    )
    x, y = _batch(16, seed=3)
    module.build(x)
    s_logits, t_logits = module.forward_models(x)
    terms = module.distillation_losses(s_logits, t_logits, Batch(x, y))
    expected = _expected_terms(module, x, y, fn)
    for name in ("task_loss", "kd_loss", "feature_loss", "loss"):
        assert math.isclose(terms[name].item(), expected[name].item(), rel_tol=1e-5, abs_tol=1e-6), name
    assert terms["feature_loss"].item() > 0
    # the weights matter: each pair's term is in the sum with its own beta
    module.feature_weights = [0.0, 0.0]
    module.forward_models(x)
    zero = module.distillation_losses(s_logits, t_logits, Batch(x, y))
    assert zero["feature_loss"].item() == 0.0


def test_several_feature_losses_on_every_pair():
    module = _module(
        layer_map={"block3": "block2"}, feature_loss={"rkd_distance": 25.0, "rkd_angle": 50.0}, feature_weight=2.0
    )
    x, y = _batch(12, seed=4)
    module.build(x)
    s_logits, t_logits = module.forward_models(x)
    terms = module.distillation_losses(s_logits, t_logits, Batch(x, y))
    s2 = module.student.block2(module.student.block1(x))
    with torch.no_grad():
        t3 = module.teacher.block3(module.teacher.block2(module.teacher.block1(x)))
    expected = 2.0 * (25.0 * rkd_distance_loss(s2, t3) + 50.0 * rkd_angle_loss(s2, t3))
    assert math.isclose(terms["feature_loss"].item(), expected.item(), rel_tol=1e-5)


def test_distillation_losses_without_forward_models_is_an_error():
    module = _module()
    x, y = _batch()
    module.build(x)
    with pytest.raises(RuntimeError, match="needs forward_models"):
        module.distillation_losses(torch.zeros(16, 10), torch.zeros(16, 10), Batch(x, y))


# --------------------------------------------------------------------------------------------
# Training: hint stage, learning signal, every loss
# --------------------------------------------------------------------------------------------


class _StepRecorder(L.Callback):
    """Logged train/* values at every step, and the student's head / first conv around each epoch."""

    def __init__(self) -> None:
        self.steps: list[dict[str, float]] = []
        self.head: dict[tuple[int, str], torch.Tensor] = {}
        self.conv: dict[tuple[int, str], torch.Tensor] = {}

    def _snapshot(self, trainer, pl_module, when: str) -> None:
        key = (trainer.current_epoch, when)
        self.head[key] = pl_module.student.head.weight.detach().clone()
        self.conv[key] = pl_module.student.block1[0][0].weight.detach().clone()

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._snapshot(trainer, pl_module, "start")

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self._snapshot(trainer, pl_module, "end")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        row = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("train/")}
        row["epoch"] = trainer.current_epoch
        row["returned"] = float(outputs["loss"])
        self.steps.append(row)


def test_hint_stage_trains_only_on_the_feature_terms(digits_dm, make_trainer):
    alpha = 0.9
    module = _module(
        teacher=DigitsCNN(),
        teacher_checkpoint="zoo:digits_cnn",
        layer_map={"block2": "block1"},
        feature_loss="mse",
        hint_epochs=1,
        alpha=alpha,
        optimizer=functools.partial(torch.optim.SGD, lr=0.5),
    )
    recorder = _StepRecorder()
    trainer = make_trainer(**_fit_kwargs(limit_train_batches=3, max_epochs=2, log_every_n_steps=1, callbacks=[recorder]))
    trainer.fit(module, datamodule=digits_dm)
    epochs = [row["epoch"] for row in recorder.steps]
    assert epochs == [0, 0, 0, 1, 1, 1]
    for row in recorder.steps:
        assert {"train/loss", "train/feature_loss", "train/kd_loss", "train/task_loss"} <= set(row)
        assert math.isclose(row["returned"], row["train/loss"], rel_tol=1e-6)
        full = (1 - alpha) * row["train/task_loss"] + alpha * row["train/kd_loss"] + row["train/feature_loss"]
        if row["epoch"] == 0:  # hint stage: the feature terms only (kd / task logged, not added)
            assert math.isclose(row["train/loss"], row["train/feature_loss"], rel_tol=1e-6)
            assert row["train/kd_loss"] > 0 and row["train/task_loss"] > 0
            assert not math.isclose(row["train/loss"], full, rel_tol=1e-3)
        else:  # then the full objective
            assert math.isclose(row["train/loss"], full, rel_tol=1e-5)
    # epoch 0: the head (above the hooked layer) does not move, the hooked layers do
    assert torch.equal(recorder.head[(0, "start")], recorder.head[(0, "end")])
    assert not torch.equal(recorder.conv[(0, "start")], recorder.conv[(0, "end")])
    # epoch 1: the head trains as well
    assert not torch.equal(recorder.head[(1, "start")], recorder.head[(1, "end")])


def test_feature_loss_decreases_with_hints(digits_dm, make_trainer):
    torch.manual_seed(0)
    module = _module(
        teacher=DigitsCNN(),
        teacher_checkpoint="zoo:digits_cnn",
        layer_map={"block2": "block1"},
        feature_loss="mse",
        alpha=0.0,
        optimizer=functools.partial(torch.optim.Adam, lr=1e-2),
    )
    recorder = _StepRecorder()
    trainer = make_trainer(**_fit_kwargs(limit_train_batches=None, max_epochs=3, callbacks=[recorder]))
    trainer.fit(module, datamodule=digits_dm)
    values = [row["train/feature_loss"] for row in recorder.steps]
    assert len(values) >= 30
    first, last = sum(values[:3]) / 3, sum(values[-3:]) / 3
    assert last < 0.8 * first, (first, last)


@pytest.mark.parametrize("feature_loss", sorted(FEATURE_LOSSES))
def test_every_feature_loss_trains(feature_loss, digits_dm, make_trainer):
    module = _module(teacher=DigitsCNN(), layer_map={"block2": "block1"}, feature_loss=feature_loss)
    trainer = make_trainer(**_fit_kwargs(limit_train_batches=2, limit_val_batches=1))
    trainer.fit(module, datamodule=digits_dm)
    assert trainer.global_step == 2
    value = trainer.callback_metrics["train/feature_loss"]
    assert torch.isfinite(value) and value.item() >= 0
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    assert "val/acc" in trainer.callback_metrics
