"""DFAD (Fang et al. 2019) as a data-free robust-distillation baseline.

Generator: adversarial, from scratch; it maximises the student/teacher discrepancy
D = mean L1 of logits, D(S(x), T_rob(x)), with no prior on the samples; the student stays in train
mode during the generator step, as in DFAD's code. Student: the shared
robust KD of :mod:`derd.distill.robust_kd` (k_student steps per generator step, DFAD's 5:1 ratio).
"""
from __future__ import annotations

from typing import Any

from derd.distill import register_method
from derd.distill.robust_kd import DataFreeBaseline
from derd.losses import l1_discrepancy


@register_method("dfad", "DFAD")
class DFAD(DataFreeBaseline):
    def adversarial_loss(self, x):
        """−D(S(x), T(x)): the generator ascends the L1 logit discrepancy."""
        with self.synthesis():
            return -l1_discrepancy(self.ctx.student(x), self.teacher(x))

    def generator_step(self, it: int) -> dict[str, Any]:
        loss = self.adversarial_loss(self.ctx.generate())
        self.ctx.update_generator(loss, it)
        return {"g_loss": loss.detach(), "g_discrepancy": -loss.detach()}

    def reading(self) -> dict[str, Any]:
        return {**super().reading(), "generator_objective": "DFAD: maximise mean L1(S(x), T_rob(x))"}
