"""Run a short 2-process DDP fit on CPU (gloo) and write per-rank facts to JSON.

Used by ``tests/strategies/test_ddp.py`` as ``python tests/scripts/ddp_fit.py STRATEGY OUT_DIR``; Lightning's
``ddp`` strategy re-launches this same script for rank 1.
"""

from __future__ import annotations

import json
import os
import sys
import warnings

import lightning as L
import torch

from lightning_distill.models import DigitsCNN, DigitsMLP, DigitsStudentCNN

warnings.filterwarnings("ignore")


class Recorder(L.Callback):
    """Per rank: the temperature used at every step, the stage every epoch, the monitor's logged values."""

    def __init__(self, curriculum=None) -> None:
        self.curriculum = curriculum
        self.steps: dict[int, list[float]] = {}
        self.logged: dict[int, dict[str, float]] = {}
        self.stages: dict[int, int] = {}
        self.seen: dict[int, list[int]] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        from lightning_distill.callbacks.temperature import used_temperature

        tau = torch.as_tensor(used_temperature(pl_module))
        self.steps[trainer.global_step] = [float(v) for v in tau.reshape(-1)]
        from lightning_distill.callbacks import TemperatureMonitor

        monitor = next((c for c in trainer.callbacks if isinstance(c, TemperatureMonitor)), None)
        if monitor is not None and monitor.last_logged:
            self.logged[trainer.global_step] = dict(monitor.last_logged)
            monitor.last_logged = {}
        self.seen.setdefault(trainer.current_epoch, []).extend(int(i) for i in batch[2])

    def on_train_epoch_start(self, trainer, pl_module):
        if self.curriculum is not None:
            self.stages[trainer.current_epoch] = self.curriculum.stage


def build(name: str):
    from lightning_distill import CTKD, FeatureDistillation, KnowledgeDistillation

    if name in ("CTKD_global", "CTKD_instance"):
        return CTKD(
            DigitsMLP(), DigitsCNN(), teacher_checkpoint="zoo:digits_cnn", init_temperature=3.0,
            temperature_mode="global" if name == "CTKD_global" else "instance", lambda_epochs=2,
            temperature_lr=0.05,
        )
    if name == "KnowledgeDistillation":
        return KnowledgeDistillation(DigitsStudentCNN(), DigitsCNN(), teacher_checkpoint="zoo:digits_cnn")
    if name == "FeatureDistillation":
        # hint stage for epoch 0: the head and the KD path get only zero-weighted gradients there
        return FeatureDistillation(
            DigitsStudentCNN(), DigitsCNN(), teacher_checkpoint="zoo:digits_cnn",
            layer_map={"block2": "block1"}, feature_loss="mse", hint_epochs=1,
        )
    raise SystemExit(f"unknown strategy {name}")


def main() -> None:
    name, out_dir = sys.argv[1], sys.argv[2]
    from lightning.pytorch.loggers import CSVLogger

    from lightning_distill.callbacks import ProgressiveCurriculum, TemperatureMonitor
    from lightning_distill.data import DigitsDataModule

    L.seed_everything(0, verbose=False)
    module = build(name)
    before = {k: v.clone() for k, v in module.teacher.state_dict().items()}
    callbacks, curriculum, logger, epochs = [], None, False, 2
    if name.startswith("CTKD"):
        # CTKD + TemperatureMonitor + ProgressiveCurriculum (alphas per stage: CTKD learns its temperature)
        curriculum = ProgressiveCurriculum(alphas=[0.5, 0.7, 0.9], stage_ends=[0.34, 0.67], progress_bar=False)
        callbacks = [curriculum, TemperatureMonitor(logging_interval=2)]
        logger, epochs = CSVLogger(out_dir, name="csv", version=0), 3
    recorder = Recorder(curriculum)
    trainer = L.Trainer(
        accelerator="cpu", devices=2, strategy="ddp", max_epochs=epochs, limit_train_batches=3, limit_val_batches=1,
        logger=logger, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=out_dir, callbacks=callbacks + [recorder],
    )
    trainer.fit(module, datamodule=DigitsDataModule(batch_size=32, shuffle_seed=0))
    after = module.teacher.state_dict()
    facts = {
        "rank": trainer.global_rank,
        "world_size": trainer.world_size,
        "global_step": trainer.global_step,
        "teacher_identical": all(torch.equal(after[k], v) for k, v in before.items()),
        "teacher_eval": not any(m.training for m in module.teacher.modules()),
        "student_checksum": float(sum(p.double().sum() for p in module.student.parameters())),
        "loss_finite": bool(torch.isfinite(trainer.callback_metrics["train/loss"]).item()),
        "temperatures": recorder.steps,
        "logged": recorder.logged,
        "stages": recorder.stages,
        "seen": recorder.seen,
        "order": curriculum.order if curriculum is not None else None,
    }
    with open(os.path.join(out_dir, f"rank{trainer.global_rank}.json"), "w") as fh:
        json.dump(facts, fh)


if __name__ == "__main__":
    main()
