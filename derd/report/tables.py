"""The report stage: ``reports/report.html`` (self-contained, images embedded) and ``reports/report.md``.

Contents: the comparison table in the paper's layout (Clean, FGSM, PGD_S, PGD_T, CW, AA, Ave, in
percent; the ``Nature``/``SAT`` reference rows, then one row per method, mean ± sample std over
seeds), the sanity-check flags, ε-curves, training curves (Stage-I terms, Stage-II losses), the
generated-sample grid, the reconstructed choices of METHOD.md that ran, the configuration and the
environment (versions, AutoAttack package, seed, device, git commit). Figures rendered here go to
``reports/figures/``; the HTML embeds every image as a data URI.
"""
from __future__ import annotations

import base64
import html
import os
import statistics
from dataclasses import dataclass
from pathlib import Path

import yaml

from derd.artifacts import read_json, versions, write_bytes, write_text
from derd.config import Config
from derd.curves import read_rows
from derd.report import plots
from derd.runtime import Paths, git_commit, resolve_device

COLUMNS = ("Clean", "FGSM", "PGD_S", "PGD_T", "CW", "AA", "Ave")
# The evaluate stage's record (every model's row with its sanity flags, the settings, AutoAttack's version),
# relative to the project; metrics/eval.json holds its table alone, the numbers DVC shows.
EVALUATION = "artifacts/evaluation.json"
# The supplementary's row order and labels (Table 1); methods not listed follow in config order.
METHOD_LABELS = {"dafl": "DAFL", "dfad": "DFAD", "zskt": "ZSKT", "cmi": "CMI", "dfard": "DFARD-style", "ferd": "FERD",
                 "derd_inv": "DERD_inv", "derd_no_tnat": "w/o T_nat", "derd": "DERD", "rslad_real": "RSLAD-real (data-ful)"}
# Reconstructed [R] choices of METHOD.md that are configuration keys (the report prints which ran).
RECONSTRUCTED = (
    "stage1.generator.arch", "stage1.ie_log_base", "stage2.k_student", "stage2.discrepancy", "stage2.aggregation",
    "stage2.rob_target", "stage2.tau", "stage2.lambda_rob_clean", "stage2.augment", "stage2.baselines.student_loss",
)


class ReportError(ValueError):
    """A missing or unreadable input of the report, with the file and the stage that writes it."""


@dataclass
class Row:
    """One line of the table: a reference model or a method aggregated over its seeds."""

    label: str
    values: dict[str, list[float]]  # column -> one value per seed
    models: list[str]
    suspect: list[str]  # "model: failed checks"
    unchecked: int = 0  # models whose sanity checks did not run

    @property
    def sanity(self) -> str:
        if self.suspect:
            return "; ".join(self.suspect)
        return "not run" if self.unchecked == len(self.models) else "pass"

    def cell(self, column: str) -> str:
        vals = self.values.get(column) or []
        if not vals:
            return "–"
        if len(vals) == 1:
            return f"{vals[0]:.2f}"
        return f"{statistics.mean(vals):.2f} ± {statistics.stdev(vals):.2f}"


# ---------------------------------------------------------------- inputs
def load_eval(root: Path) -> dict:
    """The evaluate stage's record (:data:`EVALUATION`); :class:`ReportError` naming the file when unusable."""
    path = Paths(root).root / EVALUATION
    if not path.is_file():
        raise ReportError(f"{path}: not found; run `derd evaluate` (or `dvc repro`) first")
    try:
        result = read_json(path)
    except ValueError as exc:
        raise ReportError(f"{path}: not valid JSON ({exc}); rerun `derd evaluate`") from None
    if not isinstance(result.get("rows"), list):
        raise ReportError(f"{path}: has no 'rows' list; rerun `derd evaluate`")
    return result


def _optional_json(path: Path) -> dict:
    return read_json(path) if path.is_file() else {}


def table_metrics(root: Path) -> dict[str, float]:
    """``<model>/<column>`` -> percent, for every evaluated model (the parent run's final metrics)."""
    return {f"{r['model']}/{c}": float(r[c]) for r in load_eval(root)["rows"] for c in COLUMNS if c in r}


def table_rows(evaluation: dict) -> list[Row]:
    """Reference rows first (as evaluated), then one row per method in the paper's order."""
    refs, methods = [], {}
    for r in evaluation["rows"]:
        failed = [c for c, ok in (r.get("sanity") or {}).items() if ok is False]
        flag = [f"{r['model']}: {', '.join(failed)}"] if failed else []
        values = {c: [float(r[c])] for c in COLUMNS if c in r}
        unchecked = int(not r.get("sanity"))
        if r.get("kind") != "student":
            refs.append(Row(r["model"], values, [r["model"]], flag, unchecked))
            continue
        method = r.get("method") or r["model"].rsplit("-seed", 1)[0]
        row = methods.setdefault(method, Row(METHOD_LABELS.get(method, method), {}, [], []))
        for c, v in values.items():
            row.values.setdefault(c, []).extend(v)
        row.models.append(r["model"])
        row.suspect.extend(flag)
        row.unchecked += unchecked
    order = list(METHOD_LABELS)
    ranked = sorted(methods, key=lambda m: (order.index(m) if m in order else len(order), m))
    return refs + [methods[m] for m in ranked]


# ---------------------------------------------------------------- environment
def environment(cfg: Config, root: Path, evaluation: dict) -> dict:
    aa = evaluation.get("autoattack") or {}
    return {
        "versions": versions(),
        "autoattack": f"{aa.get('package', '?')} {aa.get('version', '?')} ({aa.get('aa_version', '?')}, "
                      f"{aa.get('n_examples', '?')} examples)",
        "seed": cfg.seed,
        "device": f"{cfg.device} -> {resolve_device(cfg.device)}",
        "git_commit": git_commit(root) or "unknown (not a git checkout)",
    }


def reconstructed(cfg: Config, distill: dict) -> dict[str, object]:
    """The [R] configuration keys with their values, and each method's recorded reading."""
    data = cfg.model_dump(mode="json")
    out: dict[str, object] = {}
    for key in RECONSTRUCTED:
        node: object = data
        for part in key.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        if node is not None:
            out[key] = node
    readings = {}
    for name, entry in distill.items():
        if isinstance(entry, dict) and entry.get("reading"):
            readings.setdefault(entry.get("method", name), entry["reading"])
    return {**out, **{f"reading[{m}]": r for m, r in readings.items()}}


# ---------------------------------------------------------------- figures
def training_figures(root: Path, stage1_units: list[str], students: list[str]) -> dict[str, Path]:
    """Render the Stage-I and Stage-II curves of the configured units into reports/figures/; title -> file."""
    paths, out = Paths(root), {}
    figures = paths.reports / "figures"
    warmup = {u: read_rows(p) for u in stage1_units if (p := paths.plots / "warmup" / f"{u}.csv").is_file()}
    png = plots.curves_png({k: v for k, v in warmup.items() if v}, "Stage-I warm-up: L_G^I terms per step")
    if png:
        out["Stage-I training curves"] = write_bytes(figures / "warmup_curves.png", png)
    curves = {u: read_rows(p) for u in students if (p := paths.plots / "distill" / f"{u}.csv").is_file()}
    png = plots.curves_png({k: v for k, v in curves.items() if v}, "Stage-II distillation: losses per iteration")
    if png:
        out["Stage-II training curves"] = write_bytes(figures / "distill_curves.png", png)
    return out


def plane_figure(rows: list[Row], evaluation: dict, figures: Path) -> dict[str, Path]:
    """The table's rows on the clean-vs-AA plane (teachers and each method's students, seed spread), drawn
    into ``figures``/plane.png; title -> file (none when no row has both columns)."""
    models = {r["model"]: r for r in evaluation["rows"]}

    def kind(model: dict) -> str:
        return plots.plane_kind(model.get("kind"), model.get("method") or model["model"].rsplit("-seed", 1)[0])

    points = plots.plane_points((r.label, kind(models[r.models[0]]), r.values) for r in rows)
    if not points:
        return {}
    png = plots.plane_png(points, f"{evaluation.get('dataset', '?')}: clean vs AutoAttack accuracy of the run's models")
    return {"Clean vs AA (mean ± sample std over seeds)": write_bytes(figures / "plane.png", png)}


# ---------------------------------------------------------------- rendering
def markdown(rows: list[Row], sections: dict[str, object], images: dict[str, Path], evaluation: dict,
             reports: Path, runs_url: str | None = None) -> str:
    runs = ["", f"Every run in MLflow (start `derd ui`): [the runs table]({runs_url})"] if runs_url else []
    lines = ["# DERD report", "", _caption(evaluation), *runs, "", "| Model | " + " | ".join(COLUMNS) + " | Seeds | Sanity |",
             "|" + "---|" * (len(COLUMNS) + 3)]
    for r in rows:
        lines.append(f"| {r.label} | " + " | ".join(r.cell(c) for c in COLUMNS)
                     + f" | {len(r.models)} | {r.sanity} |")
    for title, path in images.items():
        lines += ["", f"## {title}", "", f"![{title}]({_relative(path, reports)})"]
    for title, body in sections.items():
        lines += ["", f"## {title}", "", "```", _as_text(body), "```"]
    return "\n".join(lines) + "\n"


def html_page(rows: list[Row], sections: dict[str, object], images: dict[str, Path], evaluation: dict,
              runs_url: str | None = None) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in ("Model", *COLUMNS, "Seeds", "Sanity"))
    body = []
    for r in rows:
        cls = ' class="suspect"' if r.suspect else ""
        cells = "".join(f"<td>{html.escape(r.cell(c))}</td>" for c in COLUMNS)
        flag = html.escape(r.sanity)
        body.append(f"<tr{cls}><th>{html.escape(r.label)}</th>{cells}<td>{len(r.models)}</td><td>{flag}</td></tr>")
    figs = "".join(
        f"<h2>{html.escape(t)}</h2><img alt=\"{html.escape(t)}\" src=\"data:image/png;base64,"
        f"{base64.b64encode(p.read_bytes()).decode()}\">" for t, p in images.items())
    extra = "".join(f"<h2>{html.escape(t)}</h2><pre>{html.escape(_as_text(b))}</pre>" for t, b in sections.items())
    runs = (f"<p>Every run in MLflow (start <code>derd ui</code>): <a href=\"{html.escape(runs_url)}\">the runs "
            "table</a></p>") if runs_url else ""
    style = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
             "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}"
             "tr.suspect{background:#fde2e2}img{max-width:100%}pre{background:#f6f6f6;padding:1em;overflow:auto}")
    return (f"<!doctype html><html><head><meta charset=\"utf-8\"><title>DERD report</title><style>{style}</style>"
            f"</head><body><h1>DERD report</h1><p>{html.escape(_caption(evaluation))}</p>{runs}"
            f"<table id=\"results\"><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"
            f"{figs}{extra}</body></html>\n")


def _caption(evaluation: dict) -> str:
    aa = evaluation.get("autoattack") or {}
    return (f"Robust accuracy (%) on {evaluation.get('dataset', '?')}, L∞ ε = {evaluation.get('eps', '?')} "
            f"(pixel units in [0,1]), {evaluation.get('n_examples', '?')} test examples; AA = {aa.get('package', '?')} "
            f"{aa.get('aa_version', '')} on {aa.get('n_examples', '?')} examples. Ave = mean of all six columns "
            "including Clean; students: mean ± sample std over seeds. Rows failing a sanity check are marked.")


def _as_text(body: object) -> str:
    return body if isinstance(body, str) else yaml.safe_dump(body, sort_keys=False, allow_unicode=True).rstrip()


def _relative(path: Path, start: Path) -> str:
    return Path(os.path.relpath(path.resolve(), start.resolve())).as_posix()


def run(cfg: Config, root: Path = Path("."), runs_url: str | None = None) -> dict:
    """The report stage (see the module docstring); ``runs_url``: the MLflow runs table to link."""
    paths = Paths(root)
    evaluation = load_eval(root)
    stage1_units, students = cfg.stage1_units(), cfg.student_units()
    distill = {u: _optional_json(paths.students / f"{u}.json") for u in students}  # the sidecars: each reading
    rows = table_rows(evaluation)
    images = {"ε-curves (PGD_S)": paths.plots / "eps_curve.png"}
    images |= {f"Generated samples (Stage-I {u})": paths.plots / "warmup" / f"{u}.png" for u in stage1_units
               if u != "inversion_pool" or cfg.stage1.inversion.pool_size}  # an empty pool has no samples
    images = {t: p for t, p in images.items() if p.is_file()} | training_figures(root, stage1_units, students)
    images = plane_figure(rows, evaluation, paths.reports / "figures") | images  # first: it reads the table
    sections = {
        "Sanity checks": {r["model"]: r.get("sanity") or "not run" for r in evaluation["rows"]},
        "Reconstructed choices (METHOD.md [R]) that ran": reconstructed(cfg, distill),
        "Teachers": {role: check for role in ("natural", "robust")
                     if (check := _optional_json(paths.teachers / f"{role}.json").get("metrics"))},
        "Environment": environment(cfg, root, evaluation),
        "Configuration (params)": cfg.model_dump(mode="json"),
    }
    sections = {title: body for title, body in sections.items() if body}  # a section with nothing to show is left out
    html_path = write_text(paths.reports / "report.html", html_page(rows, sections, images, evaluation, runs_url))
    md_path = write_text(paths.reports / "report.md", markdown(rows, sections, images, evaluation, paths.reports, runs_url))
    return {"html": str(html_path), "markdown": str(md_path), "rows": len(rows), "models": len(evaluation["rows"]),
            "suspect_rows": sum(bool(r.suspect) for r in rows), "figures": len(images)}
