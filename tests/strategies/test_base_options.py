"""The options every strategy inherits from ``DistillationModule`` (``strategies/base.py``).

Label-free batches, function matching, pseudo-labels, the teacher cache, a reduced-precision
teacher, channels_last, ``compile``, the training-step logging cadence and bf16-mixed training.
Every test compares with a value computed independently here (never just "it ran").
"""

from __future__ import annotations

import copy
import csv
import functools
import math
import re
from pathlib import Path
from typing import Any, Optional

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import CSVLogger
from test_contract import STRATEGIES  # tests/strategies is on sys.path (rootdir-less test dirs)
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from lightning_distill import CRD, DistillationModule, FeatureDistillation, KnowledgeDistillation, MutualLearning
from lightning_distill.augment import FunctionMatching
from lightning_distill.cache import TeacherCache
from lightning_distill.callbacks import ChannelsLast, CompileModels
from lightning_distill.data import DigitsDataModule
from lightning_distill.losses import kd_loss
from lightning_distill.models import DigitsCNN, DigitsMLP, DigitsStudentCNN

pytestmark = pytest.mark.usefixtures("single_thread")

IGNORE = -100
T, ALPHA = 4.0, 0.7  # the KD row of the contract test

#: loss terms that come from hard labels only (0 when a batch has none)
_HARD = re.compile(r"^(task_loss|teacher_loss|head\d+_ce)$")


# ------------------------------------------------------------------------------------------ helpers
def _kd(**kwargs: Any) -> KnowledgeDistillation:
    """The contract test's KD settings, plus base-class options."""
    return KnowledgeDistillation(
        DigitsStudentCNN(), DigitsCNN(), teacher_checkpoint="zoo:digits_cnn", temperature=T, alpha=ALPHA, **kwargs
    )


def _feature(**kwargs: Any) -> FeatureDistillation:
    """The contract test's FeatureDistillation settings, plus base-class options."""
    return FeatureDistillation(
        DigitsStudentCNN(), DigitsCNN(), teacher_checkpoint="zoo:digits_cnn",
        layer_map={"block2": "block1", "block1": "block1.0"}, feature_loss="mse", feature_weight=[1.0, 0.5],
        projection_lr=0.01, **kwargs,
    )


def _digits_batch(n: int = 32) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    dm = DigitsDataModule()
    dm.setup()
    ds = dm.train_dataset
    return ds.inputs[:n].clone(), ds.targets[:n].clone(), torch.arange(n)


def _fit_trainer(make_trainer, **kwargs: Any) -> L.Trainer:
    defaults = dict(max_epochs=1, limit_val_batches=0, num_sanity_val_steps=0)
    defaults.update(kwargs)
    return make_trainer(**defaults)


def _state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _assert_states_close(a: dict, b: dict, atol: float) -> None:
    assert a.keys() == b.keys()
    for key in a:
        if a[key].is_floating_point():
            torch.testing.assert_close(a[key], b[key], rtol=0.0, atol=atol, msg=key)
        else:
            assert torch.equal(a[key], b[key]), key


class _Steps(L.Callback):
    """Per-step ``train/loss`` (as logged) and the teacher's forward calls inside / outside training steps."""

    def __init__(self, module_attr: str = "teacher") -> None:
        self.module_attr = module_attr
        self.losses: list[float] = []
        self.returned: list[float] = []
        self.teacher_calls_in_steps = 0
        self.teacher_calls_outside_steps = 0  # from on_train_start on: the cache build
        self._in_step = False
        self._handle = None

    def on_train_start(self, trainer, pl_module):  # runs before the module's on_train_start (the build)
        def hook(module, args):
            if self._in_step:
                self.teacher_calls_in_steps += 1
            else:
                self.teacher_calls_outside_steps += 1

        self._handle = getattr(pl_module, self.module_attr).register_forward_pre_hook(hook)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._in_step = True

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._in_step = False
        self.losses.append(float(trainer.callback_metrics["train/loss"]))
        self.returned.append(float(outputs["loss"] if isinstance(outputs, dict) else outputs))

    def on_train_end(self, trainer, pl_module):
        self._handle.remove()


def _hand_kd(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * mean_i sum_c p_T log(p_T / p_S), written out (float64)."""
    log_ps = F.log_softmax(student_logits.double() / temperature, -1)
    log_pt = F.log_softmax(teacher_logits.double() / temperature, -1)
    return temperature**2 * (log_pt.exp() * (log_pt - log_ps)).sum(-1).mean()


# ------------------------------------------------------------------------------------------ label-free batches
@pytest.mark.parametrize("cls", list(STRATEGIES), ids=lambda c: c.__name__)
def test_label_free_batches_every_strategy(cls, digits_dm, make_trainer, seeded):
    module = STRATEGIES[cls](DigitsStudentCNN(), DigitsCNN())
    # one real step builds every lazy part (probe projections, CRD banks, the learned gate, ...)
    _fit_trainer(make_trainer, max_steps=1, limit_train_batches=1).fit(module, datamodule=digits_dm)
    module.eval()  # deterministic forwards (dropout of trained peers / online teachers off)
    x, y, index = _digits_batch(16)

    none_terms, none_batch = module.training_terms((x, None, index))
    ignored_terms, ignored_batch = module.training_terms((x, torch.full_like(y, IGNORE), index))
    labelled_terms, _ = module.training_terms((x, y, index))

    assert none_batch.target is None  # pseudo_labels is off: nothing invents labels
    assert torch.equal(ignored_batch.target, torch.full_like(y, IGNORE))
    hard = [k for k in none_terms if _HARD.match(k)]
    assert "task_loss" in hard
    for terms in (none_terms, ignored_terms):
        assert set(terms) == set(labelled_terms)
        for name, value in terms.items():
            assert torch.isfinite(value).all(), f"{name} = {value}"
        for name in hard:
            assert terms[name].item() == 0.0, f"{name} = {terms[name]} without labels"
    # with labels the hard terms are not 0 (so the check above can fail)
    assert all(labelled_terms[name].item() > 0 for name in hard)
    if cls is not CRD:  # CRD draws fresh negatives and updates its banks at every call
        for name in none_terms:
            assert torch.equal(none_terms[name], ignored_terms[name]), name
    # the loss of an unlabelled batch trains: finite gradients reach the student
    module.zero_grad()
    none_terms, _ = module.training_terms((x, None, index))
    none_terms["loss"].backward()
    grads = [p.grad for p in module.student.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


def test_kd_unlabelled_batch_is_pure_distillation(seeded):
    module = _kd().eval()
    x, _, index = _digits_batch(32)
    with torch.no_grad():
        s, t = module.student(x), module.teacher(x)
    terms, _ = module.training_terms((x, None, index))
    assert terms["task_loss"].item() == 0.0
    expected = ALPHA * kd_loss(s, t, T)
    torch.testing.assert_close(terms["loss"], expected, rtol=0.0, atol=1e-7)
    torch.testing.assert_close(terms["kd_loss"].double(), _hand_kd(s, t, T), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(terms["loss"].double(), ALPHA * _hand_kd(s, t, T), rtol=1e-6, atol=1e-7)


def test_kd_half_labelled_batch_averages_each_term_over_its_own_samples(seeded):
    module = _kd().eval()
    x, y, index = _digits_batch(32)
    target = y.clone()
    target[16:] = IGNORE
    with torch.no_grad():
        s, t = module.student(x), module.teacher(x)
    terms, _ = module.training_terms((x, target, index))
    # task: CE over the 16 labelled samples only, written out
    log_p = F.log_softmax(s.double(), -1)
    expected_task = -sum(log_p[i, y[i]] for i in range(16)) / 16
    torch.testing.assert_close(terms["task_loss"].double(), expected_task, rtol=1e-6, atol=1e-7)
    assert not math.isclose(terms["task_loss"].item(), (expected_task * 16 / 32).item(), rel_tol=1e-3)
    # kd: over all 32 samples
    torch.testing.assert_close(terms["kd_loss"].double(), _hand_kd(s, t, T), rtol=1e-6, atol=1e-7)
    assert not math.isclose(terms["kd_loss"].item(), _hand_kd(s[:16], t[:16], T).item(), rel_tol=1e-3)
    torch.testing.assert_close(
        terms["loss"].double(), (1 - ALPHA) * expected_task + ALPHA * _hand_kd(s, t, T), rtol=1e-6, atol=1e-7
    )


# ------------------------------------------------------------------------------------------ function matching
class _Inputs(L.Callback):
    """The raw batch and what teacher and student received during the (single) training step."""

    def __init__(self) -> None:
        self.batch = None
        self.teacher_inputs: list[torch.Tensor] = []
        self.student_inputs: list[torch.Tensor] = []
        self.student_outputs: list[torch.Tensor] = []
        self._handles: list = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.batch = tuple(b.clone() if isinstance(b, torch.Tensor) else b for b in batch)
        self._handles = [
            pl_module.teacher.register_forward_pre_hook(lambda m, a: self.teacher_inputs.append(a[0].detach().clone())),
            pl_module.student.register_forward_pre_hook(lambda m, a: self.student_inputs.append(a[0].detach().clone())),
            pl_module.student.register_forward_hook(lambda m, a, o: self.student_outputs.append(o.detach().clone())),
        ]

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        for h in self._handles:
            h.remove()


def _spy_training_terms(module: DistillationModule) -> list:
    seen: list = []
    original = module.training_terms

    def spy(batch):
        terms, b = original(batch)
        seen.append(({k: v.detach().clone() for k, v in terms.items()}, b))
        return terms, b

    module.training_terms = spy
    return seen


def test_function_matching_one_augmentation_for_both_models(digits_dm, make_trainer, seeded):
    module = _kd(function_matching=FunctionMatching(mixup_alpha=1.0, seed=0))
    rec = _Inputs()
    seen = _spy_training_terms(module)
    _fit_trainer(make_trainer, max_steps=1, limit_train_batches=1, callbacks=[rec]).fit(module, datamodule=digits_dm)

    x_raw, y_raw, _ = rec.batch
    assert len(rec.teacher_inputs) == 1 and len(rec.student_inputs) == 1  # one forward each
    teacher_in, student_in = rec.teacher_inputs[0], rec.student_inputs[0]
    assert torch.equal(teacher_in, student_in)  # bitwise the same tensor
    assert teacher_in.shape == x_raw.shape and not torch.allclose(teacher_in, x_raw, atol=1e-3)
    # exactly the augmentation an independent FunctionMatching with the same seed draws for this batch
    expected_x, expected_y, info = FunctionMatching(mixup_alpha=1.0, seed=0)(x_raw, y_raw)
    assert info["mode"] == "mixup" and bool(info["mixed"].any())
    assert torch.equal(student_in, expected_x)
    # the batch the losses saw: mixed samples have no label, the others keep theirs
    (terms, b), = seen
    mixed = info["mixed"]
    assert torch.equal(b.target, expected_y)
    assert bool((b.target[mixed] == IGNORE).all()) and torch.equal(b.target[~mixed], y_raw[~mixed])
    assert torch.equal(b.input, student_in)
    # the task term only counts unmixed samples
    logits = rec.student_outputs[0]
    expected_task = F.cross_entropy(logits[~mixed], y_raw[~mixed]) if bool((~mixed).any()) else torch.tensor(0.0)
    torch.testing.assert_close(terms["task_loss"], expected_task, rtol=1e-6, atol=1e-7)


def test_without_function_matching_models_see_the_raw_batch(digits_dm, make_trainer, seeded):
    module = _kd()
    rec = _Inputs()
    seen = _spy_training_terms(module)
    _fit_trainer(make_trainer, max_steps=1, limit_train_batches=1, callbacks=[rec]).fit(module, datamodule=digits_dm)
    x_raw, y_raw, _ = rec.batch
    assert torch.equal(rec.teacher_inputs[0], x_raw) and torch.equal(rec.student_inputs[0], x_raw)
    assert torch.equal(seen[0][1].target, y_raw)


# ------------------------------------------------------------------------------------------ pseudo-labels
def _teacher_view(module: DistillationModule, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        probs = module.teacher(x).softmax(-1)
    conf, guess = probs.max(-1)
    return conf, guess, module.student(x).detach()


def test_pseudo_labels_threshold_zero_labels_every_unlabelled_sample(seeded):
    module = _kd(pseudo_labels=0.0).eval()
    x, y, index = _digits_batch(32)
    _, guess, s = _teacher_view(module, x)
    for target in (None, torch.full_like(y, IGNORE)):
        terms, b = module.training_terms((x, target, index))
        assert torch.equal(b.target, guess)
        torch.testing.assert_close(terms["task_loss"], F.cross_entropy(s, guess), rtol=1e-6, atol=1e-7)
    # labelled samples keep their own label (chosen to differ from the teacher's guess)
    target = (guess + 1) % 10
    target[16:] = IGNORE
    terms, b = module.training_terms((x, target, index))
    assert torch.equal(b.target[:16], (guess[:16] + 1) % 10) and torch.equal(b.target[16:], guess[16:])
    torch.testing.assert_close(terms["task_loss"], F.cross_entropy(s, b.target), rtol=1e-6, atol=1e-7)


def test_pseudo_labels_threshold_one_labels_nothing(seeded):
    module = _kd(pseudo_labels=1.0).eval()
    x, y, index = _digits_batch(32)
    conf, _, _ = _teacher_view(module, x)
    assert bool((conf < 1.0).all())  # no float32 softmax saturates to exactly 1 on these samples
    terms, b = module.training_terms((x, None, index))
    assert torch.equal(b.target, torch.full_like(y, IGNORE))
    assert terms["task_loss"].item() == 0.0
    target = y.clone()
    target[16:] = IGNORE
    _, b = module.training_terms((x, target, index))
    assert torch.equal(b.target, target)


def test_pseudo_labels_intermediate_threshold(seeded):
    x, y, index = _digits_batch(64)
    probe = _kd().eval()
    conf, guess, _ = _teacher_view(probe, x)
    threshold = float(conf.median())
    module = _kd(pseudo_labels=threshold).eval()
    _, _, s = _teacher_view(module, x)
    expected = torch.where(conf >= threshold, guess, torch.full_like(guess, IGNORE))
    assert 0 < int((expected != IGNORE).sum()) < 64  # some, not all
    terms, b = module.training_terms((x, None, index))
    assert torch.equal(b.target, expected)
    keep = expected != IGNORE
    torch.testing.assert_close(terms["task_loss"], F.cross_entropy(s[keep], expected[keep]), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(terms["kd_loss"], kd_loss(s, module.teacher(x).detach(), T), rtol=1e-6, atol=1e-7)




@pytest.mark.parametrize(
    "cls",
    [pytest.param(c, id=c.__name__) for c in STRATEGIES],
)
def test_pseudo_labels_every_strategy_with_a_frozen_teacher(cls, digits_dm, make_trainer, seeded):
    module = STRATEGIES[cls](DigitsStudentCNN(), DigitsCNN())
    if module.teacher is None:
        pytest.skip(f"{cls.__name__} has no frozen teacher: pseudo_labels is refused at construction")
    _fit_trainer(make_trainer, max_steps=1, limit_train_batches=1).fit(module, datamodule=digits_dm)
    module.pseudo_labels = 0.0  # what pseudo_labels=0.0 at construction sets
    module.eval()
    x, _, index = _digits_batch(16)
    terms, b = module.training_terms((x, None, index))
    assert b.target is not None and b.target.shape == (16,)
    assert bool(((b.target >= 0) & (b.target < 10)).all())
    teacher_logits = module.teacher_forward(x)
    if teacher_logits.ndim == 2:
        assert torch.equal(b.target, teacher_logits.argmax(-1))
    assert all(torch.isfinite(v).all() for v in terms.values())
    assert terms["task_loss"].item() > 0  # the pseudo labels reach the hard-label term


# ------------------------------------------------------------------------------------------ teacher cache
def _fit_steps(module, make_trainer, dm, steps: int = 3, **kwargs) -> _Steps:
    rec = _Steps()
    _fit_trainer(make_trainer, limit_train_batches=steps, log_every_n_steps=1, callbacks=[rec], **kwargs).fit(
        module, datamodule=dm
    )
    return rec


@pytest.mark.parametrize("build", [_kd, _feature], ids=["KnowledgeDistillation", "FeatureDistillation"])
def test_memory_cache_trains_like_the_live_teacher(build, make_trainer):
    dm = DigitsDataModule(batch_size=64, shuffle_seed=0)
    torch.manual_seed(0)
    live = build()
    live_rec = _fit_steps(live, make_trainer, dm)
    torch.manual_seed(0)
    cache = TeacherCache(storage="memory", progress=False)
    cached = build(teacher_cache=cache)
    cached_rec = _fit_steps(cached, make_trainer, dm)

    assert cache.is_built and len(cache) == len(dm.train_dataset)
    if build is _feature:
        assert set(cache.fields) == {"logits", "feat:block2", "feat:block1"}
    # the teacher ran at the build (ceil(1079 / 256) = 5 batches), never inside a training step
    assert cached_rec.teacher_calls_outside_steps == math.ceil(len(dm.train_dataset) / cache.batch_size)
    assert cached_rec.teacher_calls_in_steps == 0
    assert live_rec.teacher_calls_in_steps == 3 and live_rec.teacher_calls_outside_steps == 0
    assert len(cached_rec.losses) == 3 and cached_rec.losses == cached_rec.returned
    torch.testing.assert_close(torch.tensor(cached_rec.losses), torch.tensor(live_rec.losses), rtol=0.0, atol=1e-6)
    assert live_rec.losses[0] != live_rec.losses[-1]  # it trained
    _assert_states_close(_state(cached.student), _state(live.student), atol=1e-6)
    if build is _feature:
        _assert_states_close(_state(cached.projections), _state(live.projections), atol=1e-6)


def test_disk_cache_is_reused_by_a_second_fit(make_trainer, tmp_path):
    dm = DigitsDataModule(batch_size=64, shuffle_seed=0)
    directory = tmp_path / "teacher_cache"
    runs = []
    for _ in range(2):
        torch.manual_seed(0)
        cache = TeacherCache(storage="disk", directory=str(directory), progress=False)
        module = _kd(teacher_cache=cache)
        runs.append((cache, _fit_steps(module, make_trainer, dm), _state(module.student)))
    (first, first_rec, first_state), (second, second_rec, second_state) = runs
    assert first_rec.teacher_calls_outside_steps == math.ceil(len(dm.train_dataset) / first.batch_size)
    assert second_rec.teacher_calls_outside_steps == 0  # reopened, not rebuilt
    assert first_rec.teacher_calls_in_steps == second_rec.teacher_calls_in_steps == 0
    assert first.path == second.path and second.path.parent == directory
    assert [p.name for p in directory.iterdir()] == [first.key]  # one complete cache, no temporary folder
    assert first_rec.losses == second_rec.losses
    _assert_states_close(first_state, second_state, atol=0.0)


def test_teacher_cache_refused_with_function_matching():
    with pytest.raises(ValueError, match="cannot be combined with `function_matching`"):
        _kd(teacher_cache=TeacherCache(progress=False), function_matching=FunctionMatching())


@pytest.mark.parametrize("cls", [CRD, MutualLearning], ids=lambda c: c.__name__)
def test_teacher_cache_refused_by_strategies_without_support(cls):
    assert cls.supports_teacher_cache is False
    student, teacher = DigitsStudentCNN(), DigitsCNN()
    kwargs = dict(teacher_cache=TeacherCache(progress=False))
    with pytest.raises(ValueError, match=f"{cls.__name__} cannot use `teacher_cache`"):
        if cls is CRD:
            CRD(student, teacher, student_layer="block2", teacher_layer="block3", feat_dim=16, num_negatives=64, **kwargs)
        else:
            MutualLearning(student, teacher, num_students=2, seed=0, **kwargs)


def test_strategies_that_refuse_the_teacher_cache():
    refusing = {cls.__name__ for cls in STRATEGIES if not cls.supports_teacher_cache}
    assert refusing == {"CRD", "MutualLearning", "OnlineDistillation", "BornAgain", "MultiTeacherDistillation"}


def test_teacher_cache_refused_by_online_distillation():
    from lightning_distill import OnlineDistillation

    # it has no frozen teacher, so it takes no frozen-teacher options at all
    with pytest.raises(TypeError, match="OnlineDistillation.__init__\\(\\) got an unexpected keyword argument 'teacher_cache'"):
        OnlineDistillation(DigitsStudentCNN(), DigitsCNN(), teacher_cache=TeacherCache(progress=False))


def test_teacher_cache_refused_with_teacher_train_mode():
    with pytest.raises(ValueError, match="cannot be combined with teacher_train_mode=True"):
        _kd(teacher_cache=TeacherCache(progress=False), teacher_train_mode=True)


def test_teacher_cache_refused_for_batches_without_index(make_trainer):
    x, y, _ = _digits_batch(64)
    loader = DataLoader(TensorDataset(x, y), batch_size=32)
    module = _kd(teacher_cache=TeacherCache(progress=False), num_classes=10)
    with pytest.raises(ValueError, match="training batches carry none"):
        _fit_trainer(make_trainer, max_steps=1).fit(module, train_dataloaders=loader)


class _TensorIndexed(Dataset):
    """(input, target, index) samples from two tensors, without an ``inputs`` attribute or a datamodule."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        return self.x[i], self.y[i], i


class RandomNoise:
    """A random transform, recognised by its name."""

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x + 0.01 * torch.randn_like(x)


class Jitter(RandomNoise):
    """The same random transform under an innocent name: only reloading samples finds it."""


class _TransformedDigits(Dataset):
    def __init__(self, transform) -> None:
        self.inputs, self.targets, _ = _digits_batch(64)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.inputs)

    def __getitem__(self, i: int):
        return self.transform(self.inputs[i]), self.targets[i], i


@pytest.mark.parametrize("transform", [RandomNoise, Jitter], ids=["by-name", "by-reloading"])
def test_teacher_cache_refused_for_random_transforms(transform, make_trainer):
    loader = DataLoader(_TransformedDigits(transform()), batch_size=32)
    module = _kd(teacher_cache=TeacherCache(progress=False), num_classes=10)
    with pytest.raises(ValueError, match="does not give the teacher the same input every epoch"):
        _fit_trainer(make_trainer, max_steps=1).fit(module, train_dataloaders=loader)


# ------------------------------------------------------------------------------------------ teacher dtype
def _param_bytes(module: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def test_bfloat16_teacher_is_held_in_bfloat16(seeded):
    module = _kd(teacher_dtype="bfloat16")
    reference = copy.deepcopy(module.teacher)
    assert all(p.dtype == torch.bfloat16 for p in module.teacher.parameters())
    assert all(b.dtype == torch.bfloat16 for b in module.teacher.buffers() if b.is_floating_point())
    assert all(p.dtype == torch.float32 for p in module.student.parameters())
    assert 2 * _param_bytes(module.teacher) == _param_bytes(DigitsCNN())
    x, _, _ = _digits_batch(16)
    out = module.teacher_forward(x)
    assert out.dtype == torch.float32
    with torch.no_grad():
        assert torch.equal(out, reference(x.to(torch.bfloat16)).float())
        # close to the float32 teacher it was made from (bf16 rounding only), but not equal
        fp32 = _kd().teacher(x)
    torch.testing.assert_close(out, fp32, rtol=0.05, atol=0.1)
    assert not torch.equal(out, fp32)


def _bf16_fit(module, make_trainer, **fit_kwargs) -> _Steps:
    rec = _Steps()
    _fit_trainer(make_trainer, limit_train_batches=2, limit_val_batches=1, log_every_n_steps=1, callbacks=[rec]).fit(
        module, **fit_kwargs
    )
    return rec


def _assert_bf16_fit(module, rec, before) -> None:
    assert len(rec.losses) == 2 and all(math.isfinite(v) for v in rec.losses)
    assert rec.teacher_calls_in_steps == 2
    after = module.teacher.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())
    assert all(p.dtype == torch.bfloat16 for p in module.teacher.parameters())
    assert math.isfinite(float(module.trainer.callback_metrics["val/kl"]))


def test_bfloat16_teacher_short_fit_without_probe(make_trainer, seeded):
    # plain loaders and num_classes: setup() has no example input, so no shape probe runs
    x, y, _ = _digits_batch(128)
    train = DataLoader(_TensorIndexed(x[:96], y[:96]), batch_size=32)
    val = DataLoader(_TensorIndexed(x[96:], y[96:]), batch_size=32)
    module = _kd(teacher_dtype="bfloat16", num_classes=10)
    before = _state(module.teacher)
    rec = _bf16_fit(module, make_trainer, train_dataloaders=train, val_dataloaders=val)
    _assert_bf16_fit(module, rec, before)


def test_bfloat16_teacher_fit_with_datamodule(digits_dm, make_trainer, seeded):
    module = _kd(teacher_dtype="bfloat16")
    before = _state(module.teacher)
    rec = _bf16_fit(module, make_trainer, datamodule=digits_dm)
    _assert_bf16_fit(module, rec, before)


# ------------------------------------------------------------------------------------------ channels_last
def test_channels_last_matches_contiguous(seeded):
    student, teacher = DigitsStudentCNN(), DigitsCNN()
    plain = KnowledgeDistillation(copy.deepcopy(student), copy.deepcopy(teacher), temperature=T, alpha=ALPHA)
    cl = KnowledgeDistillation(student, teacher, temperature=T, alpha=ALPHA)
    ChannelsLast().setup(None, cl, "fit")  # what the callback does before anything runs
    convs = [m for m in cl.student.modules() if isinstance(m, nn.Conv2d)]
    assert convs and all(m.weight.is_contiguous(memory_format=torch.channels_last) for m in convs)
    assert not convs[-1].weight.is_contiguous()  # 4 -> 8 channels: really converted, not trivially both
    assert all(
        m.weight.is_contiguous(memory_format=torch.channels_last) for m in cl.teacher.modules() if isinstance(m, nn.Conv2d)
    )
    assert all(
        m.weight.is_contiguous() for m in plain.student.modules() if isinstance(m, nn.Conv2d)
    )
    for a, b in zip(cl.student.parameters(), plain.student.parameters()):
        assert torch.equal(a, b)

    x, y, index = _digits_batch(32)
    cl.train()
    plain.train()
    first_conv_outputs = []
    hook = convs[0].register_forward_hook(lambda m, a, out: first_conv_outputs.append(out))
    cl_terms, cl_batch = cl.training_terms((x, y, index))
    hook.remove()
    plain_terms, _ = plain.training_terms((x, y, index))
    # the forward runs in channels_last: a channels_last weight makes the convolution's output channels_last
    assert first_conv_outputs[0].is_contiguous(memory_format=torch.channels_last)
    for name in plain_terms:
        torch.testing.assert_close(cl_terms[name], plain_terms[name], rtol=0.0, atol=1e-5)
    cl_terms["loss"].backward()
    plain_terms["loss"].backward()
    for (name, a), b in zip(cl.student.named_parameters(), plain.student.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-5, msg=name)


# ------------------------------------------------------------------------------------------ compile
@functools.lru_cache(maxsize=1)
def _inductor_problem() -> Optional[str]:
    """Why torch.compile (inductor) cannot run here, or None when it works (probed once)."""
    try:
        fn = torch.compile(lambda v: torch.sin(v) * 2.0 + 1.0, backend="inductor")
        v = torch.arange(4.0)
        if not torch.allclose(fn(v), torch.sin(v) * 2.0 + 1.0):
            return "torch.compile gave a wrong result"
    except Exception as err:  # noqa: BLE001 - any failure means: no working compiler toolchain
        return f"torch.compile (inductor) does not work on this machine: {type(err).__name__}: {err}"
    return None


def test_compile_student_trains_like_eager(digits_dm, make_trainer):
    problem = _inductor_problem()
    if problem is not None:
        pytest.skip(problem)
    runs = {}
    for mode in (None, "student"):
        torch.manual_seed(0)
        # the MLP student keeps the (cold) inductor compile short
        module = KnowledgeDistillation(
            DigitsMLP(), DigitsCNN(), teacher_checkpoint="zoo:digits_cnn", temperature=T, alpha=ALPHA
        )
        rec = _Steps()
        compile_cb = [CompileModels(mode)] if mode is not None else []
        _fit_trainer(make_trainer, limit_train_batches=2, log_every_n_steps=1, callbacks=[rec, *compile_cb]).fit(
            module, datamodule=digits_dm
        )
        runs[mode] = (module, rec)
    (eager, eager_rec), (compiled, compiled_rec) = runs[None], runs["student"]
    assert compiled.student._compiled_call_impl is not None and eager.student._compiled_call_impl is None
    assert compiled.teacher._compiled_call_impl is None
    assert list(compiled.state_dict()) == list(eager.state_dict())  # names (and checkpoints) unchanged
    assert len(compiled_rec.losses) == 2
    torch.testing.assert_close(torch.tensor(compiled_rec.losses), torch.tensor(eager_rec.losses), rtol=0.0, atol=1e-4)
    _assert_states_close(_state(compiled.student), _state(eager.student), atol=1e-4)


# ------------------------------------------------------------------------------------------ logging cadence
def _expected_log_batches(batches: int, epochs: int, every: int) -> list[int]:
    """Global step indices (batches_that_stepped before the step) of the steps that call self.log."""
    out = []
    for epoch in range(epochs):
        for i in range(batches):
            step = epoch * batches + i
            if (step + 1) % every == 0 or i == 0 or i == batches - 1:
                out.append(step)
    return out


@pytest.mark.parametrize(("batches", "epochs"), [(7, 1), (4, 2)])
def test_training_terms_are_logged_only_on_log_steps(batches, epochs, digits_dm, make_trainer, seeded):
    module = _kd()
    calls: list[int] = []
    original_log = module.log

    def counting_log(name, value, *args, **kwargs):
        if name == "train/loss":
            calls.append(module.global_step)
        return original_log(name, value, *args, **kwargs)

    module.log = counting_log
    rec = _Steps()
    _fit_trainer(
        make_trainer, limit_train_batches=batches, max_epochs=epochs, log_every_n_steps=3, callbacks=[rec]
    ).fit(module, datamodule=digits_dm)
    expected = _expected_log_batches(batches, epochs, 3)
    assert calls == expected  # e.g. 7 batches: [0, 2, 5, 6]
    assert len(rec.returned) == batches * epochs
    assert float(module.trainer.callback_metrics["train/loss"]) == rec.returned[-1]


@pytest.mark.parametrize("progress_bar", [True, False])
def test_loss_goes_to_the_progress_bar_only_when_there_is_one(progress_bar, digits_dm, make_trainer, seeded):
    # Lightning converts progress-bar values to Python numbers after every batch (a device sync on a GPU)
    module = _kd()
    trainer = _fit_trainer(make_trainer, limit_train_batches=2, enable_progress_bar=progress_bar)
    trainer.fit(module, datamodule=digits_dm)
    assert ("train/loss" in trainer.progress_bar_metrics) is progress_bar
    assert "train/loss" in trainer.callback_metrics and "train/kd_loss" in trainer.callback_metrics


def _csv_rows(make_trainer, dm, tmp_path: Path, name: str) -> list[tuple[int, str]]:
    torch.manual_seed(0)
    module = _kd()
    logger = CSVLogger(save_dir=str(tmp_path), name=name)
    _fit_trainer(make_trainer, limit_train_batches=7, log_every_n_steps=3, logger=logger).fit(module, datamodule=dm)
    with open(Path(logger.log_dir) / "metrics.csv") as f:
        return [(int(r["step"]), r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")]


def test_logger_rows_are_those_of_every_step_logging(make_trainer, tmp_path, monkeypatch):
    dm = DigitsDataModule(batch_size=64, shuffle_seed=0)
    rows = _csv_rows(make_trainer, dm, tmp_path, "sparse")
    monkeypatch.setattr(DistillationModule, "should_log_step", lambda self: True)
    reference = _csv_rows(make_trainer, dm, tmp_path, "every_step")
    assert rows == reference  # same steps, same values
    # Lightning writes when (batches_that_stepped + 1) % 3 == 0, i.e. after steps 2 and 5 of 0..6
    assert [step for step, _ in rows] == [2, 5]


# ------------------------------------------------------------------------------------------ bf16-mixed
class _Terms(L.Callback):
    def __init__(self) -> None:
        self.logged: list[dict[str, float]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.logged.append({k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("train/")})


@pytest.mark.parametrize("cls", list(STRATEGIES), ids=lambda c: c.__name__)
def test_bf16_mixed_every_strategy(cls, digits_dm, make_trainer, seeded):
    module = STRATEGIES[cls](DigitsStudentCNN(), DigitsCNN())
    dtypes: list[tuple[torch.dtype, dict[str, torch.dtype]]] = []
    original = module.distillation_losses

    def spy(student_logits, teacher_logits, batch):
        terms = original(student_logits, teacher_logits, batch)
        first = student_logits[0] if isinstance(student_logits, (list, tuple)) else student_logits
        first = getattr(first, "logits", first)  # the outputs of forward_models
        dtypes.append((first.dtype, {k: v.dtype for k, v in terms.items()}))
        return terms

    module.distillation_losses = spy
    rec = _Terms()
    _fit_trainer(
        make_trainer, precision="bf16-mixed", limit_train_batches=2, limit_val_batches=1, log_every_n_steps=1,
        callbacks=[rec],
    ).fit(module, datamodule=digits_dm)

    assert len(rec.logged) == 2 and all("train/loss" in step for step in rec.logged)
    for step in rec.logged:
        bad = {k: v for k, v in step.items() if not math.isfinite(v)}
        assert not bad, bad
    assert len(dtypes) == 2
    for logits_dtype, term_dtypes in dtypes:
        assert logits_dtype == torch.bfloat16  # autocast was on: the student ran in bf16
        for name in ("loss", "kd_loss", "task_loss", "feature_loss", "crd_loss"):
            if name in term_dtypes:
                assert term_dtypes[name] == torch.float32, (name, term_dtypes[name])
    assert math.isfinite(float(module.trainer.callback_metrics["val/loss"]))


# ------------------------------------------------------------------------------------------ construction errors
@pytest.mark.parametrize("bad", [1.5, -0.1])
def test_bad_pseudo_labels_raises(bad):
    with pytest.raises(ValueError, match=r"`pseudo_labels` must be in \[0, 1\]"):
        _kd(pseudo_labels=bad)


def test_bad_teacher_dtype_raises():
    with pytest.raises(ValueError, match=r"`teacher_dtype` must be one of .*'int8'"):
        _kd(teacher_dtype="int8")


def test_bad_compile_raises():
    with pytest.raises(ValueError, match=r"`models` must be one of .*'all'"):
        CompileModels("all")


@pytest.mark.parametrize("bad", [{"mixup_alpha": 1.0}, nn.Identity()], ids=["dict", "module"])
def test_function_matching_of_wrong_type_raises(bad):
    with pytest.raises(TypeError, match="`function_matching` must be a lightning_distill.augment.FunctionMatching"):
        _kd(function_matching=bad)


def test_teacher_cache_of_wrong_type_raises():
    with pytest.raises(TypeError, match="`teacher_cache` must be a lightning_distill.cache.TeacherCache"):
        _kd(teacher_cache={"storage": "memory"})


def test_pseudo_labels_without_teacher_raises():
    with pytest.raises(ValueError, match="`pseudo_labels` needs a frozen teacher to label samples, but MutualLearning has none"):
        MutualLearning(DigitsStudentCNN(), teacher=None, num_students=2, seed=0, pseudo_labels=0.5)


# ----------------------------------------------------------------------------- review fixes
def test_function_matching_checkpoints_load_with_and_without_the_option(digits_dm, make_trainer, tmp_path, seeded):
    module = _kd(function_matching=FunctionMatching(seed=0))
    trainer = make_trainer(max_epochs=1, limit_train_batches=2, limit_val_batches=0, default_root_dir=tmp_path,
                           enable_checkpointing=True)
    trainer.fit(module, datamodule=digits_dm)
    ckpt = next(tmp_path.rglob("*.ckpt"))
    state = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    assert any(k.startswith("function_matching.") for k in state)
    plain = KnowledgeDistillation.load_from_checkpoint(ckpt, student=DigitsStudentCNN(), teacher=DigitsCNN(), weights_only=True)
    for key, value in plain.student.state_dict().items():
        assert torch.equal(value, module.student.state_dict()[key])
    # the other way round: a plain checkpoint into a module that adds function matching
    fm = FunctionMatching(seed=3)
    before = fm.state_dict()
    stripped = {k: v for k, v in state.items() if not k.startswith("function_matching.")}
    other = _kd(function_matching=fm)
    other.load_state_dict(stripped)
    for key, value in plain.student.state_dict().items():
        assert torch.equal(other.student.state_dict()[key], value)
    assert fm.state_dict().keys() == before.keys()


def test_cache_key_depends_on_the_selected_tuple_element():
    def tag(select):
        return FeatureDistillation(DigitsStudentCNN(), DigitsCNN(), layer_map={"block2": "block1"},
                                   teacher_select=select, teacher_cache=TeacherCache(progress=False)).teacher_source.tag()

    assert tag(0) != tag(1)
    assert tag(0) == tag(None)


def test_max_steps_run_ends_with_current_train_metrics(digits_dm, make_trainer, seeded):
    module = _kd()
    losses = []

    class Rec(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append(float(outputs["loss"]))

    trainer = make_trainer(max_steps=5, limit_val_batches=0, log_every_n_steps=50, callbacks=[Rec()])
    trainer.fit(module, datamodule=digits_dm)
    assert len(losses) == 5
    assert math.isclose(float(trainer.callback_metrics["train/loss"]), losses[-1], rel_tol=1e-6)


def test_perplexity_stays_finite_when_a_probability_underflows():
    from lightning_distill.module import Perplexity

    metric = Perplexity()
    logits = torch.tensor([[0.0, -120.0], [0.0, 0.0]])  # softmax of the target underflows float32
    target = torch.tensor([1, 0])
    metric.update(F.cross_entropy(logits, target, reduction="none"))
    expected = math.exp((120.0 + math.log1p(math.exp(-120.0)) + math.log(2.0)) / 2)
    assert math.isclose(float(metric.compute()), expected, rel_tol=1e-5)


def test_reduced_precision_teacher_keeps_namedtuple_outputs():
    from typing import NamedTuple

    from lightning_distill.teachers import _to_float32

    class Out(NamedTuple):
        logits: torch.Tensor
        feat: torch.Tensor

    out = _to_float32(Out(torch.ones(2, dtype=torch.bfloat16), torch.zeros(1, dtype=torch.float16)))
    assert isinstance(out, Out) and out.logits.dtype == torch.float32 and out.feat.dtype == torch.float32


def test_pseudo_labels_leave_mixed_samples_label_free(seeded):
    module = _kd(function_matching=FunctionMatching(mixup_alpha=1.0, mix_prob=1.0, seed=0), pseudo_labels=0.0,
                 num_classes=10)
    module.train()
    x = torch.rand(8, 1, 8, 8)
    _, seen = module.training_terms((x, torch.full((8,), -100), torch.arange(8)))
    mixed = seen.mixed
    assert mixed is not None and bool(mixed.any())
    assert bool((seen.target[mixed] == -100).all())
    assert bool((seen.target[~mixed] >= 0).all())  # unmixed unlabelled samples got the teacher's class


def test_token_level_pseudo_labels_need_a_mask():
    from lightning_distill.module import Batch

    module = _kd(pseudo_labels=0.5, num_classes=10)
    batch = Batch(torch.zeros(2, 3, dtype=torch.long), torch.tensor([[1, 2, 3], [4, -100, -100]]))
    with pytest.raises(ValueError, match=r"`pseudo_labels` with token-level logits \[N, L, V\] needs the batch's `mask`"):
        module.with_pseudo_labels(batch, torch.randn(2, 3, 10))
