"""What every attack shares: device handling, [0,1] + eps-ball projection, eval mode and its restore."""
from __future__ import annotations

import contextlib
import logging
from contextlib import contextmanager

import torch
from torch import nn

from derd.registry import Registry

log = logging.getLogger("derd")
ATTACKS: Registry[type[Attack]] = Registry("attack")


@contextmanager
def model_mode(model: nn.Module, training: bool):
    """Put ``model`` in train (``training``) or eval mode and restore each submodule's own flag afterwards."""
    modes = [(m, m.training) for m in model.modules()]
    model.train(training)
    try:
        yield model
    finally:
        for m, was_training in modes:
            m.training = was_training


def eval_mode(model: nn.Module):
    """:func:`model_mode` in eval mode."""
    return model_mode(model, False)


def project(x_adv: torch.Tensor, x: torch.Tensor, eps: float) -> torch.Tensor:
    """Clip into the L-inf ball of radius eps around x, then into [0,1]."""
    return torch.min(torch.max(x_adv, x - eps), x + eps).clamp(0, 1)


def input_gradient_precision(device: torch.device):
    """Where an attack's input gradient is sound: under fp16 autocast it would underflow (a zero gradient
    stalls a signed step), so attacks run in fp32 there; bf16 (fp32's exponent range) and fp32 are kept."""
    fp16 = torch.is_autocast_enabled(device.type) and torch.get_autocast_dtype(device.type) == torch.float16
    return torch.autocast(device.type, enabled=False) if fp16 else contextlib.nullcontext()


def model_device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


class Attack:
    """An L-inf attack on inputs in [0,1]. Subclasses implement :meth:`perturb` on tensors that are
    already on the model's device, with the model in eval mode."""

    def __init__(self, model: nn.Module, eps: float):
        if eps < 0:
            raise ValueError(f"eps must be ≥ 0, got {eps}")
        self.model, self.eps = model, eps

    def __call__(self, x: torch.Tensor, y: torch.Tensor | None = None, **inputs: torch.Tensor) -> torch.Tensor:
        """The adversarial x; ``inputs``: further per-example tensors the subclass's :meth:`perturb` takes
        (PGD's ``target``; None: not given), detached and moved to the model's device like x."""
        device = model_device(self.model)
        x = x.detach().to(device)
        y = y.to(device) if y is not None else None
        inputs = {k: v.detach().to(device) for k, v in inputs.items() if v is not None}
        with eval_mode(self.model), input_gradient_precision(device):
            x_adv = self.perturb(x, y, **inputs)
        return project(x_adv, x, self.eps).detach()

    def perturb(self, x: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError


@torch.no_grad()
def _correct(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(correct, finite) per example. Non-finite logits (or a non-finite adversarial input) never count
    as correct: argmax over NaN would otherwise pick an arbitrary class and could match the label."""
    with eval_mode(model):
        logits = model(x)
    finite = torch.isfinite(logits).all(1) & torch.isfinite(x.flatten(1)).all(1)
    return ((logits.argmax(1) == y.to(x.device)) & finite).cpu(), finite.cpu()


def robust_flags(model: nn.Module, attack: Attack | None, x: torch.Tensor, y: torch.Tensor,
                 batch_size: int = 256) -> torch.Tensor:
    """Per-example booleans: is ``model`` correct on ``x`` and, given an attack, also on ``attack(x)``?

    Robust means both: an attack that happens to turn a wrong prediction right does not make the example
    robust (AutoAttack's rule: only the clean-correct examples count). Examples whose logits are NaN/inf
    are flagged False (not robust) and a warning counts them."""
    device = model_device(model)
    out, bad = [], 0
    for i in range(0, len(x), batch_size):
        xb, yb = x[i : i + batch_size].to(device), y[i : i + batch_size].to(device)
        correct, finite = _correct(model, xb, yb)
        if attack is not None:
            adv_correct, adv_finite = _correct(model, attack(xb, yb), yb)
            correct, finite = correct & adv_correct, finite & adv_finite
        out.append(correct)
        bad += int((~finite).sum())
    if bad:
        what = type(attack).__name__ if attack is not None else "clean inputs"
        log.warning("%s produced non-finite logits (NaN/inf) on %d of %d examples under %s; they are counted "
                    "as not robust (wrong). Check the model's weights and inputs.", type(model).__name__, bad,
                    len(x), what)
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.bool)
