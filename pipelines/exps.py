"""``derd exps``: the workspace and its DVC experiments in a table a terminal can show.

``dvc exp show`` gives every metric and param its own column: the default profile's metrics alone are about 35
(each model's seven numbers in metrics/eval.json, the teachers', Stage-I's and Stage-II's finals), which a
120-column terminal shows as "…". This reads the same data (``dvc exp show --json``) and prints one line per
(experiment, method): the method's seed count and Clean / AA / Ave (mean over its seeds, from metrics/eval.json's
table), then the params that differ from the experiment's commit (``key=value`` as ``dvc exp run -S`` takes them),
cut to the terminal's width. The teachers' rows and every other column stay in ``dvc exp show`` / ``derd table``.
"""
from __future__ import annotations

import shutil
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipelines import sweep

COLUMNS = ("Clean", "AA", "Ave")
HEAD = ("Experiment", "Method", "Seeds", *COLUMNS)
WIDTHS = (22, 12, 5, 6, 6, 6)  # the fixed columns; the changed params take the rest of the line


@dataclass
class Line:
    """One experiment (or the workspace, or a commit) and what it evaluated."""

    name: str
    changed: str = ""  # "key=value, ..." against its commit's params
    state: str = "success"
    methods: dict[str, tuple[int, dict[str, float]]] = field(default_factory=dict)  # method -> (seeds, means)


def _params(data: dict | None) -> dict[str, Any]:
    files = (data or {}).get("params") or {}
    return sweep.leaves((files.get("params.yaml") or {}).get("data") or {})


def _table(data: dict | None) -> dict[str, dict[str, float]]:
    metrics = (data or {}).get("metrics") or {}
    return ((metrics.get("metrics/eval.json") or {}).get("data") or {}).get("table") or {}


def methods(table: dict[str, dict[str, float]]) -> dict[str, tuple[int, dict[str, float]]]:
    """method -> (seeds, mean of each of :data:`COLUMNS` that every seed has) over its ``<method>-seed<k>`` rows."""
    groups: dict[str, list[dict[str, float]]] = {}
    for model, values in table.items():
        method, seeded, _ = model.rpartition("-seed")
        if seeded:
            groups.setdefault(method, []).append(values)
    return {m: (len(rows), {c: statistics.mean(r[c] for r in rows) for c in COLUMNS if all(c in r for r in rows)})
            for m, rows in groups.items()}


def changed(params: dict[str, Any], base: dict[str, Any]) -> str:
    """The leaves of ``params`` that differ from (or are absent in) ``base``, as ``key=value, ...``."""
    return ", ".join(f"{k}={sweep.hydra_value(v)}" for k, v in params.items() if k not in base or base[k] != v)


def lines(show: list[dict]) -> list[Line]:
    """The workspace (against the first commit shown), each commit, and each commit's experiments (against it),
    from ``dvc exp show --json``."""
    commits = [b for b in show if b.get("rev") != "workspace"]
    out = []
    for entry in show:
        data = entry.get("data") or {}
        if entry.get("rev") == "workspace":
            base = _params(commits[0].get("data")) if commits else {}
            out.append(Line("workspace", changed(_params(data), base), methods=methods(_table(data))))
            continue
        base = _params(data)
        out.append(Line(entry.get("name") or str(entry.get("rev", ""))[:7], methods=methods(_table(data))))
        for exp in entry.get("experiments") or []:
            head = (exp.get("revs") or [{}])[0]
            state = (exp.get("executor") or {}).get("state") or ("failed" if head.get("error") else "success")
            name = exp.get("name") or head.get("name") or str(head.get("rev", ""))[:7]
            out.append(Line(f"  {name}", changed(_params(head.get("data")), base), state,
                            methods(_table(head.get("data")))))
    return out


def _fit(text: str, width: int) -> str:
    return text if len(text) <= width else text[: max(width - 1, 0)] + "…"


def render(rows: list[Line], width: int = 120) -> str:
    """The table, no line longer than ``width``: one line per (experiment, method); an experiment without
    results shows its state."""
    fixed = sum(WIDTHS) + 2 * len(WIDTHS)
    rest = max(width - fixed, 0)

    def line(cells: list[str], params: str) -> str:
        text = "  ".join(_fit(c, w).ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, WIDTHS)))
        return _fit(f"{text}  {_fit(params, rest)}".rstrip(), width)

    out = [line(list(HEAD), "Changed params (vs its commit)")]
    for row in rows:
        params = row.changed or "–"
        if not row.methods:
            state = row.state if row.state != "success" else "no metrics/eval.json"
            out.append(line([row.name, f"({state})", "", "", "", ""], params))
            continue
        for i, (method, (seeds, means)) in enumerate(row.methods.items()):
            cells = [f"{means[c]:.1f}" if c in means else "–" for c in COLUMNS]
            out.append(line([row.name if i == 0 else "", method, str(seeds), *cells], params if i == 0 else ""))
    return "\n".join(out)


def exps_command(root: Path = Path("."), rev: str | None = None, commits: int = 1) -> int:
    """``derd exps``: print the table for the experiments of ``commits`` commits from ``rev`` (default HEAD)."""
    print(render(lines(sweep.show(root, rev, commits)), shutil.get_terminal_size((120, 24)).columns))
    return 0
