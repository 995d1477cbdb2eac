"""FERD (Li et al., "FERD: Fairness-Enhanced Data-Free Robustness Distillation", ICLR 2026) as a Stage-II method.

Learned from the paper's abstract and the public code (mayaobuduyao/FERD, d1d79c7 or later; METHOD.md "FERD"
says where the two differ and which ran). Robust teacher only; generator from scratch.

Synthesis in rounds of ``round_iterations`` generator steps. A round draws labels y from the class sampling
probabilities p, fresh latents z (trained with G, lr ``latent_lr``) and, by default, re-initialises G. Each step
minimises, on the crop+flip view x of G(z), against T_rob in eval mode and S in eval mode:
  λbn·L_BN(T_rob) − λadv·DKL(S(x), T_rob(x)) + λoh·CE(T_rob(x), y) + λuni·KL(U ‖ σ(T_rob^nr(x)))
where T_rob^nr(x) = fc(f ⊙ m) are the teacher's logits from its non-robust penultimate channels (m from an
information bottleneck, :func:`bottleneck_noise`). The round's lowest-objective batch enters FERD's memory
bank; the round's last batch, attacked by PGD on T_rob with its labels, gives each class's risk (mean negative
margin), which sets the next round's p (robustness-guided class reweighting).
Student: on bank batches (crop+flip), x_adv by label-free KL-PGD maximising KL(σ(T_rob(x)) ‖ σ(S(x_adv)))
[− λutae·KL(U ‖ σ(S(x_adv))), the paper's uniform-target term], then
  c·DKL(S(x), T_rob(x)) + (1 − c)·DKL(S(x_adv), T_rob(x)),  c = 5/6.
"""
from __future__ import annotations

import contextlib
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from derd import distributed
from derd.attacks import PGD
from derd.attacks.base import eval_mode
from derd.attacks.pgd import LossFn, kl_loss
from derd.config import ConfigError
from derd.distill import register_method
from derd.distill.loop import Context, Method
from derd.distill.memory_bank import MemoryBank
from derd.distill.robust_kd import DataFreeBaseline
from derd.distill.zskt import LastFeatureMap
from derd.losses import BNStatistics, Terms, WeightedSum, kd_kl
from derd.models import build_generator
from derd.stage1 import warmup

TERM_LABELS = {"bn": "L_BN(T_rob)", "adv": "DKL(S(x), T_rob(x))", "oh": "CE(T_rob(x), y)",
               "uni": "KL(U ‖ σ(T_rob^nr(x)))"}


def dkl_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, class_weights: torch.Tensor | None = None,
             alpha: float = 1.0, reduction: str = "batchmean") -> torch.Tensor:
    """Decoupled KL (Cui et al. 2024) in FERD's form: α/4·Σ_b Σ_ij w_bi w_bj (Δs_bij − Δt_bij)² / Σ_b Σ_ij w_bi w_bj
    + KL(σ(t) ‖ σ(s)) (σ(t) detached; ``reduction`` as :func:`~derd.losses.kd_kl`), Δs_ij = s_i − s_j, w the
    per-example class weights. The pair sum is taken as 2·(Σw·Σw d² − (Σw d)²), d = s − t: O(K) per example.
    α = 0 (or no weights): the KL alone."""
    kl = kd_kl(teacher_logits.detach(), student_logits, reduction=reduction)
    if not alpha or class_weights is None:
        return kl
    d, w = student_logits - teacher_logits, class_weights
    total = w.sum(1)
    pairs = 2 * (total * (w * d**2).sum(1) - (w * d).sum(1) ** 2)
    return alpha / 4 * pairs.sum() / (total**2).sum() + kl


def uniform_kl(logits: torch.Tensor) -> torch.Tensor:
    """KL(U ‖ σ(logits)), batchmean: zero when the logits say nothing about the class."""
    log_p = F.log_softmax(logits, 1)
    return (-math.log(logits.shape[1]) - log_p).mean(1).mean()


def gaussian_kl(p_var: torch.Tensor, q_var: torch.Tensor, delta: float = 1e-10) -> torch.Tensor:
    """Mean over entries of ½(p/q + ln(q/p) − 1) (variances, +δ): the bottleneck's pull of the noise variance q
    toward the feature's own spatial variance p."""
    return 0.5 * (p_var / (q_var + delta) + torch.log((q_var + delta) / (p_var + delta)) - 1).mean()


def bottleneck_noise(features: torch.Tensor, spatial_var: torch.Tensor, head: nn.Module, labels: torch.Tensor,
                     steps: int, lr: float, beta: float) -> torch.Tensor:
    """FERD's information bottleneck on the teacher's penultimate channels (B×C ``features``, the pooled last
    feature map; ``spatial_var`` its per-channel spatial variance): noise σ·ε (ε ~ N(0, 1) per example and
    channel, σ = softplus(ρ), ρ from 0) learned by ``steps`` Adam steps on CE(head(f + σ·ε), y) + β·KL(var ‖ σ²).
    Returns the learned noise variances σ² (B×C, no graph)."""
    f, var = features.detach().float(), spatial_var.detach().float()
    rho = torch.zeros_like(f, requires_grad=True)
    opt = torch.optim.Adam([rho], lr=lr)
    with torch.enable_grad():
        for _ in range(steps):
            sigma = F.softplus(rho)
            loss = F.cross_entropy(head(f + sigma * torch.randn_like(f)), labels) + beta * gaussian_kl(var, sigma**2)
            (rho.grad,) = torch.autograd.grad(loss, rho)
            opt.step()
    return F.softplus(rho.detach()) ** 2


def non_robust_channels(noise_var: torch.Tensor, spatial_var: torch.Tensor) -> torch.Tensor:
    """The B×C mask of the non-robust channels (1): FERD's code calls a channel robust where its learned noise
    variance ends above the batch's largest spatial variance. A constant: no gradient flows through the split."""
    return (noise_var <= spatial_var.max()).float()


def margin_sums(logits: torch.Tensor, labels: torch.Tensor, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per class: Σ −margin over its examples and their count; margin = z_y − max_{j≠y} z_j (< 0: misclassified)."""
    true = logits.gather(1, labels[:, None]).squeeze(1)
    other = logits.scatter(1, labels[:, None], float("-inf")).amax(1)
    sums = torch.zeros(num_classes, device=logits.device).index_add_(0, labels, (other - true).float())
    return sums, torch.bincount(labels, minlength=num_classes).float()


def class_probabilities(sums: torch.Tensor, counts: torch.Tensor, p_min: float, p_max: float) -> torch.Tensor:
    """FERD's class sampling probabilities: each class's risk (mean −margin; 0 for a class without examples)
    min-max scaled into [p_min, p_max], then normalised. Riskier classes are drawn more often."""
    risk = torch.where(counts > 0, sums / counts.clamp_min(1), torch.zeros_like(sums))
    p = p_min + (p_max - p_min) * (risk - risk.min()) / (risk.max() - risk.min() + 1e-8)
    return p / p.sum()


def utae_loss(weight: float) -> LossFn:
    """Per-example KL(p ‖ σ(z)) − λ·KL(U ‖ σ(z)): PGD's objective with the paper's uniform-target term."""
    def loss(logits: torch.Tensor, target_probs: torch.Tensor) -> torch.Tensor:
        uniform = torch.full_like(target_probs, 1 / target_probs.shape[1])
        return kl_loss(logits, target_probs) - weight * kl_loss(logits, uniform)

    return loss


@register_method("ferd", "FERD")
class FERD(Method):
    teachers = ("robust",)
    generator_source = "scratch"

    def __init__(self, ctx: Context):
        super().__init__(ctx)
        o, s2, g = ctx.s2.ferd, ctx.s2, ctx.cfg.stage1.generator
        self.opts, self.teacher, self.head = o, ctx.teachers["robust"], ctx.teachers["robust"].net.fc
        self.objective = WeightedSum({"bn": o.lambda_bn, "adv": -o.lambda_adv, "oh": o.lambda_oh, "uni": o.lambda_uni},
                                     "stage2.ferd.lambda_bn/lambda_adv/lambda_oh/lambda_uni")
        self.bn = BNStatistics(self.teacher) if self.objective.active("bn") else None
        if self.objective.active("uni"):
            self._check_feature_map()
        self.z = nn.Parameter(torch.zeros(s2.batch_size, g.nz, device=ctx.device))  # the round's latents (global batch)
        role = self.stage1_role(s2)
        generator = (warmup.load_generator(ctx.cfg, ctx.root, role) if role
                     else build_generator(g.arch, g.nz, ctx.info.shape, g.width))
        self.initial = {k: v.clone() for k, v in generator.state_dict().items()} if role else None  # round restarts
        ctx.set_generator(generator, [self.z])
        ctx.opt_g = torch.optim.Adam([{"params": list(ctx.generator.parameters())},
                                      {"params": [self.z], "lr": o.latent_lr}],
                                     lr=s2.lr_generator, betas=(o.adam_beta1, 0.999))
        ctx.bank = MemoryBank(o.bank_size, o.bank_fraction, ctx.device) if o.bank_size else None
        self.class_probs = torch.full((ctx.info.num_classes,), 1 / ctx.info.num_classes)
        self.labels = torch.zeros(s2.batch_size, dtype=torch.long)  # the round's labels (global batch)
        self.best: torch.Tensor | None = None  # the round's lowest-objective batch (this rank's rows)
        self.best_loss = math.inf

    @classmethod
    def stage1_role(cls, s2) -> str | None:
        """``stage2.baselines.generator_init: stage1``: G starts (and every round restarts) from Stage-I's T_rob
        generator, as the other baselines' warm-start row."""
        return DataFreeBaseline.stage1_role(s2)

    def _check_feature_map(self) -> None:
        """The non-robust split reads the teacher's last feature map; its pooled features must be that map's mean."""
        with torch.no_grad(), LastFeatureMap(self.teacher) as fmap:
            _, f = self.teacher(torch.rand(2, *self.ctx.info.shape, device=self.ctx.device), return_features=True)
        arch = self.ctx.cfg.teachers.robust.arch
        if fmap.last is None or fmap.last.shape[1] != f.shape[1] or not torch.allclose(
                fmap.last.float().mean((2, 3)), f.float(), atol=1e-4):
            raise ConfigError(f"stage2.ferd.lambda_uni: FERD's non-robust channels need a teacher whose features are "
                              f"the global average of a feature map larger than 1x1; teachers.robust.arch={arch} at "
                              f"this image size has none; set stage2.ferd.lambda_uni: 0")

    # ---------------------------------------------------------------- synthesis rounds
    def start_round(self, it: int) -> None:
        """New labels from the class probabilities, new latents, and (``reset_generator``) a re-initialised G
        (the Stage-I weights again under the warm start)."""
        ctx, o, n = self.ctx, self.opts, self.ctx.s2.batch_size
        if it and o.reset_generator:
            self.restart_generator()
            ctx.opt_g.state.clear()
        distributed.share(n, "stage2.batch_size")
        with torch.no_grad():
            self.z.copy_(torch.randn(self.z.shape, generator=ctx.rng))
        ctx.opt_g.state.pop(self.z, None)
        self.labels = torch.multinomial(self.class_probs, n, replacement=True, generator=ctx.rng)
        self.best, self.best_loss = None, math.inf

    def restart_generator(self) -> None:
        """The Stage-I weights under the warm start, else a fresh random initialisation (FERD's ``reset_model``)."""
        if self.initial is not None:
            self.ctx.generator.load_state_dict(self.initial)
            return
        for m in self.ctx.generator.modules():
            if hasattr(m, "reset_parameters"):
                m.reset_parameters()

    def end_round(self, last: torch.Tensor, labels: torch.Tensor) -> None:
        """The best batch enters the bank; the last batch's per-class risk under PGD on T_rob sets p."""
        ctx, o, a = self.ctx, self.opts, self.ctx.s2.attack
        if ctx.bank is not None:
            ctx.bank.add(self.best)
        x_adv = PGD(self.teacher, a.eps, steps=o.risk_steps, step_size=a.step_size)(last, labels)
        with torch.no_grad():
            sums, counts = distributed.average(list(margin_sums(self.teacher(x_adv), labels, ctx.info.num_classes)))
        self.class_probs = class_probabilities(sums, counts, o.class_min, o.class_max).cpu()

    # ---------------------------------------------------------------- generator
    def generator_objective(self, x: torch.Tensor, y: torch.Tensor) -> Terms:
        """FERD's generator loss on x (to minimise) with the round's labels y."""
        uni = self.objective.active("uni")
        with (self.bn.recording() if self.bn is not None else contextlib.nullcontext(),
              LastFeatureMap(self.teacher) if uni else contextlib.nullcontext() as fmap):
            t, f = self.teacher(x, return_features=True)
        return self.objective({
            "bn": lambda: self.bn.loss(),
            "adv": lambda: self.discrepancy(x, t),
            "oh": lambda: F.cross_entropy(t, y),
            "uni": lambda: uniform_kl(self.non_robust_logits(f, fmap.last, y)),
        })

    def discrepancy(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """DKL(S(x), T(x)) with class weights σ(T(x)/T2), the student in eval mode (FERD's generator step)."""
        with eval_mode(self.ctx.student):
            s = self.ctx.student(x)
        return dkl_loss(s, t, F.softmax(t / self.opts.dkl_temperature, 1))

    def non_robust_logits(self, f: torch.Tensor, fmap: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        o = self.opts
        var = fmap.detach().float().var((2, 3))
        noise = bottleneck_noise(f, var, self.head, y, o.ib_steps, o.ib_lr, o.ib_beta)
        return self.head(f * non_robust_channels(noise, var).to(f.dtype))

    def generator_step(self, it: int) -> dict[str, Any]:
        ctx, o = self.ctx, self.opts
        if it % o.round_iterations == 0:
            self.start_round(it)
        x = ctx.generator(distributed.mine(self.z))
        x_view, y = ctx.augment(x), distributed.mine(self.labels).to(ctx.device)
        terms = self.generator_objective(x_view, y)
        ctx.update_generator(terms.total, it)
        (total,) = ctx.global_losses(terms.total)
        if total < self.best_loss:
            self.best, self.best_loss = x.detach(), total
        if (it + 1) % o.round_iterations == 0 or it + 1 == ctx.s2.generator_warmup + ctx.s2.iterations:
            self.end_round(x_view.detach(), y)
        return {**terms.logs("g_", total="loss"), "bank": len(ctx.bank) if ctx.bank is not None else 0,
                "class_p_min": self.class_probs.min(), "class_p_max": self.class_probs.max()}

    # ---------------------------------------------------------------- student
    def adversarial(self, x: torch.Tensor, target_probs: torch.Tensor) -> torch.Tensor:
        """x_adv maximising KL(p ‖ σ(S(x_adv))) [− λutae·KL(U ‖ σ(S(x_adv)))], the shared attack settings."""
        if not self.opts.lambda_utae:
            return self.ctx.adversarial(x, target_probs=target_probs)
        a = self.ctx.s2.attack
        return PGD(self.ctx.student, a.eps, steps=a.steps, step_size=a.step_size, start="normal",
                   loss=utae_loss(self.opts.lambda_utae))(x, target=target_probs)

    def student_loss(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
        ctx, o = self.ctx, self.opts
        with torch.no_grad():
            t = self.teacher(x)
        x_adv = self.adversarial(x, F.softmax(t, 1))
        ctx.student.train()
        weights = F.softmax(t / o.dkl_temperature, 1) if o.student_alpha else None
        clean = dkl_loss(ctx.student(x), t, weights, o.student_alpha, ctx.s2.kd_reduction)
        robust = dkl_loss(ctx.student(x_adv), t, weights, o.student_alpha, ctx.s2.kd_reduction)
        loss = o.clean_weight * clean + (1 - o.clean_weight) * robust
        return loss, {"s_loss": loss.detach(), "s_clean": clean.detach(), "s_rob": robust.detach()}

    def student_step(self, it: int) -> dict[str, Any]:
        loss, logs = self.student_loss(self.ctx.pseudo_batch())
        self.ctx.update_student(loss, it)
        return logs

    # ---------------------------------------------------------------- bookkeeping
    def hooks(self) -> list[Any]:
        return [self.bn] if self.bn is not None else []

    def state_dict(self) -> dict[str, Any]:
        best = torch.empty(0) if self.best is None else self.best.cpu()
        return {"class_probs": self.class_probs, "labels": self.labels, "best": best, "best_loss": self.best_loss}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.class_probs, self.labels = state["class_probs"], state["labels"]
        self.best = state["best"].to(self.ctx.device) if state["best"].numel() else None
        self.best_loss = float(state["best_loss"])

    def reading(self) -> dict[str, Any]:
        o, s2, c = self.opts, self.ctx.s2, self.opts.clean_weight
        utae = f" − {o.lambda_utae}·KL(U ‖ σ(S(x_adv))) (UTAE)" if o.lambda_utae else " (no UTAE term, as the code)"
        return {
            **super().reading(),
            "generator_init": ("Stage-I generator on T_rob (warm start, beyond the method's paper)"
                               if self.initial is not None else "from scratch")
                              + (", restarted every round" if o.reset_generator else ""),
            "generator_optimiser": f"Adam lr={s2.lr_generator} betas=({o.adam_beta1}, 0.999); latents lr={o.latent_lr}",
            "generator_objective": f"FERD: {self.objective.describe(TERM_LABELS)}; DKL class weights "
                                   f"σ(T_rob(x)/{o.dkl_temperature}); S and T_rob in eval mode",
            "non_robust_channels": f"information bottleneck on T_rob's penultimate channels: {o.ib_steps} Adam steps "
                                   f"lr={o.ib_lr}, β={o.ib_beta}; robust where the noise variance ends above the "
                                   "batch's largest spatial variance",
            "rounds": f"{o.round_iterations} generator steps per round (FERD's code: 200), new latents and labels "
                      "each round",
            "class_sampling": f"per-class mean −margin of T_rob under PGD-{o.risk_steps} (CE, labels y) on the "
                              f"round's last batch, scaled into [{o.class_min}, {o.class_max}] and normalised",
            "memory_bank": ("FERD's: each round's lowest-objective batch; " + self.ctx.bank.describe()
                            if self.ctx.bank is not None else "none: student batches are fresh G(z)"),
            "adversarial_examples": f"KL-PGD on the student maximising KL(σ(T_rob(x)) ‖ σ(S(x_adv))){utae}: "
                                    f"eps={s2.attack.eps}, {s2.attack.steps} steps of {s2.attack.step_size}, "
                                    "start x+0.001·N",
            "student_loss": f"{c:.4g}·DKL(S(x), T_rob(x)) + {1 - c:.4g}·DKL(S(x_adv), T_rob(x)), DKL's weighted-MSE "
                            f"weight {o.student_alpha}" + ("" if o.student_alpha else " (KL only, as the code in effect)")
                            + f", KL reduction {s2.kd_reduction}",
            "student_mode_in_generator_step": "eval",
            "schedule": "FERD's code: 220 rounds of 200 generator steps (batch 256, G Adam 2e-3), 400 student steps "
                        "per round after 20 warm-up rounds; here the shared Stage-II budget",
        }
