"""Shared pieces of the Stage-I tests: a seeded tiny teacher and a tiny digits configuration."""
from __future__ import annotations

import torch

from derd import config
from derd.models import build_model


def tiny_teacher(classes: int = 3, seed: int = 0) -> torch.nn.Module:
    """A seeded small_cnn (width 4, 8×8 grey input) with non-trivial BN running statistics, eval mode."""
    torch.manual_seed(seed)
    model = build_model("small_cnn", 1, classes, (0.4,), (0.3,), image_size=8, width=4)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features) * 0.2)
            m.running_var.copy_(torch.rand(m.num_features) + 0.5)
    return model.eval()


def tiny_config(**stage1) -> config.Config:
    """Digits at 8×8 with tiny teachers and a short Stage-I (seconds on one core)."""
    quick = {"epochs": 15, "batch_size": 32, "lr": 0.1}  # natural teacher ≈ 95% test accuracy
    raw = {
        "device": "cpu",
        "data": {"image_size": 8},
        "teachers": {
            "natural": {"arch": "small_cnn", "width": 8, "train": quick},
            "robust": {"arch": "small_cnn", "width": 8, "method": "pgd_at", "train": {**quick, "epochs": 1},
                       "attack": {"eps": 0.1, "steps": 1, "step_size": 0.1}},
        },
        "stage1": {
            "iterations": 60, "batch_size": 32, "lr": 0.01, "health_samples": 100, "checkpoint_every": 10,
            "inversion": {"pool_size": 40, "batch_size": 20, "steps": 15, "lr": 0.05}, **stage1,
        },
    }
    return config.parse(raw)
