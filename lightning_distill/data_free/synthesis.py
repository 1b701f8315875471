"""DeepInversion's synthesis: optimise random inputs until the frozen teacher "recognises" them.

:func:`deep_inversion` checks its arguments (:class:`~lightning_distill.data_free.options.InversionOptions`),
freezes the teacher, and optimises the transfer set batch by batch (:class:`_Inversion`: the
starting noise, one Adam step on the objective, the steps of one batch, the batches of the run);
:func:`_result` assembles the inputs, their targets and a record of the run.
"""

from __future__ import annotations

import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_distill.data_free.options import ADAM_BETAS, InversionOptions, LRSchedule
from lightning_distill.data_free.priors import BNStatisticsHook, input_l2_prior, total_variation_prior

__all__ = ["deep_inversion"]

PAPER = "Yin et al. 2020, Dreaming to Distill, arXiv:1912.08795"


def deep_inversion(
    teacher: nn.Module,
    num_samples: int,
    input_shape: Sequence[int],
    num_classes: int,
    *,
    batch_size: int = 256,
    steps: int = 200,
    lr: float = 0.2,
    lr_schedule: LRSchedule = "cosine",
    bn_weight: float = 3.0,
    first_bn_multiplier: float = 10.0,
    bn_layer_weights: Optional[Sequence[float]] = None,
    tv_weight: float = 0.0,
    l2_weight: float = 0.0,
    ce_weight: float = 1.0,
    jitter: int = 0,
    flip: bool = False,
    input_range: Optional[tuple[float, float]] = (0.0, 1.0),
    targets: Optional[Tensor] = None,
    seed: int = 0,
    progress: bool = True,
    device: Optional[Union[str, torch.device]] = None,
) -> dict[str, Any]:
    """Synthesise a transfer set from a frozen teacher by DeepInversion (Yin et al. 2020).

    Paper: "Dreaming to Distill: Data-free Knowledge Transfer via DeepInversion", CVPR 2020,
    arXiv:1912.08795. Random inputs ``x̂`` (the only tensors with a gradient) are optimised with
    Adam so that

    .. math::

        \\mathcal{L}(\\hat x) = w_{ce}\\,\\mathrm{CE}(f(\\hat x), y) + w_{bn} R_{feature}(\\hat x)
            + w_{tv} R_{TV}(\\hat x) + w_{\\ell_2} R_{\\ell_2}(\\hat x)

    decreases, where ``R_feature`` is :func:`~lightning_distill.data_free.bn_statistics_loss` over
    every BatchNorm layer of the teacher (:class:`~lightning_distill.data_free.BNStatisticsHook`),
    ``R_TV`` is :func:`~lightning_distill.data_free.total_variation_prior` and ``R_ℓ2``
    :func:`~lightning_distill.data_free.input_l2_prior`. Each step the teacher sees a randomly rolled (``jitter``)
    and possibly mirrored (``flip``) copy of ``x̂``, as in the official code; the priors are
    computed on ``x̂`` itself (the official code uses the jittered copy, whose TV then includes
    the wrap-around seam of ``torch.roll``). Batches of ``batch_size`` samples are optimised one after another,
    each for ``steps`` Adam steps (betas ``(0.5, 0.9)`` as the official code) with a cosine
    learning-rate decay to 0 (the official ``lr_cosine_policy``) or a constant rate.

    Inputs start as ``U(low, high)`` noise when ``input_range=(low, high)`` and are **clamped**
    into that range after every step (the official code's ``clip``; a hard bound keeps Adam's
    steps simple and lets pixels sit exactly at 0 like a real background); with
    ``input_range=None`` they start as ``N(0, 1)`` and are unconstrained.

    The teacher is frozen and in eval mode throughout: it runs with its BatchNorm *running*
    statistics (which are never updated), its parameters get no ``.grad``, and its per-module
    train/eval flags and ``requires_grad`` flags are restored afterwards -- every tensor of
    its ``state_dict`` is bit-identical after the call.

    The defaults are tuned for the shipped digits teacher (``zoo:digits_cnn``, inputs
    ``[1, 8, 8]`` in ``[0, 1]``): 2,000 samples take about 36 s on one CPU thread (busy 2-core
    machine) and the teacher classifies 100% of them as their target; a ``DigitsMLP`` trained
    by KD (T=4) on them alone reaches about 83% on the real digits test split (95% when
    distilled on the 1,079 real training images, 51% with ``bn_weight=0``, 12% on uniform
    noise). On digits, ``jitter=1`` cost 5-10 points (a roll wraps strokes around an 8x8
    image) and TV or ℓ2 priors (weight 0.05) moved it by a point at most, so they are off;
    300-400 steps gave no gain over 200. The official ImageNet script (224 px ResNet-50) uses
    ``lr=0.2`` with 100 warm-up steps, ``bn_weight`` (``r_feature``) 0.01-0.05,
    ``first_bn_multiplier=10``, ``tv_l2=1e-4`` on batch-wide norms (``tv_weight ≈
    1e-4·sqrt(batch_size)`` here), ``l2=1e-5``, ``jitter=30``, ``flip=True`` and 2,000 steps per
    resolution -- start there for large images.

    Args:
        teacher: the trained classifier; must contain BatchNorm layers unless ``bn_weight=0``.
        num_samples: how many inputs to synthesise.
        input_shape: one input's shape without the batch dimension, e.g. ``(1, 8, 8)``.
        num_classes: the teacher's number of classes (its output is ``[N, num_classes]``).
        batch_size: samples optimised together (BatchNorm statistics are batch statistics, so
            larger batches match them better; the last batch may be smaller).
        steps: Adam steps per batch.
        lr: Adam learning rate (start of the cosine decay).
        lr_schedule: ``"cosine"`` (decay to 0 over ``steps``) or ``"constant"``.
        bn_weight: weight of ``R_feature``; 0 turns the BatchNorm prior off (then the teacher
            needs no BatchNorm).
        first_bn_multiplier: extra factor on the first BatchNorm layer (the official code uses
            10: the first layer sees the image almost directly).
        bn_layer_weights: per-layer weights, one per BatchNorm layer in ``named_modules()``
            order; ``None`` means all 1. The first one is still multiplied by
            ``first_bn_multiplier`` (pass ``first_bn_multiplier=1`` to use them as given).
        tv_weight: weight of the ℓ2 total-variation prior.
        l2_weight: weight of the ℓ2-norm prior.
        ce_weight: weight of the cross-entropy towards ``targets``.
        jitter: each step the inputs are rolled (``torch.roll``, wrapping around) by a random
            shift in ``[-jitter, jitter]`` along every spatial dimension; 0 turns it off.
        flip: mirror the inputs along the last dimension with probability 1/2 each step (for
            data with mirror symmetry only -- not for digits).
        input_range: ``(low, high)`` to start in and clamp to after every step, or ``None``.
        targets: ``LongTensor[num_samples]`` of class indices; ``None`` takes balanced
            round-robin classes ``0, 1, ..., C-1, 0, 1, ...`` (every batch is balanced too).
        seed: seeds a private generator for the initial noise and the jitter/flip draws; the
            global RNG is not touched, so a seed gives the same set on the same device.
        progress: show a tqdm progress bar over all steps of all batches.
        device: where to optimise; ``None`` uses the teacher's device. Never moves the teacher.

    Returns:
        ``{"inputs": Tensor[num_samples, *input_shape], "targets": LongTensor[num_samples],
        "teacher_acc": float, "loss_history": list[float], "loss_terms": dict[str, list[float]],
        "meta": dict}`` on the CPU. ``teacher_acc`` is the share of the final inputs that the
        teacher classifies as their target (no jitter); ``loss_history`` is the total objective
        of the first batch at each step (before that step's update) and ``loss_terms`` holds
        its parts before the ``*_weight`` factors, ``"ce"``, ``"bn"`` (R_feature with its
        per-layer weights), ``"tv"``, ``"l2"`` (0 where a weight is 0); ``meta`` records every
        option, the BatchNorm layer names, the teacher's class and the time taken.

    Raises:
        TypeError: ``teacher`` is not a module, or an argument has the wrong type.
        ValueError: an argument out of range, a teacher without BatchNorm statistics while
            ``bn_weight > 0``, or an ``input_shape`` / ``num_classes`` that does not fit the teacher.

    Example::

        >>> import torch
        >>> from torch import nn
        >>> _ = torch.manual_seed(0)
        >>> teacher = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
        ...                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)).eval()
        >>> out = deep_inversion(teacher, num_samples=6, input_shape=(1, 8, 8), num_classes=3,
        ...                      steps=20, progress=False)
        >>> tuple(out["inputs"].shape), out["targets"].tolist()
        ((6, 1, 8, 8), [0, 1, 2, 0, 1, 2])
        >>> out["loss_history"][-1] < out["loss_history"][0]
        True
    """
    options = InversionOptions(**locals())  # every argument is checked before the teacher is touched
    start = time.perf_counter()
    from tqdm.auto import tqdm

    total_steps = options.num_batches * options.steps
    shown = options.progress
    with (
        _frozen(teacher),
        BNStatisticsHook(teacher) if options.bn_weight > 0 else nullcontext() as hook,
        tqdm(total=total_steps, desc="DeepInversion", unit="step", disable=not shown, leave=shown) as bar,
    ):
        record = _Inversion(teacher, options, hook, bar).run()
    return _result(teacher, options, record, time.perf_counter() - start)


@contextmanager
def _frozen(teacher: nn.Module) -> Iterator[nn.Module]:
    """Eval mode and no parameter gradients inside; every module's and parameter's flag restored after."""
    modes = [(m, m.training) for m in teacher.modules()]
    grad_flags = [(p, p.requires_grad) for p in teacher.parameters()]
    try:
        teacher.eval()
        teacher.requires_grad_(False)
        yield teacher
    finally:
        for module, mode in modes:
            module.training = mode
        for param, flag in grad_flags:
            param.requires_grad_(flag)


@dataclass
class _Record:
    """What a run collects: the final inputs per batch, how many the teacher gets right, the first batch's losses."""

    inputs: list[Tensor] = field(default_factory=list)
    correct: int = 0
    bn_layers: list[str] = field(default_factory=list)
    history: list[float] = field(default_factory=list)
    terms: dict[str, list[float]] = field(default_factory=lambda: {"ce": [], "bn": [], "tv": [], "l2": []})

    def log(self, loss: Tensor, terms: dict[str, Tensor]) -> None:
        self.history.append(float(loss.detach()))
        for key, value in terms.items():
            self.terms[key].append(float(value.detach()))


class _Inversion:
    """One DeepInversion run over a frozen teacher; every random draw comes from one seeded generator.

    The draws happen in a fixed order -- per batch its starting noise, then per step its jitter
    shift and flip -- so a seed gives the same transfer set on the same device.
    """

    def __init__(self, teacher: nn.Module, options: InversionOptions, hook: Optional[BNStatisticsHook], bar: Any):
        self.teacher = teacher
        self.options = options
        self.hook = hook
        self.bar = bar
        self.generator = torch.Generator().manual_seed(options.seed)

    def run(self) -> _Record:
        """Optimise every batch in turn and score the result with the teacher (no jitter)."""
        o = self.options
        record = _Record(bn_layers=list(self.hook.names) if self.hook is not None else [])
        for b in range(o.num_batches):
            y = o.targets[b * o.batch_size : (b + 1) * o.batch_size].to(o.device)
            x = self.optimise_batch(y, b, record if b == 0 else None)
            with torch.no_grad():
                record.correct += int((self.teacher(x).argmax(dim=1) == y).sum())
            record.inputs.append(x.to("cpu", torch.float32))
        return record

    def optimise_batch(self, y: Tensor, batch: int, record: Optional[_Record]) -> Tensor:
        """``steps`` Adam steps on a fresh batch of noise for the targets ``y``; logs to ``record`` if given."""
        o = self.options
        x = self.initial_inputs(len(y)).requires_grad_(True)
        optimizer = torch.optim.Adam([x], lr=o.lr, betas=ADAM_BETAS, eps=1e-8)
        for step in range(o.steps):
            loss, terms = self.step(x, y, optimizer, step, first=batch == 0 and step == 0)
            if record is not None:
                record.log(loss, terms)
            self.bar.update(1)
            if o.progress and (step % 50 == 0 or step == o.steps - 1):
                self.bar.set_postfix(batch=f"{batch + 1}/{o.num_batches}", loss=f"{float(loss.detach()):.4g}")
        return x.detach()

    def initial_inputs(self, n: int) -> Tensor:
        """``U(low, high)`` noise inside ``input_range``, or ``N(0, 1)`` without one."""
        o = self.options
        if o.input_range is None:
            init = torch.randn((n, *o.input_shape), generator=self.generator)
        else:
            low, high = o.input_range
            init = torch.rand((n, *o.input_shape), generator=self.generator) * (high - low) + low
        return init.to(device=o.device, dtype=o.dtype)

    def step(
        self, x: Tensor, y: Tensor, optimizer: torch.optim.Optimizer, step: int, first: bool
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """One update of ``x``: the objective on a jittered copy, its gradient, an Adam step, the clamp.

        Returns the objective and its unweighted terms, both from before the update.
        """
        o = self.options
        if o.lr_schedule == "cosine":
            for group in optimizer.param_groups:
                group["lr"] = o.lr_at(step)
        x_in = _jitter_flip(x, o.jitter, o.flip, self.generator)
        if self.hook is not None:
            self.hook.clear()
        logits = self.forward(x_in, len(y)) if first else self.teacher(x_in)
        ce = F.cross_entropy(logits.float(), y)
        terms = {
            "ce": ce,
            "bn": self.hook.loss(o.layer_weights) if self.hook is not None else ce.new_zeros(()),
            "tv": total_variation_prior(x) if o.tv_weight else ce.new_zeros(()),
            "l2": input_l2_prior(x) if o.l2_weight else ce.new_zeros(()),
        }
        loss = o.ce_weight * ce + o.bn_weight * terms["bn"] + o.tv_weight * terms["tv"] + o.l2_weight * terms["l2"]
        (grad,) = torch.autograd.grad(loss, [x])
        x.grad = grad
        optimizer.step()
        if o.input_range is not None:
            with torch.no_grad():
                x.clamp_(*o.input_range)
        return loss, terms

    def forward(self, x_in: Tensor, n: int) -> Tensor:
        """The run's first forward: a teacher that does not fit ``input_shape`` / ``num_classes`` is named."""
        o = self.options
        name = type(self.teacher).__name__
        try:
            logits = self.teacher(x_in)
        except RuntimeError as err:
            raise ValueError(
                f"`input_shape`={o.input_shape!r} does not fit {name}: the forward of a batch {tuple(x_in.shape)} "
                f"failed with: {err}"
            ) from None
        if logits.dim() != 2 or logits.shape[1] != o.num_classes:
            raise ValueError(
                f"`num_classes`={o.num_classes!r} does not fit {name}: its output for a batch {tuple(x_in.shape)} "
                f"has shape {tuple(logits.shape)}, expected [{n}, {o.num_classes}]."
            )
        return logits


def _jitter_flip(x: Tensor, jitter: int, flip: bool, generator: torch.Generator) -> Tensor:
    """Roll ``x`` by a random shift in ``[-jitter, jitter]`` per spatial dimension; mirror it with probability 1/2."""
    if jitter:
        shifts = torch.randint(-jitter, jitter + 1, (x.dim() - 2,), generator=generator).tolist()
        if any(shifts):
            x = torch.roll(x, shifts=shifts, dims=tuple(range(2, x.dim())))
    if flip and bool(torch.rand((), generator=generator) < 0.5):
        x = torch.flip(x, dims=(x.dim() - 1,))
    return x


def _result(teacher: nn.Module, options: InversionOptions, record: _Record, elapsed: float) -> dict[str, Any]:
    """The transfer set and a record of the run: every option, the BatchNorm layers, the teacher, the time."""
    o = options
    teacher_acc = record.correct / o.num_samples
    meta = {
        "method": "deep_inversion",
        "paper": PAPER,
        "teacher": type(teacher).__name__,
        "num_samples": o.num_samples,
        "input_shape": list(o.input_shape),
        "num_classes": o.num_classes,
        "batch_size": o.batch_size,
        "steps": o.steps,
        "lr": o.lr,
        "lr_schedule": o.lr_schedule,
        "betas": list(ADAM_BETAS),
        "bn_weight": o.bn_weight,
        "first_bn_multiplier": o.first_bn_multiplier,
        "bn_layer_weights": o.layer_weights,
        "bn_layers": record.bn_layers,
        "tv_weight": o.tv_weight,
        "l2_weight": o.l2_weight,
        "ce_weight": o.ce_weight,
        "jitter": o.jitter,
        "flip": o.flip,
        "input_range": list(o.input_range) if o.input_range is not None else None,
        "seed": o.seed,
        "teacher_acc": teacher_acc,
        "time_s": elapsed,
        "torch": str(torch.__version__),
    }
    return {
        "inputs": torch.cat(record.inputs).contiguous(),
        "targets": o.targets,
        "teacher_acc": teacher_acc,
        "loss_history": record.history,
        "loss_terms": record.terms,
        "meta": meta,
    }
