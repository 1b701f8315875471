"""Shared fixtures: tiny models, the digits data, and a quiet Trainer factory."""

from __future__ import annotations

import os
import warnings

import pytest

os.environ.setdefault("WANDB_MODE", "offline")  # W&B never needs a server in tests
os.environ.setdefault("WANDB_SILENT", "true")

import lightning as L  # noqa: E402

warnings.filterwarnings("ignore", message=r".*does not have many workers.*")
warnings.filterwarnings("ignore", message=r".*GPU available but not used.*")


@pytest.fixture
def digits_dm():
    from lightning_distill.data import DigitsDataModule

    return DigitsDataModule(batch_size=64, shuffle_seed=0)


@pytest.fixture
def make_trainer(tmp_path):
    """``make_trainer(**overrides)``: a CPU Trainer writing only under ``tmp_path``."""

    def factory(**kwargs) -> L.Trainer:
        defaults = dict(
            default_root_dir=tmp_path,
            accelerator="cpu",
            devices=1,
            max_epochs=1,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            deterministic=True,
        )
        defaults.update(kwargs)
        return L.Trainer(**defaults)

    return factory
