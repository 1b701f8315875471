"""Framework overhead of a distillation step: ``KnowledgeDistillation`` under ``Trainer.fit`` vs a plain loop.

Both sides do the same unavoidable work on the same models, batch and optimizer: teacher forward
under ``no_grad``, student forward and backward, ``kd_loss`` + cross-entropy, an optimizer step. The
plain loop does nothing else; the Lightning side runs with its default logging (``train/*`` on the
steps Lightning writes, see ``DistillationModule.should_log_step``), progress bar off, no
validation, no checkpointing. The two are timed alternately, several repeats each, in one process,
and the median time per step of each is reported with the ratio Lightning / plain (1.00 = no
overhead) and the samples/s of each side.

The speed options apply identically to both sides: ``--device cuda`` (models, batch and optimizer on
the GPU, ``torch.cuda.synchronize()`` before every clock read); ``--precision bf16-mixed`` /
``16-mixed`` (plain loop: ``torch.autocast(..., cache_enabled=False)`` with that dtype around the
forwards and the loss, plus a ``GradScaler`` for float16, as Lightning's ``MixedPrecision`` plugin
does; Lightning side: ``Trainer(precision=...)``); ``--channels-last`` (plain loop: models and input
in ``torch.channels_last``; Lightning side: the ``ChannelsLast`` callback); ``--compile``
(plain loop: ``nn.Module.compile()`` on student and teacher; Lightning side: ``CompileModels("both")``,
which does the same when fitting starts; both sides then get an untimed warm-up so compilation is
never timed). ``--device cuda`` without a CUDA device prints "skipped: no CUDA device" and exits 0.
Run by hand, not in the test suite:

    python benchmarks/step_overhead.py                    # digits pair and resnet32x4 -> resnet8x4
    python benchmarks/step_overhead.py --pairs digits --steps 200 --repeats 5
    python benchmarks/step_overhead.py --device cuda --pairs resnet32x4_to_resnet8x4 --batch 256 \
        --precision bf16-mixed --channels-last --compile   # GPU; prints "skipped: no CUDA device" without one
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import statistics
import sys
import time
import warnings
from dataclasses import dataclass
from functools import partial

import lightning as L
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from lightning_distill import KnowledgeDistillation
from lightning_distill.callbacks import ChannelsLast, CompileModels
from lightning_distill.losses import kd_loss
from lightning_distill.models import DigitsCNN, DigitsMLP, ResNet8x4, ResNet32x4

warnings.filterwarnings("ignore")
for _name in ("lightning.pytorch", "lightning.fabric"):  # "GPU available: ...", tips, "`Trainer.fit` stopped"
    logging.getLogger(_name).setLevel(logging.WARNING)

PAIRS = {
    # name: (teacher, student, input shape, classes, batch size)
    "digits": (lambda: DigitsCNN(), lambda: DigitsMLP(), (1, 8, 8), 10, 64),
    "resnet32x4_to_resnet8x4": (lambda: ResNet32x4(num_classes=100), lambda: ResNet8x4(num_classes=100), (3, 32, 32), 100, 32),
}


_AUTOCAST = {"32": None, "bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}


@dataclass(frozen=True)
class Settings:
    """Speed options applied identically to the plain loop and the Lightning side."""

    device: str = "cpu"
    precision: str = "32"
    channels_last: bool = False
    compile: bool = False

    def sync(self) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()

    def autocast(self):
        dtype = _AUTOCAST[self.precision]
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device, dtype=dtype, cache_enabled=False)  # as Lightning's plugin

    def describe(self) -> str:
        return (f"precision {self.precision}, channels_last {'on' if self.channels_last else 'off'}, "
                f"torch.compile {'on' if self.compile else 'off'}")


DEFAULT = Settings()


class _FixedBatches(Dataset):
    """The same pre-made batch over and over (no data-loading cost on either side)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, steps: int) -> None:
        self.x, self.y, self.steps = x, y, steps
        self.index = torch.arange(len(y), device=y.device)

    def __len__(self) -> int:
        return self.steps

    def __getitem__(self, i: int):
        return self.x, self.y, self.index


def _loader(x, y, steps) -> DataLoader:
    return DataLoader(_FixedBatches(x, y, steps), batch_size=None, shuffle=False)


def plain_loop(teacher, student, x, y, steps, temperature=4.0, alpha=0.9, settings: Settings = DEFAULT) -> float:
    """Seconds per step of the unavoidable work."""
    teacher.eval()
    student.train()
    opt = torch.optim.SGD(student.parameters(), lr=0.01, momentum=0.9)
    # as Lightning's MixedPrecision plugin: a gradient scaler for float16 only
    scaler = torch.amp.GradScaler(settings.device) if settings.precision == "16-mixed" else None
    settings.sync()
    start = time.perf_counter()
    for _ in range(steps):
        with settings.autocast():
            with torch.no_grad():
                t = teacher(x)
            s = student(x)
            loss = (1 - alpha) * F.cross_entropy(s, y) + alpha * kd_loss(s, t, temperature)
        opt.zero_grad(set_to_none=True)
        if scaler is None:
            loss.backward()
            opt.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
    settings.sync()
    return (time.perf_counter() - start) / steps


class _StepTimer(L.Callback):
    def __init__(self, settings: Settings = DEFAULT) -> None:
        self.settings = settings

    def on_train_start(self, trainer, pl_module):
        self.settings.sync()
        self.start = time.perf_counter()

    def on_train_end(self, trainer, pl_module):
        self.settings.sync()
        self.seconds = time.perf_counter() - self.start


def lightning_fit(teacher, student, x, y, steps, temperature=4.0, alpha=0.9, settings: Settings = DEFAULT,
                  num_classes: int | None = None) -> float:
    """Seconds per step of KnowledgeDistillation under Trainer.fit (setup excluded)."""
    module = KnowledgeDistillation(
        student, teacher, temperature=temperature, alpha=alpha, num_classes=num_classes or int(y.max()) + 1,
        optimizer=partial(torch.optim.SGD, lr=0.01, momentum=0.9),
    )
    module.example_input_array = x[:2]
    timer = _StepTimer(settings)
    extra = ([ChannelsLast()] if settings.channels_last else []) + ([CompileModels("both")] if settings.compile else [])
    trainer = L.Trainer(
        accelerator=settings.device, devices=1, precision=settings.precision, max_steps=steps, max_epochs=1,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        limit_val_batches=0, num_sanity_val_steps=0, callbacks=[timer, *extra],
    )
    trainer.fit(module, train_dataloaders=_loader(x, y, steps))
    return timer.seconds / steps


class _BareKD(L.LightningModule):
    """The floor of any LightningModule: the same work in ``training_step``, no logging, no metrics."""

    def __init__(self, teacher, student, temperature: float, alpha: float) -> None:
        super().__init__()
        self.teacher, self.student, self.temperature, self.alpha = teacher, student, temperature, alpha
        self.teacher.requires_grad_(False)

    def training_step(self, batch, batch_idx):
        x, y, _ = batch
        with torch.no_grad():
            t = self.teacher(x)
        s = self.student(x)
        return (1 - self.alpha) * F.cross_entropy(s, y) + self.alpha * kd_loss(s, t, self.temperature)

    def configure_optimizers(self):
        return torch.optim.SGD(self.student.parameters(), lr=0.01, momentum=0.9)

    def train(self, mode: bool = True):
        super().train(mode)
        self.teacher.eval()
        return self


def bare_lightning_fit(teacher, student, x, y, steps, temperature=4.0, alpha=0.9, settings: Settings = DEFAULT) -> float:
    """Seconds per step of a minimal LightningModule under the same Trainer settings."""
    timer = _StepTimer(settings)
    trainer = L.Trainer(
        accelerator=settings.device, devices=1, precision=settings.precision, max_steps=steps, max_epochs=1,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        limit_val_batches=0, num_sanity_val_steps=0, callbacks=[timer],
    )
    trainer.fit(_BareKD(teacher, student, temperature, alpha), train_dataloaders=_loader(x, y, steps))
    return timer.seconds / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", nargs="+", default=list(PAIRS), choices=list(PAIRS))
    parser.add_argument("--steps", type=int, default=None, help="steps per timed run (default: 100 digits, 10 resnet)")
    parser.add_argument("--repeats", type=int, default=3, help="alternating repeats of each side")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--batch", type=int, default=None, help="batch size (default: the pair's, 64 digits, 32 resnet)")
    parser.add_argument("--precision", choices=tuple(_AUTOCAST), default="32",
                        help="32, or autocast to bfloat16 / float16 (Trainer precision of the same name)")
    parser.add_argument("--channels-last", action="store_true", help="channels_last memory format for models and inputs")
    parser.add_argument("--compile", action="store_true", help="torch.compile student and teacher (both sides)")
    parser.add_argument("--no-bare", action="store_true",
                        help="skip the third timing: a minimal LightningModule doing the same work (Lightning's floor)")
    parser.add_argument("--quick", action="store_true", help="smoke test: 2 steps, 1 repeat, batch <= 8")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("skipped: no CUDA device (torch.cuda.is_available() is False); run with --device cpu")
        sys.exit(0)
    if args.quick:
        args.steps, args.repeats = args.steps or 2, 1
    settings = Settings(args.device, args.precision, args.channels_last, args.compile)
    where = torch.cuda.get_device_name(0) if args.device == "cuda" else "CPU"
    print(f"torch {torch.__version__}, lightning {L.__version__}, {torch.get_num_threads()} threads, {where}")
    if settings != DEFAULT:
        print(settings.describe())
    for name in args.pairs:
        make_teacher, make_student, shape, classes, batch = PAIRS[name]
        batch = args.batch or (min(batch, 8) if args.quick else batch)
        steps = args.steps or (100 if name == "digits" else 10)
        torch.manual_seed(0)
        x, y = torch.randn(batch, *shape), torch.randint(0, classes, (batch,))
        teacher, student = make_teacher(), make_student()
        x, y = x.to(args.device), y.to(args.device)
        teacher.to(args.device)
        student.to(args.device)
        if settings.channels_last:
            teacher.to(memory_format=torch.channels_last)
            student.to(memory_format=torch.channels_last)
            x = x.contiguous(memory_format=torch.channels_last)
        if settings.compile:
            teacher.compile()
            student.compile()
        plain_loop(teacher, student, x, y, 3, settings=settings)  # warm-up (allocator, kernels, compilation)
        if settings.compile:
            lightning_fit(teacher, student, x, y, 3, settings=settings, num_classes=classes)  # its compilation, untimed
        plain, light, bare = [], [], []
        for _ in range(args.repeats):
            plain.append(plain_loop(teacher, student, x, y, steps, settings=settings))
            light.append(lightning_fit(teacher, student, x, y, steps, settings=settings, num_classes=classes))
            if not args.no_bare:
                bare.append(bare_lightning_fit(teacher, student, x, y, steps, settings=settings))
        p, lt = statistics.median(plain), statistics.median(light)
        floor = ""
        if bare:
            b = statistics.median(bare)
            # our step against Lightning's floor, paired per repeat (both timed back to back): the library's own cost
            paired = sorted(lt_i / b_i for lt_i, b_i in zip(light, bare))
            floor = (
                f" | bare LightningModule (same work, no logging) {1e3 * b:.2f} ms/step, ratio {b / p:.2f}"
                f" | KnowledgeDistillation / bare LightningModule: {statistics.median(paired):.3f}"
                f" (median of {len(paired)} paired repeats, {paired[0]:.3f}..{paired[-1]:.3f})"
            )
        print(
            f"{name}: batch {batch}, {steps} steps x {args.repeats} alternating repeats | plain loop {1e3 * p:.2f} ms/step"
            f" ({batch / p:.0f} samples/s) | KnowledgeDistillation + Trainer.fit {1e3 * lt:.2f} ms/step"
            f" ({batch / lt:.0f} samples/s) | ratio {lt / p:.2f}{floor}"
        )


if __name__ == "__main__":
    main()
