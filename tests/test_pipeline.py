"""End-to-end smoke of the DVC pipeline on the micro profile, in a throw-away copy of the project.

`dvc repro` runs every stage through the `derd` CLI (Prefect flows against the session's test
server, MLflow in the copy's store), with every registered Stage-II method and the SAT student,
recording what each stage reads so that dvc.yaml is checked against it; dry runs show what each kind of
change reruns; a Stage-II change reruns distill and what follows, never teachers or warm-up, and MLflow
shows which runs produced what. After the traced run, the project keeps one method and no SAT student
(`SMALL`): each further student is another stage process (~10 s), and what follows needs only one.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from dependencies import mismatches
from pipeline_profile import MICRO, write_params

from derd import config
from derd.artifacts import read_json
from derd.distill import registered_methods
from pipelines import tracking
from pipelines.stages import STAGES

PROJECT = Path(__file__).resolve().parent.parent
METHODS = MICRO["stage2"]["methods"]
SMALL = {"stage2.methods": ["derd"], "eval.sat_student": False}
pytestmark = [pytest.mark.slow, pytest.mark.prefect, pytest.mark.xdist_group("prefect")]


def _run(cmd: list[str], cwd: Path, env: dict[str, str]) -> str:
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    out = done.stdout + done.stderr
    assert done.returncode == 0, f"{' '.join(cmd)} failed ({done.returncode}):\n{out[-6000:]}"
    return out


@pytest.fixture(scope="module")
def project(tmp_path_factory, prefect_api) -> tuple[Path, dict[str, str]]:
    """A git + DVC copy of the project with the micro profile as params.yaml, and its environment."""
    root = tmp_path_factory.mktemp("project")
    for name in ("derd", "pipelines"):
        shutil.copytree(PROJECT / name, root / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("dvc.yaml", "pyproject.toml", ".gitignore"):
        shutil.copy(PROJECT / name, root / name)
    write_params(root / "params.yaml")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "PREFECT_API_URL": prefect_api, "OMP_NUM_THREADS": "1", "DVC_NO_ANALYTICS": "1"}
    for cmd in (["git", "init", "-q"], ["git", "config", "user.email", "ci@example.com"],
                ["git", "config", "user.name", "ci"], ["dvc", "init", "-q"], ["git", "add", "-A"],
                ["git", "commit", "-qm", "micro project"]):
        _run(cmd, root, env)
    return root, env


def _declared(root: Path) -> list[Path]:
    """Every out, metric and plot of every resolved stage (dvc.lock expands foreach/matrix)."""
    stages = yaml.safe_load((root / "dvc.lock").read_text())["stages"]
    return [root / out["path"] for stage in stages.values() for out in stage.get("outs", [])]


def _runs(root: Path):
    from mlflow.tracking import MlflowClient

    cfg = config.load(root / "params.yaml")
    client = MlflowClient(tracking.tracking_uri(cfg, root))
    experiment = client.get_experiment_by_name(tracking.experiment_name(cfg))
    assert experiment is not None, "no MLflow experiment for the dataset"
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    parents = [r for r in runs if r.data.tags.get("derd.kind") == "parent"]
    children = [r for r in runs if r.data.tags.get("derd.kind") == "stage"]
    return client, parents, children


def _stage_runs(children, stage: str):
    return [r for r in children if r.data.tags["derd.stage"] == stage]


def _ran(out: str) -> list[str]:
    return re.findall(r"Running stage '([^']+)'", out)


def test_the_traced_profile_runs_every_registered_method_and_the_sat_student():
    """A method missing from the micro profile would have its reads never compared with dvc.yaml."""
    assert sorted(METHODS) == sorted(registered_methods()), "tests/pipeline_profile.py: list every registered method"
    assert MICRO["eval"]["sat_student"], "the SAT student's reads are the evaluate stage's too"


def test_dvc_pipeline_end_to_end_and_stage2_rerun(project, tmp_path):
    root, env = project
    traces = tmp_path / "traces"
    traces.mkdir()
    out = _run(["dvc", "repro"], root, {**env, "DERD_TRACE_READS": str(traces)})
    assert "Report: " in out and "derd ui" in out, "the report stage must say where the report is"
    missing = [str(p.relative_to(root)) for p in _declared(root) if not p.exists()]
    assert not missing, f"declared outputs missing after dvc repro: {missing}"
    assert mismatches(root, traces) == {}, "dvc.yaml must declare exactly what each stage reads"
    stale = json.loads(_run(["dvc", "status", "--json"], root, env))
    assert set(stale) <= {"inputs"}, f"after dvc repro only the always-run inputs stage may differ: {stale}"
    (shown,) = json.loads(_run(["dvc", "metrics", "show", "--json"], root, env)).values()  # the workspace
    table = shown["data"]["metrics/eval.json"]["data"]["table"]
    assert set(table) == {"Nature", "SAT", "SAT student", *(f"{m}-seed0" for m in METHODS)}
    assert "AA" in table["derd-seed0"]
    plots = json.loads(_run(["dvc", "plots", "show", "--json"], root, env))
    assert not plots.get("errors") and any("distill" in name for name in plots["data"])

    client, parents, children = _runs(root)
    assert len(parents) == 1
    parent = parents[0]
    cfg = config.load(root / "params.yaml")
    assert parent.data.tags["derd.params_hash"] == tracking.config_hash(cfg)
    assert parent.data.params["stage2.lambda_rob"] == "0.5" and parent.data.params["stage2.iterations"] == "2"
    assert {"Nature/AA", "SAT/Ave", "derd-seed0/Clean", "dafl-seed0/PGD_S"} <= set(parent.data.metrics)
    units = {"warmup": cfg.stage1_units(), "distill": cfg.student_units()}
    expected = sorted(f"{s.name}.{u}" if u else s.name for s in STAGES for u in units.get(s.name, [None]))
    names = sorted(f"{r.data.tags['derd.stage']}.{r.data.tags['derd.unit']}".rstrip(".") for r in children)
    assert names == expected
    for child in children:
        key = f"{child.data.tags['derd.stage']}.{child.data.tags['derd.unit']}".rstrip(".")
        assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert child.data.tags["derd.autoattack"] and child.data.tags["version.torch"]
        assert parent.data.tags[f"derd.run.{key}"] == child.info.run_id
    distill = next(r for r in _stage_runs(children, "distill") if r.data.tags["derd.unit"] == "derd-seed0")
    assert distill.data.params["stage2.lambda_rob"] == "0.5"
    curve = client.get_metric_history(distill.info.run_id, "derd-seed0/L_rob")
    assert [m.step for m in curve] == [1, 2], "per-step Stage-II losses are logged with their iteration"
    evaluate = _stage_runs(children, "evaluate")[0]
    assert evaluate.data.metrics["derd-seed0/Ave"] == parent.data.metrics["derd-seed0/Ave"]
    artifacts = {a.path for a in client.list_artifacts(_stage_runs(children, "report")[0].info.run_id, "reports")}
    assert {"reports/report.html", "reports/report.md"} <= artifacts
    teachers_run = _stage_runs(children, "teachers")[0].info.run_id
    assert read_json(root / "artifacts/teachers/natural.json")["mlflow_run_id"] == teachers_run

    # Evaluate again (one more MLflow run, so after those checks) with the SAT student cached: it then reads only
    # its cache key, which must still be every declared key (a key that its training reads but the cache key lacks
    # would reuse a stale SAT student).
    cached, sat = tmp_path / "cached", root / "artifacts/reference/sat_student.pt"
    shutil.copytree(traces, cached)
    trained = sat.stat().st_mtime_ns
    _run(["dvc", "repro", "--force", "--single-item", "evaluate"], root, {**env, "DERD_TRACE_READS": str(cached)})
    assert sat.stat().st_mtime_ns == trained, "the SAT student was trained again, not read from its cache"
    assert mismatches(root, cached) == {}, "the SAT student's cache key must hold every key its training reads"

    # what reruns, per change (dry runs: nothing is trained)
    def dry(changes: dict) -> list[str]:
        write_params(root / "params.yaml", changes)
        return [s for s in _ran(_run(["dvc", "repro", "--dry"], root, env)) if s != "inputs"]

    assert dry({"stage2.seeds": [0, 1]}) == [*(f"distill@{m}-1" for m in METHODS), "evaluate", "report"], \
        "a new seed trains only its students"
    assert dry(SMALL) == ["evaluate", "report"], "dropping methods or the SAT student trains nothing"
    assert dry({"stage1.inversion.steps": 3}) == ["inversion", "report"], "a DERD_inv key never retrains a generator"
    assert dry({"eval.n_examples": 12}) == ["evaluate", "report"]
    assert dry({"data.root": "elsewhere", "data.download": True, "device": "auto"}) == ["report"], \
        "where the data lives and the device are not inputs of the numbers"

    # A Stage-II change: distill, evaluate and report rerun; teachers and warm-up come from the cache. Run as
    # `derd repro`: every stage command is forked from its warm process (pipelines/warm.py).
    write_params(root / "params.yaml", {**SMALL, "stage2.lambda_rob": 1.0})
    out = _run([sys.executable, "-m", "pipelines.cli", "repro"], root, env)
    assert out.count("forked from the warm process") == len(_ran(out)) >= 4, out[-3000:]
    assert "Stage 'teachers' didn't change, skipping" in out
    assert "Stage 'warmup@natural' didn't change, skipping" in out
    assert "Running stage 'distill@derd-0'" in out and "Running stage 'report'" in out
    client, parents, children = _runs(root)
    assert len(parents) == 2
    assert len(_stage_runs(children, "teachers")) == 1 and len(_stage_runs(children, "warmup")) == len(units["warmup"])
    assert len(_stage_runs(children, "distill")) == len(METHODS) + 1
    new_parent = next(p for p in parents if p.info.run_id != parent.info.run_id)
    assert new_parent.data.params["stage2.lambda_rob"] == "1.0"
    assert new_parent.data.tags["derd.run.teachers"] == teachers_run, "the cached teachers stay linked"
    assert read_json(root / "artifacts/teachers/natural.json")["mlflow_run_id"] == teachers_run


def test_experiment_in_a_temp_dir_reuses_stage1_and_logs_to_the_project_store(project):
    """`dvc exp run --temp` runs in .dvc/tmp/exps/...: the generator comes from the cache, and the
    MLflow runs land in the project's store, not in the temporary copy."""
    root, env = project
    if not (root / "dvc.lock").exists():
        pytest.skip("needs the pipeline of the previous test")
    _run(["git", "add", "dvc.lock", "params.yaml"], root, env)
    _run(["git", "commit", "-qm", "locked"], root, env)
    _, _, before = _runs(root)
    out = _run(["dvc", "exp", "run", "--temp", "-S", "stage2.lambda_rob=2"], root, env)
    assert not [s for s in _ran(out) if s.startswith(("warmup", "inversion", "teachers"))]
    assert "Running stage 'distill@derd-0'" in out
    _, parents, children = _runs(root)
    students = config.load(root / "params.yaml").student_units()  # every method declares stage2.lambda_rob
    assert len(_stage_runs(children, "distill")) == len(_stage_runs(before, "distill")) + len(students)
    assert any(float(p.data.params["stage2.lambda_rob"]) == 2.0 for p in parents)
    assert not list((root / ".dvc" / "tmp").rglob("mlflow.db")), "a run was logged inside the temp copy"


def test_two_queued_experiments_run_in_parallel_and_both_land_in_mlflow(project):
    """`dvc queue start -j 2`: both experiments finish, each logs its own parent run, neither overwrites
    the other's outputs (each runs in its own copy; flags and MLflow are shared, content-keyed)."""
    root, env = project
    if not (root / "dvc.lock").exists():
        pytest.skip("needs the pipeline of the first test")
    for value in (3, 4):
        _run(["dvc", "exp", "run", "--queue", "-n", f"par{value}", "-S", f"stage2.lambda_rob={value}"], root, env)
    # `dvc queue start` may stay attached to its workers until the queue drains: don't wait on it, poll the status
    starter = subprocess.Popen(["dvc", "queue", "start", "-j", "2"], cwd=root, env=env, stdin=subprocess.DEVNULL,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 1200
    while "Queued" in (status := _run(["dvc", "queue", "status"], root, env)) or "Running" in status:
        assert time.monotonic() < deadline, status
        time.sleep(5)
    assert status.count("Success") >= 2 and "Failed" not in status, status
    assert starter.wait(timeout=120) == 0
    shown = json.loads(_run(["dvc", "exp", "show", "--json"], root, env))
    tables = {e["name"]: e["revs"][0]["data"]["metrics"]["metrics/eval.json"]["data"]["table"]
              for b in shown for e in (b.get("experiments") or []) if e.get("name") in ("par3", "par4")}
    assert set(tables) == {"par3", "par4"} and all("derd-seed0" in t for t in tables.values())
    _, parents, _ = _runs(root)
    assert {3.0, 4.0} <= {float(p.data.params["stage2.lambda_rob"]) for p in parents}
