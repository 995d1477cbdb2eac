"""CW-inf (Carlini & Wagner 2017, L-inf form used by SAT/TRADES papers): PGD on the margin loss."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from derd.attacks.base import ATTACKS
from derd.attacks.pgd import PGD


def margin_loss(logits: torch.Tensor, y: torch.Tensor, kappa: float = 50.0) -> torch.Tensor:
    """Per-example CW margin to ascend: min(max_{j≠y} z_j − z_y, κ).

    The negation of CW's f(x') = max(z_y − max_{j≠y} z_j, −κ): the gradient pushes the best wrong class
    past the true one and stops once it leads by the confidence κ (never before: a confident correct
    prediction still gets a gradient).
    """
    true = logits.gather(1, y[:, None]).squeeze(1)
    others = logits.masked_fill(F.one_hot(y, logits.shape[1]).bool(), float("-inf")).amax(1)
    return torch.clamp(others - true, max=kappa)


@ATTACKS.register("cw")
class CW(PGD):
    """CW-inf: ``steps`` signed steps on the margin loss with confidence κ, zero start."""

    def __init__(self, model: nn.Module, eps: float, steps: int = 30, step_size: float = 2 / 255,
                 kappa: float = 50.0, **kw):
        super().__init__(model, eps, steps, step_size, start="zero",
                         loss=lambda z, y: margin_loss(z, y, kappa), **kw)
