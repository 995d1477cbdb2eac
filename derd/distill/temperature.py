"""Per-expert temperatures balanced by entropy (B-MTARD, Zhao et al., TPAMI 2024) [P + R].

With ``stage2.temperature: entropy`` each expert's soft labels are σ(T_e(x)/τ_e) (the student's side stays at
τ = 1, no τ² factor, as in B-MTARD's code), and after every student step each τ_e takes one signed step of
``stage2.temperature_lr`` that moves the two experts' mean prediction entropies toward each other:
τ_rob ← τ_rob − lr·sign(H_rob/H_nat − 1), τ_nat ← τ_nat − lr·sign(H_nat/H_rob − 1), both clamped to
[TAU_MIN, TAU_MAX] = [1, 10] (B-MTARD's range). The sharper expert is softened, the softer one sharpened.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

TAU_MIN, TAU_MAX = 1.0, 10.0
ROLES = ("nat", "rob")


def mean_entropy(probs: torch.Tensor) -> float:
    """Mean over the batch of −Σ_k p_k ln p_k."""
    return float(-(probs * probs.clamp_min(1e-12).log()).sum(1).mean())


class EntropyBalance:
    """The two experts' temperatures and their update (module docstring)."""

    def __init__(self, lr: float):
        self.lr = lr
        self.tau = dict.fromkeys(ROLES, 1.0)

    def soft(self, logits: torch.Tensor, role: str) -> torch.Tensor:
        """The expert's soft labels σ(logits / τ_role)."""
        return F.softmax(logits / self.tau[role], 1)

    def update(self, nat_logits: torch.Tensor, rob_logits: torch.Tensor) -> dict[str, float]:
        """One step of both temperatures from the experts' entropies at the current τ; returns what it logs."""
        h = {"nat": mean_entropy(self.soft(nat_logits, "nat")), "rob": mean_entropy(self.soft(rob_logits, "rob"))}
        for role, other in (("nat", "rob"), ("rob", "nat")):
            ratio = h[role] / max(h[other], 1e-12)
            step = self.lr * (1.0 if ratio > 1 else -1.0 if ratio < 1 else 0.0)
            self.tau[role] = min(TAU_MAX, max(TAU_MIN, self.tau[role] - step))
        return {"tau_nat": self.tau["nat"], "tau_rob": self.tau["rob"], "H_nat": h["nat"], "H_rob": h["rob"]}

    def state_dict(self) -> dict[str, float]:
        return dict(self.tau)

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.tau = {role: float(state[role]) for role in ROLES}
