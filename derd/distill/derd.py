"""DERD and its two variants (METHOD.md "Stage-II" and "Variants").

Generator step (data level): L_G^II = L_G^I(x; T_nat) − λd·D(S(x), T_nat(x)), D = mean L1 on logits
(DFAD) or KL; the generator starts from the cached Stage-I artifact. L_G^II is a weighted sum of named
terms (:meth:`DERD.generator_objective`): ``stage1`` (1), ``discrepancy`` (−λd), ``rob_oh`` and ``bn_prior``
below; a term of weight 0 is not computed; each is logged as ``g_<term>`` (raw) and ``g_w_<term>`` (weighted). [R] options (0 / first = the paper's
reading): ``generator_opponent: robust`` compares S with T_rob in D; ``generator_init: scratch`` starts G fresh;
+ λg_rob·L_oh(T_rob(x)) (``lambda_g_rob_oh``) asks for samples the robust expert is confident about;
+ λg_bn·(L_BN(T_nat) + L_BN(T_rob)) (``lambda_g_bn``) asks for samples whose per-layer statistics match
both experts' BatchNorm running statistics (their real training data), like DFARD's BN prior.
Student step (sample level + expert guidance), on detached x = G(z) (optional crop+flip):
  x_adv = label-free KL-PGD against S;
  L_nat = λnat·KL(σ_τ(T_nat(x)) ‖ σ_τ(S(x)))
  L_rob = λrob·KL(σ_τ(T_rob(x_adv or x)) ‖ σ_τ(S(x_adv))) [+ λrob_clean·KL(σ_τ(T_rob(x)) ‖ σ_τ(S(x)))]
and g_nat = ∇θ L_nat, g_rob = ∇θ L_rob are aggregated by :mod:`derd.distill.aggregation` (stage2.aggregation).
Each input is forwarded once; the two gradients come from ``torch.autograd.grad`` on that graph.

- ``derd_no_tnat``: no natural teacher; the student stands in for it. The generator (warmed up on
  T_rob) plays S against T_rob, and the "natural" expert term uses T_rob on clean samples.
- ``derd_inv``: no generator; the student is distilled on the Stage-I inversion pool.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from derd.artifacts import check_finite
from derd.distill import register_method
from derd.distill.aggregation import GradientAggregator
from derd.distill.loop import Context, Method
from derd.distill.temperature import EntropyBalance
from derd.losses import (
    BNStatistics,
    StageOneLoss,
    StageOneResult,
    Terms,
    WeightedSum,
    kd_kl,
    l1_discrepancy,
    one_hot_loss,
    soft_kl,
)
from derd.models import build_generator
from derd.stage1 import warmup
from derd.stage1.health import batch_health


def discrepancy(kind: str, student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """D(S(x), T(x)): mean L1 of logits (DFAD) or KL(σ(T) ‖ σ(S))."""
    return l1_discrepancy(student_logits, teacher_logits) if kind == "l1" else kd_kl(teacher_logits, student_logits)


def stage1_generator(ctx: Context, teacher_role: str):
    """The cached Stage-I generator warmed up on ``teacher_role`` (a clear error when missing)."""
    return warmup.load_generator(ctx.cfg, ctx.root, teacher_role)


@register_method("derd", "DERD")
class DERD(Method):
    """Two experts: natural knowledge on clean pseudo data, robust knowledge on adversarial pseudo data."""

    teachers = ("natural", "robust")
    generator_source = "stage1:natural"
    natural_role = "natural"  # whose soft labels L_nat distils, and whom the generator plays S against

    def __init__(self, ctx: Context):
        super().__init__(ctx)
        if self.generator_source:
            ctx.set_generator(self.initial_generator())
        self.natural = ctx.teachers[self.natural_role]
        self.robust = ctx.teachers["robust"]
        self.aggregator = GradientAggregator.from_config(ctx.s2, seed=ctx.mask_seed)
        self.stage_one = self.objective = self.robust_bn = None
        self.balance = EntropyBalance(ctx.s2.temperature_lr) if ctx.s2.temperature == "entropy" else None
        if self.generator_source:
            s2 = ctx.s2
            self.objective = WeightedSum({"stage1": 1.0, "discrepancy": -s2.lambda_d, "rob_oh": s2.lambda_g_rob_oh,
                                          "bn_prior": s2.lambda_g_bn, "class_ce": s2.lambda_g_ce},
                                         "stage2.lambda_d/lambda_g_rob_oh/lambda_g_bn/lambda_g_ce")
            self.stage_one = StageOneLoss.from_config(self.natural, ctx.cfg.stage1, record_bn=bool(s2.lambda_g_bn))
            if s2.lambda_g_bn and self.natural is not self.robust:
                self.robust_bn = BNStatistics(self.robust)

    def initial_generator(self) -> torch.nn.Module:
        """The cached Stage-I generator, or a fresh one (``generator_init: scratch``, the w/o Stage-I ablation)."""
        if role := self.stage1_role(self.ctx.s2):
            return stage1_generator(self.ctx, role)
        g = self.ctx.cfg.stage1.generator
        return build_generator(g.arch, g.nz, self.ctx.info.shape, g.width)

    # ---------------------------------------------------------------- data level
    def generator_objective(self, x: torch.Tensor) -> tuple[Terms, StageOneResult]:
        """L_G^II on ``x`` = G(z) (the generator's objective, to minimise), and the L_G^I inside it."""
        stage_one = self.stage_one(x)
        robust = self.robust_logits_for_generator(x, stage_one.logits)
        opponent = robust if self.opponent_role == "robust" else stage_one.logits
        terms = self.objective({
            "stage1": lambda: stage_one.total,
            "discrepancy": lambda: discrepancy(self.ctx.s2.discrepancy, self.ctx.student(x), opponent),
            "rob_oh": lambda: one_hot_loss(robust),
            "bn_prior": lambda: self.bn_prior(stage_one),
            "class_ce": lambda: F.cross_entropy(stage_one.logits, self.sampled_labels(len(x))),
        })
        return terms, stage_one

    def sampled_labels(self, n: int) -> torch.Tensor:
        """Labels drawn uniformly per sample from the run's stream (drawn only while ``lambda_g_ce`` is on)."""
        return torch.randint(0, self.ctx.info.num_classes, (n,), generator=self.ctx.rng).to(self.ctx.device)

    def bn_prior(self, stage_one: StageOneResult) -> torch.Tensor:
        """L_BN(T_nat) [+ L_BN(T_rob) when T_rob is another network], from the generator step's forwards."""
        natural = stage_one.raw["bn"] if "bn" in stage_one.raw else self.stage_one.bn.loss()
        return natural + (0.0 if self.robust_bn is None else self.robust_bn.loss())

    def generator_step(self, it: int) -> dict[str, Any]:
        terms, stage_one = self.generator_objective(self.ctx.generate())
        self.ctx.update_generator(terms.total, it)
        logs = {**terms.logs("g_", total="loss"), **stage_one.logs("g_", total=None)}
        if "bn_prior" in terms.raw and self.robust_bn is not None:
            logs["g_rob_bn"] = self.robust_bn.loss().detach()
        return logs

    def robust_logits_for_generator(self, x: torch.Tensor, stage_one_logits: torch.Tensor) -> torch.Tensor | None:
        """T_rob(x) for the generator objective: the Stage-I forward's logits when T_rob is the Stage-I
        teacher, else one forward (recording T_rob's BN distances for the BN prior); None when unread."""
        if self.natural is self.robust:
            return stage_one_logits
        if self.robust_bn is not None:
            with self.robust_bn.recording():
                return self.robust(x)
        return self.robust(x) if (self.opponent_role == "robust" or self.objective.active("rob_oh")) else None

    # ---------------------------------------------------------------- sample level + expert guidance
    def student_batch(self) -> torch.Tensor:
        return self.ctx.pseudo_batch()

    def student_step(self, it: int) -> dict[str, Any]:
        ctx, s2 = self.ctx, self.ctx.s2
        x = self.student_batch()
        x_adv = ctx.adversarial(x)
        with torch.no_grad():
            t_nat = self.natural(x)
            t_rob_clean = None
            if s2.rob_target == "clean" or s2.lambda_rob_clean:  # w/o T_nat: T_rob(x) is t_nat already
                t_rob_clean = t_nat if self.natural is self.robust else self.robust(x)
            t_rob = self.robust(x_adv) if s2.rob_target == "adv" else t_rob_clean
        ctx.student.train()
        s_clean, s_adv = ctx.student(x), ctx.student(x_adv)
        l_nat = s2.lambda_nat * self.expert_kl(t_nat, s_clean, "nat")
        l_rob = s2.lambda_rob * self.expert_kl(t_rob, s_adv, "rob")
        if s2.lambda_rob_clean:
            l_rob = l_rob + s2.lambda_rob_clean * self.expert_kl(t_rob_clean, s_clean, "rob")
        check_finite(l_nat, "L_nat", it)
        check_finite(l_rob, "L_rob", it)
        grad = self.aggregator.expert_grads  # a gradient, or a vote's chunk shares
        g_nat = grad(ctx.student_grads, l_nat, (s_clean,), retain_graph=bool(s2.lambda_rob_clean), scale=ctx.scale_s)
        g_rob = grad(ctx.student_grads, l_rob, (s_clean, s_adv), scale=ctx.scale_s)
        grads, stats = self.aggregator(g_nat, g_rob, ctx.global_losses(l_nat, l_rob))  # same on every rank
        ctx.apply_student_grads(grads)
        agreement = None if self.natural is self.robust else t_rob_clean  # w/o T_nat: one expert, nothing to agree
        temperatures = self.balance.update(t_nat, t_rob) if self.balance else {}
        return {"L_nat": l_nat.detach(), "L_rob": l_rob.detach(), **stats, **temperatures,
                **batch_health(x, t_nat, agreement)}

    def expert_kl(self, teacher_logits: torch.Tensor, student_logits: torch.Tensor, role: str) -> torch.Tensor:
        """KL(expert ‖ student) at the shared τ, or at the expert's entropy-balanced τ (``temperature: entropy``)."""
        s2 = self.ctx.s2
        if self.balance is None:
            return kd_kl(teacher_logits, student_logits, s2.tau, s2.kd_reduction)
        return soft_kl(self.balance.soft(teacher_logits, role), student_logits, s2.kd_reduction)

    def reading(self) -> dict[str, Any]:
        s2 = self.ctx.s2
        out = {
            **super().reading(),
            "natural_expert": "T_rob on clean samples (student stands in for T_nat)" if self.natural_role == "robust"
            else "T_nat on clean samples",
            "rob_target": f"T_rob({'x_adv' if s2.rob_target == 'adv' else 'x'})",
            "lambda_nat": s2.lambda_nat, "lambda_rob": s2.lambda_rob, "lambda_rob_clean": s2.lambda_rob_clean,
            "tau": (f"per expert, entropy-balanced (B-MTARD), step {s2.temperature_lr}, within [1, 10]"
                    if self.balance else s2.tau), "aggregation": s2.aggregation, "lambda_sga": s2.lambda_sga,
            "sga_weights": "sum to 2, move at rate lambda_sga toward 2·r/Σr, r = loss / first-step loss",
        }
        if self.generator_source:
            role, opp = self.natural_role[:3], self.opponent_role[:3]
            bn_terms = f"L_BN(T_{role})" + (" + L_BN(T_rob)" if self.robust_bn is not None else "")
            labels = {"stage1": f"L_G^I(x; T_{role})", "discrepancy": f"D(S(x), T_{opp}(x))",
                      "rob_oh": "L_oh(T_rob(x))", "bn_prior": f"({bn_terms})", "class_ce": f"CE(T_{role}(x), y~U)"}
            out["generator"] = "scratch (w/o Stage-I)" if s2.generator_init == "scratch" else self.generator_source
            out.update({"generator_objective": self.objective.describe(labels),
                        "discrepancy": s2.discrepancy, "lambda_d": s2.lambda_d, "lambda_g_rob_oh": s2.lambda_g_rob_oh,
                        "lambda_g_bn": s2.lambda_g_bn, "lambda_g_ce": s2.lambda_g_ce})
        return out

    @property
    def opponent_role(self) -> str:
        """Whose logits the generator drives the student away from (``stage2.generator_opponent``)."""
        return self.natural_role if self.ctx.s2.generator_opponent == "natural" else "robust"

    def hooks(self) -> list[Any]:
        return [h for h in (self.stage_one, self.robust_bn) if h is not None]

    def state_dict(self) -> dict[str, Any]:
        return {"aggregator": self.aggregator.state_dict(), "temperatures": self.balance.state_dict() if self.balance else {}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.aggregator.load_state_dict(state["aggregator"])
        if self.balance:
            self.balance.load_state_dict(state["temperatures"])


@register_method("derd_no_tnat", "w/o T_nat")
class DERDNoNaturalTeacher(DERD):
    """Supplementary §3.2: the student replaces T_nat; self-adversarial generator between S and T_rob."""

    teachers = ("robust",)
    generator_source = "stage1:robust"
    natural_role = "robust"


@register_method("derd_inv", "DERD_inv")
class DERDInversion(DERD):
    """Supplementary §3.1: no generator; batches drawn (with crop+flip) from the Stage-I inversion pool."""

    generator_source = None
    uses_pool = True

    def __init__(self, ctx: Context):
        super().__init__(ctx)
        self.pool = warmup.load_inversion_pool(ctx.root).to(ctx.device)

    def generator_step(self, it: int) -> dict[str, Any]:
        return {}

    def student_batch(self) -> torch.Tensor:
        idx = torch.randint(0, len(self.pool), (self.ctx.s2.batch_size,), generator=self.ctx.rng)
        return self.ctx.augment(self.pool[idx.to(self.pool.device)])

    def reading(self) -> dict[str, Any]:
        return {**super().reading(), "pseudo_data": f"Stage-I inversion pool ({len(self.pool)} images)"}
