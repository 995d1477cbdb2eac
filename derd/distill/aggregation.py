"""Stochastic gradient aggregation of the two experts' gradients on the student (METHOD.md, Stage-II 4).

g_nat = ∇θ L_nat and g_rob = ∇θ λrob·L_rob arrive as lists of tensors (one per student parameter).
Each strategy is a small pure function ``(g_nat, g_rob, weights, generator) -> list[Tensor]``:

- ``sum``      g_nat + g_rob (the "w/o SGA" ablation)
- ``pcgrad``   PCGrad (Yu et al. 2020): on conflict (g_nat·g_rob < 0) each gradient loses its
               component along the other, on the flattened parameter vector
- ``graddrop`` sign-consistency masking (Chen et al. 2020), per coordinate: P = ½(1 + Σg/Σ|g|),
               keep the positive parts where U < P, else the negative parts, U ~ Uniform(0, 1)
- ``mtard``    w_nat·g_nat + w_rob·g_rob with online loss-ratio weights (MTARD, Zhao et al. 2022)
- ``sga``      the online weights, then the stochastic sign-consistency mask [R, the default]

The online weights live in :class:`GradientAggregator`: they sum to 2 (so w = (1, 1) is the plain
sum) and move each step at rate λSGA toward 2·r_e / (r_nat + r_rob), with r_e = L_e / L_e(step 0)
the expert's relative loss: the expert that is learning slower gains weight.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

Grads = list[torch.Tensor]
Strategy = Callable[[Sequence[torch.Tensor], Sequence[torch.Tensor], torch.Tensor, torch.Generator | None], Grads]

N_EXPERTS = 2


def flatten(grads: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.cat([g.reshape(-1) for g in grads])


def unflatten(flat: torch.Tensor, like: Sequence[torch.Tensor]) -> Grads:
    out, i = [], 0
    for g in like:
        out.append(flat[i : i + g.numel()].view_as(g))
        i += g.numel()
    return out


def cosine(g_a: Sequence[torch.Tensor], g_b: Sequence[torch.Tensor]) -> float:
    """cos(g_a, g_b) of the flattened gradients (0 when either is zero)."""
    a, b = flatten(g_a), flatten(g_b)
    denom = a.norm() * b.norm()
    return float((a @ b) / denom) if denom > 0 else 0.0


def conflict_fraction(g_a: Sequence[torch.Tensor], g_b: Sequence[torch.Tensor]) -> float:
    """Share of coordinates whose two gradient entries have opposite signs."""
    a, b = flatten(g_a), flatten(g_b)
    return float(((a * b) < 0).float().mean())


def aggregate_sum(g_nat, g_rob, weights=None, generator=None) -> Grads:
    """g_nat + g_rob."""
    return [a + b for a, b in zip(g_nat, g_rob)]


def aggregate_pcgrad(g_nat, g_rob, weights=None, generator=None) -> Grads:
    """PCGrad with two tasks: g_i ← g_i − (g_i·g_j / ‖g_j‖²)·g_j when g_i·g_j < 0 (originals on the right)."""
    a, b = flatten(g_nat), flatten(g_rob)
    dot = a @ b
    if dot < 0:
        a, b = a - dot / (b @ b).clamp_min(1e-20) * b, b - dot / (a @ a).clamp_min(1e-20) * a
    return unflatten(a + b, g_nat)


def sign_consistency_mask(grads: Sequence[Sequence[torch.Tensor]], generator: torch.Generator | None) -> Grads:
    """GradDrop's stochastic mask over several gradient lists, summed: per coordinate keep the
    positive entries where U < P = ½(1 + Σg/Σ|g|), else the negative ones."""
    out = []
    for parts in zip(*grads):
        stacked = torch.stack(list(parts))
        purity = 0.5 * (1 + stacked.sum(0) / stacked.abs().sum(0).clamp_min(1e-20))
        u = torch.rand(purity.shape, generator=generator,
                       device=generator.device if generator is not None else purity.device)
        keep_positive = (u < purity).unsqueeze(0)
        mask = torch.where(keep_positive, stacked > 0, stacked < 0)
        out.append((stacked * mask).sum(0))
    return out


def aggregate_graddrop(g_nat, g_rob, weights=None, generator=None) -> Grads:
    return sign_consistency_mask([g_nat, g_rob], generator)


def aggregate_mtard(g_nat, g_rob, weights, generator=None) -> Grads:
    """w_nat·g_nat + w_rob·g_rob."""
    return [weights[0] * a + weights[1] * b for a, b in zip(g_nat, g_rob)]


def aggregate_sga(g_nat, g_rob, weights, generator) -> Grads:
    """The weighted gradients, then the stochastic sign-consistency mask."""
    return sign_consistency_mask([[weights[0] * a for a in g_nat], [weights[1] * b for b in g_rob]], generator)


STRATEGIES: dict[str, Strategy] = {
    "sum": aggregate_sum,
    "pcgrad": aggregate_pcgrad,
    "graddrop": aggregate_graddrop,
    "mtard": aggregate_mtard,
    "sga": aggregate_sga,
}
WEIGHTED = frozenset({"mtard", "sga"})  # strategies that use (and move) the online weights


def move_weights(weights: torch.Tensor, losses: torch.Tensor, initial: torch.Tensor, rate: float) -> torch.Tensor:
    """One online-weight step: w ← w + rate·(2·r/Σr − w), r = losses / initial losses."""
    ratios = losses / initial.clamp_min(1e-12)
    target = N_EXPERTS * ratios / ratios.sum().clamp_min(1e-12)
    return weights + rate * (target - weights)


class GradientAggregator:
    """Holds a strategy's state (online weights, initial losses, the mask's random stream)."""

    def __init__(self, strategy: str, rate: float, seed: int = 0):
        if strategy not in STRATEGIES:
            raise KeyError(f"stage2.aggregation: unknown strategy {strategy!r}; known: {sorted(STRATEGIES)}")
        self.strategy, self.rate = strategy, rate
        self.weights = torch.ones(N_EXPERTS)
        self.initial_losses: torch.Tensor | None = None
        self.seed = seed
        self.generator = torch.Generator().manual_seed(seed)  # moves to the gradients' device at first use

    def _generator_on(self, device: torch.device) -> torch.Generator:
        """The mask's random stream on ``device`` (drawn there, never copied from the CPU): seeded with
        ``seed`` on the device of the first gradients; a resumed stream continues on its own device."""
        if self.generator.device.type != device.type:
            if self._drawn:
                raise RuntimeError(f"stage2 aggregation: the mask's random stream lives on {self.generator.device}, "
                                   f"the gradients on {device}; resume on the device the run started on")
            self.generator = torch.Generator(device=device).manual_seed(self.seed)
        self._drawn = True
        return self.generator

    _drawn = False

    def __call__(self, g_nat: Sequence[torch.Tensor], g_rob: Sequence[torch.Tensor],
                 losses: Sequence[float]) -> tuple[Grads, dict[str, float]]:
        """Aggregate with the current weights, then move the weights (weighted strategies only).

        ``losses`` are the two experts' current loss values (L_nat, λrob·L_rob)."""
        stats = {"cos_nat_rob": cosine(g_nat, g_rob), "conflict_frac": conflict_fraction(g_nat, g_rob),
                 "w_nat": float(self.weights[0]), "w_rob": float(self.weights[1])}
        device = g_nat[0].device
        grads = STRATEGIES[self.strategy](g_nat, g_rob, self.weights.to(device), self._generator_on(device))
        if self.strategy in WEIGHTED:
            current = torch.tensor([float(v) for v in losses])
            if self.initial_losses is None:
                self.initial_losses = current
            self.weights = move_weights(self.weights, current, self.initial_losses, self.rate)
        return grads, stats

    def state_dict(self) -> dict:
        state = {"weights": self.weights.clone(), "generator": self.generator.get_state(),
                 "generator_device": str(self.generator.device)}
        if self.initial_losses is not None:
            state["initial_losses"] = self.initial_losses.clone()
        return state

    def load_state_dict(self, state: dict) -> None:
        self.weights = state["weights"].clone()
        device = torch.device(state.get("generator_device", "cpu"))
        if device.type != self.generator.device.type:
            self.generator = torch.Generator(device=device)
        self.generator.set_state(state["generator"])
        self._drawn = True
        self.initial_losses = state.get("initial_losses")
