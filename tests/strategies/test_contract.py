"""The teacher contract, asserted for every strategy and every objective after a short real ``fit``.

The contract (see ``lightning_distill.distiller``): the teacher is frozen, always in eval mode, run under
``no_grad`` (not ``inference_mode``), bit-identical after training, never in an optimizer and not in
checkpoints; trained parts receive gradients; a checkpoint restores everything; the loss is finite. Every
case is fed both ways Lightning is fed: a datamodule, and plain ``DataLoader``s passed to ``trainer.fit``.

A new strategy joins by adding one row to ``STRATEGIES`` (``test_every_strategy_is_covered`` fails until it
does). Every objective exported by ``lightning_distill.objectives`` joins automatically inside the general
``DistillationModule`` (built with its defaults; ``OBJECTIVE_ARGS`` holds the few that need arguments). Objectives
that read what only transformers produce (hidden states, attention maps, query / key / value projections) say so
with the class attribute ``requires_transformer``: they run the same contract on a tiny Hugging Face GPT-2 pair
(``HF_OBJECTIVE_ARGS`` holds their tiny settings) instead of the digits CNNs.
"""

from __future__ import annotations

import copy
import inspect

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_distill
from lightning_distill import (
    CRD,
    CTKD,
    BornAgain,
    DistillationModule,
    FeatureDistillation,
    KnowledgeDistillation,
    MultiTeacherDistillation,
    MutualLearning,
    OnlineDistillation,
    QuantAwareDistillation,
    SelfDistillation,
)
from lightning_distill import objectives as objectives_module
from lightning_distill.checkpoint import load_weights
from lightning_distill.models import DigitsCNN, DigitsStudentCNN
from lightning_distill.objectives import (
    AuxiliaryHeads,
    CRDLoss,
    CrossEntropy,
    DistilBERTLoss,
    FeatureMatch,
    MiniLMLoss,
    MultiTeacherKD,
    Objective,
    TinyBERTLoss,
)
from lightning_distill.teachers import FrozenTeacher, TeacherEnsemble


def _kd(student: nn.Module, teacher: nn.Module) -> DistillationModule:
    return KnowledgeDistillation(student, teacher, teacher_checkpoint="zoo:digits_cnn", temperature=4.0, alpha=0.7)


def _feature(student: nn.Module, teacher: nn.Module) -> DistillationModule:
    # conv projections with BatchNorm (student_to_teacher) and a spatial resize (8x8 -> 4x4)
    return FeatureDistillation(
        student, teacher, teacher_checkpoint="zoo:digits_cnn", layer_map={"block2": "block1", "block1": "block1.0"},
        feature_loss="mse", feature_weight=[1.0, 0.5], projection_lr=0.01,
    )


def _crd(student: nn.Module, teacher: nn.Module) -> DistillationModule:
    return CRD(
        student, teacher, teacher_checkpoint="zoo:digits_cnn", student_layer="block2", teacher_layer="block3",
        feat_dim=16, num_negatives=64, alpha=0.3,
    )


def _ctkd(student: nn.Module, teacher: nn.Module) -> DistillationModule:
    # instance mode (an MLP built from the probe) with an anchor and a feature pair: every moving part
    return CTKD(
        student, teacher, teacher_checkpoint="zoo:digits_cnn", temperature_mode="instance", init_temperature=4.0,
        lambda_epochs=1, anchor=4.0, anchor_weight=0.1, temperature_lr=0.01,
        features={"layer_map": {"block3": "block2"}, "loss": "cosine"},
    )


def _self_distillation(student: nn.Module, teacher: nn.Module) -> DistillationModule:
    # no teacher: the network's deepest head teaches heads on its own intermediate layers
    return SelfDistillation(student, exit_layers=["block1.0", "block1"], bottleneck_channels=4)


def _born_again(student: nn.Module, teacher: nn.Module) -> DistillationModule:
    # one generation distilled from the user's teacher (generation hand-over: test_born_again.py)
    return BornAgain(student, generations=1, teacher=teacher, teacher_checkpoint="zoo:digits_cnn", temperature=4.0, alpha=0.7)


def _mutual(student: nn.Module, teacher: nn.Module) -> DistillationModule:
    # two students (the second re-initialised) plus the frozen teacher as an extra, non-trained peer
    return MutualLearning(
        student, teacher, num_students=2, teacher_checkpoint="zoo:digits_cnn", temperature=2.0, alpha=0.5, seed=0
    )


def _online(student: nn.Module, teacher: nn.Module) -> DistillationModule:
    # the teacher trains here; its EMA copy is the frozen part
    return OnlineDistillation(student, teacher, ema_decay=0.9, temperature=3.0, alpha=0.7)


def _multi_teacher(student: nn.Module, teacher: nn.Module) -> DistillationModule:
    return MultiTeacherDistillation(
        student, [teacher, DigitsCNN(dropout=0.5)], teacher_checkpoints=["zoo:digits_cnn", "zoo:digits_cnn"],
        weighting="learned", temperature=4.0, alpha=0.7, gate_hidden=8,
    )


def _quant_aware(student: nn.Module, teacher: nn.Module) -> DistillationModule:
    # ternary conv/linear weights with error diffusion and 8-bit inputs; the head stays float
    return QuantAwareDistillation(
        student, teacher, teacher_checkpoint="zoo:digits_cnn", ternary=True, error_diffusion=0.5,
        activation_bits=8, skip=("head",), temperature=5.0, alpha=0.5,
    )


#: strategy class -> factory(student, teacher) building it with tiny, fast settings
#: (strategies without a frozen teacher ignore ``teacher``; the teacher checks then do not apply)
STRATEGIES = {
    KnowledgeDistillation: _kd,
    FeatureDistillation: _feature,
    CRD: _crd,
    CTKD: _ctkd,
    SelfDistillation: _self_distillation,
    BornAgain: _born_again,
    MutualLearning: _mutual,
    OnlineDistillation: _online,
    MultiTeacherDistillation: _multi_teacher,
    QuantAwareDistillation: _quant_aware,
}


def test_every_strategy_is_covered():
    exported = {
        obj
        for name in lightning_distill.__all__
        if inspect.isclass(obj := getattr(lightning_distill, name))
        and issubclass(obj, DistillationModule)
        and obj is not DistillationModule
    }
    assert exported, "no strategy exported?"
    assert exported == set(STRATEGIES), f"strategies without a contract-test row: {exported - set(STRATEGIES)}"


#: objectives that cannot be built with their defaults -> a factory with tiny settings for the digits models
OBJECTIVE_ARGS = {
    FeatureMatch: lambda: FeatureMatch(layer_map={"block2": "block1"}, loss="mse"),
    CRDLoss: lambda: CRDLoss("block2", "block3", feat_dim=16, num_negatives=64),
    AuxiliaryHeads: lambda: AuxiliaryHeads(["block1.0", "block1"], width=4),
    MultiTeacherKD: lambda: MultiTeacherKD(0.7, weighting="learned", gate_hidden=8),
}


#: transformer objectives (``requires_transformer``) -> a factory with tiny settings for the GPT-2 pair of
#: ``_hf_pair`` (student: 1 layer of width 16; teacher: 2 layers of width 24; 2 heads each)
HF_OBJECTIVE_ARGS = {
    TinyBERTLoss: lambda: TinyBERTLoss(layer_map="learned"),
    MiniLMLoss: lambda: MiniLMLoss(
        "transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn", relations=("query", "key", "value"),
        relation_heads=4, causal=True,
    ),
}


def _exported_objectives() -> list[type]:
    return [
        obj for name in objectives_module.__all__
        if inspect.isclass(obj := getattr(objectives_module, name)) and issubclass(obj, Objective) and obj is not Objective
    ]


def _needs_transformer(cls: type) -> bool:
    """Whether the objective reads what only transformer models produce (it runs on the Hugging Face pair)."""
    return bool(getattr(cls, "requires_transformer", False))


def _objective_case(cls: type):
    """factory(student, teacher) -> DistillationModule with the objective (a task term next to it when it has none)."""

    def build(student: nn.Module, teacher: nn.Module) -> DistillationModule:
        args = HF_OBJECTIVE_ARGS if _needs_transformer(cls) else OBJECTIVE_ARGS
        objective = args[cls]() if cls in args else cls()
        named = {objective.name: objective}
        if cls is not CrossEntropy and not isinstance(objective, (AuxiliaryHeads, DistilBERTLoss)):  # (its own MLM term)
            named = {"task": CrossEntropy(0.5), **named}
        if not objective.needs_teacher:
            source = None  # nothing reads a teacher: the teacher checks do not apply
        elif _needs_transformer(cls):
            source = FrozenTeacher(teacher)  # a randomly initialised Hugging Face model (no zoo checkpoint)
        elif cls is MultiTeacherKD:
            second = DigitsCNN(dropout=0.5)
            for member in (teacher, second):
                load_weights(member, "zoo:digits_cnn")
            source = FrozenTeacher(TeacherEnsemble([teacher, second]))
        else:
            source = FrozenTeacher(teacher, checkpoint="zoo:digits_cnn")
        return DistillationModule(student, source, objectives=named)

    return build


#: every contract case: strategies by class name, objectives as "DistillationModule[<Objective>]"
CASES = {cls.__name__: factory for cls, factory in STRATEGIES.items()} | {
    f"DistillationModule[{cls.__name__}]": _objective_case(cls) for cls in _exported_objectives()
}
#: the cases of transformer objectives: built from the Hugging Face pair, not the digits CNNs
HF_CASES = [f"DistillationModule[{cls.__name__}]" for cls in _exported_objectives() if _needs_transformer(cls)]


def test_every_objective_is_covered():
    exported = _exported_objectives()
    assert {"DKD", "LogitKD", "FeatureMatch", "CRDLoss", "CrossEntropy"} <= {c.__name__ for c in exported}
    for cls in exported:
        assert f"DistillationModule[{cls.__name__}]" in CASES
        if cls not in OBJECTIVE_ARGS and cls not in HF_OBJECTIVE_ARGS:  # built with its defaults: that must work
            cls()
    transformer = {c.__name__ for c in exported if _needs_transformer(c)}
    assert {"TinyBERTLoss", "MiniLMLoss", "DistilBERTLoss", "HiddenStateDynamics"} <= transformer
    assert set(HF_CASES) == {f"DistillationModule[{name}]" for name in transformer}
    assert not {c for c in exported if not _needs_transformer(c)} & set(HF_OBJECTIVE_ARGS)


class _Recorder(L.Callback):
    """Records the teacher's state at every use during training, and optimizer contents."""

    def __init__(self) -> None:
        self.calls: list[tuple[bool, bool, bool]] = []
        self.losses: list[float] = []
        self.optimizer_param_ids: set[int] = set()
        self.handle = None

    def on_train_start(self, trainer, pl_module):
        def hook(module, args):
            self.calls.append((module.training, torch.is_grad_enabled(), torch.is_inference_mode_enabled()))

        if pl_module.teacher is not None:
            self.handle = pl_module.teacher.register_forward_pre_hook(hook)
        for opt in trainer.optimizers:
            for group in opt.param_groups:
                self.optimizer_param_ids.update(id(p) for p in group["params"])

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self.losses.append(float(loss))

    def on_train_end(self, trainer, pl_module):
        if self.handle is not None:
            self.handle.remove()


class _TrainTheTeacher(L.Callback):
    """A hostile user: switches the teacher to train mode before every batch."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if pl_module.teacher is not None:
            pl_module.teacher.train()


def _state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


@pytest.fixture(params=[c for c in CASES if c not in HF_CASES])  # digits cases; HF_CASES: below
def case(request) -> str:
    return request.param


@pytest.fixture
def strategy(case):
    torch.manual_seed(0)
    teacher = DigitsCNN()  # BatchNorm + Dropout: both would change behaviour / buffers in train mode
    student = DigitsStudentCNN()  # has BatchNorm too: its buffers must update
    return CASES[case](student, teacher)


def _reads_sample_index(module: DistillationModule) -> bool:
    return any(isinstance(o, CRDLoss) for o in module.objectives.values())


def _plain_loaders(module: DistillationModule) -> tuple[DataLoader, DataLoader]:
    """Plain ``DataLoader``s of ``(x, y)`` tensors (``(x, y, index)`` for CRD, whose memory bank needs the
    sample index: ``(x, y)`` batches get a clear error, tested below)."""
    from lightning_distill.data import DigitsDataModule

    dm = DigitsDataModule()
    dm.setup("fit")
    x, y = dm.train_dataset.inputs, dm.train_dataset.targets
    vx, vy = dm.val_dataset.inputs, dm.val_dataset.targets
    if _reads_sample_index(module):
        train = TensorDataset(x, y, torch.arange(len(x)))
    else:
        train = TensorDataset(x, y)
    return DataLoader(train, batch_size=64, shuffle=True), DataLoader(TensorDataset(vx, vy), batch_size=64)


def _assert_teacher_contract(strategy, recorder, teacher_before):
    # always eval, no_grad (not inference_mode) at every teacher forward during training
    assert recorder.calls, "the teacher was never called during training"
    assert all(not training for training, _, _ in recorder.calls), "teacher ran in train mode"
    assert all(not grad for _, grad, _ in recorder.calls), "teacher ran with grad enabled"
    assert all(not inf for _, _, inf in recorder.calls), "teacher ran under inference_mode"
    assert not strategy.teacher.training and all(not m.training for m in strategy.teacher.modules())
    # bit-identical: weights, BatchNorm running stats, num_batches_tracked
    after = strategy.teacher.state_dict()
    for key, value in teacher_before.items():
        assert torch.equal(after[key], value), f"teacher tensor {key} changed"
    # frozen: never received a gradient, never in an optimizer
    assert all(p.grad is None and not p.requires_grad for p in strategy.teacher.parameters())
    teacher_ids = {id(p) for p in strategy.teacher.parameters()}
    assert recorder.optimizer_param_ids and not (recorder.optimizer_param_ids & teacher_ids)


@pytest.mark.parametrize("feeding", ["datamodule", "dataloaders"])
def test_teacher_contract_after_fit(strategy, case, feeding, digits_dm, make_trainer, tmp_path):
    has_teacher = strategy.teacher is not None
    teacher_before = _state(strategy.teacher) if has_teacher else None
    student_before = _state(strategy.student)
    if has_teacher:  # frozen from construction on
        assert all(not p.requires_grad for p in strategy.teacher.parameters())
        assert not strategy.teacher.training

    recorder = _Recorder()
    trainer = make_trainer(
        max_epochs=2,
        limit_train_batches=4,
        limit_val_batches=2,
        callbacks=[recorder, _TrainTheTeacher()],
        enable_checkpointing=True,
    )
    data = {"datamodule": digits_dm}
    if feeding == "dataloaders":
        train, val = _plain_loaders(strategy)
        data = {"train_dataloaders": train, "val_dataloaders": val}
    if has_teacher:
        with pytest.warns(UserWarning, match="teacher submodule was in train mode"):
            trainer.fit(strategy, **data)
        _assert_teacher_contract(strategy, recorder, teacher_before)
    else:
        trainer.fit(strategy, **data)

    # every trained parameter was optimised: it moved, and it is in the optimizer (frozen parts -- a
    # teacher, an EMA copy -- are never in it)
    frozen = {id(p) for p in strategy.frozen_parameters()}
    assert not (recorder.optimizer_param_ids & frozen)
    for name, p in strategy.named_parameters():
        if name.startswith("teacher.") or id(p) in frozen:
            continue
        assert id(p) in recorder.optimizer_param_ids, f"{name} is not optimised"
        if name.startswith("student."):
            assert not torch.equal(p.detach(), student_before[name[len("student.") :]]), f"{name} did not change"
    # the student's own BatchNorm statistics did update (train mode reached the student)
    bn_keys = [k for k in student_before if k.endswith("running_mean")]
    assert bn_keys and any(not torch.equal(strategy.student.state_dict()[k], student_before[k]) for k in bn_keys)

    # finite loss at every step
    assert recorder.losses and all(torch.isfinite(torch.tensor(recorder.losses)))

    # checkpoint: no teacher weights; loading it into a fresh module restores everything else
    ckpt_path = trainer.checkpoint_callback.best_model_path or trainer.checkpoint_callback.last_model_path
    ckpt = torch.load(ckpt_path, weights_only=True)
    assert not [k for k in ckpt["state_dict"] if k.startswith("teacher.")]
    assert any(k.startswith("student.") for k in ckpt["state_dict"])
    fresh = CASES[case](DigitsStudentCNN(), DigitsCNN())
    fresh.on_load_checkpoint(ckpt)  # what Lightning calls before load_state_dict
    fresh.load_state_dict(ckpt["state_dict"])
    for key, value in strategy.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), f"{key} not restored from the checkpoint"


def test_train_mode_never_reaches_teacher(strategy):
    if strategy.teacher is None:
        pytest.skip("no frozen teacher")
    strategy.train()
    assert strategy.student.training
    assert not any(m.training for m in strategy.teacher.modules())
    copy.deepcopy(strategy).train(True)  # a copy keeps the contract too
    assert not strategy.teacher.training


def test_checkpoint_round_trip_via_load_from_checkpoint(strategy, case, digits_dm, make_trainer, tmp_path):
    trainer = make_trainer(max_epochs=1, limit_train_batches=2, limit_val_batches=1)
    trainer.fit(strategy, datamodule=digits_dm)
    path = tmp_path / "model.ckpt"
    trainer.save_checkpoint(path)
    if type(strategy) is DistillationModule:
        # the general module's objects (teacher source, objectives) are not hyperparameters: pass them again
        twin = CASES[case](DigitsStudentCNN(), DigitsCNN())
        modules = {"student": twin.student, "teacher": twin.teacher_source, "objectives": dict(twin.objectives)}
    else:
        init = inspect.signature(type(strategy).__init__).parameters
        modules = {"student": DigitsStudentCNN()}
        if "teacher" in init and (strategy.teacher is not None or init["teacher"].default is inspect.Parameter.empty):
            modules["teacher"] = DigitsCNN()
        if "teachers" in init:
            modules["teachers"] = [DigitsCNN() for _ in strategy.teachers]
    restored = type(strategy).load_from_checkpoint(path, **modules)
    for key, value in strategy.state_dict().items():
        assert torch.equal(restored.state_dict()[key], value), key
    if strategy.teacher is not None:
        assert not restored.teacher.training and not any(p.requires_grad for p in restored.teacher.parameters())


def test_crd_with_index_free_batches_fails_before_the_first_step(make_trainer):
    from lightning_distill.data import DigitsDataModule

    dm = DigitsDataModule()
    dm.setup("fit")
    module = STRATEGIES[CRD](DigitsStudentCNN(), DigitsCNN())
    before = _state(module.student)
    loader = DataLoader(TensorDataset(dm.train_dataset.inputs, dm.train_dataset.targets), batch_size=64)
    trainer = make_trainer(max_epochs=1, limit_val_batches=0)
    with pytest.raises(ValueError, match=r"CRD needs each sample's index .*IndexedDataset"):
        trainer.fit(module, train_dataloaders=loader)
    assert trainer.global_step == 0
    assert all(torch.equal(module.student.state_dict()[k], v) for k, v in before.items())


# ------------------------------------------------------------------------------------------ Hugging Face pair
def _hf_pair() -> tuple[nn.Module, nn.Module]:
    """``(student, teacher)``: tiny GPT-2 models (dropout in the teacher: train mode would change its outputs)."""
    from _hf import tiny_gpt2

    return tiny_gpt2(seed=1), tiny_gpt2(n_layer=2, n_embd=24, seed=2)


def _hf_contract(build, feeding, make_trainer, tmp_path=None):
    """The contract of a module ``build()`` makes from Hugging Face models, fed Hugging Face dict batches."""
    from _hf import HFDictDataModule

    strategy = build()
    teacher_before, student_before = _state(strategy.teacher), _state(strategy.student)
    assert all(not p.requires_grad for p in strategy.teacher.parameters()) and not strategy.teacher.training
    recorder = _Recorder()
    trainer = make_trainer(max_epochs=2, limit_train_batches=3, limit_val_batches=2,
                           callbacks=[recorder, _TrainTheTeacher()], enable_checkpointing=True)
    dm = HFDictDataModule()
    data = {"datamodule": dm} if feeding == "datamodule" else {
        "train_dataloaders": dm.train_dataloader(), "val_dataloaders": dm.val_dataloader()}
    with pytest.warns(UserWarning, match="teacher submodule was in train mode"):
        trainer.fit(strategy, **data)
    _assert_teacher_contract(strategy, recorder, teacher_before)
    assert all(torch.isfinite(torch.tensor(recorder.losses)))
    for name, p in strategy.student.named_parameters():
        assert id(p) in recorder.optimizer_param_ids, name
    assert any(not torch.equal(v, strategy.student.state_dict()[k]) for k, v in student_before.items())
    # the objectives' trained parts (projections, a learned layer map's gate) are optimised too
    frozen = {id(p) for p in strategy.frozen_parameters()}
    for name, p in strategy.named_parameters():
        if not name.startswith("teacher.") and id(p) not in frozen:
            assert id(p) in recorder.optimizer_param_ids, f"{name} is not optimised"
    ckpt = torch.load(trainer.checkpoint_callback.last_model_path or trainer.checkpoint_callback.best_model_path,
                      weights_only=True)
    assert not [k for k in ckpt["state_dict"] if k.startswith("teacher.")]
    fresh = build()
    fresh.on_load_checkpoint(ckpt)
    fresh.load_state_dict(ckpt["state_dict"])
    for key, value in strategy.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), f"{key} not restored from the checkpoint"
    # resuming continues from the checkpoint's step with the teacher re-attached, frozen and unchanged
    resumed = build()
    trainer2 = make_trainer(max_epochs=3, limit_train_batches=3, limit_val_batches=2, enable_checkpointing=False)
    trainer2.fit(resumed, ckpt_path=trainer.checkpoint_callback.last_model_path or
                 trainer.checkpoint_callback.best_model_path, **data)
    assert trainer2.global_step == trainer.global_step + 3
    for key, value in teacher_before.items():
        assert torch.equal(resumed.teacher.state_dict()[key], value)
    return strategy, trainer


@pytest.mark.parametrize("feeding", ["datamodule", "dataloaders"])
def test_teacher_contract_hugging_face_causal_lm_pair(feeding, make_trainer):
    """The same contract for transformers models fed Hugging Face dict batches (dropout in the teacher: train mode
    would change its outputs)."""
    pytest.importorskip("transformers")

    def build():
        return KnowledgeDistillation(*_hf_pair(), temperature=2.0, alpha=0.5)

    _hf_contract(build, feeding, make_trainer)


@pytest.mark.parametrize("feeding", ["datamodule", "dataloaders"])
@pytest.mark.parametrize("hf_case", HF_CASES)
def test_teacher_contract_transformer_objectives(hf_case, feeding, make_trainer, tmp_path):
    """Objectives reading hidden states / attention maps / q-k-v projections, on the Hugging Face pair: the teacher
    contract, their trained parts optimised and restored, and (datamodule feeding) ``load_from_checkpoint``."""
    pytest.importorskip("transformers")

    def build():
        return CASES[hf_case](*_hf_pair())

    strategy, trainer = _hf_contract(build, feeding, make_trainer)
    if feeding == "datamodule":
        path = tmp_path / "model.ckpt"
        trainer.save_checkpoint(path)
        twin = build()
        modules = {"student": twin.student, "teacher": twin.teacher_source, "objectives": dict(twin.objectives)}
        restored = DistillationModule.load_from_checkpoint(path, **modules)
        for key, value in strategy.state_dict().items():
            assert torch.equal(restored.state_dict()[key], value), key
        assert not restored.teacher.training and not any(p.requires_grad for p in restored.teacher.parameters())
