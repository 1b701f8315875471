"""A callback that SIGKILLs its own process at a given training batch: a crash at a known point, with no
timing involved, for the resume tests (``tests/test_kill_resume.py``)."""

from __future__ import annotations

import os
import signal

import lightning as L


class KillAt(L.Callback):
    """Kill the process (SIGKILL: no cleanup, no checkpoint) when training reaches ``batch`` of ``epoch``."""

    def __init__(self, epoch: int, batch: int) -> None:
        self.epoch, self.batch = epoch, batch

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.current_epoch == self.epoch and batch_idx == self.batch:
            os.kill(os.getpid(), signal.SIGKILL)
