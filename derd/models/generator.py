"""Generators G(z) -> images in [0,1] (sigmoid head, so PGD's eps-ball lives in pixel space)."""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from derd.registry import Registry

GENERATORS: Registry[Callable[..., nn.Module]] = Registry("generator", "stage1.generator.arch")
register_generator = GENERATORS.register
registered_generators = GENERATORS.names


def _up_block(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Upsample(scale_factor=2), nn.Conv2d(cin, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout),
            nn.LeakyReLU(0.2, inplace=True)]


class DAFLGenerator(nn.Module):
    """DAFL/DFAD topology: linear head to (H/4, W/4), two x2 upsample-conv blocks, sigmoid (METHOD.md)."""

    def __init__(self, nz: int, channels: int, image_size: int, width: int = 128):
        super().__init__()
        if image_size % 4:
            raise ValueError(f"dafl generator needs an image size divisible by 4, got {image_size}")
        self.nz, self.init = nz, image_size // 4
        self.head = nn.Sequential(nn.Linear(nz, width * self.init**2))
        self.body = nn.Sequential(
            nn.BatchNorm2d(width), *_up_block(width, width), *_up_block(width, width // 2),
            nn.Conv2d(width // 2, channels, 3, 1, 1), nn.Sigmoid(),
        )
        self.width = width

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.body(self.head(z).view(z.shape[0], self.width, self.init, self.init))


class DCGANGenerator(nn.Module):
    """DCGAN-style transposed-conv generator for large images (ImageNet-100 at 224x224).

    z -> 7x7 (transposed conv), then x2 transposed-conv upsamplings until the target size, sigmoid.
    """

    def __init__(self, nz: int, channels: int, image_size: int, width: int = 64):
        super().__init__()
        ups, size = 0, 7
        while size < image_size:
            size, ups = size * 2, ups + 1
        if size != image_size:
            raise ValueError(f"dcgan generator needs image_size = 7*2^k (e.g. 224), got {image_size}")
        self.nz = nz
        cin = width * 2**min(ups, 4)
        layers: list[nn.Module] = [nn.ConvTranspose2d(nz, cin, 7, 1, 0, bias=False), nn.BatchNorm2d(cin), nn.ReLU(True)]
        for i in range(ups - 1):
            cout = max(width, cin // 2)
            layers += [nn.ConvTranspose2d(cin, cout, 4, 2, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(True)]
            cin = cout
        layers += [nn.ConvTranspose2d(cin, channels, 4, 2, 1), nn.Sigmoid()]
        self.body = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.body(z.view(z.shape[0], -1, 1, 1))


register_generator("dafl")(DAFLGenerator)
register_generator("dcgan")(DCGANGenerator)


def build_generator(arch: str, nz: int, shape: tuple[int, int, int], width: int | None = None) -> nn.Module:
    """A registered generator sized from the dataset's (C, H, W); ``width`` None = the arch's default."""
    channels, height, _ = shape
    return GENERATORS[arch](nz, channels, height, **({} if width is None else {"width": width}))
