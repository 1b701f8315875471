"""SelfDistillation (BYOT): heads from the probe, loss composition, metrics, early exit, checkpoints.

Reference values are recomputed here by calling the network's stages and the heads by hand (no
hooks) and writing the formulas out with plain torch ops, then compared with what the module does.
"""

from __future__ import annotations

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_distill.data import DigitsDataModule
from lightning_distill.losses import self_distillation_loss
from lightning_distill.models import DigitsCNN, DigitsMLP, DigitsStudentCNN
from lightning_distill.module import Batch
from lightning_distill.strategies.self_distillation import SelfDistillation, early_exit

pytestmark = pytest.mark.usefixtures("single_thread")


def _module(student: nn.Module | None = None, **kwargs) -> SelfDistillation:
    kwargs.setdefault("exit_layers", ["block1", "block2"])
    kwargs.setdefault("final_feature_layer", "block3")
    kwargs.setdefault("bottleneck_channels", 8)
    return SelfDistillation(student or DigitsCNN(), **kwargs)


def _batch(n: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g)


def _digits(n: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    dm = DigitsDataModule()
    dm.setup()
    return dm.val_dataset.inputs[:n], dm.val_dataset.targets[:n]


def _by_hand(module: SelfDistillation, x: torch.Tensor):
    """DigitsCNN heads on block1 / block2, final feature block3: (logits per head, projected feats, final)."""
    s = module.student
    h1 = s.block1(x)
    h2 = s.block2(h1)
    final = s.block3(h2)
    deepest = s.head(s.dropout(final))
    logits, feats = [], []
    for h, head, proj in zip((h1, h2), module.heads, module.projections):
        hidden = head.features(h)
        logits.append(head.classifier(hidden))
        feats.append(proj(hidden))
    return logits + [deepest], feats, final


# --------------------------------------------------------------------------------------------
# Construction
# --------------------------------------------------------------------------------------------


def test_there_is_no_teacher():
    module = _module()
    assert module.teacher is None and not module.has_teacher
    assert (module.temperature, module.alpha, module.feature_weight) == (3.0, 0.3, 0.03)
    with pytest.raises(TypeError, match="unexpected keyword argument 'teacher'"):  # no frozen-teacher options at all
        SelfDistillation(DigitsCNN(), exit_layers=["block1"], teacher=DigitsCNN())


def test_unknown_exit_layer_lists_valid_names_at_construction():
    with pytest.raises(ValueError) as info:
        _module(exit_layers=["block1", "blok2"])
    msg = str(info.value)
    assert "`exit_layers`: the student (DigitsCNN) has no submodule named 'blok2' (did you mean 'block2'" in msg
    assert "Valid names (from named_modules()): ['block1'" in msg and "'block3'" in msg and "'head'" in msg
    with pytest.raises(ValueError, match="no submodule named 'pool'"):
        _module(final_feature_layer="pool")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"exit_layers": []}, "`exit_layers` must be a non-empty list"),
        ({"exit_layers": ["block1", "block1"]}, "lists a layer twice"),
        ({"temperature": 0.0}, "`temperature` must be a finite number > 0"),
        ({"alpha": 1.5}, r"`alpha` must be in \[0, 1\]"),
        ({"feature_weight": -1.0}, "`feature_weight` .* must be a finite number >= 0"),
        ({"bottleneck_channels": 0}, "`bottleneck_channels` must be an integer >= 1"),
        ({"exit_threshold": -0.1}, "`exit_threshold` must be None or a finite number >= 0"),
    ],
)
def test_bad_arguments_are_rejected(kwargs, match):
    with pytest.raises(ValueError, match=match):
        _module(**kwargs)


def test_exit_layers_out_of_forward_order_are_rejected_by_the_probe():
    module = _module(exit_layers=["block2", "block1"])
    with pytest.raises(ValueError, match=r"shallow to deep.*forward finishes them as \['block1', 'block2'\]"):
        module.build(torch.zeros(2, 1, 8, 8))


def test_heads_are_built_from_probed_shapes():
    module = _module(bottleneck_channels=8)
    assert len(module.heads) == 0
    module.build(torch.zeros(2, 1, 8, 8))
    (h1, h2), (p1, p2) = module.heads, module.projections
    # block1 [N, 16, 8, 8] and block2 [N, 32, 4, 4]: 1x1 conv -> 8, 3x3 conv 8 -> 8, pool, linear 8 -> 10
    assert [tuple(m.weight.shape) for m in h1.features if isinstance(m, nn.Conv2d)] == [(8, 16, 1, 1), (8, 8, 3, 3)]
    assert [tuple(m.weight.shape) for m in h2.features if isinstance(m, nn.Conv2d)] == [(8, 32, 1, 1), (8, 8, 3, 3)]
    assert tuple(h1.classifier.weight.shape) == tuple(h2.classifier.weight.shape) == (10, 8)
    # projections to the deepest feature, block3 [N, 64]
    assert tuple(p1.weight.shape) == tuple(p2.weight.shape) == (64, 8)
    assert module.num_classes == 10 and module.final_feature_source == "output of 'block3'"
    names = {n for n, _ in module.named_parameters()}
    assert "objectives.byot.heads.0.classifier.weight" in names and "objectives.byot.projections.1.weight" in names


def test_vector_heads_and_default_final_feature():
    # DigitsMLP: block1 gives [N, 16]; the logits come from `head`, whose input is block1's output
    module = SelfDistillation(DigitsMLP(hidden=16), exit_layers=["block1"], bottleneck_channels=5)
    module.build(torch.zeros(3, 1, 8, 8))
    head = module.heads[0]
    assert [tuple(m.weight.shape) for m in head.features if isinstance(m, nn.Linear)] == [(5, 16)]
    assert tuple(head.classifier.weight.shape) == (10, 5)
    assert module.final_feature_source == "input of 'head'"
    assert tuple(module.projections[0].weight.shape) == (16, 5)
    x = torch.rand(3, 1, 8, 8)
    out = module.head_outputs(x)
    assert torch.equal(out.final_feature, module.student.block1(x)) and tuple(out.final_feature.shape) == (3, 16)


def test_heads_need_a_probe_input(make_trainer):
    module = _module(num_classes=10)
    with pytest.raises(RuntimeError, match="heads do not exist yet"):
        module.head_outputs(torch.zeros(2, 1, 8, 8))
    # plain dataloaders: the probe runs on the first batch, so the heads exist before the first step
    x, y = _batch(4)
    make_trainer().validate(module, dataloaders=DataLoader(TensorDataset(x, y), batch_size=4), verbose=False)
    assert len(module.heads) == 2 and module.final_feature_source == "output of 'block3'"


# --------------------------------------------------------------------------------------------
# Loss
# --------------------------------------------------------------------------------------------


def test_loss_equals_an_independent_computation():
    torch.manual_seed(0)
    module = _module(temperature=2.0, alpha=0.4, feature_weight=0.5)
    x, y = _batch()
    module.build(x)
    module.eval()  # deterministic BatchNorm / dropout for the comparison
    terms = module.distillation_losses(*module.forward_models(x), Batch(x, y))

    logits, feats, final = _by_hand(module, x)
    t = 2.0
    ces = [F.cross_entropy(z, y) for z in logits]
    p_deep = F.softmax(logits[-1] / t, dim=1)
    kls = [t**2 * (p_deep * (p_deep.log() - F.log_softmax(z / t, dim=1))).sum(1).mean() for z in logits[:-1]]
    mses = [((f - final) ** 2).mean() for f in feats]
    expected = 0.6 * sum(ces) + 0.4 * sum(kls) + 0.5 * sum(mses)

    torch.testing.assert_close(terms["loss"], expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(terms["task_loss"], sum(ces), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(terms["kd_loss"], sum(kls), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(terms["feature_loss"], sum(mses), rtol=1e-5, atol=1e-6)
    for i, ce in enumerate(ces, start=1):
        torch.testing.assert_close(terms[f"head{i}_ce"], ce, rtol=1e-5, atol=1e-6)
    assert set(terms) == {"loss", "task_loss", "kd_loss", "feature_loss", "head1_ce", "head2_ce", "head3_ce"}


def test_deepest_head_is_a_detached_teacher():
    module = _module()
    x, y = _batch()
    module.build(x)
    student, _ = module.forward_models(x)
    deepest, final_feature = student.logits, student.features["block3"]  # the deepest head's logits and feature
    terms = module.distillation_losses(student, None, Batch(x, y))
    # neither the KL nor the hint term reaches the deepest head (logits or feature) ...
    grads = torch.autograd.grad(terms["kd_loss"], [deepest, final_feature], retain_graph=True, allow_unused=True)
    assert all(g is None or not g.any() for g in grads)
    grads = torch.autograd.grad(terms["feature_loss"], [deepest, final_feature], retain_graph=True, allow_unused=True)
    assert all(g is None or not g.any() for g in grads)
    # ... while they do train the shallow heads (head 1's classifier, head 2's hint projection), and the CE trains
    # the deepest head
    assert torch.autograd.grad(terms["kd_loss"], module.heads[0].classifier.weight, retain_graph=True)[0].abs().sum() > 0
    assert torch.autograd.grad(terms["feature_loss"], module.projections[1].weight, retain_graph=True)[0].abs().sum() > 0
    assert torch.autograd.grad(terms["task_loss"], deepest, retain_graph=True)[0].abs().sum() > 0


def test_pure_loss_without_labels_and_without_shallow_heads():
    z = torch.randn(4, 5)
    terms = self_distillation_loss([z], None, [], torch.randn(4, 3))
    assert terms["loss"].item() == 0.0 and terms["head_ce"].shape == (1,)
    with pytest.raises(ValueError, match="K - 1 shallow features"):
        self_distillation_loss([z, z], None, [], torch.randn(4, 3))


@pytest.mark.parametrize(("alpha", "feature_weight"), [(0.3, 0.03), (0.0, 0.0), (1.0, 0.0)])
def test_every_parameter_gets_a_gradient_every_step(alpha, feature_weight):
    """DDP needs every trainable parameter in the graph, even with zero weights."""
    module = _module(alpha=alpha, feature_weight=feature_weight)
    x, y = _batch()
    module.build(x)
    terms = module.distillation_losses(*module.forward_models(x), Batch(x, y))
    assert torch.isfinite(terms["loss"])
    terms["loss"].backward()
    missing = [n for n, p in module.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing


# --------------------------------------------------------------------------------------------
# Early exit
# --------------------------------------------------------------------------------------------


def _hand_early_exit(logits: list[torch.Tensor], threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    chosen, index = [], []
    for n in range(logits[0].shape[0]):
        for i, z in enumerate(logits):
            if z[n].softmax(-1).max().item() >= threshold or i == len(logits) - 1:
                chosen.append(z[n])
                index.append(i + 1)
                break
    return torch.stack(chosen), torch.tensor(index)


def test_early_exit_thresholds():
    torch.manual_seed(0)
    module = _module().eval()
    x, _ = _batch(32)
    module.build(x)
    with torch.no_grad():
        heads = module.head_outputs(x).logits

        logits, index = module.predict_early_exit(x, threshold=0.0)  # everything is confident enough
        assert index.tolist() == [1] * 32 and torch.equal(logits, heads[0])

        logits, index = module.predict_early_exit(x, threshold=1.5)  # nothing is: the deepest head
        assert index.tolist() == [3] * 32 and torch.equal(logits, heads[2])
        assert torch.equal(module(x), heads[2])  # plain inference is the deepest head

        threshold = heads[0].softmax(-1).amax(-1).median().item()
        logits, index = module.predict_early_exit(x, threshold=threshold)
        expected_logits, expected_index = _hand_early_exit(heads, threshold)
        assert torch.equal(index, expected_index) and torch.equal(logits, expected_logits)
        assert 1 in index.tolist() and len(set(index.tolist())) >= 2  # a genuinely mixed case

    module.exit_threshold = 0.0
    with torch.inference_mode():  # what Trainer.validate / test / predict use
        assert module.predict_early_exit(x)[1].tolist() == [1] * 32
    module.exit_threshold = None
    with pytest.raises(ValueError, match="predict_early_exit needs a threshold"):
        module.predict_early_exit(x)


def test_early_exit_function_on_hand_made_logits():
    shallow = torch.tensor([[3.0, 0.0], [0.0, 0.0], [0.0, 0.0]])  # p_max 0.95, 0.5, 0.5
    middle = torch.tensor([[0.0, 0.0], [0.0, 3.0], [0.0, 0.0]])  # p_max 0.5, 0.95, 0.5
    deep = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 0.1]])
    logits, index = early_exit([shallow, middle, deep], threshold=0.9)
    assert index.tolist() == [1, 2, 3]
    assert torch.equal(logits, torch.stack([shallow[0], middle[1], deep[2]]))


# --------------------------------------------------------------------------------------------
# With a Trainer
# --------------------------------------------------------------------------------------------


def test_eval_metrics_equal_an_independent_computation(make_trainer):
    torch.manual_seed(0)
    module = _module()
    x, y = _digits(64)
    module.build(x)
    module.eval()
    with torch.no_grad():
        logits, _, _ = _by_hand(module, x)
    # a threshold that sends some samples out at head 1 and the rest deeper
    module.exit_threshold = threshold = logits[0].softmax(1).amax(1).median().item()
    trainer = make_trainer()
    results = trainer.validate(module, dataloaders=DataLoader(TensorDataset(x, y), batch_size=64), verbose=False)[0]

    for i, z in enumerate(logits, start=1):
        assert results[f"val/head{i}_acc"] == pytest.approx((z.argmax(1) == y).float().mean().item())
    assert results["val/acc"] == results["val/head3_acc"]
    ensemble = torch.stack([z.softmax(1) for z in logits]).mean(0)
    assert results["val/ensemble_acc"] == pytest.approx((ensemble.argmax(1) == y).float().mean().item())
    chosen, index = _hand_early_exit(logits, threshold)
    assert len(set(index.tolist())) >= 2
    assert results["val/early_exit_acc"] == pytest.approx((chosen.argmax(1) == y).float().mean().item())
    assert results["val/avg_exit_depth"] == pytest.approx(index.float().mean().item())


class _Losses(L.Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []
        self.optimizer_param_ids: set[int] = set()

    def on_train_start(self, trainer, pl_module):
        for opt in trainer.optimizers:
            for group in opt.param_groups:
                self.optimizer_param_ids.update(id(p) for p in group["params"])

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"] if isinstance(outputs, dict) else outputs))


def test_fit_optimises_the_heads_and_logs_every_term(digits_dm, make_trainer):
    torch.manual_seed(0)
    module = _module(exit_threshold=0.5)
    recorder = _Losses()
    trainer = make_trainer(max_epochs=1, limit_train_batches=3, limit_val_batches=1, callbacks=[recorder])
    module.build(digits_dm.example_input())
    before = {k: v.detach().clone() for k, v in module.named_parameters()}
    trainer.fit(module, datamodule=digits_dm)

    for name, p in module.named_parameters():
        assert id(p) in recorder.optimizer_param_ids, f"{name} is not optimised"
        assert not torch.equal(p.detach(), before[name]), f"{name} did not change"
    assert recorder.losses and all(torch.isfinite(torch.tensor(recorder.losses)))
    logged = set(trainer.logged_metrics)
    for key in ("train/loss", "train/task_loss", "train/kd_loss", "train/feature_loss", "train/head1_ce", "train/head3_ce"):
        assert key in logged, key
    for key in ("val/acc", "val/head1_acc", "val/head2_acc", "val/head3_acc", "val/ensemble_acc",
                "val/early_exit_acc", "val/avg_exit_depth"):
        assert key in logged, key
    assert 1.0 <= float(trainer.logged_metrics["val/avg_exit_depth"]) <= 3.0


def _resume_module() -> SelfDistillation:
    L.seed_everything(7, verbose=False)
    # DigitsStudentCNN has no dropout (no RNG in a step); default final feature: the input of `head`
    return SelfDistillation(
        DigitsStudentCNN(), exit_layers=["block1.0", "block1"], bottleneck_channels=4,
        optimizer=lambda params: torch.optim.SGD(params, lr=0.05, momentum=0.9),
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5),
    )


def test_resume_matches_uninterrupted_run(resume_runs):
    straight, first, resumed, trainer = resume_runs(_resume_module, 3, 1, limit_train_batches=3)

    assert trainer.current_epoch == 3 and trainer.global_step == 9
    assert straight.final_feature_source == resumed.final_feature_source == "input of 'head'"
    for key, value in straight.state_dict().items():
        assert torch.equal(resumed.state_dict()[key], value), f"{key} differs after resume"
    assert not torch.equal(first.heads[0].classifier.weight, straight.heads[0].classifier.weight)


def test_load_from_checkpoint_rebuilds_the_heads_before_setup(digits_dm, make_trainer, tmp_path):
    module = _module(exit_threshold=0.7)
    trainer = make_trainer(max_epochs=1, limit_train_batches=2, limit_val_batches=1)
    trainer.fit(module, datamodule=digits_dm)
    path = tmp_path / "model.ckpt"
    trainer.save_checkpoint(path)
    assert any(k.startswith("objectives.byot.heads.") for k in torch.load(path, weights_only=True)["state_dict"])

    restored = SelfDistillation.load_from_checkpoint(path, student=DigitsCNN())
    assert restored.exit_layers == ["block1", "block2"] and restored.exit_threshold == 0.7
    assert restored.teacher is None
    for key, value in module.state_dict().items():
        assert torch.equal(restored.state_dict()[key], value), key
    x, _ = _batch(4)
    module.eval()
    restored.eval()
    with torch.no_grad():
        assert torch.equal(restored.predict_early_exit(x)[0], module.predict_early_exit(x)[0])
