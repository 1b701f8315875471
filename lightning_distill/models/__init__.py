"""Model zoo: digits models, the CIFAR ResNets / Wide ResNets of the literature, torchvision models."""

from __future__ import annotations

from typing import Any

from torch import nn

from lightning_distill.models.char_transformer import CharTransformer
from lightning_distill.models.cifar import (
    CIFAR_MODELS,
    CifarResNet,
    ResNet8x4,
    ResNet20,
    ResNet32x4,
    ResNet56,
    WideResNet,
    WRN16x2,
    WRN40x2,
)
from lightning_distill.models.digits import DigitsCNN, DigitsMLP, DigitsStudentCNN
from lightning_distill.models.torchvision_model import TorchvisionModel, torchvision_model_names, unknown_model_error

__all__ = [
    "CIFAR_MODELS",
    "DIGITS_MODELS",
    "CharTransformer",
    "CifarResNet",
    "DigitsCNN",
    "DigitsMLP",
    "DigitsStudentCNN",
    "ResNet8x4",
    "ResNet20",
    "ResNet32x4",
    "ResNet56",
    "TorchvisionModel",
    "WRN16x2",
    "WRN40x2",
    "WideResNet",
    "get_model",
]

DIGITS_MODELS: dict[str, type[nn.Module]] = {
    "digits_cnn": DigitsCNN,
    "digits_student_cnn": DigitsStudentCNN,
    "digits_mlp": DigitsMLP,
}


def get_model(name: str, num_classes: int, **kwargs: Any) -> nn.Module:
    """Build a model by name.

    Looks ``name`` up in ``DIGITS_MODELS`` (``"digits_cnn"``, ``"digits_student_cnn"``,
    ``"digits_mlp"``), then in ``CIFAR_MODELS`` (``"resnet8x4"``, ``"resnet32x4"``, ``"resnet20"``,
    ``"resnet56"``, ``"wrn_16_2"``, ``"wrn_40_2"``), and otherwise builds
    ``TorchvisionModel(name, num_classes, **kwargs)`` (e.g. ``"resnet18"``, ``weights=None``).

    Args:
        name: the model name.
        num_classes: output classes.
        **kwargs: passed to the model's constructor (``width`` for the digits CNNs, ``weights``
            for torchvision models, ...). The CIFAR models take none.

    Raises:
        ValueError: if no model has this name (the message lists close matches).

    Example::

        >>> get_model("resnet8x4", num_classes=10).fc.out_features
        10
    """
    if name in DIGITS_MODELS:
        return DIGITS_MODELS[name](num_classes=num_classes, **kwargs)
    if name in CIFAR_MODELS:
        return CIFAR_MODELS[name](num_classes=num_classes, **kwargs)
    tv_names = torchvision_model_names()
    if not isinstance(name, str) or name.lower() not in tv_names:
        raise unknown_model_error(str(name), [*DIGITS_MODELS, *CIFAR_MODELS, *tv_names], what="model")
    return TorchvisionModel(name, num_classes=num_classes, **kwargs)
