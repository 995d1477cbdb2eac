"""Projected gradient descent (Madry et al. 2018) and its label-free KL form (TRADES/Stage-II)."""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from derd.attacks.base import ATTACKS, Attack, project

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (logits, target) -> per-example loss


def ce_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, y, reduction="none")


@ATTACKS.register("pgd")
class PGD(Attack):
    """L-inf PGD ascent on a per-example loss (cross-entropy by default).

    Args: eps radius; steps and step_size of signed-gradient ascent; start ``uniform`` (U(-eps, eps)),
    ``zero`` or ``normal`` (x + 0.001·N(0,1)); restarts keep, per example, the first restart that
    fools the model (or the first one), and attack only the examples no restart has fooled yet.
    """

    start = "uniform"

    def __init__(self, model: nn.Module, eps: float, steps: int = 20, step_size: float = 2 / 255,
                 restarts: int = 1, start: str | None = None, loss: LossFn = ce_loss, seed: int | None = None):
        super().__init__(model, eps)
        self.steps, self.step_size, self.restarts, self.loss = steps, step_size, restarts, loss
        self.start = start or self.start
        self.seed = seed

    def _init(self, x: torch.Tensor, gen: torch.Generator | None) -> torch.Tensor:
        if self.start == "uniform":
            noise = (torch.rand(x.shape, generator=gen, device=x.device) * 2 - 1) * self.eps
        elif self.start == "normal":
            noise = 0.001 * torch.randn(x.shape, generator=gen, device=x.device)
        else:
            noise = torch.zeros_like(x)
        return project(x + noise, x, self.eps)

    def target(self, x: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        """What the loss compares against: the labels (label-free subclasses override)."""
        if y is None:
            raise ValueError(f"{type(self).__name__} needs labels")
        return y

    def check_target(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """A caller's ``target``: one row per example."""
        if len(target) != len(x):
            raise ValueError(f"{type(self).__name__}: target has {len(target)} rows for {len(x)} examples")
        return target

    def ascend(self, x: torch.Tensor, target: torch.Tensor, gen: torch.Generator | None,
               only: torch.Tensor | None = None) -> torch.Tensor:
        """``steps`` signed-gradient steps from a random start; ``only`` (indices) attacks that subset, its
        start drawn with the whole batch's so that each example sees the same random numbers either way."""
        x_adv = self._init(x, gen)
        if only is not None:
            x, target, x_adv = x[only], target[only], x_adv[only]
        for _ in range(self.steps):
            x_adv.requires_grad_(True)
            loss = self.loss(self.model(x_adv), target).sum()
            (grad,) = torch.autograd.grad(loss, x_adv)
            x_adv = project(x_adv.detach() + self.step_size * grad.sign(), x, self.eps)
        return x_adv.detach()

    def perturb(self, x: torch.Tensor, y: torch.Tensor | None, target: torch.Tensor | None = None) -> torch.Tensor:
        """``target``: what the loss compares against when the caller fixes it (default :meth:`target`)."""
        gen = None
        if self.seed is not None:
            gen = torch.Generator(device=x.device).manual_seed(self.seed)
        target = self.target(x, y) if target is None else self.check_target(x, target)
        best = self.ascend(x, target, gen)
        if self.restarts > 1 and y is not None:
            with torch.no_grad():
                fooled = self.model(best).argmax(1) != y
            for _ in range(self.restarts - 1):
                if fooled.all():
                    break
                left = (~fooled).nonzero().squeeze(1)
                candidate = self.ascend(x, target, gen, only=left)
                with torch.no_grad():
                    now = self.model(candidate).argmax(1) != y[left]
                best[left[now]] = candidate[now]
                fooled[left[now]] = True
        return best


def kl_loss(logits: torch.Tensor, target_probs: torch.Tensor) -> torch.Tensor:
    """Per-example KL(p ‖ softmax(logits)), p the target probabilities."""
    return F.kl_div(F.log_softmax(logits, 1), target_probs, reduction="none").sum(1)


@ATTACKS.register("kl_pgd")
class KLPGD(PGD):
    """Label-free PGD maximising KL(p ‖ σ(f(x_adv))). By default p = σ(f(x)), the model's own clean
    prediction: TRADES' inner problem and DERD's adversarial pseudo examples. A caller may fix p per
    example (``attack(x, target=p)``, rows of probabilities): RSLAD's inner problem, p = σ_τ(T_rob(x)).
    Default start x + 0.001·N(0, I)."""

    start = "normal"

    def __init__(self, model: nn.Module, eps: float, steps: int = 10, step_size: float | None = None, **kw):
        super().__init__(model, eps, steps, step_size if step_size is not None else eps / 4, loss=kl_loss, **kw)

    def target(self, x: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        with torch.no_grad():
            return F.softmax(self.model(x), 1)

    def check_target(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Target probabilities: a B×K float matrix whose rows are distributions."""
        target = super().check_target(x, target)
        if target.dim() != 2 or not target.is_floating_point():
            raise ValueError(f"KLPGD: target must be B×K probabilities, got {tuple(target.shape)} {target.dtype}")
        if (target < 0).any() or not torch.allclose(target.float().sum(1), torch.ones(len(target), device=target.device),
                                                    atol=1e-2):
            raise ValueError("KLPGD: target rows must be probability distributions (≥ 0, summing to 1)")
        return target
