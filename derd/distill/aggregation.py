"""Stochastic gradient aggregation of the two experts' gradients on the student (METHOD.md, Stage-II 4).

g_nat = ∇θ L_nat and g_rob = ∇θ λrob·L_rob arrive as lists of tensors (one per student parameter);
:class:`GradientAggregator` flattens each list once into one vector (a few large kernels instead of
a few small ones per parameter), and each strategy is a small pure function on those vectors
``(g_nat, g_rob, weights, generator) -> Tensor``:

- ``sum``        g_nat + g_rob (the "w/o SGA" ablation)
- ``pcgrad``     PCGrad (Yu et al. 2020): on conflict (g_nat·g_rob < 0) each gradient loses its
                 component along the other, on the flattened parameter vector
- ``graddrop``   sign-consistency masking (Chen et al. 2020), per coordinate: P = ½(1 + Σg/Σ|g|),
                 keep the positive parts where U < P, else the negative parts, U ~ Uniform(0, 1)
- ``mtard``      w_nat·g_nat + w_rob·g_rob with online loss-ratio weights (MTARD, Zhao et al. 2022)
- ``sga``        the online weights, then the stochastic sign-consistency mask [R, the default]
- ``agree``      per coordinate only the components whose sign agrees with g_nat + g_rob (a conflict
                 keeps the larger one alone): the mask's most likely outcome, every time [R]
- ``gradrefine`` GradRefine (DataFreeShield, Lee et al. 2024): every gradient votes its sign per
                 coordinate; where |Σ sign| ≥ τ·n (n votes) the gradients of the winning sign are summed,
                 elsewhere the coordinate is not updated. The votes are the experts' gradients, or with
                 ``stage2.gradrefine.chunks`` = m the m chunk shares of each (:func:`chunk_losses`): 2m votes

In expectation the sign-consistency mask is the sum it masks: with A the positive and B the negative
mass of a coordinate, P = A/(A+B) and E = P·A − (1 − P)·B = A − B = Σg. So ``graddrop`` is ``sum`` and
``sga`` is ``mtard`` plus zero-mean noise; ``agree`` and ``gradrefine`` are the readings that favour
agreement.

The online weights live in :class:`GradientAggregator`: they sum to 2 (so w = (1, 1) is the plain
sum) and move each step at rate λSGA toward 2·r_e / (r_nat + r_rob), with r_e = L_e / L_e(step 0)
the expert's relative loss: the expert that is learning slower gains weight.
"""
from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import torch

from derd.registry import Registry

Grads = list[torch.Tensor]
Strategy = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Generator | None], torch.Tensor]
GradFn = Callable[..., Grads]  # (loss, retain_graph=...) -> one gradient per parameter (Context.student_grads)

N_EXPERTS = 2
GRADREFINE_THRESHOLD = 0.5  # DataFreeShield's τ (p_thresh in its README's commands)
AGGREGATIONS: Registry[Strategy] = Registry("aggregation strategy", "stage2.aggregation")


def flatten(grads: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.cat([g.reshape(-1) for g in grads])


def unflatten(flat: torch.Tensor, like: Sequence[torch.Tensor]) -> Grads:
    out, i = [], 0
    for g in like:
        out.append(flat[i : i + g.numel()].view_as(g))
        i += g.numel()
    return out


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """cos(a, b) of two flattened gradients (0 when either is zero)."""
    denom = a.norm() * b.norm()
    return float((a @ b) / denom) if denom > 0 else 0.0


def conflict_fraction(a: torch.Tensor, b: torch.Tensor) -> float:
    """Share of coordinates whose two gradient entries have opposite signs."""
    return float(((a * b) < 0).float().mean())


@AGGREGATIONS.register("sum")
def aggregate_sum(g_nat, g_rob, weights=None, generator=None) -> torch.Tensor:
    """g_nat + g_rob."""
    return g_nat + g_rob


@AGGREGATIONS.register("pcgrad")
def aggregate_pcgrad(g_nat, g_rob, weights=None, generator=None) -> torch.Tensor:
    """PCGrad with two tasks: g_i ← g_i − (g_i·g_j / ‖g_j‖²)·g_j when g_i·g_j < 0 (originals on the right)."""
    a, b = g_nat, g_rob
    dot = a @ b
    if dot < 0:
        a, b = a - dot / (b @ b).clamp_min(1e-20) * b, b - dot / (a @ a).clamp_min(1e-20) * a
    return a + b


def sign_consistency_mask(grads: Sequence[torch.Tensor], generator: torch.Generator | None) -> torch.Tensor:
    """GradDrop's stochastic mask over several flattened gradients, summed: per coordinate keep the
    positive entries where U < P = ½(1 + Σg/Σ|g|), else the negative ones (U drawn in coordinate
    order: the same numbers as one draw per parameter in parameter order)."""
    stacked = torch.stack(list(grads))
    purity = 0.5 * (1 + stacked.sum(0) / stacked.abs().sum(0).clamp_min(1e-20))
    u = torch.rand(purity.shape, generator=generator,
                   device=generator.device if generator is not None else purity.device)
    mask = torch.where((u < purity).unsqueeze(0), stacked > 0, stacked < 0)
    return (stacked * mask).sum(0)


@AGGREGATIONS.register("graddrop")
def aggregate_graddrop(g_nat, g_rob, weights=None, generator=None) -> torch.Tensor:
    return sign_consistency_mask([g_nat, g_rob], generator)


@AGGREGATIONS.register("mtard")
def aggregate_mtard(g_nat, g_rob, weights, generator=None) -> torch.Tensor:
    """w_nat·g_nat + w_rob·g_rob."""
    return weights[0] * g_nat + weights[1] * g_rob


@AGGREGATIONS.register("sga")
def aggregate_sga(g_nat, g_rob, weights, generator) -> torch.Tensor:
    """The weighted gradients, then the stochastic sign-consistency mask."""
    return sign_consistency_mask([weights[0] * g_nat, weights[1] * g_rob], generator)


@AGGREGATIONS.register("agree")
def aggregate_agree(g_nat, g_rob, weights=None, generator=None) -> torch.Tensor:
    """Per coordinate, the sum of the components whose sign is the sign of g_nat + g_rob."""
    stacked = torch.stack([g_nat, g_rob])
    return (stacked * (stacked.sign() == stacked.sum(0).sign())).sum(0)


def sign_vote(votes: torch.Tensor, threshold: float) -> torch.Tensor:
    """GradRefine's update from ``votes`` (n×D, one gradient per row): per coordinate s = Σ sign(g_i); where
    |s| ≥ τ·n the sum of the entries of sign(s) (where s = 0, which only τ = 0 keeps: the plain sum), else 0."""
    s = votes.sign().sum(0)
    winners = torch.where(s > 0, votes.clamp_min(0).sum(0), votes.clamp_max(0).sum(0))
    winners = torch.where(s == 0, votes.sum(0), winners)
    return torch.where(s.abs() >= threshold * len(votes), winners, torch.zeros_like(winners))


@AGGREGATIONS.register("gradrefine")
def aggregate_gradrefine(g_nat, g_rob, weights=None, generator=None, threshold=GRADREFINE_THRESHOLD) -> torch.Tensor:
    """GradRefine's sign vote over the rows of g_nat and g_rob (one row each, or one per chunk)."""
    return sign_vote(torch.cat([g_nat.reshape(-1, g_nat.shape[-1]), g_rob.reshape(-1, g_rob.shape[-1])]), threshold)


WEIGHTED = frozenset({"mtard", "sga"})  # strategies that use (and move) the online weights
VOTING = frozenset({"gradrefine"})  # strategies that read τ and each expert's per-chunk gradients (rows)


def chunk_losses(loss: torch.Tensor, outputs: Sequence[torch.Tensor], chunks: int,
                 scale: Callable[[torch.Tensor], torch.Tensor] | None = None) -> list[torch.Tensor]:
    """``chunks`` scalars whose parameter gradients are the shares of ∇θ ``loss`` carried by each chunk of
    rows (samples, split as ``tensor_split`` along dim 0 of every output), through the one forward that made
    ``outputs`` (BatchNorm statistics of the whole batch): the shares add up to ∇θ ``loss``. ``loss`` must read
    the parameters only through ``outputs``. ``scale``: the fp16 loss scale the caller's gradient function
    applies; ∂loss/∂outputs is taken through it, so that small entries do not underflow."""
    scale = scale or (lambda t: t)
    factor = scale(torch.ones((), device=loss.device))
    grads = torch.autograd.grad(scale(loss), list(outputs), retain_graph=True, allow_unused=True)
    pairs = [(o.tensor_split(chunks), (g.float() / factor).tensor_split(chunks))
             for o, g in zip(outputs, grads) if g is not None]
    return [sum(((o[c].float() * g[c]).sum() for o, g in pairs), torch.zeros((), device=loss.device))
            for c in range(chunks)]


def _shares(grads: Grads | list[Grads]) -> list[Grads]:
    """A gradient (a tensor per parameter), or the list of its chunk shares, as that list."""
    return [grads] if isinstance(grads[0], torch.Tensor) else list(grads)


def _rows(shares: list[Grads]) -> torch.Tensor:
    """The flattened shares as the rows of an m×D matrix."""
    return flatten(shares[0]).unsqueeze(0) if len(shares) == 1 else torch.stack([flatten(g) for g in shares])


def move_weights(weights: torch.Tensor, losses: torch.Tensor, initial: torch.Tensor, rate: float) -> torch.Tensor:
    """One online-weight step: w ← w + rate·(2·r/Σr − w), r = losses / initial losses."""
    ratios = losses / initial.clamp_min(1e-12)
    target = N_EXPERTS * ratios / ratios.sum().clamp_min(1e-12)
    return weights + rate * (target - weights)


class GradientAggregator:
    """Holds a strategy's state (online weights, initial losses, the mask's random stream) and a vote's τ and
    chunk count (``stage2.gradrefine``)."""

    def __init__(self, strategy: str, rate: float, seed: int = 0, threshold: float = GRADREFINE_THRESHOLD,
                 chunks: int = 1):
        self.aggregate = AGGREGATIONS[strategy]
        if strategy in VOTING:
            self.aggregate = functools.partial(self.aggregate, threshold=threshold)
        self.chunks = chunks if strategy in VOTING else 1  # only a vote reads the chunks
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

    @classmethod
    def from_config(cls, s2, seed: int = 0) -> GradientAggregator:
        """The aggregator ``stage2`` (a :class:`derd.config.Stage2`) names: aggregation, lambda_sga, gradrefine."""
        return cls(s2.aggregation, s2.lambda_sga, seed, s2.gradrefine.threshold, s2.gradrefine.chunks)

    def expert_grads(self, grad: GradFn, loss: torch.Tensor, outputs: Sequence[torch.Tensor],
                     retain_graph: bool = False, scale: Callable[[torch.Tensor], torch.Tensor] | None = None
                     ) -> Grads | list[Grads]:
        """∇θ ``loss`` by ``grad``: one gradient, or (a vote with ``chunks`` > 1) the list of its chunk shares
        (:func:`chunk_losses` of ``outputs``, the student outputs ``loss`` reads; ``scale``: fp16 loss scale)."""
        if self.chunks == 1:
            return grad(loss, retain_graph=retain_graph)
        pieces = chunk_losses(loss, outputs, self.chunks, scale)
        return [grad(p, retain_graph=retain_graph or c < len(pieces) - 1) for c, p in enumerate(pieces)]

    def __call__(self, g_nat: Grads | list[Grads], g_rob: Grads | list[Grads],
                 losses: Sequence[float]) -> tuple[Grads, dict[str, float]]:
        """Aggregate with the current weights, then move the weights (weighted strategies only).

        ``g_nat``, ``g_rob``: each a gradient, or the list of its chunk shares (:meth:`expert_grads`): a vote
        reads the shares, every other strategy (and the logged statistics) their sum. ``losses`` are the two
        experts' current loss values (L_nat, λrob·L_rob)."""
        shares = _shares(g_nat), _shares(g_rob)
        rows_a, rows_b = _rows(shares[0]), _rows(shares[1])
        a, b = rows_a.sum(0), rows_b.sum(0)
        stats = {"cos_nat_rob": cosine(a, b), "conflict_frac": conflict_fraction(a, b),
                 "w_nat": float(self.weights[0]), "w_rob": float(self.weights[1])}
        device = a.device
        inputs = (rows_a, rows_b) if self.strategy in VOTING else (a, b)
        grads = unflatten(self.aggregate(*inputs, self.weights.to(device), self._generator_on(device)), shares[0][0])
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
