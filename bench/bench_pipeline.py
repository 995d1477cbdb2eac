"""The default `dvc repro` as a user runs it: per-stage fixed cost vs compute, one Prefect server vs a
temporary one per stage, and what a rerun and a sweep point cost. Measured in a fresh ``git clone``
of the project's HEAD in a temporary folder (never in the project's own DVC state).

Phases (``--phases``, in this order; each appends to the JSON as it finishes, so a long run keeps
what it measured):

- ``full``     the reference workload (the README's budget unit), ``derd repro`` from scratch, the
               reference workload again (the unit is their mean: neighbours on a shared host moved it
               from 7.5 s to 9.0 s across one run, and to 15.1 s in ``python -m bench`` an hour later):
               per stage its wall time (from DVC's "Running stage" lines to the next) and its in-stage
               time (the run record's ``seconds``: the library call); fixed cost = the difference
               (process start, imports, Prefect, MLflow, DVC's hashing and caching).
- ``imports``  the floor under a stage's fixed cost: a bare interpreter and the imports every Prefect stage
               pays (torch, Prefect, MLflow with its SQL store, the flows module), each in fresh processes.
- ``noop``     ``dvc repro`` again with nothing changed.
- ``sweep``    ``dvc exp run --temp -S <--sweep>`` (default: one more method row) under one server:
               which stages ran, which were skipped or restored from the run-cache, at what cost.
- ``rerun``    ``derd repro`` after ``<--rerun>`` (default: a Stage-II weight): the Stage-II-only rerun.
- ``overhead`` the report stage's fixed cost with a temporary server, the shared one, and the shared one
               plus the warm process (``pipelines.warm``), interleaved (before/after of ``derd repro``).

    python -m bench.bench_pipeline                         # all phases, writes bench/pipeline.json
    python -m bench.bench_pipeline --phases overhead --work /tmp/derd-pipeline-xxxx
"""
# ruff: noqa: ISC004  (the report's paragraphs are implicitly concatenated strings in lists, on purpose)
from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.timing import machine, reference_workload

PROJECT = Path(__file__).resolve().parent.parent
PHASES = ("full", "imports", "noop", "sweep", "rerun", "overhead", "aa")
RUNNING = re.compile(r"Running stage '([^']+)'")
COMMAND = re.compile(r"^> .*pipelines\.cli (\w+)(?: --only (\S+))?")
SKIPPED = re.compile(r"Stage '([^']+)' (?:didn't change, skipping|is cached - skipping run)")
SHARED_SERVER = "import sys; from pipelines import prefect_server; sys.exit(prefect_server.repro(sys.argv[2:], run=sys.argv[1].split()))"


def environment() -> dict[str, str]:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "DVC_NO_ANALYTICS": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1"}
    for key in ("PREFECT_API_URL", "PYTHONPATH", "OMP_NUM_THREADS"):  # as a user runs it
        env.pop(key, None)
    return env


def record(work: Path, stage: str, unit: str | None) -> float | None:
    """The in-stage seconds of a stage's run record (None for a stage that writes none: inputs)."""
    path = work / "artifacts" / "runs" / (f"{stage}-{unit}.json" if unit else f"{stage}.json")
    return json.loads(path.read_text())["seconds"] if path.exists() else None


def run_logged(cmd: list[str], work: Path, env: dict[str, str], records: bool = True) -> dict[str, Any]:
    """Run ``cmd``, timestamping DVC's stage lines: per stage that ran, wall and in-stage seconds; the
    stages skipped or restored from the run-cache; the shared server's start time when one started.
    ``records=False`` (a ``dvc exp run --temp``: the stages run in a copy, their run records stay there):
    wall times only."""
    start = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    marks: list[tuple[str, float]] = []
    commands: dict[str, tuple[str, str | None]] = {}
    skipped, server_s, tail = [], None, []
    for line in proc.stdout:
        now = time.monotonic() - start
        tail = (tail + [line.rstrip()])[-40:]
        if m := RUNNING.search(line):
            marks.append((m.group(1), now))
        elif (m := COMMAND.match(line.strip())) and marks:
            commands[marks[-1][0]] = (m.group(1), m.group(2))
        elif m := SKIPPED.search(line):
            skipped.append(m.group(1))
        elif "derd repro: Prefect server" in line and (m := re.search(r"started in ([\d.]+) s", line)):
            server_s = float(m.group(1))
    status = proc.wait()
    total = time.monotonic() - start
    if status:
        sys.exit(f"{' '.join(cmd)} failed ({status}):\n" + "\n".join(tail))
    stages = []
    for i, (name, t0) in enumerate(marks):
        wall = (marks[i + 1][1] if i + 1 < len(marks) else total) - t0
        inner = record(work, *commands[name]) if records and name in commands else None
        stages.append({"stage": name, "wall_s": wall, "in_stage_s": inner,
                       "fixed_s": wall - (inner or 0.0) if records else None})
    before_first = marks[0][1] if marks else total
    return {"command": " ".join(cmd), "total_s": total, "before_first_stage_s": before_first,
            "server_start_s": server_s, "stages": stages, "skipped": skipped}


def shared(cmd: str, *args: str) -> list[str]:
    """``cmd args`` under one Prefect server (``pipelines.prefect_server.repro``)."""
    return [sys.executable, "-c", SHARED_SERVER, cmd, *args]


def committed_params(path: str) -> str:
    """``path`` relative to the project, refusing a file HEAD does not hold: the fresh clone would lack it, and
    numbers measured on it could not be regenerated."""
    full = Path(path).resolve()
    rel = full.relative_to(PROJECT) if full.is_relative_to(PROJECT) else None
    if rel is None or subprocess.run(["git", "cat-file", "-e", f"HEAD:{rel}"], cwd=PROJECT,
                                     capture_output=True, check=False).returncode != 0:
        raise SystemExit(f"--params {path}: not a file committed in {PROJECT}; commit it first, so that the "
                         "numbers measured on it can be regenerated")
    return str(rel)


def set_param(work: Path, assignment: str) -> None:
    """``key.path=yaml-value`` written into the clone's params.yaml (then committed there), as DVC reads it: a
    round trip through ruamel.yaml (YAML 1.2, DVC's own parser) keeps every other value and comment as it was
    (PyYAML's YAML 1.1 would rewrite ``amp: off`` as ``false``, a change DVC reruns the teachers for)."""
    from ruamel.yaml import YAML

    key, value = assignment.split("=", 1)
    yaml = YAML()
    params = yaml.load((work / "params.yaml").read_text())
    *parents, leaf = key.split(".")
    node = params
    for part in parents:
        node = node[part]
    new = yaml.load(value)
    if node.get(leaf) == new:
        sys.exit(f"--rerun {assignment}: params.yaml has that value already, so nothing would rerun")
    node[leaf] = new
    with (work / "params.yaml").open("w") as f:
        yaml.dump(params, f)


MODES = ("temporary", "shared", "shared + warm")


def fixed_cost_modes(work: Path, env: dict[str, str], reps: int) -> dict[str, Any]:
    """The report stage's fixed cost (wall - in-stage) with a temporary Prefect server, with a shared one, and
    with a shared one and the warm process (``pipelines.warm``), interleaved (the shared server and the warm
    process are started once, outside the timing)."""
    from pipelines import warm
    from pipelines.cli import prefect_defaults
    from pipelines.prefect_server import server

    cmd = [sys.executable, "-m", "pipelines.cli", "report"]
    out: dict[str, list[float]] = {mode: [] for mode in MODES}
    env = {**env, "PREFECT_HOME": str(work / ".prefect")}
    with server(env=env) as url:  # the warm process imports Prefect with the settings the stages get
        stages_env = {**prefect_defaults(work), **env, "PREFECT_API_URL": url}
        with warm.process(stages_env, cwd=work) as socket_path:
            extra = {"temporary": {}, "shared": {"PREFECT_API_URL": url},
                     "shared + warm": {"PREFECT_API_URL": url, warm.SOCKET_ENV: socket_path}}
            for _ in range(reps):
                for mode in MODES:
                    start = time.monotonic()
                    subprocess.run(cmd, cwd=work, env={**env, **extra[mode]}, check=True, capture_output=True)
                    out[mode].append(time.monotonic() - start - record(work, "report", None))
    return {"stage": "report", "reps": reps, "fixed_s": out,
            "median_s": {k: statistics.median(v) for k, v in out.items()}}


def aa_versions(work: Path, reps: int) -> dict[str, Any]:
    """Seconds and robust accuracy of the evaluate stage's AutoAttack on each of the clone's models (its
    ``eval`` settings and examples), as ``custom`` with ``standard-apgd``'s two attacks and as
    ``standard-apgd``, interleaved ``reps`` times (the medians)."""
    from derd import config, data
    from derd.evaluation.autoattack import AutoAttack
    from derd.evaluation.evaluate import models_to_evaluate
    from derd.runtime import resolve_device

    with contextlib.chdir(work):  # data.root as the clone's stages read it
        cfg = config.load("params.yaml")
        ev, splits = cfg.eval, data.load(cfg.data)
    x, y = data.stratified_n(getattr(splits, ev.split), ev.n_examples)
    versions = {"custom": ("custom", ["apgd-ce", "apgd-t"]), "standard-apgd": ("standard-apgd", None)}
    rows = {}
    for item in models_to_evaluate(cfg, work, splits, resolve_device(cfg.device)):
        times: dict[str, list[float]] = {v: [] for v in versions}
        accuracy = {}
        for _ in range(reps):
            for name, (version, attacks) in versions.items():
                start = time.monotonic()
                result = AutoAttack(item.model, ev.eps, version, attacks, cfg.seed, ev.autoattack.batch_size).run(x, y)
                times[name].append(time.monotonic() - start)
                accuracy[name] = result.accuracy
        rows[item.name] = {"seconds": {v: statistics.median(t) for v, t in times.items()}, "accuracy": accuracy}
    return {"n": len(x), "eps": ev.eps, "reps": reps, "rows": rows}


def fixed_total(run: dict[str, Any]) -> float:
    """A run's fixed cost: every stage's (wall - in-stage) plus what came before the first stage (the
    shared server's start, DVC reading the pipeline)."""
    return run["before_first_stage_s"] + sum(st["fixed_s"] for st in run["stages"])


IMPORTS = {"python": "pass", "torch": "import torch", "prefect": "import prefect",
           "mlflow + SQL store": "import mlflow.store.tracking.sqlalchemy_store",
           "pipelines.flows (torch, Prefect, derd)": "import pipelines.flows"}


def import_floor(work: Path, env: dict[str, str], reps: int = 3) -> dict[str, float]:
    """Median seconds of ``python -c <import>`` in fresh processes, run in the clone, interleaved."""
    times: dict[str, list[float]] = {name: [] for name in IMPORTS}
    for _ in range(reps):
        for name, code in IMPORTS.items():
            start = time.monotonic()
            subprocess.run([sys.executable, "-c", code], cwd=work, env=env, check=True)
            times[name].append(time.monotonic() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


def _stage_table(run: dict[str, Any]) -> list[str]:
    lines = ["| stage | wall s | in-stage s | fixed s | fixed share of the stage |", "|---|---|---|---|---|"]
    for st in run["stages"]:
        inner = "—" if st["in_stage_s"] is None else f"{st['in_stage_s']:.1f}"
        fixed = "— | —" if st["fixed_s"] is None else f"{st['fixed_s']:.1f} | {100 * st['fixed_s'] / st['wall_s']:.0f}%"
        lines.append(f"| {st['stage']} | {st['wall_s']:.1f} | {inner} | {fixed} |")
    return lines


def render(P: dict[str, Any]) -> list[str]:
    """The results.md section for a bench/pipeline.json (its own run: say when and on what)."""
    setup = P.get("setup", {})
    params = setup.get("params", "params.yaml (the offline default)")
    L = [f"## Pipeline overhead and incremental cost: {params}", "",
         f"Measured by `python -m bench.bench_pipeline{'' if params.startswith('params.yaml') else ' --params ' + params}` "
         f"in a fresh clone of commit {setup.get('commit', '?')} "
         f"({setup.get('date', '?')}; a separate run from the sections above, minutes to hours long, on the same "
         f"machine; load average at its start {setup.get('machine', {}).get('loadavg_at_start', '?')}). Stage wall "
         "time: from DVC's `Running stage` line to the next; in-stage: the run record's `seconds` (the library "
         "call); fixed = wall − in-stage (process start, imports, Prefect, MLflow, DVC hashing/caching). `inputs` "
         "writes no run record: all of it counts as fixed.", ""]
    if "full" not in P:
        return L + ["**Not measured**: the full phase did not finish (stopped: on this loaded machine the default run "
                    "takes hours). Run `python -m bench.bench_pipeline --phases full,noop,sweep` on a quieter machine, "
                    "then `python -m bench --render-only`.", ""]
    full = P["full"]
    fixed, total = fixed_total(full), full["total_s"]
    units = [r["seconds"] * 1000 / r["matmuls"] for r in (P["reference_workload"], P.get("reference_workload_after"))
             if r]
    unit = statistics.mean(units)
    measured = ("measured just before it" if len(units) == 1 else
                f"the mean of {units[0]:.1f} s just before it and {units[1]:.1f} s just after it")
    prefect_stages = sum(st["in_stage_s"] is not None for st in full["stages"])
    default = params.startswith("params.yaml")

    def goal(text: str, ok: bool) -> str:  # the goals are the default profile's
        return f"; {text}: {'met' if ok else 'NOT met'}" if default else ""
    L += [f"`derd repro` from scratch (one Prefect server, up in {full['server_start_s'] or 0:.1f} s; DVC starts while "
          "it comes up, so a wait for it counts in the first Prefect stage's fixed cost): "
          f"**{total:.0f} s** = {total / unit:.1f}× the budget unit ({unit:.1f} s, {measured}: 1,000 "
          f"fp32 1024² matmuls on 2 threads{goal('goal ≤ 40×', total / unit <= 40)}). "
          f"Fixed cost {fixed:.0f} s ({fixed / unit:.2f} budget units) = **{100 * fixed / total:.1f}%** of the run"
          f"{goal('goal ≤ 10%', fixed / total <= 0.10)}, {fixed - full['before_first_stage_s']:.0f} s of it in "
          f"the stages and {full['before_first_stage_s']:.0f} s before the first one."
          + ("" if default else " This profile has almost no compute: its run shows the fixed costs alone (the "
             "goals are the default profile's)."), "", *_stage_table(full), ""]
    if "imports" in P:
        im, stage_fixed = P["imports"], [st["fixed_s"] for st in full["stages"] if st["in_stage_s"] is not None]
        L += ["Where a stage's fixed cost goes: fresh `python -c` processes in the clone, median of 3: "
              + ", ".join(f"{name} {s:.1f} s" for name, s in im.items())
              + f". The Prefect stages' fixed cost: median {statistics.median(stage_fixed):.1f} s.", ""]
    if "overhead" in P:
        ov, reps = P["overhead"]["median_s"], P["overhead"]["reps"]
        if "shared + warm" in ov:  # the run above had the warm process: the before is a run without it
            stage_commands = len(full["stages"])  # inputs too: every stage command is forked warm
            saved = stage_commands * (ov["shared"] - ov["shared + warm"])
            before, before_total = fixed + saved, total + saved
            L += [f"Before/after the warm process (`pipelines.warm`): the report stage's fixed cost, {reps} interleaved "
                  f"runs each, median: temporary server per command {ov['temporary']:.1f} s, shared server "
                  f"{ov['shared']:.1f} s, shared server + warm process **{ov['shared + warm']:.1f} s** "
                  f"(×{ov['shared'] / ov['shared + warm']:.2f} over the shared server alone, "
                  f"×{ov['temporary'] / ov['shared + warm']:.2f} over a temporary server). Over the {stage_commands} stage "
                  f"commands of the run that is {saved:.0f} s: fixed cost {before:.0f} s before vs {fixed:.0f} s after "
                  f"(**×{before / fixed:.2f}**), {100 * before / before_total:.1f}% vs {100 * fixed / total:.1f}% of the "
                  "run (before: this run's stages plus the measured difference per stage; the warm process starts "
                  "while the server does).", ""]
        else:
            delta = ov["temporary"] - ov["shared"]
            before = fixed - (full["server_start_s"] or 0) + prefect_stages * delta
            before_total = total - fixed + before
            L += [f"Before/after one server: the report stage's fixed cost, {reps} interleaved runs each, "
                  f"median: temporary server per command {ov['temporary']:.1f} s, shared server {ov['shared']:.1f} s "
                  f"(×{ov['temporary'] / ov['shared']:.2f}). Over the {prefect_stages} Prefect stages of the run that is "
                  f"{prefect_stages * delta:.0f} s saved for one {full['server_start_s'] or 0:.0f} s server start: fixed "
                  f"cost {before:.0f} s before vs {fixed:.0f} s after (**×{before / fixed:.2f}**), "
                  f"{100 * before / before_total:.1f}% vs {100 * fixed / total:.1f}% of the run (before: projected from "
                  "this run's stages plus the measured difference per stage).", ""]
    if "aa" in P:
        A = P["aa"]
        cells = [f"{name} {r['seconds']['custom']:.1f} s → {r['seconds']['standard-apgd']:.1f} s "
                 f"(×{r['seconds']['custom'] / r['seconds']['standard-apgd']:.1f}; robust accuracy "
                 f"{100 * r['accuracy']['custom']:.0f} % → {100 * r['accuracy']['standard-apgd']:.0f} %)"
                 for name, r in A["rows"].items()]
        L += [f"Before/after the default's AutoAttack (`eval.autoattack.version` custom with APGD-CE + APGD-T, whose "
              f"official defaults run APGD-CE with 5 restarts → `standard-apgd`, the standard version's settings), on the "
              f"run's models, first {A['n']} examples, ε {A['eps']:g}, {A['reps']} interleaved runs each, median: "
              + "; ".join(cells) + ".", ""]
    if "noop" in P:
        L += [f"`dvc repro` with nothing changed: {P['noop']['total_s']:.1f} s "
              f"({', '.join(st['stage'] for st in P['noop']['stages']) or 'no stage'} ran).", ""]
    for key, title in (("rerun", "Stage-II-only rerun (`derd repro` after `{}`)"),
                       ("sweep", "Sweep point (`dvc exp run --temp -S '{}'`, one server)")):
        if key not in P:
            continue
        r = P[key]
        ran = {st["stage"].split("@")[0] for st in r["stages"]}
        free = [name for name in ("teachers", "warmup", "inversion") if name not in ran]
        L += [f"{title.format(r['set'])}: **{r['total_s']:.0f} s = {100 * r['total_s'] / total:.0f}% of the full run**; "
              f"ran: {', '.join(st['stage'] for st in r['stages'])}; skipped or restored from the run-cache: "
              f"{', '.join(r['skipped']) or 'none'}. Teachers and Stage-I: "
              + ("0 s (not run)." if len(free) == 3 else f"RAN ({', '.join(sorted(ran & {'teachers', 'warmup', 'inversion'}))})."),
              "", *_stage_table(r),
              *(["", "(The experiment's stages run in DVC's temporary copy and keep their run records there: "
                 "wall times only.)"] if all(st["fixed_s"] is None for st in r["stages"]) else []), ""]
    return L


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--phases", default=",".join(PHASES), help=f"comma-separated subset of {','.join(PHASES)}")
    ap.add_argument("--work", help="an existing clone from an earlier run (default: a fresh clone)")
    ap.add_argument("--params", help="a params file committed in the project (e.g. presets/digits.yaml), copied "
                                     "over the clone's params.yaml first (default: params.yaml, the offline default)")
    ap.add_argument("--sweep", default="stage2.methods=[derd,dafl]",
                    help="the -S of the dvc exp run --temp sweep point")
    ap.add_argument("--rerun", default="stage2.lambda_rob=0.5", help="the Stage-II change of the rerun")
    ap.add_argument("--reps", type=int, default=3, help="interleaved repeats of the overhead phase")
    ap.add_argument("--out", default=str(PROJECT / "bench" / "pipeline.json"))
    a = ap.parse_args()
    phases = [p for p in PHASES if p in a.phases.split(",")]
    env = environment()
    git = ["git", "-c", "user.name=bench", "-c", "user.email=bench@example.com"]
    out = Path(a.out)
    params = committed_params(a.params) if a.params else None
    R: dict[str, Any] = json.loads(out.read_text()) if a.work and out.exists() else {}

    def save(name: str, value: Any) -> None:
        R[name] = value
        out.write_text(json.dumps(R, indent=1) + "\n", encoding="utf-8")
        print(f"[bench_pipeline] {name}: done", flush=True)

    if a.work:
        work = Path(a.work)
    else:
        work = Path(tempfile.mkdtemp(prefix="derd-pipeline-")) / "derd"
        subprocess.run(["git", "clone", "-q", str(PROJECT), str(work)], check=True)
        if params:
            (work / "params.yaml").write_text((work / params).read_text(encoding="utf-8"), encoding="utf-8")
            subprocess.run([*git, "commit", "-qam", f"bench: params from {params}"], cwd=work, check=True)
        save("setup", {"work": str(work), "commit": subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=work, capture_output=True, text=True, check=True).stdout.strip(),
            "machine": machine(threads_used=0), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "params": params or "params.yaml (the offline default)"})
    if "full" in phases:
        ref = reference_workload(count=1000, n=1024, n_threads=2)
        save("reference_workload", ref)
        save("full", run_logged([sys.executable, "-m", "pipelines.cli", "repro"], work, env))
        save("reference_workload_after", reference_workload(count=1000, n=1024, n_threads=2))
    if "imports" in phases:
        save("imports", import_floor(work, env))
    if "noop" in phases:
        save("noop", run_logged(["dvc", "repro"], work, env))
    if "sweep" in phases:
        save("sweep", {"set": a.sweep, **run_logged(shared("dvc exp run", "--temp", "-S", a.sweep), work, env,
                                                    records=False)})
    if "rerun" in phases:
        set_param(work, a.rerun)
        subprocess.run([*git, "commit", "-qam", f"bench: {a.rerun}"], cwd=work, check=True)
        status = subprocess.run(["dvc", "status", "--json"], cwd=work, env=env, capture_output=True, text=True,
                                check=False)
        save("rerun", {"set": a.rerun, "dvc_status_before": json.loads(status.stdout or "{}"),  # why each stage reruns
                       **run_logged([sys.executable, "-m", "pipelines.cli", "repro"], work, env)})
    if "overhead" in phases:
        save("overhead", fixed_cost_modes(work, env, a.reps))
    if "aa" in phases:
        save("aa", aa_versions(work, reps=2))
    print(f"wrote {out} (work dir kept: {work})")


if __name__ == "__main__":
    main()
