"""Every figure the project draws, as PNG bytes (the callers write them atomically): the Stage-I sample
grid, the ε-curve, the training-curve small multiples and the clean-vs-AA plane. The only module that
imports matplotlib."""
from __future__ import annotations

import io
import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch

STEP_KEYS = ("iteration", "step", "epoch")
SKIP_CURVES = {"student_steps", "seconds", "lr", "lr_student"}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(fig, dpi: int) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    fig.clf()
    _pyplot().close(fig)
    return buf.getvalue()


def sample_grid_png(panels: dict[str, torch.Tensor], teacher_probs: dict[str, torch.Tensor],
                     per_panel: int = 40, columns: int = 10, cell: int = 48) -> bytes:
    """One panel per artifact: ``per_panel`` samples sorted by the teacher's class, each labelled
    "class confidence" underneath (the supplementary's Fig. 2 shows such samples)."""
    plt = _pyplot()
    import torch.nn.functional as F

    band, pad = 12, 2  # label band under each cell, gap between cells (pixels)
    rows = math.ceil(per_panel / columns)
    height = rows * (cell + band + pad)
    fig, axes = plt.subplots(len(panels), 1, figsize=(columns * (cell + pad) / 80, len(panels) * (height / 80 + 0.3)),
                             squeeze=False)
    for ax, (name, images) in zip(axes[:, 0], panels.items()):
        conf, cls = teacher_probs[name][:per_panel].max(1)
        order = torch.argsort(cls * 2 - conf, stable=True)  # by class, most confident first
        x = images[:per_panel][order].float()
        mode = "nearest" if x.shape[-1] < cell else "bilinear"
        x = F.interpolate(x, size=(cell, cell), mode=mode).clamp(0, 1).expand(-1, 3, -1, -1)
        canvas = torch.ones(3, height, columns * (cell + pad))
        for i in range(len(x)):
            r, c = divmod(i, columns)
            top, left = r * (cell + band + pad), c * (cell + pad)
            canvas[:, top : top + cell, left : left + cell] = x[i]
            ax.text(left + cell / 2, top + cell + band / 2, f"{int(cls[order[i]])}  {conf[order[i]]:.2f}",
                    fontsize=6, ha="center", va="center")
        ax.imshow(canvas.permute(1, 2, 0).numpy(), interpolation="nearest")
        ax.set_title(f"{name} (label: teacher class, confidence)", fontsize=8)
        ax.axis("off")
    fig.tight_layout()
    return _png(fig, dpi=120)


def eps_curve_png(curves: dict[str, list[dict]]) -> bytes:
    """Robust accuracy under PGD_S against the radius, one line per model."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, points in curves.items():
        ax.plot([p["eps"] for p in points], [100 * p["accuracy"] for p in points], marker="o", label=name)
    ax.set(xlabel="ε (L∞, pixel units in [0,1])", ylabel="robust accuracy under PGD_S (%)", ylim=(0, 100))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return _png(fig, dpi=120)


def curves_png(series: dict[str, list[dict]], title: str, max_panels: int = 16) -> bytes | None:
    """Small multiples: one panel per numeric column, one line per series, against its step column."""
    plt = _pyplot()

    columns: list[str] = []
    for rows in series.values():
        for key in rows[0] if rows else {}:
            plotted = key not in STEP_KEYS and key not in SKIP_CURVES and _number(rows[0][key]) is not None
            if plotted and key not in columns:
                columns.append(key)
    columns = columns[:max_panels]
    if not columns:
        return None
    ncol = min(4, len(columns))
    nrow = math.ceil(len(columns) / ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(3.2 * ncol, 2.4 * nrow), squeeze=False)
    for ax, column in zip(axes.flat, columns):
        for color, (name, rows) in enumerate(series.items()):
            step = next((k for k in STEP_KEYS if rows and k in rows[0]), None)
            pts = [(_number(r[step]) if step else i, _number(r.get(column))) for i, r in enumerate(rows)]
            pts = [(x, y) for x, y in pts if x is not None and y is not None]
            if pts:
                ax.plot(*zip(*pts), label=name, lw=1, color=f"C{color % 10}")  # one colour per series
        ax.set_title(column, fontsize=8)
        ax.tick_params(labelsize=6)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(columns):]:
        ax.axis("off")
    legend = {}
    for ax in axes.flat:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            legend.setdefault(label, handle)
    fig.legend(list(legend.values()), list(legend), fontsize=7, loc="upper right")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _png(fig, dpi=100)


# ---------------------------------------------------------------- the clean-vs-AA plane
# how each kind of row is drawn: (marker, colour or None for the next of the cycle, size, legend name)
PLANE_STYLES = {
    "teacher": ("*", "black", 14, "teacher"),
    "reference": ("P", "dimgray", 10, "reference (real data)"),
    "ceiling": ("s", "tab:green", 9, "data-ful ceiling"),
    "no_tnat": ("D", "tab:red", 8, "w/o T_nat"),
    "student": ("o", None, 7, "student"),
}


@dataclass(frozen=True)
class PlanePoint:
    """One row of a table on the plane: mean Clean and AA over its seeds, and their sample std (0 for one)."""

    label: str
    kind: str  # a key of PLANE_STYLES
    clean: float
    aa: float
    clean_std: float
    aa_std: float
    seeds: int


def plane_kind(kind: str | None, method: str | None = None) -> str:
    """The plane's kind of an evaluated model: its eval kind (teacher, reference) or, for a student, its
    method's (derd_no_tnat: no_tnat, rslad_real: ceiling, else student)."""
    if kind in ("teacher", "reference"):
        return kind
    return {"derd_no_tnat": "no_tnat", "rslad_real": "ceiling"}.get(method or "", "student")


def plane_points(rows: Iterable[tuple[str, str, Mapping[str, Sequence[float]]]]) -> list[PlanePoint]:
    """``(label, kind, column -> one value per seed)`` rows as points; a row without Clean or AA values is left out."""
    points = []
    for label, kind, values in rows:
        clean, aa = list(values.get("Clean") or []), list(values.get("AA") or [])
        if not clean or not aa:
            continue
        spread = [statistics.stdev(v) if len(v) > 1 else 0.0 for v in (clean, aa)]
        points.append(PlanePoint(label, kind, statistics.mean(clean), statistics.mean(aa), *spread,
                                 max(len(clean), len(aa))))
    return points


def plane_png(points: Sequence[PlanePoint], title: str) -> bytes:
    """Clean % against AA %: a point per row (mean over seeds, error bars ± the seeds' std on both axes), the
    teachers, the real-data reference, the data-ful ceiling and the w/o T_nat row drawn apart from the students."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 5))
    students, named = 0, set()
    for p in points:
        marker, colour, size, name = PLANE_STYLES[p.kind]
        if colour is None:  # a colour per student row, named in the legend; the other kinds: once per kind
            colour, students, name = f"C{students % 10}", students + 1, p.label
        label, named = ("_nolegend_" if name in named else name), named | {name}
        ax.errorbar(p.clean, p.aa, xerr=p.clean_std, yerr=p.aa_std, fmt=marker, color=colour, markersize=size,
                    capsize=3, elinewidth=1, label=label)
        ax.annotate(p.label, (p.clean, p.aa), textcoords="offset points", xytext=(6, 4), fontsize=7)
    ax.margins(0.1)
    ax.set(xlabel="Clean accuracy (%)", ylabel="AutoAttack accuracy (%)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    return _png(fig, dpi=120)


def _number(value: object) -> float | None:
    try:
        v = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None
