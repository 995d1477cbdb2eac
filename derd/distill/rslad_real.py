"""RSLAD on the REAL training data: the data-ful ceiling of the comparison (not a data-free method).

The student is distilled from the robust teacher T_rob exactly as the data-free baselines distil it
(:mod:`derd.distill.robust_kd`: same student, SGD/cosine optimiser, ``iterations × k_student`` steps,
RSLAD's adversarial examples (KL-PGD towards the teacher's soft labels) and the RSLAD loss
(1−α)·KL(σ_τ(T_rob(x)) ‖ σ_τ(S(x_adv))) + α·KL(σ_τ(T_rob(x)) ‖ σ_τ(S(x))), α = ``rslad_clean_weight``),
but x is a batch of the dataset's training split (its labels are never read) instead of generated
samples: there is no generator and no generator step. Batches walk seeded permutations of the training
split (one per epoch, drawn from the run's random stream, ``ctx.rng``) and get the dataset's crop/flip
(``ctx.augment``, when ``stage2.augment``), so a run is reproducible and resumes to the same student.

Unlike the baselines this row always uses the RSLAD loss (``stage2.baselines.student_loss: kd`` does not
turn it into plain KD): it is the ceiling of robustness distillation given the real data.
"""
from __future__ import annotations

from typing import Any

import torch

from derd import data as datasets
from derd.artifacts import CheckpointError
from derd.distill import register_method
from derd.distill.loop import Context, Method
from derd.distill.robust_kd import robust_kd_loss, rslad_adversarial, rslad_reading

PSEUDO_DATA = "REAL training data (data-ful ceiling, not data-free)"


@register_method("rslad_real", "RSLAD (real data, data-ful ceiling)")
class RSLADReal(Method):
    teachers = ("robust",)
    generator_source = None

    def __init__(self, ctx: Context):
        super().__init__(ctx)
        self.teacher = ctx.teachers["robust"]
        self.opts = ctx.s2.baselines
        self.train_set = datasets.load(ctx.cfg.data).train
        self.data_key = ctx.cfg.section_hash("data")  # which training split the permutation indexes
        self.perm = torch.empty(0, dtype=torch.long)
        self.pos = 0

    def next_indices(self) -> torch.Tensor:
        """The next ``batch_size`` indices of the current epoch's permutation (a new one when it runs out)."""
        n, out, need = len(self.train_set), [], self.ctx.s2.batch_size
        while need:
            if self.pos >= len(self.perm):
                self.perm, self.pos = torch.randperm(n, generator=self.ctx.rng), 0
            take = self.perm[self.pos : self.pos + need]
            out.append(take)
            self.pos += len(take)
            need -= len(take)
        return torch.cat(out)

    def student_batch(self) -> torch.Tensor:
        x = torch.stack([self.train_set[i][0] for i in self.next_indices().tolist()])
        return self.ctx.augment(x.to(self.ctx.device))

    def student_step(self, it: int) -> dict[str, Any]:
        ctx = self.ctx
        x = self.student_batch()
        with torch.no_grad():
            t = self.teacher(x)
        x_adv = rslad_adversarial(ctx, x, t, ctx.s2.tau)
        ctx.student.train()
        loss = robust_kd_loss("rslad", self.opts.rslad_clean_weight, t, ctx.student(x), ctx.student(x_adv), ctx.s2.tau,
                              ctx.s2.kd_reduction)
        ctx.update_student(loss, it)
        return {"s_loss": loss.detach()}

    def reading(self) -> dict[str, Any]:
        a = self.opts.rslad_clean_weight
        return {**super().reading(), "pseudo_data": PSEUDO_DATA,
                "training_images": f"{len(self.train_set)} images of {self.ctx.cfg.data.name}'s training split "
                                   "(labels unused), seeded permutation per epoch",
                "student_loss": f"RSLAD: (1−α)·KL(T_rob(x)‖S(x_adv)) + α·KL(T_rob(x)‖S(x)), α={a}",
                "tau": self.ctx.s2.tau, "kd_reduction": self.ctx.s2.kd_reduction,
                "adversarial_examples": rslad_reading(self.ctx)}

    def state_dict(self) -> dict[str, Any]:
        return {"perm": self.perm, "pos": self.pos, "data_key": self.data_key}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("data_key") != self.data_key or (len(state["perm"]) and len(state["perm"]) != len(self.train_set)):
            raise CheckpointError(f"resume state of rslad_real was written for another training split (data.*); "
                                  f"delete artifacts/checkpoints/distill_rslad_real-seed{self.ctx.seed}.pt")
        self.perm, self.pos = state["perm"].clone(), int(state["pos"])
