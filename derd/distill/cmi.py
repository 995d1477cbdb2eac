"""CMI (Fang et al. 2021, contrastive model inversion) as a data-free robust-distillation baseline.

Generator (from scratch), against the robust teacher:
  λbn·L_BN + λoh·CE(T(x), y) + λadv·L_adv + λcr·L_cr
with y drawn uniformly per sample (class-conditional inversion), L_adv = −mean_b m_b·KL(T(x_b) ‖ S(x_b))
with m_b = 1 where T and S agree (CMI's masked adversarial term: the mean runs over the whole batch, as in
CMI's code), the student in eval mode (CMI's ``synthesize``: its BatchNorm running statistics never see a
synthesis batch), and L_cr an instance-discrimination
InfoNCE loss: a projection head on the teacher's pooled features must match each sample with its
crop/flip view against the other samples of the batch and a queue of past embeddings.
Every generated batch enters a memory bank (FIFO, ``bank_size``); student batches are drawn from
the bank, so the student replays everything synthesised so far. CMI re-initialises its generator
for every synthesis round; we keep one generator for the whole run (shared loop schedule).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from derd.distill import register_method
from derd.distill.robust_kd import DataFreeBaseline
from derd.losses import BNStatistics


def info_nce(anchor: torch.Tensor, positive: torch.Tensor, queue: torch.Tensor, temperature: float) -> torch.Tensor:
    """InfoNCE with the batch's other positives and the queue as negatives (rows L2-normalised)."""
    candidates = torch.cat([positive, queue]) if len(queue) else positive
    logits = anchor @ candidates.T / temperature
    return F.cross_entropy(logits, torch.arange(len(anchor), device=anchor.device))


def masked_adversarial_kl(t_logits: torch.Tensor, s_logits: torch.Tensor) -> torch.Tensor:
    """CMI's L_adv = −mean_b m_b·KL(σ(T(x_b)) ‖ σ(S(x_b))), m_b = [argmax T(x_b) = argmax S(x_b)]: the
    generator pushes agreeing samples towards disagreement (mean over the whole batch)."""
    agree = (s_logits.argmax(1) == t_logits.argmax(1)).float()
    kl = F.kl_div(F.log_softmax(s_logits, 1), F.softmax(t_logits, 1), reduction="none").sum(1)
    return -(kl * agree).mean()


@register_method("cmi", "CMI")
class CMI(DataFreeBaseline):
    synthesis_train = False

    def __init__(self, ctx):
        o = ctx.s2.baselines.cmi
        teacher = ctx.teachers["robust"]
        with torch.no_grad():
            feat_dim = teacher(torch.zeros(2, *ctx.info.shape, device=ctx.device), return_features=True)[1].shape[1]
        self.head = nn.Sequential(nn.Linear(feat_dim, feat_dim), nn.ReLU(), nn.Linear(feat_dim, o.head_dim)).to(ctx.device)
        super().__init__(ctx)
        self.bn = BNStatistics(self.teacher)
        self.bank = torch.empty(0, *ctx.info.shape, device=ctx.device)
        self.queue = torch.empty(0, o.head_dim, device=ctx.device)

    def extra_generator_params(self) -> list[nn.Parameter]:
        return list(self.head.parameters())

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.head(self.teacher(x, return_features=True)[1]), dim=1)

    def generator_step(self, it: int) -> dict[str, Any]:
        ctx, o = self.ctx, self.opts.cmi
        x = ctx.generate()
        y = torch.randint(0, ctx.info.num_classes, (len(x),), generator=ctx.rng).to(ctx.device)
        with self.bn.recording():
            t_logits, t_feat = self.teacher(x, return_features=True)
        l_bn = self.bn.loss()
        l_oh = F.cross_entropy(t_logits, y)
        with self.synthesis():
            l_adv = masked_adversarial_kl(t_logits, ctx.student(x))
        anchor = F.normalize(self.head(t_feat), dim=1)
        positive = self.embed(ctx.augment(x))
        l_cr = info_nce(anchor, positive, self.queue, o.cr_temperature)
        loss = o.lambda_bn * l_bn + o.lambda_oh * l_oh + o.lambda_adv * l_adv + o.lambda_cr * l_cr
        ctx.update_generator(loss, it)
        self.bank = torch.cat([self.bank, x.detach()])[-o.bank_size :]
        self.queue = torch.cat([self.queue, positive.detach()])[-o.bank_size :]
        return {"g_loss": loss.detach(), "g_bn": l_bn.detach(), "g_oh": l_oh.detach(), "g_adv": l_adv.detach(),
                "g_cr": l_cr.detach(), "bank": len(self.bank)}

    def student_batch(self) -> torch.Tensor:
        idx = torch.randint(0, len(self.bank), (self.ctx.s2.batch_size,), generator=self.ctx.rng)
        return self.ctx.augment(self.bank[idx.to(self.bank.device)])

    def hooks(self) -> list[Any]:
        return [self.bn]

    def state_dict(self) -> dict[str, Any]:
        return {"bank": self.bank.cpu(), "queue": self.queue.cpu(), "head": self.head.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.bank, self.queue = state["bank"].to(self.ctx.device), state["queue"].to(self.ctx.device)
        self.head.load_state_dict(state["head"])

    def reading(self) -> dict[str, Any]:
        o = self.opts.cmi
        return {**super().reading(),
                "generator_objective": f"CMI: {o.lambda_bn}·L_BN + {o.lambda_oh}·CE(T(x), y~U) + "
                                       f"{o.lambda_adv}·(−masked KL(T‖S)) + {o.lambda_cr}·InfoNCE(τ={o.cr_temperature})",
                "pseudo_data": f"memory bank of the last {o.bank_size} generated images",
                "generator_reinit": "none (one generator for the whole run)"}
