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
* ``test_after_fit``: after ``fit``, test the final weights and print the student's test
  accuracy next to the teacher's.

Each run saves its fully resolved config as ``config.yaml`` in its log directory.
"""

from __future__ import annotations

import os
from typing import Any, Optional

import lightning as L
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import CSVLogger, Logger

__all__ = ["DistillCLI", "main"]


class DistillCLI(LightningCLI):
    """LightningCLI in subclass mode with the logger switches and the post-fit test summary."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("model_class", L.LightningModule)
        kwargs.setdefault("subclass_mode_model", True)
        kwargs.setdefault("datamodule_class", L.LightningDataModule)
        kwargs.setdefault("subclass_mode_data", True)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        # modules configure their own optimizers (so a teacher can never end up in one)
        kwargs.setdefault("auto_configure_optimizers", False)
        super().__init__(*args, **kwargs)

    def add_arguments_to_parser(self, parser: Any) -> None:
        parser.add_argument("--wandb", type=bool, default=False, help="Also log to Weights & Biases (works with WANDB_MODE=offline).")
        parser.add_argument("--wandb_project", type=str, default="lightning-distill", help="W&B project name.")
        parser.add_argument("--tensorboard", type=bool, default=False, help="Also log to TensorBoard.")
        parser.add_argument(
            "--test_after_fit",
            type=bool,
            default=True,
            help="After fit, test the final weights and print student and teacher test accuracy.",
        )

    # ------------------------------------------------------------------ loggers
    def instantiate_trainer(self, **kwargs: Any) -> L.Trainer:
        config = self.config_init[self.subcommand] if self.subcommand else self.config_init
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
        return super().instantiate_trainer(**kwargs)

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

            loggers.append(WandbLogger(project=config.get("wandb_project"), save_dir=save_dir, name=name))
        return loggers

    # ------------------------------------------------------------------ after fit
    def after_fit(self) -> None:
        config = self.config[self.subcommand]
        trainer = self.trainer
        if not config.get("test_after_fit", True) or trainer.interrupted or trainer.fast_dev_run:
            return
        if self.datamodule is None or not hasattr(self.datamodule, "test_dataloader"):
            return
        results = trainer.test(self.model, datamodule=self.datamodule, verbose=False)
        if trainer.is_global_zero and results:
            print(format_test_summary(self.model, results[0], self.datamodule))


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
    for label, (_, _, acc) in zip(labels, rows):
        value = f"{100 * acc:.2f}%" if acc is not None else "n/a"
        lines.append(f"  {label:<{width}}  {value}")
    return "\n".join(lines)


def main(args: Optional[list[str]] = None) -> None:
    """Entry point of ``lightning-distill`` and ``python -m lightning_distill``."""
    DistillCLI(args=args)


if __name__ == "__main__":
    main()
