"""ZSKT (Micaelli & Storkey 2019) as a data-free robust-distillation baseline.

Generator: adversarial, from scratch; it maximises KL(σ(T_rob(x)) ‖ σ(S(x))) (ZSKT's forward KL,
where DFAD uses L1 on logits), the student in train mode as in ZSKT's code. Student: the shared robust
KD plus ZSKT's attention transfer β·mean_{b,p}(â_S − â_T)² on clean pseudo data, â = a/‖a‖₂ with
a = channel-mean of squared activations, flattened per example; the mean runs over batch × positions
(ZSKT's ``attention_diff``, for which β = 250 was tuned). Our classifiers expose only pooled features, so
the attention map is taken at the last spatial feature map (captured by forward hooks) instead of at
the end of each of ZSKT's three block groups.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from derd.distill import register_method
from derd.distill.robust_kd import DataFreeBaseline
from derd.losses import kd_kl


class LastFeatureMap:
    """Forward hooks on every submodule keeping the last 4-D output with spatial size > 1."""

    def __init__(self, model: nn.Module):
        self.last: torch.Tensor | None = None
        self._handles = [m.register_forward_hook(self._hook) for m in model.modules() if m is not model]

    def _hook(self, _module, _inputs, output) -> None:
        if isinstance(output, torch.Tensor) and output.dim() == 4 and output.shape[2] * output.shape[3] > 1:
            self.last = output

    def __enter__(self) -> LastFeatureMap:
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()


def attention_map(features: torch.Tensor, size: int) -> torch.Tensor:
    """a = mean_c f², pooled to ``size``×``size``, flattened and L2-normalised per example."""
    a = features.pow(2).mean(1, keepdim=True)
    if a.shape[-1] != size:
        a = F.adaptive_avg_pool2d(a, size)
    return F.normalize(a.flatten(1), dim=1)


def attention_transfer(student_maps: torch.Tensor, teacher_maps: torch.Tensor) -> torch.Tensor:
    """mean over batch × positions of (â_S − â_T)², the larger map pooled to the smaller one's size."""
    size = min(student_maps.shape[-1], teacher_maps.shape[-1])
    return (attention_map(student_maps, size) - attention_map(teacher_maps, size)).pow(2).mean()


@register_method("zskt", "ZSKT")
class ZSKT(DataFreeBaseline):
    def generator_step(self, it: int) -> dict[str, Any]:
        x = self.ctx.generate()
        with self.synthesis():
            kl = kd_kl(self.teacher(x), self.ctx.student(x))
        self.ctx.update_generator(-kl, it)
        return {"g_loss": -kl.detach(), "g_kl": kl.detach()}

    def student_loss(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
        ctx, o = self.ctx, self.opts
        with LastFeatureMap(self.teacher) as t_maps:
            t, x_adv = self.teacher_and_adversarial(x)
        ctx.student.train()
        with LastFeatureMap(ctx.student) as s_maps:
            s = ctx.student(x)
        at = attention_transfer(s_maps.last, t_maps.last)
        s_adv = ctx.student(x_adv) if x_adv is not None else None
        kd = self.kd_loss(t, s, s_adv)
        loss = kd + o.zskt.beta_at * at
        return loss, {"s_loss": loss.detach(), "s_kd": kd.detach(), "s_at": at.detach()}

    def reading(self) -> dict[str, Any]:
        return {**super().reading(), "generator_objective": "ZSKT: maximise KL(T_rob(x) ‖ S(x))",
                "attention_transfer": f"beta={self.opts.zskt.beta_at}·mean over batch × positions of squared "
                                      "normalised-map differences, last spatial feature map only"}
