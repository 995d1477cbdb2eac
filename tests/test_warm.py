"""pipelines.warm: a stage command handed to the warm process runs in a fork of it, with the command's arguments,
working directory, environment and standard streams, and ends with the child's exit status; signals reach the
child; where there is no warm process the command says so and runs itself. `derd repro` starts one and stops it."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipelines import prefect_server, warm

ROOT = Path(__file__).resolve().parent.parent
PROBE = ("warm_probe",)


@pytest.fixture
def env(monkeypatch):
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), str(ROOT / "tests")]))
    monkeypatch.delenv(warm.SOCKET_ENV, raising=False)
    return dict(os.environ)


def stage(path: str | None, tmp_path: Path, *argv: str, **extra: str) -> subprocess.CompletedProcess:
    """`derd report ARGV` as DVC runs it, with the warm process's socket in its environment."""
    env = {**os.environ, "WARM_OUT": str(tmp_path / "seen.json"), **extra}
    if path:
        env[warm.SOCKET_ENV] = path
    return subprocess.run([sys.executable, "-m", "pipelines.cli", "report", *argv], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120, check=False)


def test_a_stage_command_runs_in_a_fork_of_the_warm_process(env, tmp_path):
    with warm.process(env, PROBE) as path:
        command = subprocess.Popen([sys.executable, "-m", "pipelines.cli", "report", "--params", "p.yaml"], cwd=tmp_path,
                                   env={**env, warm.SOCKET_ENV: path, "WARM_OUT": str(tmp_path / "seen.json"),
                                        "WARM_CODE": "3"}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        out, err = command.communicate(timeout=120)
    assert command.returncode == 3, err
    assert "probe ran" in out and "probe stderr" in err  # the command's own streams
    seen = json.loads((tmp_path / "seen.json").read_text())
    assert seen["preloaded"]  # the warm process's imports, not a fresh interpreter's
    assert seen["argv"] == ["report", "--params", "p.yaml"] and seen["cwd"] == str(tmp_path)
    assert seen["socket"] is None  # the child runs the command itself, it does not forward it again
    assert command.pid not in (seen["pid"], seen["ppid"])  # neither the command nor a child of it


def test_sigterm_to_the_stage_command_reaches_the_child(env, tmp_path):
    with warm.process(env, PROBE) as path:
        command = subprocess.Popen([sys.executable, "-m", "pipelines.cli", "report", "--params", "sleep"], cwd=tmp_path,
                                   env={**env, warm.SOCKET_ENV: path}, stdout=subprocess.PIPE, text=True)
        assert command.stdout.readline() == "sleeping\n"  # the child runs
        start = time.monotonic()
        command.send_signal(signal.SIGTERM)
        assert command.wait(timeout=30) == -signal.SIGTERM  # the child died of it, and the command the same way
        assert time.monotonic() - start < 10


def test_the_cli_reads_the_warm_socket_under_its_name():
    assert f'os.environ.get("{warm.SOCKET_ENV}")' in (ROOT / "pipelines" / "cli.py").read_text()


def test_without_a_warm_process_the_command_says_so_and_runs_itself(env, tmp_path, capsys):
    (tmp_path / "starting").mkdir()
    assert warm.forward(["report"], str(tmp_path / "starting" / "socket"), timeout=0.3) is None
    assert "no warm process answered" in capsys.readouterr().err
    done = stage(str(tmp_path / "gone" / "socket"), tmp_path, "--params", "missing.yaml")
    assert "no warm process at" in done.stderr
    assert done.returncode == 2 and "missing.yaml: no such params file" in done.stderr  # the real command, cold


def test_a_warm_process_that_cannot_import_is_named_and_the_stage_runs_cold(env, tmp_path):
    with warm.process(env, ("no_such_module_here",)) as path:
        done = stage(path, tmp_path, "--params", "missing.yaml")
    assert "the warm process could not start (ModuleNotFoundError" in done.stderr
    assert done.returncode == 2 and "missing.yaml: no such params file" in done.stderr


def test_derd_repro_hands_the_stages_a_warm_process_and_stops_it(env, tmp_path, monkeypatch):
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:9/api")  # a server of the user's: none started
    record, socket_file = tmp_path / "seen.json", tmp_path / "socket.txt"
    child = ("import os, sys; from pipelines import warm; path = os.environ[warm.SOCKET_ENV]; "
             "open(sys.argv[2], 'w').write(path); os.environ['WARM_OUT'] = sys.argv[1]; "
             "sys.exit(warm.forward(['report'], path))")
    assert prefect_server.repro([str(record), str(socket_file)], run=[sys.executable, "-c", child], preload=PROBE) == 0
    seen = json.loads(record.read_text())
    assert seen["preloaded"] and seen["argv"] == ["report"]
    assert not Path(socket_file.read_text()).parent.exists()  # stopped, its folder removed
    monkeypatch.setenv(warm.SWITCH_ENV, "0")
    off = f"import os, sys; sys.exit(int({warm.SOCKET_ENV!r} in os.environ))"
    assert prefect_server.repro([], run=[sys.executable, "-c", off], preload=PROBE) == 0  # DERD_WARM=0: none
