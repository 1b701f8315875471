"""Epoch time with a teacher-output cache vs a live teacher vs the student trained alone.

For one teacher/student pair, three fits of one training epoch each on the same data, same batch
order, same optimizer and the same initial student weights:

* (a) ``Classifier(student)``: the student alone, hard labels only -- the floor;
* (b) ``KnowledgeDistillation(student, teacher)``: the teacher runs on every batch;
* (c) ``KnowledgeDistillation(..., teacher_cache=TeacherCache(...))``: the teacher runs once per
  sample when training starts (timed separately, not part of the epoch) and every step looks its
  logits up by sample index.

The epoch is timed by a callback from ``on_train_epoch_start`` to ``on_train_epoch_end`` (setup,
the probe and the cache build are outside it). The three are run alternately, ``--repeats`` times
each, in one process, after one untimed warm-up round; medians are reported with the ratios b/a and
c/a (target: c/a <= 1.15). Before timing, the warm-up round checks that (b) and (c) compute the
same first-step loss (to 1e-5), so the cached run cannot silently do different work. No
validation, no checkpointing, no logger, progress bar off. Run by hand, not in the test suite:

    python benchmarks/teacher_cache.py                        # digits and resnet32x4 -> resnet8x4
    python benchmarks/teacher_cache.py --pairs resnet --repeats 5
    python benchmarks/teacher_cache.py --storage disk         # memory-mapped cache in a temp dir
    python benchmarks/teacher_cache.py --quick                # smoke test: seconds
"""

from __future__ import annotations

import argparse
import logging
import math
import statistics
import tempfile
import time
import warnings
from functools import partial
from typing import Any, Optional

import lightning as L
import torch
from _machine import describe  # benchmarks/_machine.py: this folder is on sys.path when run as a script
from torch.utils.data import DataLoader

from lightning_distill import Classifier, KnowledgeDistillation
from lightning_distill.cache import TeacherCache
from lightning_distill.data import DigitsDataModule
from lightning_distill.data.common import EpochShuffleSampler, TensorClassificationDataset
from lightning_distill.models import DigitsCNN, DigitsMLP, ResNet8x4, ResNet32x4

warnings.filterwarnings("ignore")
for _name in ("lightning.pytorch", "lightning.fabric"):  # "GPU available: ...", tips, "`Trainer.fit` stopped"
    logging.getLogger(_name).setLevel(logging.WARNING)

LOSS_TOLERANCE = 1e-5  # |first-step loss (b) - (c)|, absolute, and relative to the loss when it is > 1


def _digits_data(samples: Optional[int], seed: int) -> TensorClassificationDataset:
    dm = DigitsDataModule()
    dm.setup("fit")
    ds = dm.train_dataset
    if samples is not None:
        ds = TensorClassificationDataset(ds.inputs[:samples], ds.targets[:samples])
    return ds


def _synthetic_32x32(samples: Optional[int], seed: int, classes: int = 100) -> TensorClassificationDataset:
    g = torch.Generator().manual_seed(seed)
    n = samples or 512
    return TensorClassificationDataset(torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, classes, (n,), generator=g))


PAIRS: dict[str, dict[str, Any]] = {
    # teacher factory (+ checkpoint), student factory, dataset factory, batch size
    "digits": dict(
        teacher=lambda: DigitsCNN(num_classes=10, width=16, dropout=0.25), checkpoint="zoo:digits_cnn",
        student=lambda: DigitsMLP(num_classes=10, hidden=16), data=_digits_data, batch=64,
        what="DigitsCNN -> DigitsMLP, DigitsDataModule training set",
    ),
    "resnet": dict(
        teacher=lambda: ResNet32x4(num_classes=100), checkpoint=None,
        student=lambda: ResNet8x4(num_classes=100), data=_synthetic_32x32, batch=64,
        what="ResNet32x4 -> ResNet8x4, synthetic 3x32x32, 100 classes",
    ),
}


class _EpochTimer(L.Callback):
    """Seconds of the (last) training epoch, the first step's loss, the samples seen and the teacher
    forwards run during the epoch (counted by a forward pre-hook on the shared teacher)."""

    def __init__(self, teacher: torch.nn.Module) -> None:
        self.seconds = math.nan
        self.first_loss: Optional[float] = None
        self.samples = 0
        self.teacher_calls = 0
        self._teacher = teacher
        self._handle: Any = None

    def _count(self, module, inputs) -> None:
        self.teacher_calls += 1

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if self._handle is None:
            self._handle = self._teacher.register_forward_pre_hook(self._count)
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.first_loss is None:
            loss = outputs["loss"] if isinstance(outputs, dict) else outputs
            self.first_loss = float(loss.detach())
        self.samples += int(batch[0].shape[0])

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.seconds = time.perf_counter() - self._start
        self._handle.remove()
        self._handle = None



class Runner:
    """Builds and fits the three variants of one pair on one dataset."""

    def __init__(self, pair: dict[str, Any], dataset: TensorClassificationDataset, batch: int, seed: int,
                 storage: str, directory: Optional[str]) -> None:
        self.pair, self.dataset, self.batch, self.seed = pair, dataset, batch, seed
        self.storage, self.directory = storage, directory
        torch.manual_seed(seed)
        self.teacher = pair["teacher"]()
        if pair["checkpoint"] is not None:
            from lightning_distill.checkpoint import load_weights

            load_weights(self.teacher, pair["checkpoint"], argument="teacher_checkpoint")
        self.teacher.eval()
        self.optimizer = partial(torch.optim.SGD, lr=0.01, momentum=0.9)
        self.build_seconds: list[float] = []

    def _student(self) -> torch.nn.Module:
        torch.manual_seed(self.seed + 1)  # identical initial student in every variant
        return self.pair["student"]()

    def _module(self, variant: str) -> L.LightningModule:
        if variant == "a":
            module: L.LightningModule = Classifier(self._student(), optimizer=self.optimizer)
        else:
            cache = None
            if variant == "c":
                cache = TeacherCache(storage=self.storage, directory=self.directory, progress=False)
            module = KnowledgeDistillation(self._student(), self.teacher, temperature=4.0, alpha=0.9,
                                           optimizer=self.optimizer, teacher_cache=cache)
            if cache is not None:
                source = module.teacher_source  # a CachedTeacher: it fills the cache when training starts
                build = source.on_train_start

                def timed_build(host: L.LightningModule) -> None:
                    start = time.perf_counter()
                    build(host)
                    self.build_seconds.append(time.perf_counter() - start)

                source.on_train_start = timed_build  # type: ignore[method-assign]
        module.example_input_array = self.dataset.inputs[:2]
        return module

    def _loader(self) -> DataLoader:
        # the same order in every fit: a sampler seeded only by (seed, epoch)
        return DataLoader(self.dataset, batch_size=self.batch, sampler=EpochShuffleSampler(self.dataset, seed=self.seed))

    def fit(self, variant: str) -> _EpochTimer:
        module, timer = self._module(variant), _EpochTimer(self.teacher)
        trainer = L.Trainer(
            accelerator="cpu", devices=1, max_epochs=1, logger=False, enable_checkpointing=False,
            enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
            callbacks=[timer],
        )
        trainer.fit(module, train_dataloaders=self._loader())
        return timer


def _check_same_work(name: str, b: _EpochTimer, c: _EpochTimer) -> float:
    assert b.first_loss is not None and c.first_loss is not None
    diff = abs(b.first_loss - c.first_loss)
    if diff > LOSS_TOLERANCE * max(1.0, abs(b.first_loss)):
        raise AssertionError(
            f"{name}: first-step loss with the live teacher ({b.first_loss:.8f}) and with the cache "
            f"({c.first_loss:.8f}) differ by {diff:.3g} > {LOSS_TOLERANCE:g}: the two runs do not do the same work."
        )
    if b.samples != c.samples:
        raise AssertionError(f"{name}: live teacher saw {b.samples} samples per epoch, cached run {c.samples}.")
    if b.teacher_calls == 0 or c.teacher_calls != 0:
        raise AssertionError(
            f"{name}: the teacher ran {b.teacher_calls} times in the live epoch and {c.teacher_calls} times in the "
            "cached epoch; expected once per step and never."
        )
    return diff


def run_pair(name: str, args: argparse.Namespace, directory: Optional[str]) -> list[str]:
    pair = PAIRS[name]
    batch = args.batch or (8 if args.quick else pair["batch"])
    samples = args.samples or (2 * batch if args.quick else None)
    dataset = pair["data"](samples, args.seed)
    runner = Runner(pair, dataset, batch, args.seed, args.storage, directory)
    steps = math.ceil(len(dataset) / batch)

    # untimed warm-up round, which also checks that (b) and (c) do the same work
    warm = {v: runner.fit(v) for v in "abc"}
    diff = _check_same_work(name, warm["b"], warm["c"])
    teacher_calls = warm["b"].teacher_calls
    first_build = runner.build_seconds[-1]

    times: dict[str, list[float]] = {"a": [], "b": [], "c": []}
    for _ in range(args.repeats):
        for v in "abc":
            timer = runner.fit(v)
            times[v].append(timer.seconds)
            if v == "b":
                live = timer
        _check_same_work(name, live, timer)
    med = {v: statistics.median(t) for v, t in times.items()}
    later_builds = runner.build_seconds[1:]
    if args.storage == "disk":
        build = f"cache build {first_build:.2f} s (first fit), reopen {statistics.median(later_builds):.3f} s (median)"
    else:
        build = f"cache build {statistics.median(runner.build_seconds):.2f} s (median, every fit rebuilds)"
    target = "yes" if med["c"] / med["a"] <= 1.15 else "NO"
    rows = [
        f"### {name}: {pair['what']}",
        "",
        f"{len(dataset)} samples, batch {batch}, {steps} steps/epoch, {args.repeats} alternating repeats "
        f"(+1 warm-up); storage={args.storage}; {build}; first-step loss live vs cached differs by {diff:.2g}; "
        f"teacher forwards per epoch: live {teacher_calls}, cached 0",
        "",
        "| variant | epoch time (median) | samples/s | ratio to student alone |",
        "|---|---:|---:|---:|",
        f"| (a) Classifier, student alone | {med['a']:.3f} s | {len(dataset) / med['a']:.0f} | 1.00 |",
        f"| (b) KnowledgeDistillation, live teacher | {med['b']:.3f} s | {len(dataset) / med['b']:.0f} "
        f"| {med['b'] / med['a']:.2f} |",
        f"| (c) KnowledgeDistillation + TeacherCache({args.storage}) | {med['c']:.3f} s | {len(dataset) / med['c']:.0f} "
        f"| {med['c'] / med['a']:.2f} |",
        "",
        f"c/a <= 1.15 (target): {target}; all epoch times (s): "
        + "; ".join(f"{v}: " + ", ".join(f"{t:.3f}" for t in times[v]) for v in "abc"),
        "",
    ]
    return rows


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", nargs="+", default=list(PAIRS), choices=list(PAIRS))
    parser.add_argument("--repeats", type=int, default=3, help="alternating timed repeats of each variant")
    parser.add_argument("--storage", choices=("memory", "disk"), default="memory",
                        help="TeacherCache storage; disk: memory-mapped files in a temporary directory")
    parser.add_argument("--batch", type=int, default=None, help="batch size (default 64; 8 with --quick)")
    parser.add_argument("--samples", type=int, default=None,
                        help="training samples (default: digits 1,079, resnet 512; 2 batches with --quick)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="smoke test: 2 batches, 1 repeat")
    args = parser.parse_args(argv)
    if args.quick:
        args.repeats = 1
    print(f"Machine: {describe()}")
    print()
    def run(directory: Optional[str]) -> None:
        for name in args.pairs:
            print("\n".join(run_pair(name, args, directory)), flush=True)

    if args.storage == "disk":
        with tempfile.TemporaryDirectory(prefix="teacher_cache_bench_") as directory:
            run(directory)
    else:
        run(None)


if __name__ == "__main__":
    main()
