"""Resuming KnowledgeDistillation from a mid-training checkpoint reproduces an uninterrupted run exactly.

(Every other strategy has the same test in its own file, through the ``resume_runs`` fixture.)
"""

from __future__ import annotations

import lightning as L
import torch

from lightning_distill import KnowledgeDistillation
from lightning_distill.models import DigitsCNN, DigitsStudentCNN


def _module() -> KnowledgeDistillation:
    L.seed_everything(7, verbose=False)
    return KnowledgeDistillation(
        DigitsStudentCNN(), DigitsCNN(), teacher_checkpoint="zoo:digits_cnn",
        optimizer=lambda params: torch.optim.SGD(params, lr=0.05, momentum=0.9),
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5),
    )


def test_resume_matches_uninterrupted_run(resume_runs):
    straight, first, resumed, trainer = resume_runs(_module, 4, 2, limit_train_batches=6, limit_val_batches=2)

    assert trainer.current_epoch == 4 and trainer.global_step == 24
    assert trainer.lr_scheduler_configs[0].scheduler.get_last_lr()[0] == 0.05 * 0.5**4
    for key, value in straight.state_dict().items():
        assert torch.equal(resumed.state_dict()[key], value), f"{key} differs after resume"
    # and the interruption really mattered: the 2-epoch weights are different
    assert not torch.equal(first.student.head.weight, straight.student.head.weight)
