"""Small models for scikit-learn's 8x8 handwritten digits (``DigitsDataModule``).

Inputs are ``[N, 1, 8, 8]`` images scaled to ``[0, 1]``. Every model exposes named stages
(``block1`` ... ``head``) so feature strategies can hook them by name.
"""

from __future__ import annotations

from torch import Tensor, nn

__all__ = ["DigitsCNN", "DigitsMLP", "DigitsStudentCNN"]


def _conv_bn(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, kernel_size=3, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )


class DigitsCNN(nn.Module):
    """The digits teacher: three conv-BN-ReLU blocks, global pooling, dropout, linear head.

    About 24k parameters with the default ``width=16``; the shipped weights
    (``teacher_checkpoint: zoo:digits_cnn``) come from ``configs/digits/teacher.yaml``.

    Args:
        num_classes: output classes (10 for digits).
        width: channels of the first block; later blocks use 2x and 4x.
        dropout: dropout before the head (a teacher with BatchNorm *and* Dropout is what the
            teacher-contract test needs: both behave differently in train mode).

    Example::

        >>> import torch
        >>> DigitsCNN()(torch.zeros(2, 1, 8, 8)).shape
        torch.Size([2, 10])
    """

    def __init__(self, num_classes: int = 10, width: int = 16, dropout: float = 0.25) -> None:
        super().__init__()
        self.block1 = _conv_bn(1, width)  # 8x8
        self.block2 = nn.Sequential(_conv_bn(width, 2 * width), nn.MaxPool2d(2))  # 4x4
        self.block3 = nn.Sequential(_conv_bn(2 * width, 4 * width), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(4 * width, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.dropout(self.block3(self.block2(self.block1(x)))))


class DigitsStudentCNN(nn.Module):
    """A narrow two-block CNN student (about 1k parameters with ``width=4``).

    Example::

        >>> import torch
        >>> DigitsStudentCNN()(torch.zeros(2, 1, 8, 8)).shape
        torch.Size([2, 10])
    """

    def __init__(self, num_classes: int = 10, width: int = 4) -> None:
        super().__init__()
        self.block1 = nn.Sequential(_conv_bn(1, width), nn.MaxPool2d(2))  # 4x4
        self.block2 = nn.Sequential(_conv_bn(width, 2 * width), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(2 * width, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.block2(self.block1(x)))


class DigitsMLP(nn.Module):
    """A tiny MLP student: flatten 64 pixels -> ``hidden`` -> classes (about 1k parameters at 16).

    Example::

        >>> import torch
        >>> DigitsMLP(hidden=8)(torch.zeros(2, 1, 8, 8)).shape
        torch.Size([2, 10])
    """

    def __init__(self, num_classes: int = 10, hidden: int = 16) -> None:
        super().__init__()
        self.block1 = nn.Sequential(nn.Flatten(), nn.Linear(64, hidden), nn.ReLU(inplace=True))
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.block1(x))
