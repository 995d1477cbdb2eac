"""DERD_inv's pool (supplementary §3.1, METHOD.md "Variants"): no generator; batches of pixels
initialised from noise are optimised directly with Adam on the Stage-I loss
argmin_{x_inv} L_oh + L_a + L_BN + L_ie (λ-weighted as L_G^I) against the frozen teacher.

Pixels are parametrised as x = sigmoid(v), so the pool stays in [0,1] without clipping; v starts
from N(0, I). The pool is built batch by batch and checkpointed after each batch.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from derd.artifacts import check_finite
from derd.losses import StageOneLoss


def optimise_batch(loss_fn: StageOneLoss, shape: tuple[int, ...], steps: int, lr: float, rng: torch.Generator,
                   on_step: Callable[[int, dict[str, float]], None] | None = None) -> torch.Tensor:
    """One batch of inverted images of ``shape`` (N, C, H, W), detached, in [0,1]; the initial
    noise is drawn from ``rng`` (on the teacher's device)."""
    v = torch.randn(shape, generator=rng, device=rng.device).requires_grad_(True)
    opt = torch.optim.Adam([v], lr=lr)
    for step in range(steps):
        result = loss_fn(torch.sigmoid(v))
        check_finite(result.total, "DERD_inv loss", step)
        opt.zero_grad(set_to_none=True)
        result.total.backward()
        opt.step()
        if on_step is not None:
            on_step(step, result.as_floats())
    return torch.sigmoid(v).detach()
