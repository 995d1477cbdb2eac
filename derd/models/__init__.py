"""Architecture and generator registries.

Every classifier takes images in [0,1], owns its normalisation, and returns its penultimate
pooled features on request (``model(x, return_features=True) -> (logits, features)``).
"""
from .base import Classifier, build_model, register_arch, registered_archs
from .generator import build_generator, registered_generators
from . import cifar, imagenet, small  # noqa: F401  (fill the registry)

__all__ = [
    "Classifier", "build_model", "register_arch", "registered_archs",
    "build_generator", "registered_generators",
]
