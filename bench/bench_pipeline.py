"""Wall time of each pipeline stage and its fixed overhead (imports, Prefect, MLflow).

Copies the project into a temporary git + DVC repository, runs ``derd <stage>`` for every stage as
DVC would (one process each) and prints, per stage, the wall time, the stage's own time (the run
record's ``seconds``: the library call) and the difference, i.e. the fixed cost of starting Python
and torch, Prefect (temporary server, or a running one with ``--prefect-server``) and MLflow logging.
Then it changes one Stage-II key and times ``dvc repro`` (the Stage-II-only rerun) and a no-op
``dvc repro``.

    python -m bench.bench_pipeline                   # params.yaml of the project, temporary servers
    python -m bench.bench_pipeline --params my.yaml --prefect-server
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

from bench.timing import once

PROJECT = Path(__file__).resolve().parent.parent
STAGES = ("teachers", "warmup", "distill", "evaluate", "report")


def sh(cmd: list[str], cwd: Path, env: dict[str, str]) -> float:
    done, seconds = once(lambda: subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True,
                                                check=False))
    if done.returncode:
        sys.exit(f"{' '.join(cmd)} failed:\n{(done.stdout + done.stderr)[-4000:]}")
    return seconds


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default=str(PROJECT / "params.yaml"))
    ap.add_argument("--prefect-server", action="store_true", help="start `prefect server` once for all stages")
    ap.add_argument("--change", default="stage2.lambda_rob=1.0", help="the Stage-II change of the rerun")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="derd-bench-"))
    for name in ("derd", "pipelines"):
        shutil.copytree(PROJECT / name, work / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("dvc.yaml", "pyproject.toml", ".gitignore"):
        shutil.copy(PROJECT / name, work / name)
    shutil.copy(args.params, work / "params.yaml")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "PYTHONPATH": str(work), "DVC_NO_ANALYTICS": "1"}
    for cmd in (["git", "init", "-q"], ["git", "config", "user.email", "bench@example.com"],
                ["git", "config", "user.name", "bench"], ["dvc", "init", "-q"], ["git", "add", "-A"],
                ["git", "commit", "-qm", "bench"]):
        sh(cmd, work, env)
    server = None
    if args.prefect_server:
        port = free_port()
        env["PREFECT_HOME"] = str(work / ".prefect")
        server = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                                   "--port", str(port)], cwd=work, env=env, start_new_session=True,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        env["PREFECT_API_URL"] = f"http://127.0.0.1:{port}/api"
        wait = ("import time, urllib.request as u\nfor _ in range(240):\n try:\n"
                f"  u.urlopen('http://127.0.0.1:{port}/api/health'); break\n except Exception: time.sleep(0.5)")
        started = sh([sys.executable, "-c", wait], work, env)
        print(f"prefect server start: {started:.1f}s")
    try:
        print(f"{'stage':10s} {'wall s':>8s} {'stage s':>8s} {'overhead s':>10s}")
        total = 0.0
        for stage in STAGES:
            wall = sh(["derd", stage], work, env)
            inner = json.loads((work / "artifacts" / "runs" / f"{stage}.json").read_text())["seconds"]
            total += wall
            print(f"{stage:10s} {wall:8.1f} {inner:8.1f} {wall - inner:10.1f}")
        print(f"{'total':10s} {total:8.1f}")
        sh(["dvc", "commit", "-f", "-q"], work, env)  # record the stages run above in dvc.lock
        print(f"dvc repro, nothing changed: {sh(['dvc', 'repro'], work, env):.1f}s")
        key, value = args.change.split("=", 1)
        params = yaml.safe_load((work / "params.yaml").read_text())
        node = params
        *parents, leaf = key.split(".")
        for part in parents:
            node = node[part]
        node[leaf] = yaml.safe_load(value)
        (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        print(f"dvc repro after {args.change} (Stage-II rerun): {sh(['dvc', 'repro'], work, env):.1f}s")
    finally:
        if server is not None:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(timeout=30)
        print(f"(work dir kept: {work})")


if __name__ == "__main__":
    main()
