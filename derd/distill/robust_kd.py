"""What the data-free baselines share (METHOD.md "Variants", baselines): a generator trained from
scratch with the method's own objective, and robustness distillation of the robust teacher on its
samples — the "existing data-free KD + robust distillation" combination the baseline rows stand for.

Student loss (``stage2.baselines.student_loss``; every KL is τ²-scaled and reduced by ``stage2.kd_reduction``):
- ``rslad`` (default): (1−α)·KL(σ_τ(T_rob(x)) ‖ σ_τ(S(x_adv))) + α·KL(σ_τ(T_rob(x)) ‖ σ_τ(S(x))),
  α = ``rslad_clean_weight`` (RSLAD, Zi et al. 2021: 1/6), x_adv from RSLAD's inner problem: KL-PGD on the
  student maximising KL(σ_τ(T_rob(x)) ‖ σ(S(x_adv))) (:func:`rslad_adversarial`)
- ``kd``: KL(σ_τ(T_rob(x)) ‖ σ_τ(S(x))) on clean pseudo data only (plain data-free KD)

The student's mode during a generator step follows each method's code (:attr:`DataFreeBaseline.synthesis_train`).
"""
from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from derd.attacks.base import model_mode
from derd.distill.loop import Context, Method
from derd.losses import kd_kl
from derd.models import build_generator
from derd.stage1 import warmup


def robust_kd_loss(mode: str, alpha: float, t_clean: torch.Tensor, s_clean: torch.Tensor,
                   s_adv: torch.Tensor | None, tau: float | torch.Tensor, reduction: str) -> torch.Tensor:
    """The baselines' student loss on precomputed logits (``s_adv`` unused by ``kd``)."""
    if mode == "kd":
        return kd_kl(t_clean, s_clean, tau, reduction)
    return (1 - alpha) * kd_kl(t_clean, s_adv, tau, reduction) + alpha * kd_kl(t_clean, s_clean, tau, reduction)


def rslad_adversarial(ctx: Context, x: torch.Tensor, t_clean: torch.Tensor, tau: float | torch.Tensor) -> torch.Tensor:
    """RSLAD's x_adv: KL-PGD against the student towards KL(σ_τ(T_rob(x)) ‖ σ(S(x_adv))) (RSLAD's
    ``rslad_inner_loss``; its code runs τ = 1), the robust teacher's soft labels as the fixed target."""
    with torch.no_grad():
        target = F.softmax(t_clean / tau, 1)
    return ctx.adversarial(x, target_probs=target)


class DataFreeBaseline(Method):
    """A baseline row: subclasses implement ``generator_step``; the student step is shared."""

    teachers = ("robust",)
    generator_source = "scratch"
    synthesis_train: ClassVar[bool] = True  # student mode in generator steps (DFAD's and ZSKT's codes: train)

    def __init__(self, ctx: Context):
        super().__init__(ctx)
        self.teacher = ctx.teachers["robust"]
        self.opts = ctx.s2.baselines
        g = ctx.cfg.stage1.generator
        role = self.stage1_role(ctx.s2)
        generator = (warmup.load_generator(ctx.cfg, ctx.root, role) if role
                     else build_generator(g.arch, g.nz, ctx.info.shape, g.width))
        ctx.set_generator(generator, self.extra_generator_params())

    @classmethod
    def stage1_role(cls, s2) -> str | None:
        """``baselines.generator_init: stage1`` starts G from Stage-I's generator on T_rob (the larger-budget row)."""
        return "robust" if s2.baselines.generator_init == "stage1" else None

    def extra_generator_params(self) -> list[torch.nn.Parameter]:
        """Parameters trained with the generator's optimiser besides G's own (e.g. CMI's head)."""
        return []

    def synthesis(self):
        """Context for a generator step's student forwards: the student in its :attr:`synthesis_train` mode
        (eval keeps its BatchNorm running statistics out of synthesis), the previous mode restored."""
        return model_mode(self.ctx.student, self.synthesis_train)

    def student_batch(self) -> torch.Tensor:
        return self.ctx.pseudo_batch()

    def tau(self) -> float | torch.Tensor:
        return self.ctx.s2.tau

    def teacher_and_adversarial(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """T_rob(x) and RSLAD's x_adv (None under ``kd``) for one pseudo batch."""
        with torch.no_grad():
            t = self.teacher(x)
        return t, (rslad_adversarial(self.ctx, x, t, self.tau()) if self.opts.student_loss == "rslad" else None)

    def student_logits(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """T_rob(x), S(x) and S(x_adv) (None under ``kd``) for one pseudo batch."""
        t, x_adv = self.teacher_and_adversarial(x)
        student = self.ctx.student.train()
        return t, student(x), (student(x_adv) if x_adv is not None else None)

    def kd_loss(self, t: torch.Tensor, s: torch.Tensor, s_adv: torch.Tensor | None) -> torch.Tensor:
        """The student loss of ``stage2.baselines.student_loss`` on these logits."""
        o = self.opts
        return robust_kd_loss(o.student_loss, o.rslad_clean_weight, t, s, s_adv, self.tau(), self.ctx.s2.kd_reduction)

    def student_loss(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
        loss = self.kd_loss(*self.student_logits(x))
        return loss, {"s_loss": loss.detach()}

    def student_step(self, it: int) -> dict[str, Any]:
        loss, logs = self.student_loss(self.student_batch())
        self.ctx.update_student(loss, it)
        return logs

    def reading(self) -> dict[str, Any]:
        o = self.opts
        kd = (f"RSLAD: (1−α)·KL(T_rob(x)‖S(x_adv)) + α·KL(T_rob(x)‖S(x)), α={o.rslad_clean_weight}"
              if o.student_loss == "rslad" else "KD: KL(T_rob(x)‖S(x)), clean pseudo data only")
        return {**super().reading(), "generator_init": ("Stage-I generator on T_rob (warm start, beyond the method's paper)"
                                                    if self.stage1_role(self.ctx.s2) else
                                                    "from scratch (random init, as in the method's paper)"),
                "student_loss": kd, "tau": self.ctx.s2.tau, "kd_reduction": self.ctx.s2.kd_reduction,
                "adversarial_examples": rslad_reading(self.ctx) if o.student_loss == "rslad" else "none",
                "student_mode_in_generator_step": "train" if self.synthesis_train else "eval"}


def rslad_reading(ctx: Context) -> str:
    """How RSLAD's x_adv are crafted (for the readings)."""
    a = ctx.s2.attack
    return (f"KL-PGD on the student maximising KL(σ_τ(T_rob(x)) ‖ σ(S(x_adv))) (RSLAD): eps={a.eps}, "
            f"{a.steps} steps of {a.step_size}, start x+0.001·N")
