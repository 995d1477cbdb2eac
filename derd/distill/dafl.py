"""DAFL (Chen et al. 2019) as a data-free robust-distillation baseline.

Generator: no game with the student; it minimises λoh·L_oh + λie·L_ie + λa·L_a against the (robust)
teacher (one-hot confidence, information entropy, feature activation; no BN prior: λBN = 0, so L_BN is
not computed and the teacher needs no BatchNorm), trained from scratch. Student: the shared robust KD of :mod:`derd.distill.robust_kd`.
"""
from __future__ import annotations

from typing import Any

from derd.distill import register_method
from derd.distill.robust_kd import DataFreeBaseline
from derd.losses import StageOneLoss


@register_method("dafl", "DAFL")
class DAFL(DataFreeBaseline):
    def __init__(self, ctx):
        super().__init__(ctx)
        o = self.opts.dafl
        lambdas = {"oh": o.lambda_oh, "a": o.lambda_a, "ie": o.lambda_ie, "bn": 0.0}
        self.objective = StageOneLoss(self.teacher, lambdas, ctx.cfg.stage1.ie_log_base)

    def generator_step(self, it: int) -> dict[str, Any]:
        result = self.objective(self.ctx.generate())
        self.ctx.update_generator(result.total, it)
        return result.logs("g_", total="loss")

    def hooks(self) -> list[Any]:
        return [self.objective]

    def reading(self) -> dict[str, Any]:
        return {**super().reading(), "generator_objective": f"DAFL: {self.objective.describe()} on T_rob"}
