"""Loss terms. Stage-I (DAFL / DeepInversion, METHOD.md "Stage-I") and the KD terms of Stage-II.

Each term is a small function tied to its equation; :class:`StageOneLoss` weights them by name.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


def one_hot_loss(logits: torch.Tensor) -> torch.Tensor:
    """L_oh = CE(T(x), argmax T(x)): pushes the teacher to be confident on generated samples."""
    return F.cross_entropy(logits, logits.argmax(1))


def activation_loss(features: torch.Tensor) -> torch.Tensor:
    """L_a = −mean |f(x)| over the teacher's penultimate pooled features."""
    return -features.abs().mean()


def information_entropy_loss(logits: torch.Tensor, log_base: str = "e") -> torch.Tensor:
    """L_ie = Σ_k p̄_k log p̄_k with p̄ the batch-mean softmax (minimising it balances classes).

    ``log_base`` "e" (METHOD.md) or "10" (DAFL's code)."""
    p = F.softmax(logits, 1).mean(0)
    value = (p * torch.log(p.clamp_min(1e-12))).sum()
    return value / math.log(10) if log_base == "10" else value


class BNStatistics:
    """Forward hooks on every BatchNorm layer of a model, recording L_BN's per-layer distance
    ‖μ_l(x) − μ_l^run‖₂ + ‖σ²_l(x) − σ²_l^run‖₂ (layer inputs, biased variance)."""

    def __init__(self, model: nn.Module):
        self.distances: list[torch.Tensor] = []
        self._handles = [
            m.register_forward_hook(self._hook) for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
        ]

    def _hook(self, module: nn.Module, inputs: tuple[torch.Tensor], _output) -> None:
        x = inputs[0]
        dims = [0] + list(range(2, x.dim()))
        mean = x.mean(dims)
        var = x.var(dims, unbiased=False)
        self.distances.append(
            torch.linalg.vector_norm(mean - module.running_mean) + torch.linalg.vector_norm(var - module.running_var)
        )

    def reset(self) -> None:
        self.distances = []

    def loss(self) -> torch.Tensor:
        """L_BN summed over the layers seen since the last :meth:`reset`."""
        if not self.distances:
            raise RuntimeError("no BatchNorm layer ran: L_BN needs a teacher with BatchNorm")
        return torch.stack(self.distances).sum()

    @property
    def n_hooks(self) -> int:
        return len(self._handles)

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


@dataclass
class StageOneResult:
    total: torch.Tensor
    raw: dict[str, torch.Tensor]  # unweighted terms
    weighted: dict[str, torch.Tensor]
    logits: torch.Tensor  # teacher logits on x (reused by Stage-II's discrepancy term)


class StageOneLoss:
    """L_G^I = λoh·L_oh + λie·L_ie + λBN·L_BN + λa·L_a against a frozen teacher.

    Use as a context manager (or call :meth:`close`) so the BN hooks are removed from the teacher.
    """

    TERMS = ("oh", "ie", "bn", "a")

    def __init__(self, teacher: nn.Module, lambdas: dict[str, float], log_base: str = "e"):
        unknown = set(lambdas) - set(self.TERMS)
        if unknown:
            raise KeyError(f"unknown Stage-I terms {sorted(unknown)}; known: {self.TERMS}")
        self.teacher, self.lambdas, self.log_base = teacher, dict(lambdas), log_base
        self.bn = BNStatistics(teacher)

    @classmethod
    def from_config(cls, teacher: nn.Module, stage1) -> StageOneLoss:
        lambdas = {t: getattr(stage1, f"lambda_{t}") for t in cls.TERMS}
        return cls(teacher, lambdas, stage1.ie_log_base)

    def __call__(self, x: torch.Tensor) -> StageOneResult:
        self.bn.reset()
        logits, features = self.teacher(x, return_features=True)
        raw = {
            "oh": one_hot_loss(logits),
            "ie": information_entropy_loss(logits, self.log_base),
            "bn": self.bn.loss(),
            "a": activation_loss(features),
        }
        weighted = {k: self.lambdas.get(k, 0.0) * v for k, v in raw.items()}
        return StageOneResult(sum(weighted.values()), raw, weighted, logits)

    def close(self) -> None:
        self.bn.close()

    def __enter__(self) -> StageOneLoss:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def kd_kl(teacher_logits: torch.Tensor, student_logits: torch.Tensor, tau: float = 1.0) -> torch.Tensor:
    """KL(σ_τ(teacher) ‖ σ_τ(student)), batchmean (sum over classes, mean over batch)."""
    return F.kl_div(F.log_softmax(student_logits / tau, 1), F.softmax(teacher_logits / tau, 1), reduction="batchmean")


def l1_discrepancy(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean absolute difference of logits (DFAD's discrepancy)."""
    return (a - b).abs().mean()
