"""Any torchvision classification model, by name, as a plain ``nn.Module``."""

from __future__ import annotations

import difflib
from typing import Any

from torch import Tensor, nn

__all__ = ["TorchvisionModel", "torchvision_model_names"]


def torchvision_model_names() -> list[str]:
    """All model names torchvision knows (``torchvision.models.list_models()``)."""
    import torchvision

    return list(torchvision.models.list_models())


def unknown_model_error(name: str, candidates: list[str], what: str = "torchvision model") -> ValueError:
    """A ``ValueError`` for an unknown model ``name`` that suggests close matches from ``candidates``."""
    matches = difflib.get_close_matches(name.lower(), candidates, n=5, cutoff=0.5)
    hint = f" Did you mean one of {matches}?" if matches else ""
    return ValueError(
        f"Unknown {what} {name!r}.{hint} See `torchvision.models.list_models()` for the torchvision names."
    )


class TorchvisionModel(nn.Module):
    """Wrap ``torchvision.models.get_model(name, weights=..., num_classes=..., **kwargs)``.

    The torchvision network is stored as ``self.model``, so its stages are hooked as
    ``model.layer1`` and so on, and checkpoints of this wrapper carry a ``model.`` prefix.

    Args:
        name: a torchvision model name (``torchvision.models.list_models()``), e.g. ``"resnet18"``.
        num_classes: output classes of the classifier head.
        weights: optional pretrained weights, e.g. ``"DEFAULT"`` or ``"ResNet18_Weights.IMAGENET1K_V1"``.
            They are downloaded into the torch hub cache (``$TORCH_HOME``, by default
            ``~/.cache/torch/hub/checkpoints``) the first time, which needs network access; later runs
            read the cache. torchvision refuses pretrained weights whose class count differs from
            ``num_classes`` (1000 for the ImageNet weights) -- load them with ``num_classes=1000`` and
            replace the head yourself if you need another.
        **kwargs: passed to the torchvision builder (e.g. ``dropout`` for ``vit_b_16``).

    Raises:
        ValueError: if torchvision has no model called ``name`` (the message lists close matches).

    Example::

        >>> import torch
        >>> model = TorchvisionModel("resnet18", num_classes=7)
        >>> model(torch.zeros(2, 3, 32, 32)).shape
        torch.Size([2, 7])
    """

    def __init__(self, name: str, num_classes: int = 1000, weights: str | None = None, **kwargs: Any) -> None:
        super().__init__()
        import torchvision

        names = torchvision_model_names()
        if not isinstance(name, str) or name.lower() not in names:
            raise unknown_model_error(str(name), names)
        self.name = name
        self.model = torchvision.models.get_model(name, weights=weights, num_classes=num_classes, **kwargs)

    def forward(self, x: Tensor) -> Any:
        return self.model(x)
