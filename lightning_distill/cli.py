"""The ``lightning-distill`` command: a LightningCLI for every module and datamodule of the package.

Usage::

    lightning-distill fit --config configs/digits/kd.yaml          # train, then test
    lightning-distill validate --config configs/digits/kd.yaml --ckpt_path PATH
    lightning-distill test --config configs/digits/kd.yaml --ckpt_path PATH
    lightning-distill predict --config configs/digits/kd.yaml --ckpt_path PATH
    lightning-distill fit --config configs/digits/kd.yaml --wandb true   # also log to W&B

Models and datamodules are chosen by ``class_path`` (subclass mode), so any
``LightningModule`` / ``LightningDataModule`` importable by name works, not only ours.
Options added to LightningCLI's (top level of every config):

* ``wandb`` / ``wandb_project``: add a ``WandbLogger`` next to the configured loggers
  (``WANDB_MODE=offline`` works without a server);
* ``tensorboard``: add a ``TensorBoardLogger``;
* ``extra_callbacks``: callbacks appended to ``trainer.callbacks``, so that a config that loads its
  dataset's shared trainer block (``trainer: shared/trainer.yaml``) can add its own callbacks without
  repeating the block (jsonargparse cannot change one key of a group loaded from a file);
* ``test_after_fit``: after ``fit``, test the final weights and print the student's test
  accuracy next to the teacher's, then the student's at its best validation epoch (when a
  ``ModelCheckpoint`` monitors a metric);
* ``results_file``: write those results as JSON (used by ``lightning-distill compare``).

``lightning-distill compare --configs A.yaml B.yaml --seeds 0 1 2`` runs every config over
several seeds and writes a results table (:mod:`lightning_distill.experiments`).

Each run saves its fully resolved config as ``config.yaml`` in its log directory.

A logger argument may hold the placeholder ``{config}``: it becomes the stem of the last ``--config``
file, so the shared trainer blocks (``name: "{config}"``) log ``configs/digits/kd.yaml`` to
``runs/digits/kd/version_N/`` and ``configs/digits/fitnets.yaml`` to ``runs/digits/fitnets/version_N/``.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from pathlib import Path
from typing import Any, Optional

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import CSVLogger, Logger
from lightning.pytorch.plugins.io import TorchCheckpointIO

from lightning_distill.checkpoint import AtomicCheckpointIO, check_ckpt_path

__all__ = ["CONFIG_PLACEHOLDER", "DistillCLI", "LogConfigCallback", "main"]

#: Replaced, in every string argument of the configured loggers, by the stem of the last ``--config`` file.
CONFIG_PLACEHOLDER = "{config}"


class LogConfigCallback(SaveConfigCallback):
    """Save the resolved config as ``config.yaml`` in the log dir *and* give it, nested, to every logger
    as the run's hyperparameters (a W&B run's config, TensorBoard's hparams, CSV ``hparams.yaml``).

    The modules' own ``hparams`` leave out their ``nn.Module`` arguments (student, teacher) and the
    optimizer factories; the CLI config has all of them as ``class_path`` / ``init_args``.
    """

    def save_config(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        import yaml

        config = yaml.safe_load(self.parser.dump(self.config, skip_none=False))
        config.pop("config", None)  # the --config file paths
        for logger in trainer.loggers:
            logger.log_hyperparams(config)


class DistillCLI(LightningCLI):
    """LightningCLI in subclass mode with the logger switches and the post-fit test summary."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("model_class", L.LightningModule)
        kwargs.setdefault("subclass_mode_model", True)
        kwargs.setdefault("datamodule_class", L.LightningDataModule)
        kwargs.setdefault("subclass_mode_data", True)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("save_config_callback", LogConfigCallback)
        # modules configure their own optimizers (so a teacher can never end up in one)
        kwargs.setdefault("auto_configure_optimizers", False)
        super().__init__(*args, **kwargs)

    def _parse_ckpt_path(self) -> None:
        # LightningCLI reads --ckpt_path here to merge its hyperparameters into the config: first refuse, naming the
        # file, a truncated / unsafe checkpoint or one another module class wrote (lightning_distill.checkpoint)
        check_ckpt_path(self.config)
        super()._parse_ckpt_path()

    def add_arguments_to_parser(self, parser: Any) -> None:
        parser.add_argument("--wandb", type=bool, default=False, help="Also log to Weights & Biases (works with WANDB_MODE=offline).")
        parser.add_argument("--wandb_project", type=str, default="lightning-distill", help="W&B project name.")
        parser.add_argument("--tensorboard", type=bool, default=False, help="Also log to TensorBoard.")
        parser.add_argument(
            "--test_after_fit",
            type=bool,
            default=True,
            help="After fit, test the final weights (and the best-validation checkpoint) and print the accuracies.",
        )
        parser.add_argument(
            "--flush_denormal",
            type=bool,
            default=False,
            help="Flush denormal floats to zero on the CPU (torch.set_flush_denormal) before fitting. Arithmetic on "
            "denormals can be slow on some x86 CPUs; on this project's machine it made no measurable difference "
            "(benchmarks/flush_denormal.py). Changes values only below float32's normal range (~1e-38).",
        )
        parser.add_argument(
            "--results_file",
            type=Optional[str],
            default=None,
            help="After fit, write the test results (last and best epoch), wall time and log dir to this JSON file.",
        )
        parser.add_argument(
            "--extra_callbacks",
            type=Optional[list[Callback]],
            default=None,
            help="Callbacks appended to trainer.callbacks: a config that loads a shared trainer block from a file "
            "adds its own callbacks (e.g. TemperatureMonitor) here instead of repeating the block.",
        )

    # ------------------------------------------------------------------ {config} in logger arguments
    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        _fill_config_placeholder(config)

    # ------------------------------------------------------------------ loggers
    def instantiate_trainer(self, **kwargs: Any) -> L.Trainer:
        config = self.config_init[self.subcommand] if self.subcommand else self.config_init
        extra_callbacks = config.get("extra_callbacks")
        if extra_callbacks:
            configured = config["trainer"].get("callbacks") or []
            configured = list(configured) if isinstance(configured, list) else [configured]
            kwargs["callbacks"] = configured + list(extra_callbacks)
        extra = self._extra_loggers(config)
        if extra:
            configured = config["trainer"].get("logger")
            if configured is None or configured is True:
                base: list[Logger] = [CSVLogger(config["trainer"].get("default_root_dir") or os.getcwd())]
            elif configured is False:
                base = []
            elif isinstance(configured, (list, tuple)):
                base = list(configured)
            else:
                base = [configured]
            kwargs["logger"] = base + extra
        trainer = super().instantiate_trainer(**kwargs)
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:  # Lightning's default writer: make it atomic
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        return trainer

    @staticmethod
    def _extra_loggers(config: Any) -> list[Logger]:
        trainer_cfg = config["trainer"]
        configured = trainer_cfg.get("logger")
        first = configured[0] if isinstance(configured, (list, tuple)) and configured else configured
        save_dir = getattr(first, "save_dir", None) or trainer_cfg.get("default_root_dir") or os.getcwd()
        name = getattr(first, "name", None) or "lightning_distill"
        # extra loggers write into the configured logger's run directory (same version_N), not a new one
        version = getattr(first, "version", None) if isinstance(first, Logger) else None
        loggers: list[Logger] = []
        if config.get("tensorboard"):
            from lightning.pytorch.loggers import TensorBoardLogger

            loggers.append(TensorBoardLogger(save_dir=save_dir, name=name, version=version, sub_dir="tensorboard"))
        if config.get("wandb"):
            from lightning.pytorch.loggers import WandbLogger

            # absolute: wandb's background service may have been started in another working directory
            loggers.append(WandbLogger(project=config.get("wandb_project"), save_dir=os.path.abspath(save_dir), name=name))
        return loggers

    # ------------------------------------------------------------------ after fit
    def before_fit(self) -> None:
        if self.config[self.subcommand].get("flush_denormal"):
            torch.set_flush_denormal(True)
        self._fit_start = time.perf_counter()

    def after_fit(self) -> None:
        config = self.config[self.subcommand]
        trainer = self.trainer
        wall = time.perf_counter() - getattr(self, "_fit_start", time.perf_counter())
        if not config.get("test_after_fit", True) or trainer.interrupted or trainer.fast_dev_run:
            return
        if self.datamodule is None or not hasattr(self.datamodule, "test_dataloader"):
            return
        last = trainer.test(self.model, datamodule=self.datamodule, verbose=False)
        last = last[0] if last else {}
        best, best_epoch, best_score = {}, None, None
        # the checkpoint callback that monitors a metric (an unmonitored one keeps last.ckpt current:
        # with a monitor, Lightning rewrites last.ckpt only when the metric improves)
        ckpt = next((c for c in trainer.checkpoint_callbacks if c.monitor and c.best_model_path), None)
        if ckpt is not None:
            best_epoch = _epoch_of(ckpt.best_model_path)
            best_score = float(ckpt.best_model_score) if ckpt.best_model_score is not None else None
            results = trainer.test(self.model, datamodule=self.datamodule, ckpt_path=ckpt.best_model_path, verbose=False)
            best = results[0] if results else {}
        if trainer.is_global_zero:
            print(format_test_summary(self.model, last, self.datamodule))
            if best:
                monitor = ""
                if best_score is not None:  # accuracies in percent, losses / perplexities as they are
                    percent = "acc" in ckpt.monitor.rsplit("/", 1)[-1]
                    monitor = f", {ckpt.monitor} " + (f"{100 * best_score:.2f}%" if percent else f"{best_score:.4g}")
                print(
                    f"Student at its best validation epoch (epoch {best_epoch}{monitor}): "
                    f"{100 * best.get('test/acc', float('nan')):.2f}% test accuracy"
                )
            path = config.get("results_file")
            if path:
                record = {
                    "test_acc_last": last.get("test/acc"),
                    "test_acc_best": best.get("test/acc"),
                    "best_epoch": best_epoch,
                    "val_acc_best": best_score,
                    "teacher_test_acc": last.get("test/teacher_acc"),
                    "epochs": trainer.current_epoch,
                    "global_step": trainer.global_step,
                    "wall_time_s": wall,
                    "log_dir": trainer.log_dir,
                    "seed": self.config[self.subcommand].get("seed_everything"),
                    "test_last": {k: float(v) for k, v in last.items()},
                    "test_best": {k: float(v) for k, v in best.items()},
                }
                Path(path).parent.mkdir(parents=True, exist_ok=True)
                Path(path).write_text(json.dumps(record, indent=2))


def _fill_config_placeholder(config: Any) -> None:
    """Replace :data:`CONFIG_PLACEHOLDER` in the logger arguments by the stem of the last ``--config`` file.

    Without a config file (everything on the command line) the placeholder becomes ``lightning_logs``,
    Lightning's own default run name.
    """
    from jsonargparse import Namespace

    files = [f for f in (config.get("config") or []) if f is not None]
    stem = Path(str(files[-1])).stem if files else "lightning_logs"
    loggers = config.get("trainer.logger") if "trainer" in config else None
    for spec in loggers if isinstance(loggers, list) else [loggers]:
        init_args = spec.get("init_args") if isinstance(spec, Namespace) else None
        if not isinstance(init_args, Namespace):
            continue
        for key, value in list(init_args.items()):
            if isinstance(value, str) and CONFIG_PLACEHOLDER in value:
                init_args[key] = value.replace(CONFIG_PLACEHOLDER, stem)


def _epoch_of(path: str) -> Optional[int]:
    match = re.search(r"epoch=(\d+)", os.path.basename(path))
    return int(match.group(1)) if match else None


def _count(module: Any) -> str:
    n = sum(p.numel() for p in module.parameters())
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}k" if n >= 1e3 else str(n)


def format_test_summary(model: Any, metrics: dict[str, float], datamodule: Optional[Any] = None) -> str:
    """``student`` and ``teacher`` test accuracy side by side (what ``fit`` prints at the end)."""
    trained = getattr(model, "student", None) or getattr(model, "model", None) or model
    role = "student" if getattr(model, "student", None) is not None else "model"
    test_set = getattr(datamodule, "test_dataset", None)
    where = f"{len(test_set)} held-out test samples" if test_set is not None else "the test set"
    lines = [f"Test accuracy on {where} (weights after the last training step):"]
    rows = [(role, trained, metrics.get("test/acc"))]
    teacher = getattr(model, "teacher", None)
    if teacher is not None:
        rows.append(("teacher", teacher, metrics.get("test/teacher_acc")))
    labels = [f"{r} ({type(m).__name__}, {_count(m)} params)" for r, m, _ in rows]
    width = max(len(label) for label in labels)
    ppl = [metrics.get("test/perplexity"), metrics.get("test/teacher_perplexity")]
    for i, (label, (_, _, acc)) in enumerate(zip(labels, rows)):
        value = f"{100 * acc:.2f}%" if acc is not None else "n/a"
        if ppl[i] is not None:  # language models: token accuracy and perplexity
            value += f"  perplexity {float(ppl[i]):.3f}"
        lines.append(f"  {label:<{width}}  {value}")
    return "\n".join(lines)


def main(args: Optional[list[str]] = None) -> None:
    """Entry point of ``lightning-distill`` and ``python -m lightning_distill``.

    ``lightning-distill compare ...`` runs the multi-seed experiment runner
    (:mod:`lightning_distill.experiments`); every other subcommand is LightningCLI's.
    """
    argv = sys.argv[1:] if args is None else list(args)
    if argv[:1] == ["compare"]:
        from lightning_distill.experiments import main as compare_main

        compare_main(argv[1:])
        return
    DistillCLI(args=args)


if __name__ == "__main__":
    main()
