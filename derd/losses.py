"""Loss terms. Stage-I (DAFL / DeepInversion, METHOD.md "Stage-I") and the KD terms of Stage-II.

Each term is a small function tied to its equation; an objective is a :class:`WeightedSum` of named
terms with weights from the config (:class:`StageOneLoss`: L_G^I = λoh·L_oh + λie·L_ie + λBN·L_BN + λa·L_a;
DERD's L_G^II in :mod:`derd.distill.derd`), logged raw and weighted under the term names.
"""
from __future__ import annotations

import contextlib
import functools
import math
import operator
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import ClassVar

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
class Terms:
    """One evaluation of a :class:`WeightedSum`: the total, and each computed term raw and weighted."""

    total: torch.Tensor
    raw: dict[str, torch.Tensor]
    weighted: dict[str, torch.Tensor]

    def logs(self, prefix: str = "", total: str | None = "total") -> dict[str, torch.Tensor]:
        """Detached ``{prefix+total, prefix+<term>, prefix+"w_"+<term>}``: the names every log uses (per-step
        CSVs, MLflow, the report). ``total=None`` leaves the total out."""
        out = {prefix + total: self.total.detach()} if total else {}
        out.update({prefix + k: v.detach() for k, v in self.raw.items()})
        out.update({f"{prefix}w_{k}": v.detach() for k, v in self.weighted.items()})
        return out

    def as_floats(self) -> dict[str, float]:
        """:meth:`logs` as Python floats (Stage-I's per-step CSV rows)."""
        return {k: v.item() for k, v in self.logs().items()}


class WeightedSum:
    """L = Σ_k λ_k·L_k over named terms, in the order of ``weights`` (from the config). A term whose
    weight is 0 is not computed: :meth:`active` says which ones are, and only those are logged."""

    def __init__(self, weights: Mapping[str, float], source: str):
        self.weights = dict(weights)
        if not any(self.weights.values()):
            raise ValueError(f"{source}: every term weight is 0 ({self.weights}), so the objective is empty")

    def active(self, name: str) -> bool:
        return bool(self.weights.get(name))

    def describe(self, labels: Mapping[str, str]) -> str:
        """The active terms as a formula, e.g. ``L_G^I(x; T_nat) − 0.003·D(S(x), T_nat(x))`` (for readings)."""
        parts = []
        for name, w in self.weights.items():
            if w:
                sign = ("− " if w < 0 else "+ ") if parts else ("−" if w < 0 else "")
                parts.append(f"{sign}{'' if abs(w) == 1 else f'{abs(w):g}·'}{labels[name]}")
        return " ".join(parts)

    def __call__(self, terms: Mapping[str, Callable[[], torch.Tensor]]) -> Terms:
        """Evaluate ``terms[name]()`` for every active term (each a thunk, so an inactive one costs nothing)."""
        raw = {k: terms[k]() for k in self.weights if self.active(k)}
        weighted = {k: self.weights[k] * v for k, v in raw.items()}
        return Terms(functools.reduce(operator.add, weighted.values()), raw, weighted)


@dataclass
class StageOneResult(Terms):
    logits: torch.Tensor  # teacher logits on x (reused by Stage-II's discrepancy term)


class StageOneLoss:
    """L_G^I = λoh·L_oh + λie·L_ie + λBN·L_BN + λa·L_a against a frozen teacher in eval mode.

    Every computed term is returned raw and weighted, so an inert term (λBN = 1e-5) is visible; a
    term with λ = 0 is not computed (λBN = 0: no BatchNorm hooks). ``record_bn`` keeps the hooks
    for a caller that reads L_BN itself (``self.bn.loss()``). Use as a context manager (or call
    :meth:`close`) so the hooks are removed from the teacher.
    """

    TERMS = ("oh", "ie", "bn", "a")
    LABELS: ClassVar[dict[str, str]] = {"oh": "L_oh", "ie": "L_ie", "bn": "L_BN", "a": "L_a"}

    def __init__(self, teacher: nn.Module, lambdas: dict[str, float], log_base: str = "e", record_bn: bool = False):
        unknown = set(lambdas) - set(self.TERMS)
        if unknown:
            raise KeyError(f"unknown Stage-I terms {sorted(unknown)}; known: {self.TERMS}")
        if log_base not in LOG_BASES:
            raise ValueError(f"stage1.ie_log_base: must be one of {sorted(LOG_BASES)}, got {log_base!r}")
        self.teacher, self.lambdas, self.log_base = teacher, dict(lambdas), log_base
        self.objective = WeightedSum({t: self.lambdas.get(t, 0.0) for t in self.TERMS}, "Stage-I λ (stage1.lambda_*)")
        self.bn = BNStatistics(teacher) if record_bn or self.objective.active("bn") else None
        if self.bn is not None and self.bn.n_hooks == 0:
            self.close()
            raise ValueError(f"L_BN needs BatchNorm layers, and the teacher {type(teacher).__name__} has none")

    @classmethod
    def from_config(cls, teacher: nn.Module, stage1, record_bn: bool = False) -> StageOneLoss:
        lambdas = {t: getattr(stage1, f"lambda_{t}") for t in cls.TERMS}
        return cls(teacher, lambdas, stage1.ie_log_base, record_bn)

    def __call__(self, x: torch.Tensor) -> StageOneResult:
        if self.teacher.training:
            raise RuntimeError("StageOneLoss: the teacher must be in eval mode (train mode would use batch "
                               "statistics and overwrite its BatchNorm running statistics)")
        with self.bn.recording() if self.bn is not None else contextlib.nullcontext():
            logits, features = self.teacher(x, return_features=True)
        terms = self.objective({
            "oh": lambda: one_hot_loss(logits),
            "ie": lambda: information_entropy_loss(logits, self.log_base),
            "bn": lambda: self.bn.loss(),
            "a": lambda: activation_loss(features),
        })
        return StageOneResult(terms.total, terms.raw, terms.weighted, logits)

    def describe(self) -> str:
        """The active terms as a formula, e.g. ``0.05·L_oh + 5·L_ie + 1e-05·L_BN + 0.01·L_a``."""
        return self.objective.describe(self.LABELS)

    def close(self) -> None:
        if self.bn is not None:
            self.bn.close()

    def __enter__(self) -> StageOneLoss:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


KD_REDUCTIONS = ("batchmean", "mean")


def kd_kl(teacher_logits: torch.Tensor, student_logits: torch.Tensor, tau: float | torch.Tensor = 1.0,
          reduction: str = "batchmean") -> torch.Tensor:
    """τ²·KL(σ_τ(teacher) ‖ σ_τ(student)) (Hinton et al.'s τ² keeps the gradient scale across τ; ×1 at τ = 1).

    ``reduction`` (``stage2.kd_reduction``): ``batchmean`` sums over classes and averages over the batch;
    ``mean`` averages over batch × classes (= batchmean / K)."""
    return soft_kl(F.softmax(teacher_logits / tau, 1), student_logits / tau, reduction) * tau**2


def soft_kl(target_probs: torch.Tensor, student_logits: torch.Tensor, reduction: str = "batchmean") -> torch.Tensor:
    """KL(target ‖ σ(student)) for given soft labels, reduced as :func:`kd_kl` says."""
    if reduction not in KD_REDUCTIONS:
        raise ValueError(f"stage2.kd_reduction: must be one of {KD_REDUCTIONS}, got {reduction!r}")
    kl = F.kl_div(F.log_softmax(student_logits, 1), target_probs, reduction="batchmean")
    return kl / (student_logits.shape[1] if reduction == "mean" else 1)


def l1_discrepancy(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean absolute difference of logits (DFAD's discrepancy)."""
    return (a - b).abs().mean()
