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

warnings.filterwarnings("ignore")


def build(name: str):
    from lightning_distill import FeatureDistillation, KnowledgeDistillation
    from lightning_distill.models import DigitsCNN, DigitsStudentCNN

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
    from lightning_distill.data import DigitsDataModule

    L.seed_everything(0, verbose=False)
    module = build(name)
    before = {k: v.clone() for k, v in module.teacher.state_dict().items()}
    trainer = L.Trainer(
        accelerator="cpu", devices=2, strategy="ddp", max_epochs=2, limit_train_batches=3, limit_val_batches=1,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=out_dir,
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
    }
    with open(os.path.join(out_dir, f"rank{trainer.global_rank}.json"), "w") as fh:
        json.dump(facts, fh)


if __name__ == "__main__":
    main()
