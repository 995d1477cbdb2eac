"""Fast gradient sign method (Goodfellow et al. 2015): one signed step of size eps, no random start."""
from __future__ import annotations

from torch import nn

from derd.attacks.base import ATTACKS
from derd.attacks.pgd import PGD


@ATTACKS.register("fgsm")
class FGSM(PGD):
    def __init__(self, model: nn.Module, eps: float, **kw):
        super().__init__(model, eps, steps=1, step_size=eps, start="zero", **kw)
