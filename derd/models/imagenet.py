"""ImageNet-size ResNets (torchvision definitions, randomly initialised; no weights are downloaded)."""
from __future__ import annotations

import torch
from torch import nn

from derd.models.base import register_arch


class TorchvisionResNet(nn.Module):
    def __init__(self, factory, in_channels: int, num_classes: int):
        super().__init__()
        net = factory(weights=None, num_classes=num_classes)
        if in_channels != 3:
            net.conv1 = nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
        self.fc = net.fc
        net.fc = nn.Identity()
        self.trunk = net

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.trunk(x)


@register_arch("resnet18_imagenet")
def resnet18_imagenet(in_channels, num_classes, **_):
    from torchvision.models import resnet18

    return TorchvisionResNet(resnet18, in_channels, num_classes)


@register_arch("resnet50_imagenet")
def resnet50_imagenet(in_channels, num_classes, **_):
    from torchvision.models import resnet50

    return TorchvisionResNet(resnet50, in_channels, num_classes)
