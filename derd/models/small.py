"""Small BatchNorm networks for the offline (digits, CPU) profile."""
from __future__ import annotations

from torch import nn

from derd.models.base import register_arch
from derd.models.cifar import BasicBlock


def _conv_bn(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class SmallCNN(nn.Module):
    """Three conv-BN-ReLU blocks (widths w, 2w, 4w), two of them strided, global average pool."""

    def __init__(self, in_channels: int, num_classes: int, width: int):
        super().__init__()
        self.body = nn.Sequential(
            _conv_bn(in_channels, width), _conv_bn(width, 2 * width, 2), _conv_bn(2 * width, 4 * width, 2),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.fc = nn.Linear(4 * width, num_classes)

    def features(self, x):
        return self.body(x)


class SmallResNet(nn.Module):
    """A ResNet with one basic block per stage (widths w, 2w, 4w)."""

    def __init__(self, in_channels: int, num_classes: int, width: int):
        super().__init__()
        self.stem = _conv_bn(in_channels, width)
        self.stages = nn.Sequential(
            BasicBlock(width, width, 1), BasicBlock(width, 2 * width, 2), BasicBlock(2 * width, 4 * width, 2)
        )
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(4 * width, num_classes)

    def features(self, x):
        return self.pool(self.stages(self.stem(x)))


@register_arch("small_cnn")
def small_cnn(in_channels, num_classes, width=16, **_):
    return SmallCNN(in_channels, num_classes, width)


@register_arch("small_resnet")
def small_resnet(in_channels, num_classes, width=16, **_):
    return SmallResNet(in_channels, num_classes, width)
