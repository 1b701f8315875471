"""ProgressiveCurriculum (POCL): reciprocal rank fusion, difficulty scoring, the growing subset,
per-stage intensity, stage triggers, resuming mid-stage, CTKD, and argument errors.

The digits train split has N = 1079 samples; with the default fractions (1/3, 2/3, 1) the stages
train on ceil(N/3) = 360, ceil(2N/3) = 720 and 1079 samples. Batches are ``(input, target, index)``
with ``index`` the sample's position in the train split, so the samples an epoch sees are read
from ``batch[2]``.
"""

from __future__ import annotations

import csv
import functools
import math
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger

from lightning_distill import CTKD, KnowledgeDistillation
from lightning_distill.callbacks import ProgressiveCurriculum
from lightning_distill.callbacks.curriculum import reciprocal_rank_fusion
from lightning_distill.data import DigitsDataModule
from lightning_distill.models import DigitsCNN, DigitsMLP

pytestmark = pytest.mark.usefixtures("single_thread", "seeded")

N = 1079
STAGE_SIZES = (360, 720, 1079)


def _kd(lr: float | None = None, **kwargs) -> KnowledgeDistillation:
    if lr is not None:
        kwargs["optimizer"] = functools.partial(torch.optim.SGD, lr=lr)
    return KnowledgeDistillation(DigitsMLP(), DigitsCNN(), teacher_checkpoint="zoo:digits_cnn", **kwargs)


def _pocl(**kwargs) -> ProgressiveCurriculum:
    kwargs.setdefault("progress_bar", False)
    return ProgressiveCurriculum(**kwargs)


class _Recorder(L.Callback):
    """Per epoch: the sample indices seen (in order), and the module's temperature / alpha / the stage at its start."""

    def __init__(self, curriculum: ProgressiveCurriculum | None = None) -> None:
        self.curriculum = curriculum
        self.seen: dict[int, list[int]] = {}
        self.start: dict[int, tuple] = {}
        self.steps: list[tuple[int, float, float]] = []

    def on_train_epoch_start(self, trainer, pl_module):
        stage = self.curriculum.stage if self.curriculum is not None else None
        self.start[trainer.current_epoch] = (pl_module.temperature, pl_module.alpha, stage)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.seen.setdefault(trainer.current_epoch, []).extend(batch[2].tolist())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.steps.append((trainer.global_step - 1, float(pl_module.temperature), trainer.estimated_stepping_batches))


def _stages(recorder: _Recorder) -> list[int]:
    return [recorder.start[e][2] for e in sorted(recorder.start)]


def _csv(logger: CSVLogger) -> list[dict[str, str]]:
    with open(Path(logger.log_dir) / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


# ---------------------------------------------------------------------------------------------
# reciprocal rank fusion
# ---------------------------------------------------------------------------------------------


def test_rrf_hand_computation():
    # signal 1: 0.3 0.1 0.4 0.2 -> ranks 3 1 4 2 ;  signal 2: 2 5 1 3 -> ranks 2 4 1 3
    sig1 = torch.tensor([0.3, 0.1, 0.4, 0.2])
    sig2 = torch.tensor([2.0, 5.0, 1.0, 3.0])
    expected = torch.tensor(
        [1 / (60 + 3) + 1 / (60 + 2), 1 / (60 + 1) + 1 / (60 + 4), 1 / (60 + 4) + 1 / (60 + 1), 1 / (60 + 2) + 1 / (60 + 3)],
        dtype=torch.float64,
    )
    scores = reciprocal_rank_fusion([sig1, sig2], k=60)
    assert scores.dtype == torch.float64 and scores.shape == (4,)
    assert torch.allclose(scores, expected, rtol=0, atol=1e-15)
    # a single signal with k=0: 1 / rank
    assert torch.allclose(reciprocal_rank_fusion([sig1], k=0), torch.tensor([1 / 3, 1.0, 1 / 4, 1 / 2], dtype=torch.float64))


def test_rrf_ties_are_broken_by_index():
    # 0.5 at samples 0, 1, 3: ranks 2, 3, 4 in index order; sample 2 (0.1) is rank 1
    scores = reciprocal_rank_fusion([torch.tensor([0.5, 0.5, 0.1, 0.5])], k=0)
    assert torch.allclose(scores, torch.tensor([1 / 2, 1 / 3, 1.0, 1 / 4], dtype=torch.float64))
    constant = reciprocal_rank_fusion([torch.zeros(5)], k=10)
    assert torch.allclose(constant, torch.tensor([1 / (10 + r) for r in range(1, 6)], dtype=torch.float64))


def test_rrf_errors():
    with pytest.raises(ValueError, match="needs at least one signal"):
        reciprocal_rank_fusion([])
    with pytest.raises(ValueError, match="all signals must have 3 values, got 2"):
        reciprocal_rank_fusion([torch.zeros(3), torch.zeros(2)])


@settings(max_examples=60, deadline=None)
@given(
    data=st.data(),
    n=st.integers(1, 12),
    m=st.integers(1, 4),
    k=st.integers(0, 100),
)
def test_rrf_properties(data, n, m, k):
    values = st.floats(-5, 5, allow_nan=False).map(lambda v: round(v, 1))  # rounding makes ties likely
    signals = [torch.tensor(data.draw(st.lists(values, min_size=n, max_size=n))) for _ in range(m)]
    scores = reciprocal_rank_fusion(signals, k=k)
    assert scores.shape == (n,)
    assert (scores > 0).all() and (scores <= m / (k + 1) + 1e-12).all()
    easiest = data.draw(st.integers(0, n - 1))
    for s in signals:
        s[easiest] = s.min() - 1.0  # strictly easiest under every signal
    scores = reciprocal_rank_fusion(signals, k=k)
    assert scores[easiest] == pytest.approx(m / (k + 1), rel=1e-12)
    assert scores[easiest] == scores.max()
    if n > 1:
        assert (torch.cat([scores[:easiest], scores[easiest + 1 :]]) < scores[easiest]).all()


# ---------------------------------------------------------------------------------------------
# difficulty scoring
# ---------------------------------------------------------------------------------------------


def _teacher_losses(dm: DigitsDataModule) -> torch.Tensor:
    teacher = _kd().teacher  # the zoo weights, in eval mode
    assert not teacher.training
    with torch.no_grad():
        return F.cross_entropy(teacher(dm.train_dataset.inputs), dm.train_dataset.targets, reduction="none")


def test_scoring_orders_easy_to_hard(make_trainer):
    dm = DigitsDataModule(batch_size=64, shuffle_seed=0)
    pocl = _pocl()
    make_trainer(limit_train_batches=1, limit_val_batches=0, callbacks=[pocl]).fit(_kd(), datamodule=dm)
    assert len(pocl.scores) == N and len(pocl.order) == N
    assert sorted(pocl.order) == list(range(N))
    ordered_scores = [pocl.scores[i] for i in pocl.order]
    assert all(a >= b for a, b in zip(ordered_scores, ordered_scores[1:]))  # highest score (easiest) first
    losses = _teacher_losses(dm)
    third = N // 3
    first, last = losses[pocl.order[:third]].mean(), losses[pocl.order[-third:]].mean()
    assert first < last


def test_callable_signal_is_used(make_trainer):
    calls = []

    def by_index(batch, teacher_logits, student_logits):
        calls.append((tuple(teacher_logits.shape), tuple(student_logits.shape)))
        return batch[2].float()  # lower = easier: sample 0 is the easiest

    dm = DigitsDataModule(batch_size=64, shuffle_seed=0)
    pocl = _pocl(signals=[by_index])
    make_trainer(limit_train_batches=1, limit_val_batches=0, callbacks=[pocl]).fit(_kd(), datamodule=dm)
    assert pocl.order == list(range(N))
    assert len(calls) == math.ceil(N / 64)
    assert all(t[1:] == (10,) and s[1:] == (10,) and t == s for t, s in calls)


# ---------------------------------------------------------------------------------------------
# the growing subset
# ---------------------------------------------------------------------------------------------


def test_subset_grows_easy_first(make_trainer):
    pocl = _pocl(stage_ends=(0.4, 0.7), shuffle_seed=11)
    recorder = _Recorder(pocl)
    make_trainer(max_epochs=5, limit_val_batches=0, callbacks=[pocl, recorder]).fit(
        _kd(), datamodule=DigitsDataModule(batch_size=64, shuffle_seed=0)
    )
    order, seen = pocl.order, recorder.seen
    assert _stages(recorder) == [0, 0, 1, 1, 2]
    expected_sizes = [STAGE_SIZES[s] for s in (0, 0, 1, 1, 2)]
    for epoch, size in enumerate(expected_sizes):
        assert len(seen[epoch]) == size  # every sample of the stage exactly once
        assert set(seen[epoch]) == set(order[:size]), epoch
    assert math.ceil(N / 3) == 360 and math.ceil(2 * N / 3) == 720
    # reshuffled between epochs of the same stage, same set
    assert seen[0] != seen[1] and set(seen[0]) == set(seen[1])
    assert seen[2] != seen[3] and set(seen[2]) == set(seen[3])


# ---------------------------------------------------------------------------------------------
# intensity: per-stage temperature / alpha, the rising schedule
# ---------------------------------------------------------------------------------------------


def test_per_stage_temperature_and_alpha_are_applied_and_logged(make_trainer, tmp_path):
    temperatures, alphas = (1.0, 1.5, 2.0), (0.9, 0.7, 0.5)
    pocl = _pocl(temperatures=temperatures, alphas=alphas, stage_ends=(0.4, 0.7))
    recorder = _Recorder(pocl)
    logger = CSVLogger(tmp_path)
    trainer = make_trainer(max_epochs=5, limit_train_batches=2, limit_val_batches=0, logger=logger, callbacks=[pocl, recorder])
    trainer.fit(_kd(temperature=4.0, alpha=0.1), datamodule=DigitsDataModule(batch_size=64, shuffle_seed=0))
    stages = [0, 0, 1, 1, 2]
    for epoch, stage in enumerate(stages):
        temperature, alpha, _ = recorder.start[epoch]
        assert temperature == temperatures[stage] and alpha == alphas[stage]
    rows = {int(r["epoch"]): r for r in _csv(logger) if r.get("curriculum/stage")}
    assert sorted(rows) == [0, 1, 2, 3, 4]
    for epoch, stage in enumerate(stages):
        row = rows[epoch]
        assert float(row["curriculum/stage"]) == stage + 1
        assert float(row["curriculum/fraction"]) == pytest.approx((1 / 3, 2 / 3, 1.0)[stage])
        # logged as float32
        assert float(row["curriculum/temperature"]) == pytest.approx(temperatures[stage], rel=1e-6)
        assert float(row["curriculum/alpha"]) == pytest.approx(alphas[stage], rel=1e-6)


def test_rising_temperature_schedule_single_stage(make_trainer):
    pocl = _pocl(fractions=(1.0,), temperature_schedule=(1.0, 3.0))
    recorder = _Recorder(pocl)
    make_trainer(max_epochs=2, limit_train_batches=4, limit_val_batches=0, callbacks=[pocl, recorder]).fit(
        _kd(), datamodule=DigitsDataModule(batch_size=64, shuffle_seed=0)
    )
    total = 4 * 2
    assert [s[0] for s in recorder.steps] == list(range(total))
    for step, temperature, estimated in recorder.steps:
        assert estimated == total
        assert temperature == pytest.approx(1.0 + 2.0 * step / total, rel=1e-12)


def test_rising_temperature_schedule_never_decreases_across_stages(make_trainer):
    pocl = _pocl(temperature_schedule=(1.0, 3.0))
    recorder = _Recorder(pocl)
    make_trainer(max_epochs=3, limit_val_batches=0, callbacks=[pocl, recorder]).fit(
        _kd(), datamodule=DigitsDataModule(batch_size=64, shuffle_seed=0)
    )
    temperatures = [t for _, t, _ in recorder.steps]
    assert len(temperatures) == 6 + 12 + 17
    assert all(b >= a for a, b in zip(temperatures, temperatures[1:]))
    assert temperatures[-1] >= 2.9  # the last step is ~ t_max


# ---------------------------------------------------------------------------------------------
# stage triggers
# ---------------------------------------------------------------------------------------------


def test_loss_plateau_trigger_advances_after_window_plus_one_epochs(make_trainer):
    # lr = 0: the loss is flat; batch size 120 divides the stage sizes, so each epoch's mean is the same
    pocl = _pocl(trigger="loss_plateau", plateau_window=2, plateau_epsilon=1e-3)
    recorder = _Recorder(pocl)
    make_trainer(max_epochs=4, limit_val_batches=0, callbacks=[pocl, recorder]).fit(
        _kd(lr=0.0), datamodule=DigitsDataModule(batch_size=120, shuffle_seed=0)
    )
    assert _stages(recorder) == [0, 0, 0, 1]
    assert len(pocl.loss_history) == 1  # reset when the stage advanced, then epoch 3's mean


def test_loss_plateau_huge_epsilon_advances_at_the_first_check(make_trainer):
    pocl = _pocl(trigger="loss_plateau", plateau_window=1, plateau_epsilon=1e9)
    recorder = _Recorder(pocl)
    make_trainer(max_epochs=4, limit_train_batches=2, limit_val_batches=0, callbacks=[pocl, recorder]).fit(
        _kd(lr=0.1), datamodule=DigitsDataModule(batch_size=64, shuffle_seed=0)
    )
    # first check possible at the end of epoch 1 (two epoch means), then again two epochs later
    assert _stages(recorder) == [0, 0, 1, 1]


def test_val_metric_trigger_advances_after_patience(make_trainer):
    pocl = _pocl(trigger="val_metric", monitor="val/acc", patience=2)
    recorder = _Recorder(pocl)
    make_trainer(max_epochs=4, limit_train_batches=2, limit_val_batches=2, callbacks=[pocl, recorder]).fit(
        _kd(lr=0.0), datamodule=DigitsDataModule(batch_size=64, shuffle_seed=0)
    )
    # epoch 0 sets the best; epochs 1 and 2 do not improve (lr = 0) -> advance after epoch 2
    assert _stages(recorder) == [0, 0, 0, 1]


def test_val_metric_trigger_missing_monitor(make_trainer):
    pocl = _pocl(trigger="val_metric", monitor="val/not_logged")
    with pytest.raises(ValueError, match=r"monitors 'val/not_logged', which was not logged"):
        make_trainer(max_epochs=2, limit_train_batches=1, limit_val_batches=1, callbacks=[pocl]).fit(
            _kd(), datamodule=DigitsDataModule(batch_size=64, shuffle_seed=0)
        )


# ---------------------------------------------------------------------------------------------
# resuming mid-stage
# ---------------------------------------------------------------------------------------------


class _StopAfter(L.Callback):
    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_train_epoch_end(self, trainer, pl_module):
        if trainer.current_epoch == self.epoch:
            trainer.should_stop = True


def test_resume_mid_stage_restores_stage_and_order(make_trainer, tmp_path, monkeypatch):
    calls = []
    original_score = ProgressiveCurriculum.score

    def counting_score(self, *args, **kwargs):
        calls.append(self)
        return original_score(self, *args, **kwargs)

    monkeypatch.setattr(ProgressiveCurriculum, "score", counting_score)

    def run(callbacks, **kwargs):
        L.seed_everything(3, verbose=False)
        module = _kd(lr=0.05)
        trainer = make_trainer(max_epochs=5, limit_val_batches=0, callbacks=callbacks, **kwargs.pop("trainer", {}))
        trainer.fit(module, datamodule=DigitsDataModule(batch_size=64, shuffle_seed=0), **kwargs)
        return module

    straight_pocl = _pocl(stage_ends=(0.4, 0.7), shuffle_seed=5)
    straight = _Recorder(straight_pocl)
    straight_module = run([straight_pocl, straight])
    assert len(calls) == 1

    first_pocl = _pocl(stage_ends=(0.4, 0.7), shuffle_seed=5)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    run([first_pocl, _Recorder(first_pocl), _StopAfter(2), checkpoint], trainer={"enable_checkpointing": True})
    assert len(calls) == 2
    assert first_pocl.stage == 1  # stopped in the middle of stage 2 (1-based)

    resumed_pocl = _pocl(stage_ends=(0.4, 0.7), shuffle_seed=5)
    resumed = _Recorder(resumed_pocl)
    resumed_module = run([resumed_pocl, resumed], ckpt_path=tmp_path / "ckpt" / "last.ckpt")
    assert len(calls) == 2  # scoring did NOT run again
    assert resumed_pocl.order == first_pocl.order == straight_pocl.order
    assert resumed_pocl.scores == first_pocl.scores
    assert sorted(resumed.seen) == [3, 4]
    assert resumed.start[3][2] == 1 and resumed.start[4][2] == 2
    assert resumed.seen[3] == straight.seen[3]
    assert resumed.seen[4] == straight.seen[4]
    for p, q in zip(straight_module.student.parameters(), resumed_module.student.parameters()):
        assert torch.allclose(p, q, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# CTKD
# ---------------------------------------------------------------------------------------------


def _ctkd() -> CTKD:
    return CTKD(DigitsMLP(), DigitsCNN(), teacher_checkpoint="zoo:digits_cnn", alpha=0.2)


def test_ctkd_with_alphas_only(make_trainer):
    alphas = (0.9, 0.7, 0.5)
    pocl = _pocl(alphas=alphas, stage_ends=(0.4, 0.7))
    recorder = _Recorder(pocl)
    module = _ctkd()
    make_trainer(max_epochs=5, limit_train_batches=2, limit_val_batches=0, callbacks=[pocl, recorder]).fit(
        module, datamodule=DigitsDataModule(batch_size=64, shuffle_seed=0)
    )
    for epoch, stage in enumerate([0, 0, 1, 1, 2]):
        assert recorder.start[epoch][1] == alphas[stage]
    assert len(recorder.seen[0]) == 2 * 64


@pytest.mark.parametrize("kwargs", [{"temperatures": (1.0, 1.5, 2.0)}, {"temperature_schedule": (1.0, 3.0)}])
def test_instance_ctkd_rejects_curriculum_temperatures_at_setup(kwargs, make_trainer):
    # one learned temperature per sample has no single value to set: refused before scoring and any step
    pocl = _pocl(**kwargs)
    recorder = _Recorder(pocl)
    module = CTKD(DigitsMLP(), DigitsCNN(), teacher_checkpoint="zoo:digits_cnn", alpha=0.2, temperature_mode="instance")
    with pytest.raises(ValueError, match=r"ProgressiveCurriculum cannot set CTKD.temperature: an instance-wise learned"):
        make_trainer(limit_train_batches=1, callbacks=[pocl, recorder]).fit(
            module, datamodule=DigitsDataModule(batch_size=64, shuffle_seed=0)
        )
    assert recorder.seen == {} and pocl.order is None  # failed before scoring and before any step


def test_curriculum_drives_the_global_ctkd_temperature(make_trainer):
    # the temperature interface: the curriculum moves CTKD's learned temperature to each stage's value at the
    # start of the stage (learning continues from there), as it sets a fixed temperature
    temperatures = (1.5, 3.0, 6.0)
    pocl = _pocl(temperatures=temperatures, stage_ends=(0.4, 0.7))
    recorder = _Recorder(pocl)
    module = CTKD(DigitsMLP(), DigitsCNN(), teacher_checkpoint="zoo:digits_cnn", alpha=0.2, lambda_max=0.0)
    make_trainer(max_epochs=5, limit_train_batches=2, limit_val_batches=0, callbacks=[pocl, recorder]).fit(
        module, datamodule=DigitsDataModule(batch_size=64, shuffle_seed=0)
    )
    for epoch, stage in enumerate([0, 0, 1, 1, 2]):
        assert recorder.start[epoch][2] == stage
    # at each stage change the learned tau jumps to the stage's value (lambda 0: only the anchor-free KD moves it)
    for epoch in (0, 2, 4):
        assert recorder.start[epoch][0] == pytest.approx(temperatures[[0, 0, 1, 1, 2][epoch]], rel=1e-5)


# ---------------------------------------------------------------------------------------------
# argument errors
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"fractions": (0.5, 0.4, 1.0)}, r"`fractions` must increase strictly within \(0, 1\]"),
        ({"fractions": (0.5, 0.5, 1.0)}, r"`fractions` must increase strictly"),
        ({"fractions": (0.3, 0.6, 0.9)}, r"the last of `fractions` must be 1.0"),
        ({"fractions": ()}, r"`fractions` must increase strictly"),
        ({"fractions": (0.0, 1.0)}, r"`fractions` must increase strictly within \(0, 1\]"),
        ({"temperatures": (1.0, 2.0)}, r"`temperatures` needs one value per stage \(3\), got \[1.0, 2.0\]"),
        ({"temperatures": (1.0, 0.0, 2.0)}, r"`temperatures` must all be > 0"),
        ({"temperatures": (1.0, -1.0, 2.0)}, r"`temperatures` must all be > 0"),
        ({"alphas": (0.9, 0.7)}, r"`alphas` needs one value per stage \(3\)"),
        ({"alphas": (0.9, 1.1, 0.5)}, r"`alphas` must all be in \[0, 1\]"),
        ({"alphas": (-0.1, 0.5, 0.5)}, r"`alphas` must all be in \[0, 1\]"),
        (
            {"temperatures": (1.0, 1.5, 2.0), "temperature_schedule": (1.0, 3.0)},
            r"give either `temperatures` \(per stage\) or `temperature_schedule` \(rising\), not both",
        ),
        ({"trigger": "epochs"}, r"`trigger` must be one of \('time', 'loss_plateau', 'val_metric'\), got 'epochs'"),
        ({"stage_ends": (0.5,)}, r"`stage_ends` needs 2 increasing values in \(0, 1\)"),
        ({"stage_ends": (0.7, 0.4)}, r"`stage_ends` needs 2 increasing values"),
        ({"stage_ends": (0.4, 1.0)}, r"`stage_ends` needs 2 increasing values"),
        ({"signals": ("teacher_loss", "rouge")}, r"unknown signal 'rouge'"),
        ({"signals": ()}, r"`signals` needs at least one difficulty signal"),
        ({"rrf_k": -1}, r"`rrf_k` must be >= 0, got -1"),
    ],
)
def test_bad_arguments_are_rejected(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ProgressiveCurriculum(**kwargs)


def test_defaults_are_valid():
    pocl = ProgressiveCurriculum()
    assert pocl.fractions == [1 / 3, 2 / 3, 1.0]
    assert pocl.stage_ends == [1 / 3, 2 / 3]
    assert pocl.rrf_k == 60 and pocl.trigger == "time"


def test_dataloaders_passed_directly_to_fit_are_rejected(make_trainer):
    dm = DigitsDataModule(batch_size=64, shuffle_seed=0)
    dm.setup("fit")
    module = _kd(num_classes=10)  # no datamodule to probe: the module itself is fine
    pocl = _pocl()
    with pytest.raises(ValueError, match=r"dataloaders passed directly to `fit` cannot be re-subset"):
        make_trainer(limit_train_batches=1, callbacks=[pocl]).fit(module, train_dataloaders=dm.train_dataloader())
