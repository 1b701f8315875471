"""Training throughput (samples/s) of each digits strategy config relative to the student trained alone.

Every config is built exactly as ``lightning-distill fit --config ...`` would build it
(``DistillCLI(args=[...], run=False)``), with only the trainer overridden: no logger, no callbacks,
no checkpointing, no progress bar or model summary, no validation (``limit_val_batches=0``), and
``--epochs`` epochs (default 1). A callback times from ``on_train_epoch_start`` of the first epoch to
``on_train_end`` (setup, the shape probe and building the models are outside it) and counts the
samples of every training batch; samples/s = samples / seconds.

Each strategy is compared with ``Classifier`` on the *same student* (the config whose model is the
same class with the same arguments): ``baseline.yaml`` for the DigitsMLP configs,
``baseline_student_cnn.yaml`` for the DigitsStudentCNN ones, ``teacher.yaml`` for
``self_distillation.yaml`` (a DigitsCNN). The relative column is strategy samples/s / reference
samples/s (1.00 = as fast as training the student alone; 0.50 = half as fast). Configs run in turn,
``--repeats`` rounds in one process after an untimed 2-batch warm-up round, medians reported. ``born_again.yaml`` runs all its generations
(``epochs_per_generation = --epochs``, so ``generations x --epochs`` epochs); generation 1 has no
teacher. Run by hand, not in the test suite:

    python benchmarks/throughput.py                       # default config list, 1 epoch, 3 rounds
    python benchmarks/throughput.py --epochs 3 --repeats 5
    python benchmarks/throughput.py --configs configs/digits/baseline.yaml configs/digits/kd.yaml
    python benchmarks/throughput.py --quick               # smoke test: 2 batches, 1 round
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import statistics
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Iterator, Optional

import lightning as L
import yaml
from _machine import describe  # benchmarks/_machine.py: this folder is on sys.path when run as a script

from lightning_distill.cli import DistillCLI
from lightning_distill.module import TrainingModule, unpack_batch

warnings.filterwarnings("ignore")
for _name in ("lightning.pytorch", "lightning.fabric"):  # "GPU available: ...", tips, "`Trainer.fit` stopped"
    logging.getLogger(_name).setLevel(logging.WARNING)

REPO = Path(__file__).resolve().parents[1]
DIGITS = REPO / "configs" / "digits"
DEFAULT_CONFIGS = [
    "baseline_student_cnn", "kd_student_cnn", "fitnets", "at", "sp", "rkd", "cka", "hidden_states", "crd", "ctkd",
    "self_distillation", "born_again", "mutual", "online", "multi_teacher", "baseline", "kd",
]
# Classifier configs that can serve as "the student alone"; added automatically when a config needs one
REFERENCES = ["baseline", "baseline_student_cnn", "teacher"]


class _Throughput(L.Callback):
    def __init__(self) -> None:
        self.start: Optional[float] = None
        self.seconds = float("nan")
        self.samples = 0

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if self.start is None:
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.samples += TrainingModule.batch_size_of(unpack_batch(batch))

    def on_train_end(self, trainer, pl_module) -> None:
        self.seconds = time.perf_counter() - self.start


def _config_path(name: str) -> Path:
    path = Path(name)
    if path.suffix != ".yaml":
        path = DIGITS / f"{name}.yaml"
    if not path.is_file():
        raise SystemExit(f"config {name!r} not found (looked for {path}).")
    return path.resolve()


def _spec(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text())


def _trained_model(spec: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """(class_path, init_args) of the network a config trains: the Classifier's model or the strategy's student."""
    init = spec["model"].get("init_args", {})
    net = init.get("model") if spec["model"]["class_path"].endswith("Classifier") else init.get("student")
    if net is None and init.get("students"):
        net = init["students"][0]
    if not isinstance(net, dict):
        return "?", {}
    return net["class_path"], dict(net.get("init_args", {}))


def _is_classifier(spec: dict[str, Any]) -> bool:
    return spec["model"]["class_path"].rsplit(".", 1)[-1] == "Classifier"


def _reference(spec: dict[str, Any], path: Path, refs: dict[Path, dict[str, Any]]) -> Optional[Path]:
    if _is_classifier(spec):
        return path
    want = _trained_model(spec)
    return next((p for p, s in refs.items() if _trained_model(s) == want), None)


@contextlib.contextmanager
def _in_dir(directory: str) -> Iterator[None]:
    old = os.getcwd()
    os.chdir(directory)
    try:
        yield
    finally:
        os.chdir(old)


def run_config(path: Path, spec: dict[str, Any], epochs: int, limit_batches: Optional[int], workdir: str) -> _Throughput:
    max_epochs = epochs
    extra: list[str] = []
    if spec["model"]["class_path"].endswith("BornAgain"):
        generations = int(spec["model"]["init_args"].get("generations", 1))
        extra += ["--model.init_args.epochs_per_generation", str(epochs)]
        max_epochs = generations * epochs
    args = [
        "--config", str(path),
        "--trainer.default_root_dir", workdir,
        "--trainer.logger", "false",
        "--trainer.callbacks", "[]",
        "--extra_callbacks", "[]",  # a config's own callbacks (CTKD's TemperatureMonitor, POCL's curriculum)
        "--trainer.enable_checkpointing", "false",
        "--trainer.enable_progress_bar", "false",
        "--trainer.enable_model_summary", "false",
        "--trainer.limit_val_batches", "0",
        "--trainer.num_sanity_val_steps", "0",
        "--trainer.max_epochs", str(max_epochs),
        *(["--trainer.limit_train_batches", str(limit_batches)] if limit_batches else []),
        *extra,
    ]
    with _in_dir(workdir):
        cli = DistillCLI(args=args, run=False, save_config_callback=None)
        timer = _Throughput()
        cli.trainer.callbacks.append(timer)
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    if timer.samples == 0:
        raise RuntimeError(f"{path.name}: no training batch ran.")
    return timer



def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", nargs="+", default=DEFAULT_CONFIGS,
                        help="config names under configs/digits/ or paths to YAML files")
    parser.add_argument("--epochs", type=int, default=1, help="epochs per fit (born_again: per generation)")
    parser.add_argument("--repeats", type=int, default=3, help="rounds over all configs; medians are reported")
    parser.add_argument("--limit-train-batches", type=int, default=None, help="batches per epoch (default: all)")
    parser.add_argument("--quick", action="store_true", help="smoke test: 2 batches per epoch, 1 round, no warm-up")
    args = parser.parse_args(argv)
    if args.quick:
        args.repeats, args.limit_train_batches = 1, args.limit_train_batches or 2

    paths = [_config_path(c) for c in args.configs]
    specs = {p: _spec(p) for p in paths}
    refs = {p: s for p, s in specs.items() if _is_classifier(s)}
    for name in REFERENCES:  # reference configs that are not in the list yet
        p = _config_path(name)
        if p not in refs:
            refs[p] = _spec(p)
    reference = {p: _reference(s, p, refs) for p, s in specs.items()}
    missing = [p.name for p, r in reference.items() if r is None]
    if missing:
        print(f"no Classifier config trains the same student as {missing}: their relative column is empty")
    order = list(dict.fromkeys([r for r in reference.values() if r is not None and r not in specs] + paths))
    specs.update({p: refs[p] for p in order if p not in specs})

    print(f"Machine: {describe()}")
    print(f"{args.epochs} epoch(s) per fit"
          + (f", {args.limit_train_batches} batches per epoch" if args.limit_train_batches else ", full epochs")
          + f", {args.repeats} round(s) over {len(order)} configs in one process"
          + (" (no warm-up)" if args.quick else " after an untimed 2-batch warm-up round")
          + ", medians; DigitsDataModule batch 64")
    rates: dict[Path, list[float]] = {p: [] for p in order}
    with tempfile.TemporaryDirectory(prefix="throughput_bench_") as workdir:
        if not args.quick:  # untimed: first-call costs (kernel selection, lazy imports) of every config's models
            for p in order:
                run_config(p, specs[p], 1, 2, workdir)
        for _ in range(args.repeats):
            for p in order:
                timer = run_config(p, specs[p], args.epochs, args.limit_train_batches, workdir)
                rates[p].append(timer.samples / timer.seconds)
    median = {p: statistics.median(r) for p, r in rates.items()}

    print()
    print("| config | strategy | samples/s | relative to student alone |")
    print("|---|---|---:|---:|")
    for p in order:
        strategy = specs[p]["model"]["class_path"].rsplit(".", 1)[-1]
        student = _trained_model(specs[p])[0].rsplit(".", 1)[-1]
        ref = reference.get(p) or _reference(specs[p], p, refs)
        if ref is None:
            rel = "-"
        elif ref == p:
            rel = f"1.00 (reference, {student})"
        else:
            rel = f"{median[p] / median[ref]:.2f} (vs {ref.name})"
        print(f"| {p.name} | {strategy} | {median[p]:.0f} | {rel} |")
    print()
    print("samples/s: training samples per second of wall time from the first epoch's start to the end of training "
          "(medians over rounds); relative: samples/s divided by that of Classifier on the same student.")
    for p in order:
        if specs[p]["model"]["class_path"].endswith("BornAgain"):
            g = int(specs[p]["model"]["init_args"].get("generations", 1))
            print(f"{p.name}: all {g} generations, {args.epochs} epoch(s) each (generation 1 trains without a teacher).")


if __name__ == "__main__":
    main()
