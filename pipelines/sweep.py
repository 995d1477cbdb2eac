"""Sweeps: one YAML file per results table, run as DVC experiments and rendered into docs/RESULTS.md.

A sweep file (see sweeps/README.md)::

    title: Fashion-MNIST comparison (3 seeds)
    base: presets/fashion.yaml                 # the profile every row starts from
    set: {eval.split: test, stage2.seeds: [0, 1, 2]}   # overrides for every row (dotted keys)
    rows:                                      # row label -> its overrides
      DERD: {stage2.methods: [derd]}
      "w/o SGA": {stage2.methods: [derd], stage2.aggregation: sum}

``derd sweep FILE [--run] [--jobs N]`` queues one DVC experiment per row, named ``<stem>-<row slug>``:
``dvc exp run --queue -n NAME -S key=value ...`` with every leaf of base ∪ set ∪ row that differs from the
workspace params.yaml (Hydra override syntax, which is what ``-S`` parses; a key the workspace lacks is
``+key=value``). Every row's complete params are validated first, so a typo stops the sweep before
anything is queued. Rows whose experiment already exists at this baseline (done, queued or running) are
skipped; failed ones are removed from the queue and queued again. ``--run`` starts the queue and waits.

``derd table FILE [--out docs/RESULTS.md]`` reads each row's evaluation from its experiment (the table of
metrics/eval.json from ``dvc exp show --json``, and the record with the per-model rows and sanity flags,
artifacts/evaluation.json, from the DVC cache), aggregates the students per method (mean ± sample std over
seeds, :func:`derd.report.table_rows`), keeps the teachers' rows once (once per distinct result when rows
retrain them) and replaces the block between ``<!-- table:<stem> -->`` and ``<!-- /table:<stem> -->`` in the
output file. A row whose experiment is missing, queued, running or failed is listed as "not run". The
table's rows on the clean-vs-AA plane (:func:`derd.report.plots.plane_png`) go to ``figures/<stem>_plane.png``
beside the output file, linked under the table.
"""
from __future__ import annotations

import json
import math
import os
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from derd import config
from derd.config import ConfigError

GREEK = {"ε": "eps", "λ": "lambda", "τ": "tau", "α": "alpha", "β": "beta"}
DONE, PENDING = ("success",), ("queued", "running")


class SweepError(ConfigError):
    """A bad sweep file, a row whose params do not validate, or a DVC command that failed."""


# ---------------------------------------------------------------- sweep files
@dataclass
class Sweep:
    path: Path
    title: str
    base: Path | None
    set: dict[str, Any]
    rows: dict[str, dict[str, Any]]  # label -> dotted leaves

    @property
    def stem(self) -> str:
        return self.path.stem

    def name(self, label: str) -> str:
        """The DVC experiment of a row: ``<sweep stem>-<row slug>`` (``fashion_comparison-w-o-t-nat``)."""
        stem = self.stem if re.fullmatch(r"[A-Za-z0-9_-]+", self.stem) else slug(self.stem)
        return f"{stem}-{slug(label)}"


def slug(label: str) -> str:
    """``"w/o T_nat"`` -> ``w-o-t-nat``; ``"ε = 0.1"`` -> ``eps-0-1`` (a valid git ref / DVC name)."""
    text = "".join(GREEK.get(c, c) for c in str(label)).lower()
    return re.sub(r"[^a-z0-9]+", "-", text).strip("-")


def leaves(mapping: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}, "c.d": [2]}`` -> ``{"a.b": 1, "c.d": [2]}`` (lists and scalars are leaves)."""
    out: dict[str, Any] = {}
    for key, value in mapping.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict) and value:
            out.update(leaves(value, path))
        else:
            out[path] = value
    return out


def merge(*layers: Mapping[str, Any]) -> dict[str, Any]:
    """Dotted leaves, later layers winning; a key replaces the keys above or below it (``a`` vs ``a.b``)."""
    out: dict[str, Any] = {}
    for layer in layers:
        for key, value in layer.items():
            for old in [k for k in out if k.startswith(key + ".") or key.startswith(k + ".")]:
                del out[old]
            out[key] = value
    return out


def nested(flat: Mapping[str, Any], onto: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Dotted leaves applied onto a (deep-copied) nested mapping."""
    out = json.loads(json.dumps(onto or {}))
    for key, value in flat.items():
        *parents, leaf = key.split(".")
        node = out
        for part in parents:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        node[leaf] = value
    return out


def _read_yaml(path: Path, what: str) -> Any:
    if not path.is_file():
        raise SweepError(f"{path}: no such {what}")
    try:
        return yaml.load(path.read_text(encoding="utf-8"), Loader=config._UniqueKeyLoader)
    except yaml.YAMLError as exc:
        raise SweepError(f"{path}: not valid YAML: {config._yaml_problem(exc)}") from None


def load(path: str | Path, root: Path = Path(".")) -> Sweep:
    """Read a sweep file (``base`` is relative to the project root ``root``)."""
    path = Path(path)
    raw = _read_yaml(path, "sweep file")
    if not isinstance(raw, dict):
        raise SweepError(f"{path}: a sweep file is a mapping with title, base, set and rows")
    unknown = sorted(set(raw) - {"title", "base", "set", "rows"})
    if unknown:
        raise SweepError(f"{path}: unknown key(s) {unknown}; a sweep file has title, base, set and rows")
    rows = raw.get("rows")
    if not isinstance(rows, dict) or not rows:
        raise SweepError(f"{path}: rows: must map each row label to its overrides (dotted keys)")
    for label, overrides in rows.items():
        if overrides is not None and not isinstance(overrides, dict):
            raise SweepError(f"{path}: rows.{label}: must be a mapping of overrides, got {overrides!r}")
    if not isinstance(raw.get("set") or {}, dict):
        raise SweepError(f"{path}: set: must be a mapping of overrides (dotted keys)")
    sweep = Sweep(path, str(raw.get("title") or path.stem), Path(root) / raw["base"] if raw.get("base") else None,
                  leaves(raw.get("set") or {}), {str(k): leaves(v or {}) for k, v in rows.items()})
    slugs: dict[str, str] = {}
    for label in sweep.rows:
        if not slug(label):
            raise SweepError(f"{path}: rows: label {label!r} has no letters or digits to name its experiment")
        if (other := slugs.setdefault(slug(label), label)) != label:
            raise SweepError(f"{path}: rows {other!r} and {label!r} would share the experiment name "
                             f"{sweep.name(label)!r}; rename one")
    return sweep


def row_leaves(sweep: Sweep, label: str) -> dict[str, Any]:
    """Every leaf of base ∪ set ∪ row (later wins)."""
    base = leaves(_read_yaml(sweep.base, "base profile") or {}) if sweep.base else {}
    return merge(base, sweep.set, sweep.rows[label])


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, bool) or isinstance(b, bool) or a is None or b is None:
        return type(a) is type(b) and a == b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return float(a) == float(b)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


def changes(sweep: Sweep, label: str, workspace: Mapping[str, Any]) -> dict[str, Any]:
    """The leaves of a row that differ from (or are absent in) the workspace params."""
    current = leaves(workspace)
    return {k: v for k, v in row_leaves(sweep, label).items() if k not in current or not _same(current[k], v)}


def validate(sweep: Sweep, label: str, workspace: Mapping[str, Any]) -> config.Config:
    """The row's complete params, validated as `derd` will read them (a typo fails here, not in a worker)."""
    source = f"{sweep.path} row {label!r}"
    try:
        return config.check_pipeline(config.parse(nested(row_leaves(sweep, label), workspace), source), source)
    except ConfigError as exc:
        raise SweepError(str(exc)) from None


# ---------------------------------------------------------------- -S overrides (Hydra's override grammar)
_BARE = re.compile(r"[A-Za-z_][A-Za-z0-9_./-]*")
_KEYWORDS = {"null", "true", "false", "nan", "inf"}


def hydra_value(value: Any) -> str:
    """A YAML value written so that ``dvc exp run -S key=<it>`` reads it back unchanged."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return ("inf" if value > 0 else "-inf") if math.isinf(value) else repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(hydra_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {hydra_value(v)}" for k, v in value.items()) + "}"
    text = str(value)
    if _BARE.fullmatch(text) and text.lower() not in _KEYWORDS:
        return text
    # Hydra's quoted strings: \' is a quote; backslashes are escaped only before a quote or the closing quote
    escaped = re.sub(r"(\\+)(?='|$)", lambda m: m.group(1) * 2, text).replace("'", "\\'")
    return f"'{escaped}'"


def overrides(sweep: Sweep, label: str, workspace: Mapping[str, Any]) -> list[str]:
    """``key=value`` (``+key=value`` for a key the workspace params lack) for every changed leaf."""
    current = leaves(workspace)
    return [f"{'' if k in current else '+'}{k}={hydra_value(v)}" for k, v in changes(sweep, label, workspace).items()]


def queue_command(sweep: Sweep, label: str, workspace: Mapping[str, Any]) -> list[str]:
    cmd = ["dvc", "exp", "run", "--queue", "-n", sweep.name(label)]
    for item in overrides(sweep, label, workspace):
        cmd += ["-S", item]
    return cmd


# ---------------------------------------------------------------- DVC
def _dvc() -> str:
    local = Path(sys.executable).parent / "dvc"  # the venv's dvc, beside this interpreter
    return str(local) if local.is_file() else "dvc"


def run_dvc(cmd: list[str], root: Path, echo: bool = True, capture: bool = False) -> str:
    """Run a ``dvc ...`` command (printed first); its output when ``capture``."""
    if echo:
        print("$ " + shlex.join(cmd), flush=True)
    env = {"DVC_NO_ANALYTICS": "1", **os.environ}
    done = subprocess.run([_dvc(), *cmd[1:]], cwd=root, env=env, text=True, check=False,
                          stdout=subprocess.PIPE if capture else None, stderr=subprocess.PIPE if capture else None)
    if done.returncode != 0:
        detail = (done.stderr or "").strip().splitlines()[-1:] if capture else []
        raise SweepError(f"`{shlex.join(cmd)}` exited with {done.returncode}" + (f": {detail[0]}" if detail else ""))
    return done.stdout or ""


@dataclass
class Experiment:
    name: str
    state: str  # success | failed | queued | running
    rev: str | None = None
    baseline: str | None = None
    metrics: dict = field(default_factory=dict)  # metrics/eval.json as `dvc exp show --json` gives it


def experiments(show: list[dict]) -> dict[str, Experiment]:
    """Name -> experiment from the output of ``dvc exp show --json`` (dvc 3.x: a list of baselines, each
    with ``experiments``: ``{name, executor: {state}, revs: [{rev, name, error, data: {metrics}}]}``)."""
    found: dict[str, Experiment] = {}
    for baseline in show:
        for exp in baseline.get("experiments") or []:
            revs = exp.get("revs") or [{}]
            head = revs[0]
            name = exp.get("name") or head.get("name")
            if not name:
                continue
            state = (exp.get("executor") or {}).get("state") or ("failed" if head.get("error") else "success")
            metrics = (((head.get("data") or {}).get("metrics") or {}).get("metrics/eval.json") or {}).get("data")
            found.setdefault(name, Experiment(name, state, head.get("rev"), baseline.get("rev"), metrics or {}))
    return found


def show(root: Path, rev: str | None = None, commits: int = 1) -> list[dict]:
    """``dvc exp show --json`` for the baseline ``rev`` (default HEAD), or the last ``commits`` commits."""
    cmd = ["dvc", "exp", "show", "--json", *(["--rev", rev] if rev else []), *(["-n", str(commits)] if commits > 1 else [])]
    return json.loads(run_dvc(cmd, root, echo=False, capture=True) or "[]")


def _dirty(root: Path) -> list[str]:
    done = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, capture_output=True,
                          text=True, check=False)
    return [line[3:] for line in done.stdout.splitlines()] if done.returncode == 0 else []


def _workers(root: Path) -> int | None:
    """Active queue workers, from ``dvc queue status``'s "Worker status: N active, M idle" line."""
    text = run_dvc(["dvc", "queue", "status"], root, echo=False, capture=True)
    m = re.search(r"Worker status:\s*(\d+) active", text)
    return int(m.group(1)) if m else None


def wait(names: list[str], root: Path, poll: float = 20.0, patience: int = 3) -> dict[str, Experiment]:
    """Until none of ``names`` is queued or running (printing each change of state)."""
    last: dict[str, str] = {}
    idle = 0
    while True:
        try:
            found = experiments(show(root))
        except SweepError as exc:  # e.g. a worker is creating its temporary copy right now: ask again
            print(f"  (dvc exp show failed, retrying: {exc})", flush=True)
            time.sleep(poll)
            continue
        states = {n: found[n].state if n in found else "missing" for n in names}
        for n, s in states.items():
            if last.get(n) != s:
                print(f"  {n}: {s}", flush=True)
        last = states
        pending = [n for n, s in states.items() if s in PENDING]
        if not pending:
            return found
        idle = idle + 1 if _workers(root) == 0 else 0
        if idle >= patience:
            raise SweepError(f"{pending}: still queued but no queue worker is running; start one with "
                             "`dvc queue start` and rerun this command")
        time.sleep(poll)


def sweep_command(path: str, root: Path = Path("."), params: str = "params.yaml", run: bool = False,
                  jobs: int = 1, rows: Sequence[str] | None = None) -> int:
    """``derd sweep``: validate every row, queue the missing ones (of ``rows`` only, when given: a sweep can be
    spent in parts), optionally run the queue and wait."""
    root = Path(root)
    sweep = load(path, root)
    if unknown := [r for r in rows or () if r not in sweep.rows]:
        raise SweepError(f"{path}: --rows {unknown} not among its rows {list(sweep.rows)}")
    workspace = _read_yaml(root / params, "params file") or {}
    for label in sweep.rows:
        validate(sweep, label, workspace)
    if dirty := _dirty(root):
        print(f"note: uncommitted changes ({', '.join(dirty[:5])}{' ...' if len(dirty) > 5 else ''}) go into the "
              "queued experiments, but `derd table` will name only the baseline commit; commit them first for a "
              "reproducible table")
    existing = experiments(show(root))
    todo, chosen = [], [label for label in sweep.rows if not rows or label in rows]
    for label in chosen:
        name = sweep.name(label)
        exp = existing.get(name)
        if exp and exp.state not in DONE + PENDING:  # a failed task keeps the name: drop it and queue again
            run_dvc(["dvc", "queue", "remove", name], root)
            exp = None
        if exp:
            print(f"{label!r}: experiment {name} is {exp.state} at this baseline, not queued again "
                  f"(`dvc exp remove {name}` to rerun it)")
            continue
        todo.append(label)
    names = [sweep.name(label) for label in chosen]
    if not run:
        for label in todo:
            run_dvc(queue_command(sweep, label, workspace), root)
        print(f"{len(todo)} experiment(s) queued; run them with `dvc queue start -j {jobs}`, then "
              f"`derd table {path}`")
        return 0
    # With several workers, the first row runs alone so that the teachers and Stage-I artifacts it trains
    # land in the run-cache before the other workers would each train their own copy.
    batches = [todo[:1], todo[1:]] if jobs > 1 else [todo]
    for batch in (b for b in batches if b):
        for label in batch:
            run_dvc(queue_command(sweep, label, workspace), root)
        run_dvc(["dvc", "queue", "start", "-j", str(jobs if batch is not batches[0] or jobs == 1 else 1)], root)
        wait(names, root)
    found = experiments(show(root))
    failed = [n for n in names if n not in found or found[n].state != "success"]
    for n in failed:
        print(f"{n}: {found[n].state if n in found else 'missing'} (see `dvc queue logs {n}`)")
    print(f"done: {len(names) - len(failed)}/{len(names)} experiments succeeded; `derd table {path}` renders them")
    return 1 if failed else 0


# ---------------------------------------------------------------- the table
@dataclass
class Outcome:
    """One sweep row: its experiment's state and, when it ran, its evaluation (the evaluation record's shape)."""

    label: str
    name: str
    state: str  # success | failed | queued | running | missing
    baseline: str | None = None
    evaluation: dict | None = None
    methods: list[str] = field(default_factory=list)  # stage2.methods of the row
    seeds: int = 0  # len(stage2.seeds) of the row
    full_rows: bool = True  # the record's per-model rows were readable (sanity flags known)


def evaluation_from_table(data: dict) -> dict:
    """The evaluation record's shape rebuilt from metrics/eval.json's ``table`` (what ``dvc exp show`` keeps)."""
    rows = []
    for model, values in (data.get("table") or {}).items():
        kind = "teacher" if model in ("Nature", "SAT") else "reference" if model == "SAT student" else "student"
        row = {"model": model, "kind": kind, **values}
        if kind == "student" and "-seed" in model:
            method, seed = model.rsplit("-seed", 1)
            row |= {"method": method, "seed": int(seed) if seed.isdigit() else seed}
        rows.append(row)
    return {**data, "rows": rows}


def collect(sweep: Sweep, found: Mapping[str, Experiment], read: Callable[[str], dict | None],
            workspace: Mapping[str, Any]) -> list[Outcome]:
    """Each row's outcome; ``read(rev)`` returns the experiment's evaluation record (None if unreadable)."""
    out = []
    for label in sweep.rows:
        merged = nested(row_leaves(sweep, label), workspace)
        s2 = merged.get("stage2") or {}
        name = sweep.name(label)
        exp = found.get(name)
        o = Outcome(label, name, exp.state if exp else "missing", exp.baseline if exp else None,
                    methods=list(s2.get("methods") or []), seeds=len(s2.get("seeds") or []))
        if exp and exp.state == "success":
            full = read(exp.rev) if exp.rev else None
            if isinstance(full, dict) and isinstance(full.get("rows"), list):
                o.evaluation = full
            elif exp.metrics.get("table"):
                o.evaluation, o.full_rows = evaluation_from_table(exp.metrics), False
            else:
                o.state = "no metrics/eval.json"
        out.append(o)
    return out


def _setting(values: dict[str, str]) -> str:
    """One value, or each distinct value with the rows it belongs to."""
    by_value: dict[str, list[str]] = {}
    for label, value in values.items():
        by_value.setdefault(value, []).append(label)
    if len(by_value) <= 1:
        return next(iter(by_value), "–")
    return "; ".join(f"{v} ({', '.join(labels)})" for v, labels in by_value.items())


def _aa(evaluation: dict) -> str:
    aa = evaluation.get("autoattack") or {}
    settings = (evaluation.get("settings") or {}).get("autoattack") or {}
    version = aa.get("aa_version") or settings.get("version") or "?"
    if version == "custom" and settings.get("attacks"):
        version = "custom: " + ", ".join(settings["attacks"])
    return f"{aa.get('package', '?')} {aa.get('version', '')}".strip() + f" ({version}) on {aa.get('n_examples', '?')}"


def _split(evaluation: dict) -> tuple[list, dict]:
    """(reference rows: teachers, SAT student; method -> student row aggregated over seeds) of one evaluation record."""
    from derd.report.tables import table_rows

    kinds = {r["model"]: r.get("kind") for r in evaluation["rows"]}
    methods = {r["model"]: r.get("method") or r["model"].rsplit("-seed", 1)[0] for r in evaluation["rows"]}
    refs, students = [], {}
    for row in table_rows(evaluation):
        if all(kinds.get(m) != "student" for m in row.models):
            refs.append(row)
        else:
            students[methods[row.models[0]]] = row
    return refs, students


@dataclass
class TableLine:
    """One line of a sweep's table: its label, its row (a :class:`derd.report.tables.Row`; None when it did not
    run), its Seeds and Status cells, and how the plane draws it (:func:`derd.report.plots.plane_kind`)."""

    label: str
    row: Any
    seeds: str
    status: str
    kind: str


def table_lines(outcomes: list[Outcome]) -> list[TableLine]:
    """The table's lines in order: the reference rows (once per distinct result), then each row's methods."""
    from derd.report.plots import plane_kind
    from derd.report.tables import METHOD_LABELS

    def status(row, full: bool) -> str:
        if not full:
            return "sanity unknown (evaluation record unreadable)"
        if row.sanity in ("pass", "not run"):
            return "ok" if row.sanity == "pass" else "sanity not run"
        return f"**suspect**: {row.sanity}"

    ran = [o for o in outcomes if o.evaluation is not None]
    kinds = {r["model"]: r.get("kind") for o in ran for r in o.evaluation["rows"]}
    lines = []
    refs: dict[str, dict[tuple, tuple[Any, list[str], bool]]] = {}
    split = {o.label: _split(o.evaluation) for o in ran}
    for o in ran:
        for row in split[o.label][0]:
            key = tuple(sorted((c, tuple(v)) for c, v in row.values.items()))
            refs.setdefault(row.label, {}).setdefault(key, (row, [], o.full_rows))[1].append(o.label)
    for ref, variants in refs.items():
        for row, labels, full in variants.values():
            label = ref if len(variants) == 1 else f"{ref} ({', '.join(labels)})"
            lines.append(TableLine(label, row, str(len(row.models)), status(row, full), plane_kind(kinds[row.models[0]])))
    for o in outcomes:
        if o.evaluation is None:
            lines.append(TableLine(o.label, None, "0", f"not run ({o.state})", "student"))
            continue
        students = split[o.label][1]
        for method in o.methods or list(students):
            label = o.label if len(o.methods) <= 1 else f"{o.label}: {METHOD_LABELS.get(method, method)}"
            if method == "rslad_real" and "data-ful" not in label:
                label += " (data-ful)"
            row, kind = students.get(method), plane_kind("student", method)
            if row is None:
                lines.append(TableLine(label, None, "0", f"not run (no {method} rows in its evaluation)", kind))
                continue
            n = len(row.models)
            seeds = str(n) if not o.seeds or n == o.seeds else f"{n}/{o.seeds}"
            lines.append(TableLine(label, row, seeds, status(row, o.full_rows), kind))
    return lines


def plane_points(outcomes: list[Outcome]) -> list:
    """The table on the clean-vs-AA plane (:class:`derd.report.plots.PlanePoint`): a point per line that ran
    with Clean and AA values."""
    from derd.report.plots import plane_points as points

    return points((t.label, t.kind, t.row.values) for t in table_lines(outcomes) if t.row is not None)


def render(sweep: Sweep, outcomes: list[Outcome], shown_path: str, plane: str | None = None) -> str:
    """The markdown block of one sweep (between its markers); ``plane``: the link to its clean-vs-AA figure."""
    from derd.report.tables import COLUMNS

    ran = [o for o in outcomes if o.evaluation is not None]
    head = ["Row", *COLUMNS, "Seeds", "Status"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for t in table_lines(outcomes):
        cells = [t.label, *(t.row.cell(c) if t.row else "–" for c in COLUMNS), t.seeds, t.status]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    figure = ["", f"![Clean vs AA: a point per row, mean ± sample std over seeds on both axes]({plane})"] if plane else []

    baselines = sorted({o.baseline for o in ran if o.baseline})
    commit = ", ".join(f"`{b}`" for b in baselines) or "– (no experiment found)"
    settings = {
        "split": _setting({o.label: str(o.evaluation.get("split", "?")) for o in ran}),
        "eps": _setting({o.label: f"{o.evaluation.get('eps', '?')}" for o in ran}),
        "n": _setting({o.label: f"{o.evaluation.get('n_examples', '?')}" for o in ran}),
        "aa": _setting({o.label: _aa(o.evaluation) for o in ran}),
    }
    done = sum(o.evaluation is not None for o in outcomes)
    return "\n".join([
        f"<!-- table:{sweep.stem} -->",
        f"## {sweep.title}",
        "",
        f"Produced by: `derd sweep {shown_path} --run && derd table {shown_path}` on commit {commit}.",
        "",
        (f"Split: {settings['split']} · L∞ ε = {settings['eps']} (pixels in [0, 1]) · n = {settings['n']} examples · "
         f"AutoAttack: {settings['aa']} examples."),
        (f"Accuracy in percent; students: mean ± sample std over seeds; Ave = mean of the six columns including "
         f"Clean. {done}/{len(outcomes)} rows ran."),
        "",
        *lines,
        *figure,
        f"<!-- /table:{sweep.stem} -->",
    ]) + "\n"


def replace_block(text: str, stem: str, block: str) -> str:
    """``text`` with the block between ``<!-- table:stem -->`` and ``<!-- /table:stem -->`` (markers included)
    replaced by ``block``, or with ``block`` appended when the markers are absent."""
    start, end = f"<!-- table:{stem} -->", f"<!-- /table:{stem} -->"
    i = text.find(start)
    j = text.find(end, i + len(start)) if i >= 0 else -1
    if i >= 0 and j >= 0:
        return text[:i] + block.rstrip("\n") + text[j + len(end):]
    if i >= 0:
        raise SweepError(f"found {start} without its closing {end}; fix the file by hand")
    return (text.rstrip("\n") + "\n\n" if text.strip() else "") + block


def _read_full(root: Path) -> Callable[[str], dict | None]:
    """``read(rev)``: the evaluation record of an experiment (``artifacts/evaluation.json``; an experiment from
    before it existed: its ``metrics/eval.json``, which then held the rows), None when neither can be read."""
    from derd.report.tables import EVALUATION

    def read(rev: str) -> dict | None:
        import dvc.api

        for path in (EVALUATION, "metrics/eval.json"):
            try:
                record = json.loads(dvc.api.read(path, repo=str(root), rev=rev))
            except Exception:  # noqa: BLE001, S112  (the next file, then what `dvc exp show` kept)
                continue
            if isinstance(record, dict) and isinstance(record.get("rows"), list):
                return record
        return None

    return read


def table_command(path: str, root: Path = Path("."), params: str = "params.yaml", out: str = "docs/RESULTS.md",
                  rev: str | None = None) -> int:
    """``derd table``: render the sweep's experiments into ``out`` (atomically)."""
    from derd.artifacts import write_text

    root = Path(root)
    sweep = load(path, root)
    workspace = _read_yaml(root / params, "params file") or {}
    # rows may have been queued from different commits: each row's newest experiment, its baseline named
    outcomes = collect(sweep, experiments(show(root, rev, commits=1 if rev else 50)), _read_full(root), workspace)
    shown = Path(path).as_posix()
    target = root / out
    link = None
    if points := plane_points(outcomes):  # the figure beside the table: <out's folder>/figures/<stem>_plane.png
        from derd.artifacts import write_bytes
        from derd.report.plots import plane_png

        figure = write_bytes(target.parent / "figures" / f"{sweep.stem}_plane.png",
                             plane_png(points, f"{sweep.title}: clean vs AutoAttack accuracy"))
        link = figure.relative_to(target.parent).as_posix()
    block = render(sweep, outcomes, shown, plane=link)
    text = target.read_text(encoding="utf-8") if target.is_file() else "# Results\n"
    write_text(target, replace_block(text, sweep.stem, block))
    missing = [o.label for o in outcomes if o.evaluation is None]
    print(f"{target}: table {sweep.stem!r}, {len(outcomes) - len(missing)}/{len(outcomes)} rows ran"
          + (f"; not run: {', '.join(missing)}" if missing else ""))
    return 0
