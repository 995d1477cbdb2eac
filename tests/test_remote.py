"""Shared caches across machines: clone A runs the pipeline up to Stage-I and pushes its outputs and run-cache to
a DVC remote (a local folder standing in for S3/SSH); clone B — the same commit, no dvc.lock, an empty cache —
runs `dvc repro --pull`, which restores the teachers and the Stage-I generator instead of training them."""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.pipeline_profile import write_params

PROJECT = Path(__file__).resolve().parent.parent
pytestmark = [pytest.mark.slow, pytest.mark.prefect, pytest.mark.xdist_group("prefect")]
TARGETS = ["warmup"]  # inputs -> teachers -> warmup@natural (the micro profile warms one generator)
RESTORED = ("teachers", "warmup@natural")


def _run(cmd: list[str], cwd: Path, env: dict[str, str]) -> str:
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    out = done.stdout + done.stderr
    assert done.returncode == 0, f"{' '.join(cmd)} failed ({done.returncode}):\n{out[-4000:]}"
    return out


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def test_a_second_clone_restores_teachers_and_stage1_from_the_remote(tmp_path, prefect_api):
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "PREFECT_API_URL": prefect_api, "OMP_NUM_THREADS": "1", "DVC_NO_ANALYTICS": "1"}
    a, b, remote = tmp_path / "a", tmp_path / "b", tmp_path / "remote"
    a.mkdir()
    for name in ("derd", "pipelines"):
        shutil.copytree(PROJECT / name, a / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("dvc.yaml", "pyproject.toml", ".gitignore"):
        shutil.copy(PROJECT / name, a / name)
    write_params(a / "params.yaml", {"tracking.enabled": False})
    for cmd in (["git", "init", "-q"], ["git", "config", "user.email", "ci@example.com"],
                ["git", "config", "user.name", "ci"], ["dvc", "init", "-q"],
                ["dvc", "remote", "add", "-d", "shared", str(remote)], ["git", "add", "-A"],
                ["git", "commit", "-qm", "micro project"]):
        _run(cmd, a, env)

    ran = _run(["dvc", "repro", *TARGETS], a, env)
    assert set(RESTORED) <= set(re.findall(r"Running stage '([^']+)'", ran))
    _run(["dvc", "push", "--run-cache"], a, env)

    _run(["git", "clone", "-q", str(a), str(b)], tmp_path, env)  # the commit without A's dvc.lock
    assert not (b / "dvc.lock").exists() and not (b / "artifacts").exists()
    # no dvc.lock to check out from: each stage's run-cache entry (command, deps, params) names its outputs,
    # which --pull downloads from the remote (`dvc pull --run-cache` alone cannot check out lock-less stages)
    out = _run(["dvc", "repro", "--pull", *TARGETS], b, env)
    for stage in RESTORED:
        assert f"Running stage '{stage}'" not in out, f"clone B recomputed {stage}:\n{out[-3000:]}"
        assert f"Stage '{stage}' is cached - skipping run, checking out outputs" in out, out[-3000:]
    assert "teacher[" not in out and "stage1[" not in out  # no training progress lines
    for rel in ("artifacts/teachers/natural.pt", "artifacts/teachers/robust.pt", "artifacts/stage1/generator_natural.pt"):
        assert _md5(b / rel) == _md5(a / rel), rel
