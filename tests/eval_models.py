"""Tiny digits models shared by the attack and evaluation tests, trained once per test session."""
from __future__ import annotations

import functools

import torch
from torch import nn

from derd import config, data
from derd.config import NaturalTeacher, RobustTeacher
from derd.runtime import seed_everything
from derd.teachers import build_for, train_teacher

EPS = 0.1  # robust fixture radius (pixel units)
CFG = config.parse({"data": {"image_size": 16}, "device": "cpu"})


@functools.cache
def splits() -> data.Splits:
    return data.load(CFG.data)


def eval_batch(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    return data.first_n(splits().test, n)


@functools.cache
def _trained(kind: str) -> dict[str, torch.Tensor]:
    torch.set_num_threads(1)
    seed_everything(0)
    opt = {"epochs": 20, "batch_size": 32, "lr": 0.1}
    if kind == "natural":
        spec = NaturalTeacher(arch="small_cnn", width=8, train=opt)
    else:
        spec = RobustTeacher(arch="small_cnn", width=8, method="pgd_at", train=opt,
                             attack={"eps": EPS, "steps": 3, "step_size": EPS / 2})
    model = build_for("small_cnn", 8, splits().info)
    train_teacher(model, splits().train, spec, CFG, torch.device("cpu"), f"fixture[{kind}]")
    return {k: v.clone() for k, v in model.state_dict().items()}


def tiny_model(kind: str) -> nn.Module:
    """A fresh copy (eval mode) of the natural or the PGD-AT (eps=EPS) small CNN."""
    model = build_for("small_cnn", 8, splits().info)
    model.load_state_dict(_trained(kind))
    return model.eval()


class Quantised(nn.Module):
    """Gradient masking on purpose: inputs rounded to 4 grey levels, a zero gradient everywhere."""

    def __init__(self, model: nn.Module, levels: int = 4):
        super().__init__()
        self.model, self.levels = model, levels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(torch.round(x * self.levels) / self.levels)
