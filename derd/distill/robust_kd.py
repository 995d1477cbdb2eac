"""What the data-free baselines share (METHOD.md "Variants", baselines): a generator trained from
scratch with the method's own objective, and robustness distillation of the robust teacher on its
samples — the "existing data-free KD + robust distillation" combination the baseline rows stand for.

Student loss (``stage2.baselines.student_loss``):
- ``rslad`` (default): (1−α)·KL(σ_τ(T_rob(x)) ‖ σ_τ(S(x_adv))) + α·KL(σ_τ(T_rob(x)) ‖ σ_τ(S(x))),
  α = ``rslad_clean_weight`` (RSLAD, Zi et al. 2021: 1/6), x_adv from the shared label-free PGD
- ``kd``: KL(σ_τ(T_rob(x)) ‖ σ_τ(S(x))) on clean pseudo data only (plain data-free KD)
"""
from __future__ import annotations

from typing import Any

import torch

from derd.distill.loop import Context, Method
from derd.losses import kd_kl
from derd.models import build_generator


def robust_kd_loss(mode: str, alpha: float, t_clean: torch.Tensor, s_clean: torch.Tensor,
                   s_adv: torch.Tensor | None, tau: float | torch.Tensor) -> torch.Tensor:
    """The baselines' student loss on precomputed logits (``s_adv`` unused by ``kd``)."""
    if mode == "kd":
        return kd_kl(t_clean, s_clean, tau)
    return (1 - alpha) * kd_kl(t_clean, s_adv, tau) + alpha * kd_kl(t_clean, s_clean, tau)


class DataFreeBaseline(Method):
    """A baseline row: subclasses implement ``generator_step``; the student step is shared."""

    teachers = ("robust",)
    generator_source = "scratch"

    def __init__(self, ctx: Context):
        super().__init__(ctx)
        self.teacher = ctx.teachers["robust"]
        self.opts = ctx.s2.baselines
        g = ctx.cfg.stage1.generator
        ctx.set_generator(build_generator(g.arch, g.nz, ctx.info.shape, g.width), self.extra_generator_params())

    def extra_generator_params(self) -> list[torch.nn.Parameter]:
        """Parameters trained with the generator's optimiser besides G's own (e.g. CMI's head)."""
        return []

    def student_batch(self) -> torch.Tensor:
        return self.ctx.pseudo_batch()

    def tau(self) -> float | torch.Tensor:
        return self.ctx.s2.tau

    def student_logits(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """T_rob(x), S(x) and S(x_adv) (None under ``kd``) for one pseudo batch."""
        ctx = self.ctx
        x_adv = ctx.adversarial(x) if self.opts.student_loss == "rslad" else None
        with torch.no_grad():
            t = self.teacher(x)
        ctx.student.train()
        return t, ctx.student(x), (ctx.student(x_adv) if x_adv is not None else None)

    def student_loss(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
        t, s, s_adv = self.student_logits(x)
        loss = robust_kd_loss(self.opts.student_loss, self.opts.rslad_clean_weight, t, s, s_adv, self.tau())
        return loss, {"s_loss": loss.detach()}

    def student_step(self, it: int) -> dict[str, Any]:
        loss, logs = self.student_loss(self.student_batch())
        self.ctx.update_student(loss, it)
        return logs

    def reading(self) -> dict[str, Any]:
        o = self.opts
        kd = (f"RSLAD: (1−α)·KL(T_rob(x)‖S(x_adv)) + α·KL(T_rob(x)‖S(x)), α={o.rslad_clean_weight}"
              if o.student_loss == "rslad" else "KD: KL(T_rob(x)‖S(x)), clean pseudo data only")
        return {**super().reading(), "generator_init": "from scratch (random init, as in the method's paper)",
                "student_loss": kd, "tau": self.ctx.s2.tau}
