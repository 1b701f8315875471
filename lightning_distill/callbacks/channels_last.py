"""``ChannelsLast``: run the models in ``torch.channels_last`` memory format."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from torch import nn

__all__ = ["ChannelsLast", "distilled_models"]


def distilled_models(pl_module: Any) -> dict[str, nn.Module]:
    """``{role: network}`` of a module: ``student`` (or ``model``) and, when there is one, ``teacher``."""
    found = {}
    trained = getattr(pl_module, "student", None) or getattr(pl_module, "model", None)
    if isinstance(trained, nn.Module):
        found["student"] = trained
    teacher = getattr(pl_module, "teacher", None)
    if isinstance(teacher, nn.Module):
        found["teacher"] = teacher
    return found


class ChannelsLast(L.Callback):
    """Put the student and the teacher in ``torch.channels_last`` memory format before anything runs.

    Convolutions in channels-last (NHWC) layout are faster on GPUs with tensor cores and on recent CPUs.
    A convolution whose weight is channels-last returns a channels-last output whatever its input's
    layout, so converting the models converts the whole forward; the inputs need no conversion. Parameter
    names, values and checkpoints are unchanged (only the strides differ).

    Example::

        >>> import lightning as L
        >>> from lightning_distill.callbacks import ChannelsLast
        >>> trainer = L.Trainer(callbacks=[ChannelsLast()], logger=False)  # then trainer.fit(module, ...)
    """

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        for model in distilled_models(pl_module).values():
            model.to(memory_format=torch.channels_last)
