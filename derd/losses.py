"""Loss terms. Stage-I (DAFL / DeepInversion, METHOD.md "Stage-I") and the KD terms of Stage-II.

Each term is a small function tied to its equation; :class:`StageOneLoss` weights them by name:
L_G^I = λoh·L_oh + λie·L_ie + λBN·L_BN + λa·L_a.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

LOG_BASES = {"e": 1.0, "10": math.log(10)}


def one_hot_loss(logits: torch.Tensor) -> torch.Tensor:
    """L_oh = CE(T(x), argmax T(x)) (DAFL): pushes the teacher to be confident on generated samples."""
    return F.cross_entropy(logits, logits.argmax(1))


def activation_loss(features: torch.Tensor) -> torch.Tensor:
    """L_a = −mean |f(x)| (DAFL), f the teacher's penultimate pooled features (input of the final FC)."""
    return -features.abs().mean()


def information_entropy_loss(logits: torch.Tensor, log_base: str = "e") -> torch.Tensor:
    """L_ie = Σ_k p̄_k log p̄_k, p̄ the batch-mean softmax; minimising it balances the classes.

    ``log_base`` "e" (METHOD.md, natural log) or "10" (DAFL's code); the minimum is −log K."""
    if log_base not in LOG_BASES:
        raise ValueError(f"stage1.ie_log_base: must be one of {sorted(LOG_BASES)}, got {log_base!r}")
    p = F.softmax(logits, 1).mean(0)
    return (p * torch.log(p.clamp_min(1e-12))).sum() / LOG_BASES[log_base]


def bn_distance(x: torch.Tensor, bn: nn.modules.batchnorm._BatchNorm) -> torch.Tensor:
    """One layer's L_BN: ‖μ(x) − μ^run‖₂ + ‖σ²(x) − σ²^run‖₂, per-channel statistics of the layer
    input ``x`` (biased variance), un-squared L2 norms (DeepInversion)."""
    dims = [0] + list(range(2, x.dim()))
    mean, var = x.mean(dims), x.var(dims, unbiased=False)
    return torch.linalg.vector_norm(mean - bn.running_mean) + torch.linalg.vector_norm(var - bn.running_var)


class BNStatistics:
    """Forward hooks on every BatchNorm layer of a model collecting :func:`bn_distance` per layer.

    The hooks record only inside :meth:`recording`, so other forward passes through the same
    teacher (Stage-II's KD targets, attacks) pay nothing and keep no graph alive.
    Call :meth:`close` to remove the hooks."""

    def __init__(self, model: nn.Module):
        self.distances: list[torch.Tensor] = []
        self._active = False
        layers = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        untracked = [m for m in layers if m.running_mean is None or m.running_var is None]
        if untracked:
            raise ValueError(f"L_BN needs running statistics; {len(untracked)} BatchNorm layer(s) have none "
                             "(track_running_stats=False)")
        self._handles = [m.register_forward_hook(self._hook) for m in layers]

    def _hook(self, module: nn.Module, inputs: tuple[torch.Tensor, ...], _output) -> None:
        if self._active:
            self.distances.append(bn_distance(inputs[0], module))

    def recording(self) -> _Recording:
        """Context in which forward passes record fresh per-layer distances."""
        return _Recording(self)

    def loss(self) -> torch.Tensor:
        """L_BN = Σ_l over the layers recorded by the last :meth:`recording` block."""
        if not self.distances:
            raise RuntimeError("no BatchNorm layer ran while recording: L_BN needs a teacher with BatchNorm")
        return torch.stack(self.distances).sum()

    @property
    def n_hooks(self) -> int:
        return len(self._handles)

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self.distances = []


class _Recording:
    def __init__(self, stats: BNStatistics):
        self.stats = stats

    def __enter__(self) -> BNStatistics:
        self.stats.distances, self.stats._active = [], True
        return self.stats

    def __exit__(self, *exc) -> None:
        self.stats._active = False


@dataclass
class StageOneResult:
    total: torch.Tensor
    raw: dict[str, torch.Tensor]  # unweighted terms
    weighted: dict[str, torch.Tensor]
    logits: torch.Tensor  # teacher logits on x (reused by Stage-II's discrepancy term)

    def as_floats(self) -> dict[str, float]:
        """``{"total", "<term>", "w_<term>"}`` as Python floats, for logs and CSV rows."""
        out = {"total": self.total.item()}
        out.update({k: v.item() for k, v in self.raw.items()})
        out.update({f"w_{k}": v.item() for k, v in self.weighted.items()})
        return out


class StageOneLoss:
    """L_G^I = λoh·L_oh + λie·L_ie + λBN·L_BN + λa·L_a against a frozen teacher in eval mode.

    Every raw and weighted term is returned, so an inert term (λBN = 1e-5) is visible. Use as a
    context manager (or call :meth:`close`) so the BN hooks are removed from the teacher.
    """

    TERMS = ("oh", "ie", "bn", "a")

    def __init__(self, teacher: nn.Module, lambdas: dict[str, float], log_base: str = "e"):
        unknown = set(lambdas) - set(self.TERMS)
        if unknown:
            raise KeyError(f"unknown Stage-I terms {sorted(unknown)}; known: {self.TERMS}")
        if log_base not in LOG_BASES:
            raise ValueError(f"stage1.ie_log_base: must be one of {sorted(LOG_BASES)}, got {log_base!r}")
        self.teacher, self.lambdas, self.log_base = teacher, dict(lambdas), log_base
        self.bn = BNStatistics(teacher)
        if self.bn.n_hooks == 0:
            self.close()
            raise ValueError(f"L_BN needs BatchNorm layers, and the teacher {type(teacher).__name__} has none")

    @classmethod
    def from_config(cls, teacher: nn.Module, stage1) -> StageOneLoss:
        lambdas = {t: getattr(stage1, f"lambda_{t}") for t in cls.TERMS}
        return cls(teacher, lambdas, stage1.ie_log_base)

    def __call__(self, x: torch.Tensor) -> StageOneResult:
        if self.teacher.training:
            raise RuntimeError("StageOneLoss: the teacher must be in eval mode (train mode would use batch "
                               "statistics and overwrite its BatchNorm running statistics)")
        with self.bn.recording():
            logits, features = self.teacher(x, return_features=True)
        raw = {
            "oh": one_hot_loss(logits),
            "ie": information_entropy_loss(logits, self.log_base),
            "bn": self.bn.loss(),
            "a": activation_loss(features),
        }
        weighted = {k: self.lambdas.get(k, 0.0) * v for k, v in raw.items()}
        return StageOneResult(torch.stack(list(weighted.values())).sum(), raw, weighted, logits)

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
