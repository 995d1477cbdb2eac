"""Architecture and generator registries.

Every classifier takes images in [0,1], owns its normalisation, and returns its penultimate
pooled features on request (``model(x, return_features=True) -> (logits, features)``).
"""
from derd.models import cifar, imagenet, small  # noqa: F401  (fill the registry)
from derd.models.base import ARCHS, Classifier, build_model, register_arch, registered_archs
from derd.models.generator import GENERATORS, build_generator, registered_generators

__all__ = [
    "ARCHS",
    "GENERATORS",
    "Classifier",
    "build_generator",
    "build_model",
    "register_arch",
    "registered_archs",
    "registered_generators",
]
