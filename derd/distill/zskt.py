"""ZSKT (Micaelli & Storkey 2019) as a data-free robust-distillation baseline.

Generator: adversarial, from scratch; it maximises KL(σ(T_rob(x)) ‖ σ(S(x))) (ZSKT's forward KL,
where DFAD uses L1 on logits). Student: the shared robust KD plus ZSKT's attention transfer
β·‖a_S/‖a_S‖₂ − a_T/‖a_T‖₂‖₂ on clean pseudo data, a = channel-mean of squared activations.
Our classifiers expose only pooled features, so the attention map is taken at the last spatial
feature map (captured by forward hooks) instead of at the end of each of ZSKT's three block groups.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from derd.distill import register_method
from derd.distill.robust_kd import DataFreeBaseline, robust_kd_loss
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
    size = min(student_maps.shape[-1], teacher_maps.shape[-1])
    return (attention_map(student_maps, size) - attention_map(teacher_maps, size)).norm(dim=1).mean()


@register_method("zskt", "ZSKT")
class ZSKT(DataFreeBaseline):
    def generator_step(self, it: int) -> dict[str, Any]:
        x = self.ctx.generate()
        kl = kd_kl(self.teacher(x), self.ctx.student(x))
        self.ctx.update_generator(-kl, it)
        return {"g_loss": -kl.detach(), "g_kl": kl.detach()}

    def student_loss(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
        ctx, o = self.ctx, self.opts
        x_adv = ctx.adversarial(x) if o.student_loss == "rslad" else None
        ctx.student.train()
        with LastFeatureMap(self.teacher) as t_maps, torch.no_grad():
            t = self.teacher(x)
        with LastFeatureMap(ctx.student) as s_maps:
            s = ctx.student(x)
        at = attention_transfer(s_maps.last, t_maps.last)
        s_adv = ctx.student(x_adv) if x_adv is not None else None
        kd = robust_kd_loss(o.student_loss, o.rslad_clean_weight, t, s, s_adv, self.tau())
        loss = kd + o.zskt.beta_at * at
        return loss, {"s_loss": loss.detach(), "s_kd": kd.detach(), "s_at": at.detach()}

    def reading(self) -> dict[str, Any]:
        return {**super().reading(), "generator_objective": "ZSKT: maximise KL(T_rob(x) ‖ S(x))",
                "attention_transfer": f"beta={self.opts.zskt.beta_at}, last spatial feature map only"}
