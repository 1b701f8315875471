"""One optimizer step of a tiny GPT-2 pair on variable-length causal-LM batches; writes the student's update.

``python tests/scripts/token_norm_step.py MODULE NORMALIZATION BATCH ACCUMULATE DEVICES OUT.pt`` (MODULE is
``kd`` or ``classifier``). With DEVICES=2 it runs 2-process DDP on CPU (Lightning re-launches this script for
rank 1); rank 0 writes ``{name: parameter after - parameter before}`` (SGD with lr 1: minus the gradient).
Used by ``tests/hf/test_token_normalization.py``.
"""

from __future__ import annotations

import sys
import warnings
from functools import partial
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the _hf helpers

from _hf import causal_lm_batches, tiny_gpt2  # noqa: E402

from lightning_distill import Classifier, KnowledgeDistillation  # noqa: E402

warnings.filterwarnings("ignore")


def build(kind: str, normalization: str):
    sgd = partial(torch.optim.SGD, lr=1.0)
    student = tiny_gpt2(n_layer=1, n_embd=16, dropout=0.0, seed=1)
    if kind == "classifier":
        return Classifier(student, optimizer=sgd, loss_normalization=normalization)
    teacher = tiny_gpt2(n_layer=2, n_embd=24, dropout=0.0, seed=2)
    return KnowledgeDistillation(student, teacher, temperature=2.0, alpha=0.6, optimizer=sgd,
                                 loss_normalization=normalization)


def update(kind: str, normalization: str, batch: int, accumulate: int, devices: int, root: str) -> dict:
    module = build(kind, normalization)
    net = module.model if kind == "classifier" else module.student
    before = {k: v.detach().clone() for k, v in net.named_parameters()}
    loader = DataLoader(causal_lm_batches(8, length=12, seed=7), batch_size=batch, shuffle=False)
    trainer = L.Trainer(
        accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto", max_steps=1,
        accumulate_grad_batches=accumulate, limit_val_batches=0, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=root, use_distributed_sampler=True,
    )
    trainer.fit(module, train_dataloaders=loader)
    return {"rank": trainer.global_rank, "steps": trainer.global_step,
            "delta": {k: (v.detach() - before[k]) for k, v in net.named_parameters()}}


if __name__ == "__main__":
    kind, normalization, batch, accumulate, devices, out = sys.argv[1:]
    result = update(kind, normalization, int(batch), int(accumulate), int(devices), str(Path(out).parent))
    if result["rank"] == 0:
        torch.save(result, out)
