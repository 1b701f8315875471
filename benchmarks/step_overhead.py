"""Framework overhead of a distillation step: ``KnowledgeDistillation`` under ``Trainer.fit`` vs a plain loop.

Both sides do the same unavoidable work on the same models, batch and optimizer: teacher forward
under ``no_grad``, student forward and backward, ``kd_loss`` + cross-entropy, an optimizer step. The
plain loop does nothing else; the Lightning side runs with its default logging (``train/*`` every
step, progress bar off, no validation, no checkpointing). The two are timed alternately, several
repeats each, in one process, and the median time per step of each is reported with the ratio
Lightning / plain (1.00 = no overhead). Run by hand, not in the test suite:

    python benchmarks/step_overhead.py                    # digits pair and resnet32x4 -> resnet8x4
    python benchmarks/step_overhead.py --pairs digits --steps 200 --repeats 5
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from functools import partial

import lightning as L
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from lightning_distill import KnowledgeDistillation
from lightning_distill.losses import kd_loss
from lightning_distill.models import DigitsCNN, DigitsMLP, ResNet8x4, ResNet32x4

warnings.filterwarnings("ignore")

PAIRS = {
    # name: (teacher, student, input shape, classes, batch size)
    "digits": (lambda: DigitsCNN(), lambda: DigitsMLP(), (1, 8, 8), 10, 64),
    "resnet32x4_to_resnet8x4": (lambda: ResNet32x4(num_classes=100), lambda: ResNet8x4(num_classes=100), (3, 32, 32), 100, 32),
}


class _FixedBatches(Dataset):
    """The same pre-made batch over and over (no data-loading cost on either side)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, steps: int) -> None:
        self.x, self.y, self.steps = x, y, steps

    def __len__(self) -> int:
        return self.steps

    def __getitem__(self, i: int):
        return self.x, self.y, torch.arange(len(self.y))


def _loader(x, y, steps) -> DataLoader:
    return DataLoader(_FixedBatches(x, y, steps), batch_size=None, shuffle=False)


def plain_loop(teacher, student, x, y, steps, temperature=4.0, alpha=0.9) -> float:
    """Seconds per step of the unavoidable work."""
    teacher.eval()
    student.train()
    opt = torch.optim.SGD(student.parameters(), lr=0.01, momentum=0.9)
    start = time.perf_counter()
    for _ in range(steps):
        with torch.no_grad():
            t = teacher(x)
        s = student(x)
        loss = (1 - alpha) * F.cross_entropy(s, y) + alpha * kd_loss(s, t, temperature)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return (time.perf_counter() - start) / steps


class _StepTimer(L.Callback):
    def on_train_start(self, trainer, pl_module):
        self.start = time.perf_counter()

    def on_train_end(self, trainer, pl_module):
        self.seconds = time.perf_counter() - self.start


def lightning_fit(teacher, student, x, y, steps, temperature=4.0, alpha=0.9) -> float:
    """Seconds per step of KnowledgeDistillation under Trainer.fit (setup excluded)."""
    module = KnowledgeDistillation(
        student, teacher, temperature=temperature, alpha=alpha, num_classes=int(y.max()) + 1,
        optimizer=partial(torch.optim.SGD, lr=0.01, momentum=0.9),
    )
    module.example_input_array = x[:2]
    timer = _StepTimer()
    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_steps=steps, max_epochs=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
        callbacks=[timer],
    )
    trainer.fit(module, train_dataloaders=_loader(x, y, steps))
    return timer.seconds / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", nargs="+", default=list(PAIRS), choices=list(PAIRS))
    parser.add_argument("--steps", type=int, default=None, help="steps per timed run (default: 100 digits, 10 resnet)")
    parser.add_argument("--repeats", type=int, default=3, help="alternating repeats of each side")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, lightning {L.__version__}, {torch.get_num_threads()} threads, CPU")
    for name in args.pairs:
        make_teacher, make_student, shape, classes, batch = PAIRS[name]
        steps = args.steps or (100 if name == "digits" else 10)
        torch.manual_seed(0)
        x, y = torch.randn(batch, *shape), torch.randint(0, classes, (batch,))
        teacher, student = make_teacher(), make_student()
        plain_loop(teacher, student, x, y, 3)  # warm-up (allocator, kernels)
        plain, light = [], []
        for _ in range(args.repeats):
            plain.append(plain_loop(teacher, student, x, y, steps))
            light.append(lightning_fit(teacher, student, x, y, steps))
        p, lt = statistics.median(plain), statistics.median(light)
        print(
            f"{name}: batch {batch}, {steps} steps x {args.repeats} alternating repeats | plain loop {1e3 * p:.2f} ms/step"
            f" | KnowledgeDistillation + Trainer.fit {1e3 * lt:.2f} ms/step | ratio {lt / p:.2f}"
        )


if __name__ == "__main__":
    main()
