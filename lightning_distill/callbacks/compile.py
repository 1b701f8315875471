"""``CompileModels``: ``torch.compile`` the student and / or the teacher when fitting starts."""

from __future__ import annotations

import lightning as L

from lightning_distill.callbacks.channels_last import distilled_models

__all__ = ["CompileModels"]

_CHOICES = ("student", "teacher", "both")


class CompileModels(L.Callback):
    """Compile the models in place with ``nn.Module.compile`` when ``fit`` starts.

    ``nn.Module.compile`` keeps parameter names, ``state_dict`` keys and checkpoints unchanged (unlike
    wrapping the module in ``torch.compile``). Needs a working compiler toolchain (inductor).

    Args:
        models: ``"student"``, ``"teacher"`` or ``"both"``.
        **options: keyword arguments of ``torch.compile`` (``mode``, ``dynamic``, ``backend``, ...).

    Example::

        >>> from lightning_distill.callbacks import CompileModels
        >>> callback = CompileModels("student", mode="reduce-overhead")
    """

    def __init__(self, models: str = "student", **options: object) -> None:
        if models not in _CHOICES:
            raise ValueError(f"`models` must be one of {_CHOICES}, got {models!r}.")
        self.models = models
        self.options = options

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        found = distilled_models(pl_module)
        roles = ("student", "teacher") if self.models == "both" else (self.models,)
        for role in roles:
            if role in found:
                found[role].compile(**self.options)
