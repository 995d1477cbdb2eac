"""CIFAR-style networks (3x3 stem, no max-pool): ResNet-18/34, PreActResNet-18, WRN-34-10, MobileNetV2."""
from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from derd.models.base import register_arch


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class PreActBlock(nn.Module):
    """Pre-activation basic block (He et al. 2016); ``drop`` is WRN's dropout between convs."""

    def __init__(self, cin: int, cout: int, stride: int, drop: float = 0.0):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.drop = nn.Dropout(drop) if drop else nn.Identity()
        self.shortcut = None
        if stride != 1 or cin != cout:
            self.shortcut = nn.Conv2d(cin, cout, 1, stride, bias=False)

    def forward(self, x):
        out = F.relu(self.bn1(x))
        skip = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(self.drop(F.relu(self.bn2(out))))
        return out + skip


def _stages(block, widths, depths, cin, **kw):
    layers = []
    for i, (w, d) in enumerate(zip(widths, depths)):
        for j in range(d):
            layers.append(block(cin, w, (1 if i == 0 else 2) if j == 0 else 1, **kw))
            cin = w
    return nn.Sequential(*layers), cin


class ResNet(nn.Module):
    def __init__(self, depths, in_channels: int, num_classes: int, preact: bool = False):
        super().__init__()
        block = PreActBlock if preact else BasicBlock
        self.stem = nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False)
        self.stem_bn = nn.Identity() if preact else nn.BatchNorm2d(64)
        self.stem_act = nn.Identity() if preact else nn.ReLU(inplace=True)
        self.layers, cout = _stages(block, (64, 128, 256, 512), depths, 64)
        self.final = nn.Sequential(nn.BatchNorm2d(cout), nn.ReLU(inplace=True)) if preact else nn.Identity()
        self.fc = nn.Linear(cout, num_classes)

    def features(self, x):
        x = self.final(self.layers(self.stem_act(self.stem_bn(self.stem(x)))))
        return F.adaptive_avg_pool2d(x, 1).flatten(1)


class WideResNet(nn.Module):
    """WRN-d-k (Zagoruyko & Komodakis 2016); WRN-34-10 is the TRADES/SAT teacher."""

    def __init__(self, depth: int, widen: int, in_channels: int, num_classes: int, drop: float = 0.0):
        super().__init__()
        n = (depth - 4) // 6
        self.stem = nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False)
        self.layers, cout = _stages(PreActBlock, (16 * widen, 32 * widen, 64 * widen), (n, n, n), 16, drop=drop)
        self.final = nn.Sequential(nn.BatchNorm2d(cout), nn.ReLU(inplace=True))
        self.fc = nn.Linear(cout, num_classes)

    def features(self, x):
        return F.adaptive_avg_pool2d(self.final(self.layers(self.stem(x))), 1).flatten(1)


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int):
        super().__init__()
        hidden = cin * expand
        self.use_skip = stride == 1 and cin == cout
        layers = []
        if expand != 1:
            layers += [nn.Conv2d(cin, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6(inplace=True)]
        layers += [
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False), nn.BatchNorm2d(hidden),
            nn.ReLU6(inplace=True), nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout),
        ]
        self.block = nn.Sequential(*layers)

    def forward(self, x):
        out = self.block(x)
        return x + out if self.use_skip else out


class MobileNetV2(nn.Module):
    """MobileNetV2 for 32x32 inputs: stride-1 stem and first strided stage kept at stride 1."""

    # expand, channels, repeats, stride (CIFAR variant: the second stage keeps stride 1)
    SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))

    def __init__(self, in_channels: int, num_classes: int):
        super().__init__()
        layers = [nn.Conv2d(in_channels, 32, 3, 1, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU6(inplace=True)]
        cin = 32
        for t, c, n, s in self.SETTINGS:
            for i in range(n):
                layers.append(InvertedResidual(cin, c, s if i == 0 else 1, t))
                cin = c
        layers += [nn.Conv2d(cin, 1280, 1, bias=False), nn.BatchNorm2d(1280), nn.ReLU6(inplace=True)]
        self.body = nn.Sequential(*layers)
        self.fc = nn.Linear(1280, num_classes)

    def features(self, x):
        return F.adaptive_avg_pool2d(self.body(x), 1).flatten(1)


@register_arch("resnet18")
def resnet18(in_channels, num_classes, **_):
    return ResNet((2, 2, 2, 2), in_channels, num_classes)


@register_arch("resnet34")
def resnet34(in_channels, num_classes, **_):
    return ResNet((3, 4, 6, 3), in_channels, num_classes)


@register_arch("preact_resnet18")
def preact_resnet18(in_channels, num_classes, **_):
    return ResNet((2, 2, 2, 2), in_channels, num_classes, preact=True)


@register_arch("wrn34_10")
def wrn34_10(in_channels, num_classes, **_):
    return WideResNet(34, 10, in_channels, num_classes)


@register_arch("mobilenet_v2")
def mobilenet_v2(in_channels, num_classes, **_):
    return MobileNetV2(in_channels, num_classes)
