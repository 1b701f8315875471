"""CIFAR ResNets / Wide ResNets (RepDistiller architectures), ``TorchvisionModel`` and ``get_model``."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_distill.models import (
    CIFAR_MODELS,
    CifarResNet,
    DigitsCNN,
    ResNet20,
    TorchvisionModel,
    WideResNet,
    get_model,
)

# Exact counts for 100 classes, measured against a line-by-line copy of RepDistiller's
# models/resnet.py and models/wrn.py (the state_dicts load with strict=True and the outputs agree).
EXACT_PARAMS_100 = {
    "resnet8x4": 1_233_540,
    "resnet32x4": 7_433_860,
    "resnet20": 278_324,
    "resnet56": 861_620,
    "wrn_16_2": 703_284,
    "wrn_40_2": 2_255_156,
}

# Published sizes (CRD / RepDistiller tables; ResNet-20 / -56 as in He et al. for 10 classes).
PUBLISHED = {
    "resnet8x4": (1.23e6, 100),
    "resnet32x4": (7.43e6, 100),
    "resnet20": (0.27e6, 10),
    "resnet56": (0.86e6, 100),
    "wrn_16_2": (0.70e6, 100),
    "wrn_40_2": (2.26e6, 100),
}


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.fixture(scope="module")
def cifar_models() -> dict[str, nn.Module]:
    torch.manual_seed(0)
    return {name: cls() for name, cls in CIFAR_MODELS.items()}


def test_registry_names() -> None:
    assert set(CIFAR_MODELS) == set(EXACT_PARAMS_100)


@pytest.mark.parametrize("name", sorted(EXACT_PARAMS_100))
def test_forward_shape(cifar_models: dict[str, nn.Module], name: str) -> None:
    model = cifar_models[name].eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 100)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", sorted(EXACT_PARAMS_100))
def test_parameter_counts(cifar_models: dict[str, nn.Module], name: str) -> None:
    assert n_params(cifar_models[name]) == EXACT_PARAMS_100[name]
    published, classes = PUBLISHED[name]
    count = n_params(CIFAR_MODELS[name](num_classes=classes)) if classes != 100 else EXACT_PARAMS_100[name]
    assert abs(count - published) / published < 0.01, (name, count, published)


@pytest.mark.parametrize("name", ["resnet8x4", "resnet32x4", "resnet20", "resnet56"])
def test_resnet_named_stages(cifar_models: dict[str, nn.Module], name: str) -> None:
    model = cifar_models[name]
    modules = dict(model.named_modules())
    for stage in ("conv1", "bn1", "layer1", "layer2", "layer3", "avgpool", "fc"):
        assert stage in modules, stage
    assert model.stage_names == ("layer1", "layer2", "layer3")
    # RepDistiller's state_dict keys, so its checkpoints load.
    keys = set(model.state_dict())
    assert {"conv1.weight", "layer1.0.conv1.weight", "layer2.0.downsample.0.weight", "fc.bias"} <= keys


@pytest.mark.parametrize("name", ["wrn_16_2", "wrn_40_2"])
def test_wrn_named_stages(cifar_models: dict[str, nn.Module], name: str) -> None:
    model = cifar_models[name]
    modules = dict(model.named_modules())
    for stage in ("conv1", "block1", "block2", "block3", "bn1", "avgpool", "fc"):
        assert stage in modules, stage
    keys = set(model.state_dict())
    assert {"block1.layer.0.bn1.weight", "block2.layer.0.convShortcut.weight", "bn1.running_var"} <= keys


def test_stage_output_shapes() -> None:
    model = CifarResNet(8, (4, 16, 32, 64), num_classes=10).eval()  # tiny: conv is slow on small CPUs
    shapes = {}
    hooks = [
        getattr(model, stage).register_forward_hook(lambda m, i, o, s=stage: shapes.__setitem__(s, tuple(o.shape)))
        for stage in model.stage_names
    ]
    with torch.no_grad():
        model(torch.zeros(1, 3, 32, 32))
    for h in hooks:
        h.remove()
    assert shapes == {"layer1": (1, 16, 32, 32), "layer2": (1, 32, 16, 16), "layer3": (1, 64, 8, 8)}


def test_constructor_checks() -> None:
    with pytest.raises(ValueError, match=r"`depth` must be 6n \+ 2.*21"):
        CifarResNet(21, (16, 16, 32, 64))
    with pytest.raises(ValueError, match=r"`channels`.*\(16, 32\)"):
        CifarResNet(20, (16, 32))
    with pytest.raises(ValueError, match=r"`depth` must be 6n \+ 4.*17"):
        WideResNet(17, 2)
    with pytest.raises(ValueError, match=r"`num_classes`.*0"):
        ResNet20(num_classes=0)


def test_get_model_digits() -> None:
    model = get_model("digits_cnn", num_classes=10)
    assert isinstance(model, DigitsCNN)
    assert model(torch.zeros(2, 1, 8, 8)).shape == (2, 10)


def test_get_model_cifar() -> None:
    model = get_model("resnet8x4", num_classes=10)
    assert type(model) is CIFAR_MODELS["resnet8x4"]
    assert model.fc.out_features == 10  # the forward pass is covered by test_forward_shape


def test_get_model_torchvision() -> None:
    model = get_model("resnet18", num_classes=7, weights=None)
    assert isinstance(model, TorchvisionModel)
    assert model.model.fc.out_features == 7
    with torch.no_grad():
        assert model.eval()(torch.zeros(2, 3, 32, 32)).shape == (2, 7)


def test_unknown_names() -> None:
    with pytest.raises(ValueError, match=r"'resnet1888'.*resnet18"):
        TorchvisionModel("resnet1888", num_classes=10)
    with pytest.raises(ValueError, match=r"'resnet8x5'.*resnet8x4"):
        get_model("resnet8x5", num_classes=10)
