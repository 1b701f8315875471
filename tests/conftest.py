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


@pytest.fixture
def resume_runs(tmp_path):
    """``resume_runs(build, total_epochs, first_epochs, limit_train_batches=4, limit_val_batches=1, shuffle_seed=3)``.

    Trains three fresh modules from ``build()`` on digits with a deterministic CPU Trainer: one straight
    through ``total_epochs``, one stopped after ``first_epochs`` (writing ``last.ckpt``), and one resumed
    from that checkpoint to ``total_epochs`` -- what a new process would do with ``--ckpt_path``.
    Returns ``(straight, first, resumed, resumed_trainer)``.
    """
    from lightning_distill.data import DigitsDataModule

    def run(build, total_epochs, first_epochs, limit_train_batches=4, limit_val_batches=1, shuffle_seed=3):
        def trainer(root, max_epochs, **kwargs) -> L.Trainer:
            return L.Trainer(
                default_root_dir=root, accelerator="cpu", devices=1, max_epochs=max_epochs, logger=False,
                enable_progress_bar=False, enable_model_summary=False, deterministic=True,
                limit_train_batches=limit_train_batches, limit_val_batches=limit_val_batches, **kwargs,
            )

        straight = build()
        trainer(tmp_path / "a", total_epochs, enable_checkpointing=False).fit(
            straight, datamodule=DigitsDataModule(shuffle_seed=shuffle_seed)
        )
        first = build()
        ckpt = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
        trainer(tmp_path / "b", first_epochs, callbacks=[ckpt]).fit(
            first, datamodule=DigitsDataModule(shuffle_seed=shuffle_seed)
        )
        resumed = build()
        resumed_trainer = trainer(tmp_path / "c", total_epochs, enable_checkpointing=False)
        resumed_trainer.fit(
            resumed, datamodule=DigitsDataModule(shuffle_seed=shuffle_seed), ckpt_path=tmp_path / "ckpt" / "last.ckpt"
        )
        return straight, first, resumed, resumed_trainer

    return run


@pytest.fixture
def restore_global_state():
    """Undo what a Trainer / the CLI changes process-wide (use with ``pytest.mark.usefixtures``)."""
    from _state import IsolatedState

    with IsolatedState():
        yield


@pytest.fixture
def single_thread():
    """Tiny models and tensors: intra-op threads only add overhead on a shared 2-core machine."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def seeded():
    """``torch.manual_seed(0)`` before the test."""
    import torch

    torch.manual_seed(0)
