"""Every registered architecture and generator: shapes, finiteness, gradients, features, [0,1] input."""
from __future__ import annotations

import pytest
import torch

from derd.models import (
    build_generator,
    build_model,
    registered_archs,
    registered_generators,
)

SMALL = {"small_cnn", "small_resnet", "resnet18"}  # also checked on one-channel input
SIZE = {"resnet18_imagenet": 32, "resnet50_imagenet": 32}  # ImageNet stems downsample 32x


@pytest.mark.parametrize("arch", registered_archs())
@pytest.mark.parametrize("channels", [1, 3])
def test_classifier_contract(arch, channels):
    if arch not in SMALL and channels == 1:
        pytest.skip("one-channel input is checked on the small nets and resnet18")
    torch.manual_seed(0)
    size = SIZE.get(arch, 8)
    mean, std = (0.4,) * channels, (0.2,) * channels
    model = build_model(arch, channels, 7, mean, std, image_size=size, width=8)
    x = torch.rand(3, channels, size, size)
    logits, feats = model(x, return_features=True)
    assert logits.shape == (3, 7)
    assert feats.shape[0] == 3 and feats.dim() == 2
    assert feats.shape[1] == model.net.fc.in_features
    assert torch.isfinite(logits).all()
    logits.square().mean().backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert no_grad == []
    assert not any(p.requires_grad for p in model.normalize.buffers())


def test_normalisation_is_inside_the_model():
    model = build_model("small_cnn", 3, 10, (0.5, 0.4, 0.3), (0.2, 0.25, 0.3), width=4).eval()
    x = torch.rand(2, 3, 16, 16)
    manual = model.net.fc(model.net.features((x - model.normalize.mean) / model.normalize.std))
    torch.testing.assert_close(model(x), manual)
    assert set(model.state_dict()) >= {"normalize.mean", "normalize.std"}


def test_unknown_architecture_is_named():
    with pytest.raises(KeyError, match="vgg"):
        build_model("vgg", 3, 10, (0.5,) * 3, (0.5,) * 3)


@pytest.mark.parametrize("arch,shape", [("dafl", (1, 16, 16)), ("dafl", (3, 32, 32)), ("dcgan", (3, 56, 56))])
def test_generator_outputs_images_in_unit_range(arch, shape):
    assert arch in registered_generators()
    torch.manual_seed(0)
    g = build_generator(arch, 12, shape)
    x = g(torch.randn(4, 12) * 10)
    assert x.shape == (4, *shape)
    assert x.min() >= 0 and x.max() <= 1
    x.mean().backward()
    assert all(p.grad is not None for p in g.parameters())


def test_dcgan_reaches_224():
    g = build_generator("dcgan", 8, (3, 224, 224))
    with torch.no_grad():
        assert g(torch.randn(1, 8)).shape == (1, 3, 224, 224)


def test_generator_rejects_unfit_sizes():
    with pytest.raises(ValueError, match="divisible by 4"):
        build_generator("dafl", 8, (1, 18, 18))
    with pytest.raises(ValueError, match="7\\*2\\^k"):
        build_generator("dcgan", 8, (3, 100, 100))
