"""The CIFAR ResNets and Wide ResNets of the distillation literature (CRD, RepDistiller).

The architectures follow HobbitLong/RepDistiller (``models/resnet.py`` and ``models/wrn.py``)
layer for layer, and the submodules carry the same names, so a ``state_dict`` saved from a
RepDistiller model loads into the class of the same name here (``load_state_dict`` with
``strict=True``). Inputs are ``[N, 3, 32, 32]`` images; ``forward`` returns logits only --
feature strategies get intermediate features by hooking the named stages listed in each
class's ``stage_names`` (``layer1`` ... ``layer3`` for ResNets, ``block1`` ... ``block3`` for
Wide ResNets, the names RepDistiller uses).

One deliberate difference: the global pooling is ``nn.AdaptiveAvgPool2d(1)`` instead of
``nn.AvgPool2d(8)``. Both are identical on 32x32 inputs (the last stage is 8x8), and the
adaptive one also accepts other input sizes. It has no parameters, so checkpoints are unaffected.

Parameter counts for 100 classes (``sum(p.numel() for p in model.parameters())``):

=============  ==============  =========
name           class           params
=============  ==============  =========
``resnet8x4``  ``ResNet8x4``   1,233,540
``resnet32x4`` ``ResNet32x4``  7,433,860
``resnet20``   ``ResNet20``      278,324
``resnet56``   ``ResNet56``      861,620
``wrn_16_2``   ``WRN16x2``       703,284
``wrn_40_2``   ``WRN40x2``     2,255,156
=============  ==============  =========
"""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "CIFAR_MODELS",
    "CifarResNet",
    "ResNet8x4",
    "ResNet20",
    "ResNet32x4",
    "ResNet56",
    "WRN16x2",
    "WRN40x2",
    "WideResNet",
]


def _check_num_classes(num_classes: int) -> None:
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"`num_classes` must be an integer >= 1, got {num_classes!r}.")


def _conv3x3(c_in: int, c_out: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, kernel_size=3, stride=stride, padding=1, bias=False)


# --------------------------------------------------------------------------------------------
# ResNet (He et al. 2016, CIFAR variant): post-activation BasicBlocks, depth = 6n + 2
# --------------------------------------------------------------------------------------------


class _BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN, plus the (projected) shortcut, then ReLU."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = _conv3x3(c_in, c_out, stride)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(c_out, c_out)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        residual = x if self.downsample is None else self.downsample(x)
        # Not in place: a hook on ``bn2`` sees the pre-activation that OFD-style losses use.
        return F.relu(out + residual)


class CifarResNet(nn.Module):
    """ResNet for 32x32 inputs with BasicBlocks (the ``resnet*`` models of RepDistiller).

    A 3x3 stem convolution to ``channels[0]``, BN and ReLU, then three stages of
    ``(depth - 2) / 6`` blocks with ``channels[1]``, ``channels[2]``, ``channels[3]`` channels and
    strides 1, 2, 2 (32x32 -> 32x32 -> 16x16 -> 8x8), global average pooling and a linear head.
    A block whose shape changes gets a 1x1 conv + BN shortcut. Convolutions use Kaiming-normal
    (fan-out) initialisation, BN starts at weight 1 and bias 0, as in RepDistiller.

    Named stages: ``conv1``, ``bn1``, ``relu``, ``layer1``, ``layer2``, ``layer3``, ``avgpool``,
    ``fc``. The output of ``layerK`` is the post-ReLU feature map of that stage; the last
    block's ``bn2`` (e.g. ``layer3.4.bn2``) gives its pre-activation (before residual add).

    Args:
        depth: number of weighted layers, ``6n + 2`` with ``n >= 1`` (8, 20, 32, 56, 110, ...).
        channels: four widths ``(stem, stage1, stage2, stage3)``, e.g. ``(16, 16, 32, 64)``.
        num_classes: output classes.

    Example::

        >>> import torch
        >>> model = CifarResNet(depth=20, channels=(16, 16, 32, 64), num_classes=10)
        >>> model(torch.zeros(2, 3, 32, 32)).shape
        torch.Size([2, 10])
        >>> len(model.layer1), model.fc.in_features
        (3, 64)
    """

    stage_names = ("layer1", "layer2", "layer3")

    def __init__(self, depth: int, channels: Sequence[int], num_classes: int = 100) -> None:
        super().__init__()
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 8 or (depth - 2) % 6 != 0:
            raise ValueError(f"`depth` must be 6n + 2 with n >= 1 (8, 20, 32, 56, 110, ...), got {depth!r}.")
        channels = tuple(channels)
        if len(channels) != 4 or any(isinstance(c, bool) or not isinstance(c, int) or c < 1 for c in channels):
            raise ValueError(f"`channels` must be four positive integers (stem, stage1..3), got {channels!r}.")
        _check_num_classes(num_classes)
        self.depth = depth
        self.channels = channels
        n = (depth - 2) // 6
        self._in_channels = channels[0]
        self.conv1 = _conv3x3(3, channels[0])
        self.bn1 = nn.BatchNorm2d(channels[0])
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._make_layer(channels[1], n, stride=1)  # 32x32
        self.layer2 = self._make_layer(channels[2], n, stride=2)  # 16x16
        self.layer3 = self._make_layer(channels[3], n, stride=2)  # 8x8
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels[3], num_classes)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

    def _make_layer(self, c_out: int, blocks: int, stride: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or self._in_channels != c_out:
            downsample = nn.Sequential(
                nn.Conv2d(self._in_channels, c_out, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(c_out),
            )
        layers = [_BasicBlock(self._in_channels, c_out, stride, downsample)]
        self._in_channels = c_out
        layers += [_BasicBlock(c_out, c_out) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.avgpool(x).flatten(1))


class ResNet8x4(CifarResNet):
    """``resnet8x4``: depth 8, channels (32, 64, 128, 256); about 1.23M parameters (the usual student).

    Example::

        >>> import torch
        >>> ResNet8x4()(torch.zeros(2, 3, 32, 32)).shape
        torch.Size([2, 100])
    """

    def __init__(self, num_classes: int = 100) -> None:
        super().__init__(8, (32, 64, 128, 256), num_classes)


class ResNet32x4(CifarResNet):
    """``resnet32x4``: depth 32, channels (32, 64, 128, 256); about 7.43M parameters (the usual teacher)."""

    def __init__(self, num_classes: int = 100) -> None:
        super().__init__(32, (32, 64, 128, 256), num_classes)


class ResNet20(CifarResNet):
    """``resnet20``: depth 20, channels (16, 16, 32, 64); about 0.28M parameters."""

    def __init__(self, num_classes: int = 100) -> None:
        super().__init__(20, (16, 16, 32, 64), num_classes)


class ResNet56(CifarResNet):
    """``resnet56``: depth 56, channels (16, 16, 32, 64); about 0.86M parameters."""

    def __init__(self, num_classes: int = 100) -> None:
        super().__init__(56, (16, 16, 32, 64), num_classes)


# --------------------------------------------------------------------------------------------
# Wide ResNet (Zagoruyko & Komodakis 2016): pre-activation blocks, depth = 6n + 4
# --------------------------------------------------------------------------------------------


class _WideBasicBlock(nn.Module):
    """BN-ReLU-conv3x3-BN-ReLU-(dropout)-conv3x3 with an identity or 1x1-conv shortcut.

    When the shape changes, the shortcut is taken from the *activated* input
    (``relu1(bn1(x))``), as in the reference implementation.
    """

    def __init__(self, c_in: int, c_out: int, stride: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(c_in)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(c_in, c_out, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(c_out, c_out, kernel_size=3, stride=1, padding=1, bias=False)
        self.droprate = dropout
        self.equal_in_out = c_in == c_out and stride == 1
        self.convShortcut = (  # RepDistiller's name (state_dict keys)
            None if self.equal_in_out else nn.Conv2d(c_in, c_out, kernel_size=1, stride=stride, bias=False)
        )

    def forward(self, x: Tensor) -> Tensor:
        act = self.relu1(self.bn1(x))
        out = self.relu2(self.bn2(self.conv1(act)))
        if self.droprate > 0:
            out = F.dropout(out, p=self.droprate, training=self.training)
        out = self.conv2(out)
        return out + (x if self.convShortcut is None else self.convShortcut(act))


class _NetworkBlock(nn.Module):
    """A stage of ``n`` wide blocks (wrapped in ``.layer`` as in RepDistiller)."""

    def __init__(self, n: int, c_in: int, c_out: int, stride: int, dropout: float) -> None:
        super().__init__()
        self.layer = nn.Sequential(
            *[_WideBasicBlock(c_in if i == 0 else c_out, c_out, stride if i == 0 else 1, dropout) for i in range(n)]
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.layer(x)


class WideResNet(nn.Module):
    """Wide ResNet ``WRN-depth-k`` for 32x32 inputs (the ``wrn_*`` models of RepDistiller).

    A 3x3 stem convolution to 16 channels, three stages of ``(depth - 4) / 6`` pre-activation
    blocks with ``16k``, ``32k``, ``64k`` channels and strides 1, 2, 2, then BN, ReLU, global
    average pooling and a linear head. Convolutions start from ``N(0, 2 / (k*k*c_out))``, BN at
    weight 1 / bias 0 and the head's bias at 0, as in RepDistiller.

    Named stages: ``conv1``, ``block1``, ``block2``, ``block3``, ``bn1``, ``relu``, ``avgpool``,
    ``fc`` (RepDistiller's names, kept so its checkpoints load). Because the blocks are
    pre-activation, the output of ``blockK`` is a pre-activation feature map; the activated one is
    what ``block{K+1}.layer.0.bn1`` / the final ``bn1`` + ``relu`` see.

    Args:
        depth: ``6n + 4`` with ``n >= 1`` (10, 16, 22, 28, 40, ...).
        widen_factor: ``k``, the width multiplier of the three stages.
        num_classes: output classes.
        dropout: dropout probability between the two convolutions of each block.

    Example::

        >>> import torch
        >>> model = WideResNet(depth=16, widen_factor=2, num_classes=10)
        >>> model(torch.zeros(2, 3, 32, 32)).shape
        torch.Size([2, 10])
        >>> len(model.block1.layer), model.fc.in_features
        (2, 128)
    """

    stage_names = ("block1", "block2", "block3")

    def __init__(self, depth: int, widen_factor: int, num_classes: int = 100, dropout: float = 0.0) -> None:
        super().__init__()
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 10 or (depth - 4) % 6 != 0:
            raise ValueError(f"`depth` must be 6n + 4 with n >= 1 (10, 16, 22, 28, 40, ...), got {depth!r}.")
        if isinstance(widen_factor, bool) or not isinstance(widen_factor, int) or widen_factor < 1:
            raise ValueError(f"`widen_factor` must be an integer >= 1, got {widen_factor!r}.")
        _check_num_classes(num_classes)
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"`dropout` must be in [0, 1), got {dropout!r}.")
        self.depth = depth
        self.widen_factor = widen_factor
        widths = (16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor)
        n = (depth - 4) // 6
        self.conv1 = nn.Conv2d(3, widths[0], kernel_size=3, stride=1, padding=1, bias=False)
        self.block1 = _NetworkBlock(n, widths[0], widths[1], 1, dropout)  # 32x32
        self.block2 = _NetworkBlock(n, widths[1], widths[2], 2, dropout)  # 16x16
        self.block3 = _NetworkBlock(n, widths[2], widths[3], 2, dropout)  # 8x8
        self.bn1 = nn.BatchNorm2d(widths[3])
        self.relu = nn.ReLU(inplace=True)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[3], num_classes)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, 0.0, (2.0 / fan_out) ** 0.5)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        out = self.block3(self.block2(self.block1(self.conv1(x))))
        out = self.relu(self.bn1(out))
        return self.fc(self.avgpool(out).flatten(1))


class WRN16x2(WideResNet):
    """``wrn_16_2``: WRN-16-2, about 0.70M parameters.

    Example::

        >>> import torch
        >>> WRN16x2(num_classes=10)(torch.zeros(2, 3, 32, 32)).shape
        torch.Size([2, 10])
    """

    def __init__(self, num_classes: int = 100) -> None:
        super().__init__(16, 2, num_classes)


class WRN40x2(WideResNet):
    """``wrn_40_2``: WRN-40-2, about 2.26M parameters."""

    def __init__(self, num_classes: int = 100) -> None:
        super().__init__(40, 2, num_classes)


CIFAR_MODELS: dict[str, type[nn.Module]] = {
    "resnet8x4": ResNet8x4,
    "resnet32x4": ResNet32x4,
    "resnet20": ResNet20,
    "resnet56": ResNet56,
    "wrn_16_2": WRN16x2,
    "wrn_40_2": WRN40x2,
}
"""The literature names (as in RepDistiller / CRD tables) to their classes."""
