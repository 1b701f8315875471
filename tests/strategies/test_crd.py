"""CRD: the NCE criterion, memory banks, normalisation constants, errors, checkpoints, learning signal."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_distill.data import DigitsDataModule
from lightning_distill.models import DigitsCNN, DigitsStudentCNN
from lightning_distill.module import Batch
from lightning_distill.strategies.crd import CRD, _nce_loss

N_SAMPLES = 40  # memory-bank rows in the step-level tests (no trainer)


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models on 2 shared cores: one intra-op thread is much faster."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _crd(**kwargs) -> CRD:
    args = dict(
        teacher_checkpoint="zoo:digits_cnn", student_layer="block2", teacher_layer="block3",
        feat_dim=16, num_negatives=8,
    )
    args.update(kwargs)
    return CRD(DigitsStudentCNN(), DigitsCNN(), **args)


def _ready(**kwargs) -> CRD:
    """A CRD module set up without a trainer (heads probed, banks allocated for N_SAMPLES rows)."""
    module = _crd(num_samples=N_SAMPLES, **kwargs)
    module.example_input_array = torch.zeros(2, 1, 8, 8)
    module.setup("fit")
    module.train()
    return module


def _batch(seed: int, index: list[int]) -> Batch:
    g = torch.Generator().manual_seed(seed)
    n = len(index)
    return Batch(torch.rand(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g), torch.tensor(index))


def _embeddings(module: CRD, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Student / teacher embeddings recomputed by hand from the captured features (float64)."""
    with torch.no_grad():
        s_out, t_out = module.forward_models(x)
        f_s, f_t = s_out.features[module.student_layer], t_out.features[module.teacher_layer]
        out = []
        for head, f in ((module.embed_student, f_s), (module.embed_teacher, f_t)):
            w, b = head.linear.weight.double(), head.linear.bias.double()
            y = f.double().flatten(1) @ w.T + b
            out.append(y / y.pow(2).sum(1, keepdim=True).sqrt())
    return out[0], out[1]


def _replay_indices(module: CRD, batch_size: int, state: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """The [B, K+1] bank indices a step drew, replayed from the sampler state saved before it."""
    g = torch.Generator().set_state(state)
    negatives = torch.randint(0, module.memory_student.shape[0], (batch_size, module.num_negatives), generator=g)
    return torch.cat([index.unsqueeze(1), negatives], 1)


def _contrast_loss_reference(x: torch.Tensor, num_samples: int, eps: float = 1e-7) -> torch.Tensor:
    """RepDistiller's ContrastLoss, as written there (probabilities, not logs)."""
    bsz, m = x.shape[0], x.shape[1] - 1
    pn = 1.0 / num_samples
    log_d1 = (x[:, 0] / (x[:, 0] + m * pn + eps)).log()
    log_d0 = ((m * pn) / (x[:, 1:] + m * pn + eps)).log()
    return -(log_d1.sum() + log_d0.sum()) / bsz


# ------------------------------------------------------------------------------ NCE criterion
def test_nce_loss_matches_a_hand_written_loop():
    g = torch.Generator().manual_seed(0)
    log_scores = torch.randn(3, 6, generator=g) * 3 - 4  # B=3 anchors, K=5 negatives
    n, eps = 20, 1e-7
    k = 5
    total = 0.0
    for i in range(3):
        x = [math.exp(v) for v in log_scores[i].tolist()]
        total += math.log(x[0] / (x[0] + k / n + eps))
        for j in range(1, k + 1):
            total += math.log((k / n) / (x[j] + k / n + eps))
    expected = -total / 3
    got = _nce_loss(log_scores, n)
    assert got.dtype == torch.float32
    assert math.isclose(got.item(), expected, rel_tol=1e-5)
    # and RepDistiller's ContrastLoss (probability form) agrees
    assert math.isclose(_contrast_loss_reference(log_scores.double().exp(), n).item(), expected, rel_tol=1e-9)


def test_nce_loss_is_nonnegative_and_falls_as_the_positive_score_rises():
    g = torch.Generator().manual_seed(1)
    log_scores = torch.randn(4, 9, generator=g)
    values = []
    for boost in (-5.0, -1.0, 0.0, 1.0, 5.0, 20.0):
        s = log_scores.clone()
        s[:, 0] += boost
        values.append(_nce_loss(s, 100).item())
    assert all(v >= 0 for v in values)
    assert all(a > b for a, b in zip(values, values[1:])), values
    # extreme scores stay finite (log space), still >= 0
    extreme = torch.tensor([[200.0, -200.0, 300.0], [-300.0, 0.0, 0.0]])
    value = _nce_loss(extreme, 50)
    assert torch.isfinite(value) and value.item() >= 0


# ------------------------------------------------------------------ one step: banks, Z, loss
def test_one_step_scores_loss_z_and_memory_update_match_the_formulas():
    torch.manual_seed(0)
    module = _ready(nce_momentum=0.3, nce_temperature=0.1, alpha=0.5, crd_weight=0.7)
    assert module.memory_student.shape == module.memory_teacher.shape == (N_SAMPLES, 16)
    stdv = 1.0 / math.sqrt(16 / 3)
    assert module.memory_student.abs().max() <= stdv and module.memory_teacher.abs().max() <= stdv
    assert module.z_student.item() == -1.0 and module.z_teacher.item() == -1.0

    index = [3, 17, 0, 39, 22, 8]
    batch = _batch(0, index)
    old_s, old_t = module.memory_student.clone(), module.memory_teacher.clone()
    v_s, v_t = _embeddings(module, batch.input)
    state = module.objectives["crd"]._negative_generator(torch.device("cpu")).get_state()

    logits, teacher_logits = module.forward_models(batch.input)
    terms = module.distillation_losses(logits, teacher_logits, batch)

    # independent computation of the CRD term (float64, probability form, official formulas)
    idx = _replay_indices(module, len(index), state, batch.index)
    out_t = torch.exp(torch.einsum("bkd,bd->bk", old_s.double()[idx], v_t) / 0.1)
    out_s = torch.exp(torch.einsum("bkd,bd->bk", old_t.double()[idx], v_s) / 0.1)
    z_t, z_s = out_t.mean() * N_SAMPLES, out_s.mean() * N_SAMPLES
    expected_crd = _contrast_loss_reference(out_t / z_t, N_SAMPLES) + _contrast_loss_reference(out_s / z_s, N_SAMPLES)
    assert math.isclose(terms["crd_loss"].item(), expected_crd.item(), rel_tol=1e-4)
    assert math.isclose(module.z_teacher.item(), z_t.item(), rel_tol=1e-4)
    assert math.isclose(module.z_student.item(), z_s.item(), rel_tol=1e-4)
    expected_total = 0.5 * terms["task_loss"] + 0.5 * terms["kd_loss"] + 0.7 * terms["crd_loss"]
    assert torch.allclose(terms["loss"], expected_total)
    assert set(terms) == {"loss", "task_loss", "kd_loss", "crd_loss"}

    # memory update: rows at the batch indices <- normalize(m * old + (1 - m) * v), the rest unchanged
    m = 0.3
    for bank, old, v in ((module.memory_student, old_s, v_s), (module.memory_teacher, old_t, v_t)):
        mixed = m * old.double()[index] + (1 - m) * v
        expected_rows = mixed / mixed.pow(2).sum(1, keepdim=True).sqrt()
        assert torch.allclose(bank[index].double(), expected_rows, atol=1e-6)
        assert torch.allclose(bank[index].norm(dim=1), torch.ones(len(index)), atol=1e-6)
        others = [i for i in range(N_SAMPLES) if i not in index]
        assert torch.equal(bank[others], old[others])

    # Z is estimated on the first step only
    z_before = (module.z_student.clone(), module.z_teacher.clone())
    for seed in (1, 2):
        batch = _batch(seed, [5, 6, 7, 30])
        module.distillation_losses(*module.forward_models(batch.input), batch)
    assert torch.equal(module.z_student, z_before[0]) and torch.equal(module.z_teacher, z_before[1])


def test_gradients_reach_the_student_and_both_heads_only():
    module = _ready()
    batch = _batch(3, [1, 2, 3, 4])
    terms = module.distillation_losses(*module.forward_models(batch.input), batch)
    terms["crd_loss"].backward()
    for head in (module.embed_student, module.embed_teacher):
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in head.parameters())
    assert module.student.block2[0][0].weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in module.teacher.parameters())
    assert not module.memory_student.requires_grad and not module.memory_teacher.requires_grad


def test_loss_is_float32_and_finite_under_bf16_autocast():
    module = _ready()
    batch = _batch(4, [9, 10, 11, 12])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        terms = module.distillation_losses(*module.forward_models(batch.input), batch)
    assert terms["crd_loss"].dtype == torch.float32 and torch.isfinite(terms["crd_loss"])
    assert module.memory_student.dtype == torch.float32


# ------------------------------------------------------------------------------------ errors
def test_missing_index_is_rejected():
    module = _ready()
    x = torch.rand(4, 1, 8, 8)
    with pytest.raises(ValueError, match=r"CRD needs each sample's index .*\(input, target, index\)"):
        module.distillation_losses(*module.forward_models(x), Batch(x, torch.zeros(4, dtype=torch.long)))


class _NoIndexDigits(DigitsDataModule):
    """Digits whose training batches are (x, y) only."""

    def train_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(self.train_dataset.inputs, self.train_dataset.targets), batch_size=self.batch_size)


def test_missing_index_fails_the_first_training_step(make_trainer):
    module = _crd()
    trainer = make_trainer(limit_train_batches=2, limit_val_batches=0)
    with pytest.raises(ValueError, match=r"IndexedDataset"):
        trainer.fit(module, datamodule=_NoIndexDigits(shuffle_seed=0))
    assert trainer.global_step == 0


def test_too_many_negatives_fail_at_setup(digits_dm, make_trainer):
    module = _crd(num_negatives=4096)  # digits has 1,079 training samples
    before = {k: v.clone() for k, v in module.student.state_dict().items()}
    trainer = make_trainer(limit_train_batches=2)
    with pytest.raises(ValueError, match=r"`num_negatives`=4096 is too large .* 1079 rows .* Lower num_negatives"):
        trainer.fit(module, datamodule=digits_dm)
    assert trainer.global_step == 0
    assert all(torch.equal(module.student.state_dict()[k], v) for k, v in before.items())
    with pytest.raises(ValueError, match=r"`num_negatives`=39 is too large"):
        _crd(num_negatives=39, num_samples=40)  # known at construction: rejected at once


def test_num_samples_must_match_the_training_set(digits_dm, make_trainer):
    trainer = make_trainer(limit_train_batches=2)
    with pytest.raises(ValueError, match=r"`num_samples`=500 but the training set has 1079 samples"):
        trainer.fit(_crd(num_samples=500), datamodule=digits_dm)
    assert trainer.global_step == 0


class _Unsized(torch.utils.data.IterableDataset):
    """(input, target, index) samples from a stream: no length, so no training-set size."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __iter__(self):
        return iter(zip(self.x, self.y, range(len(self.x))))


def test_num_samples_is_required_without_a_train_dataset(make_trainer):
    x, y = torch.rand(16, 1, 8, 8), torch.randint(0, 10, (16,))
    module = _crd()
    module.example_input_array = x[:2]
    with pytest.raises(ValueError, match=r"pass `num_samples`"):
        make_trainer(limit_train_batches=1).fit(module, train_dataloaders=DataLoader(_Unsized(x, y), batch_size=8))
    # a plain DataLoader over a sized dataset tells the size: the banks get one row per sample
    loader = DataLoader(TensorDataset(x, y, torch.arange(16)), batch_size=8)
    module = _crd()
    make_trainer(limit_train_batches=1).fit(module, train_dataloaders=loader)
    assert module.memory_student.shape[0] == 16


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"feat_dim": 0}, r"`feat_dim` must be an integer >= 1, got 0"),
        ({"feat_dim": 1.5}, r"`feat_dim` must be an integer >= 1"),
        ({"num_negatives": 0}, r"`num_negatives` must be an integer >= 1"),
        ({"nce_temperature": 0.0}, r"`nce_temperature` must be a number in \(0.0, inf\)"),
        ({"nce_temperature": -0.1}, r"`nce_temperature`"),
        ({"nce_temperature": float("nan")}, r"`nce_temperature`"),
        ({"nce_momentum": 1.0}, r"`nce_momentum` must be a number in \[0.0, 1.0\)"),
        ({"nce_momentum": -0.1}, r"`nce_momentum`"),
        ({"crd_weight": -1.0}, r"`crd_weight` must be a number in \[0.0, inf\)"),
        ({"num_samples": 1}, r"`num_samples` must be an integer >= 2"),
        ({"student_layer": "block9"}, r"`student_layer`: the student \(DigitsStudentCNN\) has no submodule named 'block9'"),
        ({"teacher_layer": "blok3"}, r"`teacher_layer`: the teacher \(DigitsCNN\) has no submodule named 'blok3' \(did you mean 'block3'"),
        ({"alpha": 1.5}, r"`alpha` must be in \[0, 1\]"),
    ],
)
def test_bad_arguments_are_rejected(kwargs, match):
    with pytest.raises(ValueError, match=match):
        _crd(**kwargs)


# ------------------------------------------------------------------------ training, checkpoints
class _Watch(L.Callback):
    """Records train/crd_loss per step and which head parameters received a nonzero gradient."""

    def __init__(self) -> None:
        self.crd: dict[int, list[float]] = {}
        self.head_grads: set[str] = set()

    def on_after_backward(self, trainer, pl_module):
        for name, p in pl_module.named_parameters():
            if name.startswith("objectives.crd.embed_") and p.grad is not None and p.grad.abs().sum() > 0:
                self.head_grads.add(name)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.crd.setdefault(trainer.current_epoch, []).append(float(trainer.callback_metrics["train/crd_loss"]))


def test_short_fit_and_checkpoint_round_trip(digits_dm, make_trainer, tmp_path):
    torch.manual_seed(0)
    module = _crd()
    teacher_before = {k: v.clone() for k, v in module.teacher.state_dict().items()}
    watch = _Watch()
    trainer = make_trainer(limit_train_batches=3, limit_val_batches=1, callbacks=[watch])
    trainer.fit(module, datamodule=digits_dm)

    steps = watch.crd[0]
    assert len(steps) == 3 and all(math.isfinite(v) and v > 0 for v in steps)
    assert watch.head_grads == {n for n, _ in module.named_parameters() if n.startswith("objectives.crd.embed_")}
    assert len(watch.head_grads) == 4  # weight and bias of both heads
    for key, value in teacher_before.items():
        assert torch.equal(module.teacher.state_dict()[key], value), f"teacher tensor {key} changed"
    assert module.z_student.item() > 0 and module.z_teacher.item() > 0
    assert module.memory_student.shape == (1079, 16)

    path = tmp_path / "crd.ckpt"
    trainer.save_checkpoint(path)
    ckpt = torch.load(path, weights_only=True)
    for key in ("memory_student", "memory_teacher", "z_student", "z_teacher", "embed_student.linear.weight"):
        assert f"objectives.crd.{key}" in ckpt["state_dict"], key
    assert not [k for k in ckpt["state_dict"] if k.startswith("teacher.")]
    assert torch.equal(ckpt["state_dict"]["objectives.crd.z_student"], module.z_student)

    restored = CRD.load_from_checkpoint(path, student=DigitsStudentCNN(), teacher=DigitsCNN())
    assert restored.hparams.student_layer == "block2" and restored.num_negatives == 8
    state = module.state_dict()
    assert set(restored.state_dict()) == set(state)
    for key, value in state.items():
        assert torch.equal(restored.state_dict()[key], value), f"{key} not restored"
    assert not any(p.requires_grad for p in restored.teacher.parameters())


def _resume_module() -> CRD:
    L.seed_everything(3, verbose=False)
    return _crd(optimizer=lambda params: torch.optim.SGD(params, lr=0.05, momentum=0.9))


def test_resume_matches_uninterrupted_run(resume_runs):
    """Banks, Z and the negative sampler's state travel in the checkpoint: a resumed run is exact."""
    straight, _, resumed, trainer = resume_runs(_resume_module, 2, 1, limit_train_batches=3, limit_val_batches=0, shuffle_seed=1)

    assert trainer.global_step == 6
    for key, value in straight.state_dict().items():
        assert torch.equal(resumed.state_dict()[key], value), f"{key} differs after resume"


def test_crd_loss_goes_down_over_epochs(make_trainer):
    """alpha=0: the contrastive term falls from the first epoch to the third."""
    L.seed_everything(0, verbose=False)
    module = _crd(feat_dim=32, num_negatives=256, alpha=0.0, optimizer=lambda params: torch.optim.Adam(params, lr=0.01))
    watch = _Watch()
    trainer = make_trainer(max_epochs=3, limit_val_batches=0, callbacks=[watch])
    trainer.fit(module, datamodule=DigitsDataModule(shuffle_seed=0))
    means = [sum(v) / len(v) for _, v in sorted(watch.crd.items())]
    assert len(means) == 3
    assert means[-1] < 0.9 * means[0], means
