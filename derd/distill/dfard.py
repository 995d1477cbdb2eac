"""DFARD-style baseline (after Wang et al. 2023, "Out of Thin Air"; its exact rules are not public,
so this row is labelled "DFARD-style" everywhere).

Generator (from scratch): DFAD's adversarial L1 discrepancy plus a BN-statistics prior on the
robust teacher whose weight is balanced online to the adversarial term's magnitude:
  L_G = −D(S(x), T(x)) + β·(|D| / L_BN)·L_BN        (ratio detached; β = ``bn_balance``)
with the student in train mode, as in DFAD's code. Student: the shared RSLAD-style robust KD (τ²-scaled
KLs) at a learnable temperature τ that ascends the student's loss (a curriculum: the student makes the
task harder for itself), clamped to [τ_min, τ_max]; RSLAD's x_adv target the teacher's σ_τ at the current τ.
"""
from __future__ import annotations

from typing import Any

import torch

from derd.distill import register_method
from derd.distill.robust_kd import DataFreeBaseline
from derd.losses import BNStatistics, l1_discrepancy


@register_method("dfard", "DFARD-style")
class DFARDStyle(DataFreeBaseline):
    def __init__(self, ctx):
        super().__init__(ctx)
        self.bn = BNStatistics(self.teacher)
        self.temperature = torch.tensor(float(ctx.s2.tau), device=ctx.device, requires_grad=True)

    def generator_step(self, it: int) -> dict[str, Any]:
        ctx, o = self.ctx, self.opts.dfard
        x = ctx.generate()
        with self.bn.recording():
            t = self.teacher(x)
        l_bn = self.bn.loss()
        with self.synthesis():
            d = l1_discrepancy(ctx.student(x), t)
        balance = o.bn_balance * (d.detach().abs() / l_bn.detach().clamp_min(1e-12))
        loss = -d + balance * l_bn
        ctx.update_generator(loss, it)
        return {"g_loss": loss.detach(), "g_discrepancy": d.detach(), "g_bn": l_bn.detach(), "g_bn_weight": balance}

    def tau(self) -> torch.Tensor:
        return self.temperature

    def student_step(self, it: int) -> dict[str, Any]:
        o = self.opts.dfard
        loss, logs = self.student_loss(self.student_batch())
        (g_tau,) = torch.autograd.grad(loss, self.temperature, retain_graph=True)
        self.ctx.update_student(loss, it)
        with torch.no_grad():
            self.temperature.add_(o.tau_lr * g_tau).clamp_(o.tau_min, o.tau_max)
        return {**logs, "tau": self.temperature.detach()}

    def hooks(self) -> list[Any]:
        return [self.bn]

    def state_dict(self) -> dict[str, Any]:
        return {"temperature": self.temperature.detach().cpu()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        with torch.no_grad():
            self.temperature.copy_(state["temperature"])

    def reading(self) -> dict[str, Any]:
        o = self.opts.dfard
        return {**super().reading(), "label": "DFARD-style (exact rules of DFARD are not public)",
                "generator_objective": f"DFARD-style: −L1(S(x), T_rob(x)) + {o.bn_balance}·(|D|/L_BN)·L_BN",
                "temperature": f"learnable, ascends the student loss: lr={o.tau_lr}, clamp [{o.tau_min}, {o.tau_max}], "
                               f"start {self.ctx.s2.tau}"}
