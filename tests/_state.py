"""Process-wide state that Trainers and the CLI change, saved and restored around a test."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Optional

import torch


class IsolatedState:
    """Restore cwd, argv, env vars, determinism and threads; optionally work in ``cwd`` meanwhile.

    Inside, argv is pytest-free (LightningCLI(args=...) warns about pytest's own argv otherwise), torch
    uses one intra-op thread (2 cores shared by the whole suite) and W&B is offline.
    """

    def __init__(self, cwd: Optional[Path] = None) -> None:
        self.target = cwd

    def __enter__(self) -> "IsolatedState":
        self.env = dict(os.environ)
        self.deterministic = torch.are_deterministic_algorithms_enabled()
        self.threads = torch.get_num_threads()
        self.cwd = os.getcwd()
        self.argv = sys.argv
        sys.argv = sys.argv[:1]
        torch.set_num_threads(1)
        os.environ["WANDB_MODE"] = "offline"
        if self.target is not None:
            os.chdir(self.target)  # the configs' CSVLogger writes under a relative runs/...
        return self

    def __exit__(self, *exc: object) -> None:
        os.chdir(self.cwd)
        sys.argv = self.argv
        os.environ.clear()
        os.environ.update(self.env)
        torch.use_deterministic_algorithms(self.deterministic)
        torch.set_num_threads(self.threads)
