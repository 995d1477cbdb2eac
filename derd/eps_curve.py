"""Robust accuracy under PGD_S as a function of the radius: ε-multiples ``eval.eps_curve``.

The step size scales with the radius (PGD_S's step/ε ratio is kept), so every point runs the same
attack at its own scale; multiple 0 is clean accuracy. Written as ``plots/eps_curve.csv`` (model,
multiple, eps, accuracy in percent) and ``plots/eps_curve.png``.
"""
from __future__ import annotations

import csv
import io
from pathlib import Path

import torch
from torch import nn

from .attacks import PGD, robust_flags
from .config import Eval
from .eval_store import FlagStore
from .io import write_text


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
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["model", "multiple", "eps", "accuracy"])
    for name, points in curves.items():
        for p in points:
            w.writerow([name, p["multiple"], f"{p['eps']:.6g}", f"{100 * p['accuracy']:.2f}"])
    write_text(plots / "eps_curve.csv", buf.getvalue())

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, points in curves.items():
        ax.plot([p["eps"] for p in points], [100 * p["accuracy"] for p in points], marker="o", label=name)
    ax.set(xlabel="ε (L∞, pixel units in [0,1])", ylabel="robust accuracy under PGD_S (%)", ylim=(0, 100))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    plots.mkdir(parents=True, exist_ok=True)
    tmp = plots / ".eps_curve.png.tmp"
    fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
    tmp.replace(plots / "eps_curve.png")
