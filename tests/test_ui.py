"""`derd ui`: MLflow on the project's store, Prefect on the project's flow runs; every way of stopping it (Ctrl-C,
SIGTERM, SIGHUP) stops the UI's whole process group, so nothing is left serving its port."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from pipeline_profile import write_params

from derd import config
from pipelines import prefect_server, tracking, ui

REPO = Path(__file__).resolve().parent.parent

# A stand-in UI: serves HTTP on its port and starts a worker process (in its group, like uvicorn's), recording
# both pids; it never exits on its own.
FAKE_UI = """
import http.server, subprocess, sys
worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
with open(sys.argv[2], "w") as f:
    f.write(f"{worker.pid}\\n")
http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), http.server.BaseHTTPRequestHandler).serve_forever()
"""


def listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def alive(pid: int) -> bool:
    """The process exists and is not a zombie waiting to be reaped."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def descendants(pid: int) -> set[int]:
    """Every live process below ``pid`` (Linux /proc)."""
    out: set[int] = set()
    for task in Path(f"/proc/{pid}/task").glob("*"):
        for child in (task / "children").read_text().split():
            out |= {int(child)} | descendants(int(child))
    return out


def wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out after {timeout:g} s waiting for {what}"
        time.sleep(0.1)


def stop_and_check(process: subprocess.Popen, sig: int, port: int, children: set[int]) -> None:
    """Send ``sig`` to the `derd ui` process alone (as kill, a service manager or a closed terminal does): it
    exits, nothing listens on the port, and every process it started is gone."""
    assert children, "the UI started no process"
    process.send_signal(sig)
    assert process.wait(timeout=30) == 0
    assert not listening(port), f"something still serves port {port}"
    wait_for(lambda: not any(alive(pid) for pid in children), 10, "the UI's processes to end")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT])
def test_every_stop_signal_stops_the_ui_and_its_workers(sig, tmp_path):
    port, workers = prefect_server.free_port(), tmp_path / "workers"
    serve = (f"import os, sys; from pipelines.ui import serve; "
             f"sys.exit(serve([sys.executable, '-c', {FAKE_UI!r}, '{port}', {str(workers)!r}], os.environ))")
    process = subprocess.Popen([sys.executable, "-c", serve], cwd=REPO)
    try:
        wait_for(lambda: listening(port) and workers.is_file() and workers.read_text().strip(), 30, "the stand-in UI")
        children = descendants(process.pid)
        assert int(workers.read_text()) in children
        stop_and_check(process, sig, port, children)
    finally:
        if process.poll() is None:
            process.kill()


def test_a_taken_port_is_one_clear_line(tmp_path, capsys):
    from pipelines import cli

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        assert cli.main(["ui", "--port", str(port), "--params", str(write_params(tmp_path / "params.yaml")),
                         "--root", str(tmp_path)]) == 2
    assert f"derd ui: port {port} on 127.0.0.1 is in use" in capsys.readouterr().err


def test_mlflow_ui_serves_the_project_store_on_localhost_and_prints_the_runs_table_link(tmp_path, monkeypatch,
                                                                                         capsys):
    calls = {}
    monkeypatch.setattr(ui, "serve", lambda cmd, env: calls.update(cmd=cmd, env=env) or 0)
    cfg = config.parse({})
    port = prefect_server.free_port()
    assert ui.mlflow(cfg, tmp_path / ".dvc/tmp/exps/tmpx", port=port) == 0
    experiment = tracking.Tracker(cfg, tmp_path).experiment_id  # made by `derd ui` for its link
    assert f"http://127.0.0.1:{port}/#/experiments/{experiment}/runs?workflowType=machine_learning" in \
        capsys.readouterr().out
    cmd = calls["cmd"]
    assert cmd[cmd.index("--backend-store-uri") + 1] == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    assert cmd[cmd.index("--host") + 1] == "127.0.0.1" and cmd[cmd.index("--workers") + 1] == "1"
    assert cmd[cmd.index("--port") + 1] == str(port)
    assert calls["env"]["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] == "false"


def test_prefect_ui_without_a_database_says_so(tmp_path, monkeypatch, capsys):
    from pipelines import cli

    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / ".prefect"))  # the project's, as the CLI sets it
    assert cli.main(["ui", "--prefect", "--root", str(tmp_path), "--port", str(prefect_server.free_port())]) == 2
    assert f"no Prefect database at {tmp_path / '.prefect' / 'prefect.db'}" in capsys.readouterr().err


@pytest.mark.slow
def test_derd_ui_exits_on_sigterm_and_leaves_nothing_serving_its_port(tmp_path):
    """The real `mlflow ui` (a server process and its uvicorn worker)."""
    port = prefect_server.free_port()
    params = write_params(tmp_path / "params.yaml")
    process = subprocess.Popen([sys.executable, "-m", "pipelines.cli", "ui", "--port", str(port), "--params",
                                str(params), "--root", str(tmp_path)], cwd=REPO, stdout=subprocess.DEVNULL)
    try:
        wait_for(lambda: listening(port), 180, "mlflow ui to listen")
        stop_and_check(process, signal.SIGTERM, port, descendants(process.pid))
    finally:
        if process.poll() is None:
            process.kill()


def ui_api_url(url: str) -> str:
    """The API URL the UI served at ``url`` talks to (its settings endpoint)."""
    with urllib.request.urlopen(f"{url}/ui-settings", timeout=10) as response:
        return json.load(response)["api_url"]


@pytest.mark.slow
def test_a_runs_server_ui_talks_to_it_and_derd_ui_prefect_serves_its_flow_runs_afterwards(tmp_path):
    """The server `derd repro` starts (project database in .prefect/): its UI asks its own API, not port 4200, even
    with a stale PREFECT_UI_API_URL; after it stops, `derd ui --prefect` serves the flow runs it recorded."""
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    @flow(name="derd-probe")
    def probe() -> None:
        """Never run: the test records a run of it."""

    env = {**os.environ, "PREFECT_HOME": str(tmp_path / ".prefect"), "PREFECT_UI_API_URL": "http://127.0.0.1:4200/api"}
    env.pop("PREFECT_API_URL", None)
    with prefect_server.server(env=env, timeout=180) as url:
        assert prefect_server.answers(url)
        assert ui_api_url(url.removesuffix("/api")) == url
        with temporary_settings({PREFECT_API_URL: url}), get_client(sync_client=True) as client:
            client.create_flow_run(probe, name="recorded-by-a-run")
    assert not prefect_server.answers(url)

    port = prefect_server.free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_HOME", "PREFECT_API_URL")}
    process = subprocess.Popen([sys.executable, "-m", "pipelines.cli", "ui", "--prefect", "--root", str(tmp_path),
                                "--port", str(port)], cwd=REPO, env=env, stdout=subprocess.DEVNULL)
    try:
        api = f"http://127.0.0.1:{port}/api"
        wait_for(lambda: prefect_server.answers(api), 180, "derd ui --prefect to answer")
        assert ui_api_url(api.removesuffix("/api")) == api
        with temporary_settings({PREFECT_API_URL: api}), get_client(sync_client=True) as client:
            assert [r.name for r in client.read_flow_runs()] == ["recorded-by-a-run"]
        stop_and_check(process, signal.SIGTERM, port, descendants(process.pid))
    finally:
        if process.poll() is None:
            process.kill()
