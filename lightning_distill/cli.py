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

``validate`` / ``test`` / ``predict`` with ``--ckpt_path RUN/checkpoints/X.ckpt`` log next to that run, in
``RUN/<subcommand>/version_K/``, instead of opening a new ``version_N`` run, and print where. A missing
teacher checkpoint (a run that has not been made yet) ends the command with one line naming the command
that trains it, taken from the config's header comment.

A logger argument may hold the placeholder ``{config}``: it becomes the stem of the last ``--config``
file, so the shared trainer blocks (``name: "{config}"``) log ``configs/digits/kd.yaml`` to
``runs/digits/kd/version_N/`` and ``configs/digits/fitnets.yaml`` to ``runs/digits/fitnets/version_N/``.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Optional

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger, WandbLogger
from lightning.pytorch.plugins.io import TorchCheckpointIO
from torch import nn

from lightning_distill.checkpoint import AtomicCheckpointIO, MissingCheckpointError, check_ckpt_path

__all__ = ["CONFIG_PLACEHOLDER", "DistillCLI", "LogConfigCallback", "main"]

#: Replaced, in every string argument of the configured loggers, by the stem of the last ``--config`` file.
CONFIG_PLACEHOLDER = "{config}"

#: Subcommands that evaluate a checkpoint: given RUN/checkpoints/X.ckpt, they log next to that run.
EVALUATION_SUBCOMMANDS = ("validate", "test", "predict")

#: Messages of Lightning (and of the libraries it calls) that every run of the command would print and that
#: say nothing about the run: a deprecation inside Lightning's own code, the TensorBoard default-logger note
#: and the advertising tips. Silenced by :func:`_silence_lightning_noise`, in the command only.
_NOISE_WARNINGS = (
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",  # torch deprecates what lightning/_pytree.py still calls
    r"Starting from v1\.9\.0, `tensorboardX` has been removed",  # logger=True without TensorBoard installed
)
#: ... and in ``validate`` / ``test`` / ``predict``, whose ``ModelCheckpoint`` callbacks never save: that their
#: state restored from the checkpoint names another directory than their own (which they would only use to save).
_EVALUATION_NOISE_WARNINGS = (r"The dirpath has changed from",)
_NOISE_LOG_RECORDS = re.compile(r"💡 Tip: ")  # "try installing litlogger / litmodels"


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
        _silence_lightning_noise()
        super().__init__(*args, **kwargs)

    def _parse_ckpt_path(self) -> None:
        # LightningCLI reads --ckpt_path here to merge its hyperparameters into the config: first refuse, naming the
        # file, a truncated / unsafe checkpoint or one another module class wrote (lightning_distill.checkpoint)
        check_ckpt_path(self.config)
        super()._parse_ckpt_path()

    def add_arguments_to_parser(self, parser: Any) -> None:
        parser.add_argument(
            "--wandb", type=bool, default=False, help="Also log to Weights & Biases (works with WANDB_MODE=offline)."
        )
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
        if self.subcommand in EVALUATION_SUBCOMMANDS:
            _log_next_to_checkpoint(config, self.subcommand)
            _silence_lightning_noise(evaluation=True)

    def instantiate_classes(self) -> None:
        """LightningCLI's, with a missing checkpoint (a run not made yet) reported in one line, not a traceback."""
        try:
            super().instantiate_classes()
        except Exception as err:
            missing = _cause_of_type(err, MissingCheckpointError) or MissingCheckpointError.in_text(str(err))
            if missing is None:
                raise
            config = self.config[self.subcommand] if self.subcommand else self.config
            raise SystemExit("error: " + missing_checkpoint_message(missing, config.get("config"))) from None

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
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                _prepare_wandb(logger)
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
            loggers.append(TensorBoardLogger(save_dir=save_dir, name=name, version=version, sub_dir="tensorboard"))
        if config.get("wandb"):
            # absolute: wandb's background service may have been started in another working directory
            loggers.append(
                WandbLogger(project=config.get("wandb_project"), save_dir=os.path.abspath(save_dir), name=name)
            )
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
        # described now: testing the best checkpoint below loads it into the model (for BornAgain, its generation)
        summary = format_test_summary(self.model, last, self.datamodule)
        role = _trained_role(self.model)
        best, best_epoch, best_score, details = {}, None, None, ""
        # the checkpoint callback that monitors a metric (an unmonitored one keeps last.ckpt current:
        # with a monitor, Lightning rewrites last.ckpt only when the metric improves)
        ckpt = next((c for c in trainer.checkpoint_callbacks if c.monitor and c.best_model_path), None)
        if ckpt is not None:
            best_epoch = _epoch_of(ckpt.best_model_path)
            best_score = float(ckpt.best_model_score) if ckpt.best_model_score is not None else None
            results = trainer.test(
                self.model, datamodule=self.datamodule, ckpt_path=ckpt.best_model_path, verbose=False
            )
            best = results[0] if results else {}
            generation = _generation_of(self.model)  # of the checkpoint just loaded
            if generation is not None:
                details = f", generation {generation}"
        if trainer.is_global_zero:
            print(summary)
            if best:
                if best_score is not None:  # accuracies in percent, losses / perplexities as they are
                    percent = "acc" in ckpt.monitor.rsplit("/", 1)[-1]
                    details += f", {ckpt.monitor} " + (f"{100 * best_score:.2f}%" if percent else f"{best_score:.4g}")
                print(
                    f"{role.capitalize()} at its best validation epoch (epoch {best_epoch}"
                    f"{details}): {100 * best.get('test/acc', float('nan')):.2f}% test accuracy"
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

    # ------------------------------------------------------------------ after validate / test / predict
    def _print_log_dir(self) -> None:
        trainer = self.trainer
        if trainer.is_global_zero and trainer.loggers and trainer.log_dir and os.path.isdir(trainer.log_dir):
            files = ", ".join(sorted(os.listdir(trainer.log_dir)))
            print(f"Logged this {self.subcommand} run to {trainer.log_dir} ({files})")

    def after_validate(self) -> None:
        self._print_log_dir()

    def after_test(self) -> None:
        self._print_log_dir()

    def after_predict(self) -> None:
        self._print_log_dir()


def _silence_lightning_noise(evaluation: bool = False) -> None:
    """Hide the messages in :data:`_NOISE_WARNINGS` (with ``evaluation``, :data:`_EVALUATION_NOISE_WARNINGS`
    too) and Lightning's tips (:data:`_NOISE_LOG_RECORDS`).

    Targeted by message, so every other warning still shows; applied by :class:`DistillCLI` only.
    """
    for message in _EVALUATION_NOISE_WARNINGS if evaluation else _NOISE_WARNINGS:
        warnings.filterwarnings("ignore", message=message)
    # the tips are log records of Lightning's rank-zero logger, not warnings
    from lightning_utilities.core import rank_zero

    logger = rank_zero.log
    if not any(isinstance(f, _DropLogRecords) for f in logger.filters):
        logger.addFilter(_DropLogRecords(_NOISE_LOG_RECORDS))


class _DropLogRecords(logging.Filter):
    def __init__(self, pattern: re.Pattern) -> None:
        super().__init__()
        self.pattern = pattern

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.pattern.search(record.getMessage())


def _prepare_wandb(logger: WandbLogger) -> None:
    """Remove the causes of two W&B warnings printed at every run: Lightning passes ``anonymous=None``
    (wandb warns that the setting has no effect whenever it is passed at all), and wandb looks for a git
    repository in ``save_dir``, which does not exist before the first log is written."""
    init = getattr(logger, "_wandb_init", None)
    if isinstance(init, dict) and init.get("anonymous") is None:
        init.pop("anonymous", None)
    if logger.save_dir:
        os.makedirs(logger.save_dir, exist_ok=True)


def _log_next_to_checkpoint(config: Any, subcommand: str) -> None:
    """Point the CSV / TensorBoard loggers of a ``validate`` / ``test`` / ``predict`` run from
    ``RUN/checkpoints/X.ckpt`` to ``RUN/<subcommand>/version_K/``: the results sit next to the run that made
    the checkpoint instead of in a new ``version_N`` that looks like a run of its own."""
    from jsonargparse import Namespace

    ckpt_path = config.get("ckpt_path")
    if not isinstance(ckpt_path, (str, os.PathLike)) or not os.path.isfile(ckpt_path):
        return  # no checkpoint, or Lightning's "best" / "last"
    checkpoints = Path(ckpt_path).parent
    if checkpoints.name != "checkpoints":
        return
    loggers = config.get("trainer.logger") if "trainer" in config else None
    for spec in loggers if isinstance(loggers, list) else [loggers]:
        if not isinstance(spec, Namespace) or not isinstance(spec.get("init_args"), Namespace):
            continue
        if not _is_subclass(spec.get("class_path"), (CSVLogger, TensorBoardLogger)):
            continue  # only the loggers whose layout is save_dir/name/version_N
        spec.init_args["save_dir"] = str(checkpoints.parent)
        spec.init_args["name"] = subcommand
        spec.init_args["version"] = None


def _is_subclass(class_path: Any, bases: tuple[type, ...]) -> bool:
    import importlib

    module, _, name = str(class_path).rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return False
    return isinstance(cls, type) and issubclass(cls, bases)


def _cause_of_type(err: BaseException, kind: type) -> Optional[BaseException]:
    """``err`` or the first exception of type ``kind`` it was raised from or while handling."""
    seen: set[int] = set()
    current: Optional[BaseException] = err
    while current is not None and id(current) not in seen:
        if isinstance(current, kind):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


def missing_checkpoint_message(err: MissingCheckpointError, config_files: Any = None) -> str:
    """One line for a missing checkpoint: what is missing and, when a config's header comment names it, the
    command that makes it.

    The header comment of a config that needs another run first names that run's command, e.g.
    ``#   lightning-distill fit --config configs/text/teacher.yaml   # first: the teacher``. The command
    chosen is the one whose config file is named in the missing path (runs are named after their config:
    ``runs/text/teacher/...`` comes from ``teacher.yaml``), else the one marked ``first``.
    """
    message = f"{err.argument or 'checkpoint'} {err.path!r} does not exist"
    files = [str(f) for f in (config_files or []) if f is not None]
    for config in reversed(files):
        command = _training_command(Path(config), Path(err.path))
        if command:
            return f"{message}: train it first with  {command}"
    return message + "."


_COMMAND_LINE = re.compile(r"^#\s*(lightning-distill\s+fit\s+.*?--config\s+(\S+)[^#]*?)\s*(?:#(.*))?$")


def _training_command(config: Path, missing: Path) -> Optional[str]:
    """The ``lightning-distill fit`` command in the header comment of ``config`` that trains ``missing``."""
    try:
        lines = config.read_text().splitlines()
    except OSError:
        return None
    commands = []
    for line in lines:
        if not line.startswith("#"):
            break  # the header comment ends at the first key
        match = _COMMAND_LINE.match(line.strip())
        if match and Path(match.group(2)).stem != config.stem and not match.group(1).rstrip().endswith("\\"):
            commands.append((match.group(1).strip(), Path(match.group(2)), match.group(3) or ""))
    chosen = next((c for c in commands if c[1].stem in missing.parts), None)
    chosen = chosen or next((c for c in commands if "first" in c[2]), None)
    if chosen is None:
        return None
    command, named, _ = chosen
    # the comment names the config from the repository root; from elsewhere, name the file next to this one
    sibling = config.parent / named.name
    if not named.is_file() and sibling.is_file():
        command = command.replace(str(named), str(sibling))
    return command


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


def _trained_role(model: Any) -> str:
    """What the summary calls the trained network: ``student`` for a distillation module, else ``model``."""
    return "student" if getattr(model, "student", None) is not None else "model"


def format_test_summary(model: Any, metrics: dict[str, float], datamodule: Optional[Any] = None) -> str:
    """``student`` and ``teacher`` test accuracy side by side (what ``fit`` prints at the end).

    A :class:`~lightning_distill.Classifier` has one ``model`` row. The teacher row appears when the teacher
    was tested (``test/teacher_acc``); a :class:`~lightning_distill.BornAgain` run, whose teacher is its
    previous generation, shows the last generation and the ensemble of all generations instead.
    """
    trained = getattr(model, "student", None) or getattr(model, "model", None) or model
    role = _trained_role(model)
    if _generation_of(model) is not None:
        role = f"{role}, generation {_generation_of(model)}"
    test_set = getattr(datamodule, "test_dataset", None)
    where = f"{len(test_set)} held-out test samples" if test_set is not None else "the test set"
    lines = [f"Test accuracy on {where} (weights after the last training step):"]
    # (label, accuracy, perplexity)
    rows = [(_describe(role, trained), metrics.get("test/acc"), metrics.get("test/perplexity"))]
    teacher = getattr(model, "teacher", None)
    teacher_metrics = (metrics.get("test/teacher_acc"), metrics.get("test/teacher_perplexity"))
    if teacher is not None and any(m is not None for m in teacher_metrics):
        rows.append((_describe("teacher", teacher), *teacher_metrics))
    members = model.ensemble_members() if callable(getattr(model, "ensemble_members", None)) else None
    if members and metrics.get("test/ensemble_acc") is not None:
        n = len(members)
        label = (
            f"ensemble of the {n} generations ({n} x {type(trained).__name__}, {_count(nn.ModuleList(members))} params)"
        )
        rows.append((label, metrics.get("test/ensemble_acc"), None))
    width = max(len(label) for label, _, _ in rows)
    for label, acc, ppl in rows:
        value = f"{100 * acc:.2f}%" if acc is not None else "n/a"
        if ppl is not None:  # language models: token accuracy and perplexity
            value += f"  perplexity {float(ppl):.3f}"
        lines.append(f"  {label:<{width}}  {value}")
    return "\n".join(lines)


def _generation_of(model: Any) -> Optional[int]:
    """The generation a :class:`~lightning_distill.BornAgain` module is training (``None`` for other modules)."""
    if getattr(model, "generation_models", None) is None:
        return None
    return getattr(model, "generation", None)


def _describe(role: str, module: Any) -> str:
    return f"{role} ({type(module).__name__}, {_count(module)} params)"


def main(args: Optional[list[str]] = None) -> None:
    """Entry point of ``lightning-distill`` and ``python -m lightning_distill``.

    ``lightning-distill compare ...`` runs the multi-seed experiment runner
    (:mod:`lightning_distill.experiments`), ``lightning-distill export ...`` writes the student out
    (:mod:`lightning_distill.export`); every other subcommand is LightningCLI's.
    """
    argv = sys.argv[1:] if args is None else list(args)
    if argv[:1] == ["compare"]:
        from lightning_distill.experiments import main as compare_main

        compare_main(argv[1:])
        return
    if argv[:1] == ["export"]:
        from lightning_distill.export import main as export_main

        export_main(argv[1:])
        return
    DistillCLI(args=args)


if __name__ == "__main__":
    main()
