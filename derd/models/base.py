"""The classifier wrapper every architecture shares, and the architecture registry."""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from derd.registry import Registry

# builder(in_channels, num_classes, image_size, width) -> network with .features(x) and .fc
ARCHS: Registry[Callable[..., nn.Module]] = Registry("architecture", "teachers.<role>.arch / stage2.student.arch")
register_arch = ARCHS.register
registered_archs = ARCHS.names


class Normalize(nn.Module):
    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class Classifier(nn.Module):
    """[0,1] images -> logits (and optionally the pooled features feeding the final layer)."""

    def __init__(self, net: nn.Module, mean: Sequence[float], std: Sequence[float], arch: str = ""):
        super().__init__()
        self.arch = arch
        self.normalize = Normalize(mean, std)
        self.net = net

    def forward(self, x: torch.Tensor, return_features: bool = False):
        features = self.net.features(self.normalize(x))
        logits = self.net.fc(features)
        return (logits, features) if return_features else logits


def build_model(
    arch: str,
    in_channels: int,
    num_classes: int,
    mean: Sequence[float],
    std: Sequence[float],
    image_size: int = 32,
    width: int = 16,
    normalize: str = "dataset",
) -> Classifier:
    """Instantiate a registered architecture wrapped with its input normalisation: the dataset's
    ``mean``/``std`` (``normalize="dataset"``) or the identity (``"none"``: weights trained on raw [0,1]
    inputs, such as the public TRADES and most RobustBench checkpoints)."""
    if normalize not in ("dataset", "none"):
        raise ValueError(f"normalize: must be dataset or none, got {normalize!r}")
    if normalize == "none":
        mean, std = (0.0,) * in_channels, (1.0,) * in_channels
    net = ARCHS[arch](in_channels=in_channels, num_classes=num_classes, image_size=image_size, width=width)
    return Classifier(net, mean, std, arch)
