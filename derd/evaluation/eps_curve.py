"""Robust accuracy under PGD_S as a function of the radius: ε-multiples ``eval.eps_curve``.

The step size scales with the radius (PGD_S's step/ε ratio is kept), so every point runs the same
attack at its own scale; multiple 0 is clean accuracy. Written as ``plots/eps_curve.csv`` (model,
multiple, eps, accuracy in percent) and ``plots/eps_curve.png``.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from derd.artifacts import write_bytes
from derd.attacks import PGD, robust_flags
from derd.config import Eval
from derd.curves import write_rows
from derd.evaluation.flags import FlagStore
from derd.report import plots as plots_png


def multiples(ev: Eval) -> list[float]:
    return sorted(set(ev.eps_curve))


def eps_curve(model: nn.Module, x: torch.Tensor, y: torch.Tensor, ev: Eval, seed: int, store: FlagStore,
              known: dict[float, torch.Tensor]) -> list[dict]:
    """Points {multiple, eps, accuracy (fraction)}; ``known`` reuses flags already computed (0: Clean, 1: PGD_S)."""
    points = []
    for m in multiples(ev):
        if m in known:
            flags = known[m]
        else:
            step = ev.pgd_s.step_size * m
            flags, _, _ = store.run(f"curve:PGD_S@{m:g}eps", {"eps": ev.eps * m, "steps": ev.pgd_s.steps,
                                                               "step_size": step, "seed": seed},
                                    lambda: robust_flags(model, PGD(model, ev.eps * m, ev.pgd_s.steps, step, seed=seed),
                                                         x, y, ev.batch_size))
        points.append({"multiple": m, "eps": ev.eps * m, "accuracy": flags.float().mean().item()})
    return points


def write_curves(curves: dict[str, list[dict]], plots: Path) -> None:
    """CSV (percent) and PNG of every model's ε-curve."""
    write_rows(plots / "eps_curve.csv", [{"model": name, "multiple": p["multiple"], "eps": f"{p['eps']:.6g}",
                                          "accuracy": f"{100 * p['accuracy']:.2f}"}
                                         for name, points in curves.items() for p in points])

    write_bytes(plots / "eps_curve.png", plots_png.eps_curve_png(curves))
