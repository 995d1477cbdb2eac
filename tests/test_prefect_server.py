"""`derd repro`: one Prefect server started for the whole run, handed to it, and stopped afterwards,
on success, failure and SIGTERM alike (a stand-in server that serves /api/health; the real one, its UI and
`derd ui --prefect`: tests/test_ui.py)."""
from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

import pytest
from pipeline_profile import write_params

from derd import config
from pipelines import cli, prefect_server, warm

FAKE_SERVER = """
import http.server, os, sys, time
port, log = int(sys.argv[1]), sys.argv[2]
with open(log, "a") as f:
    f.write(f"{os.getpid()}\\n")
time.sleep(float(sys.argv[3]) if len(sys.argv) > 3 else 0)  # a slow start (a real one migrates its database)
class Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if self.path == "/api/health" else 404)
        self.end_headers()
    def log_message(self, *args):
        pass
http.server.HTTPServer(("127.0.0.1", port), Health).serve_forever()
"""

# the command run in place of `dvc repro`: waits for the server as a stage does (pipelines.cli), then records
# the API URL it was given and whether it answered
CHILD = """
import json, os, sys, time
from pipelines.prefect_server import WAIT_ENV, answers, await_api
url, began = os.environ.get("PREFECT_API_URL", ""), time.monotonic()
await_api(url, float(os.environ.get(WAIT_ENV) or 0))
with open(sys.argv[1], "w") as f:
    json.dump({"url": url, "answered": answers(url), "began": began}, f)
time.sleep(float(sys.argv[3]))
sys.exit(int(sys.argv[2]))
"""


def alive(pid: int) -> bool:
    """The process exists (the stop reaps it, so a stopped server's pid is gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture
def fake(tmp_path, monkeypatch):
    """A stand-in server on a fixed free port, and a stand-in `dvc repro` (exit status, seconds to sleep)."""
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    monkeypatch.setenv(warm.SWITCH_ENV, "0")  # the warm process has its own tests (test_warm.py)
    monkeypatch.setenv("PYTHONPATH", str(Path(__file__).resolve().parent.parent))
    port, starts, seen = prefect_server.free_port(), tmp_path / "starts.log", tmp_path / "seen.json"
    monkeypatch.setattr(prefect_server, "free_port", lambda: port)
    server = [sys.executable, "-c", FAKE_SERVER, str(port), str(starts)]

    def run(status: int = 0, sleep: float = 0.0, server_delay: float = 0.0) -> int:
        return prefect_server.repro([str(status), str(sleep)], run=[sys.executable, "-c", CHILD, str(seen)],
                                    command=[*server, str(server_delay)], timeout=30)

    def started() -> list[int]:
        return [int(line) for line in starts.read_text().split()] if starts.exists() else []

    return run, started, seen, port, server


@pytest.mark.parametrize("status", [0, 3])
def test_one_server_serves_the_run_and_is_stopped_after_it(fake, status):
    run, started, seen, port, _ = fake
    assert run(status) == status  # dvc's exit status, success or failure
    pids = started()
    assert len(pids) == 1  # started once
    record = json.loads(seen.read_text())
    assert (record["url"], record["answered"]) == (f"http://127.0.0.1:{port}/api", True)
    assert not alive(pids[0])
    assert not prefect_server.answers(record["url"])


def test_sigterm_reaches_the_run_and_the_server_still_stops(fake):
    run, started, seen, _, _ = fake

    def terminate_when_running():
        deadline = time.monotonic() + 30
        while not seen.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGTERM)

    before = signal.getsignal(signal.SIGTERM)
    threading.Thread(target=terminate_when_running, daemon=True).start()
    assert run(0, sleep=60) == -signal.SIGTERM  # the child got the SIGTERM and the wait returned its status
    assert signal.getsignal(signal.SIGTERM) is before  # handlers restored
    assert not alive(started()[0])


def test_a_server_that_dies_is_a_clear_error_and_stops_the_run(tmp_path, monkeypatch):
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    monkeypatch.setenv(warm.SWITCH_ENV, "0")
    monkeypatch.setenv("PYTHONPATH", str(Path(__file__).resolve().parent.parent))
    seen = tmp_path / "seen.json"
    dead = [sys.executable, "-c", "import sys; print('database is locked'); sys.exit(1)"]
    start = time.monotonic()
    with pytest.raises(prefect_server.ReproError, match=r"exited with status 1(.|\n)*database is locked"):
        prefect_server.repro([], run=[sys.executable, "-c", CHILD, str(seen), "0", "0"], command=dead, timeout=30)
    assert time.monotonic() - start < 20, "the run waiting for the server was stopped, not left to time out"
    assert not seen.exists(), "no stage got past its wait for the server"


def test_the_run_starts_while_the_server_does_and_stages_wait_for_it(fake):
    run, started, seen, _, _ = fake
    start = time.monotonic()
    assert run(0, server_delay=2) == 0
    record = json.loads(seen.read_text())
    assert record["began"] - start < 1.5, "the run waited for the server before starting"
    assert record["answered"], "the stage went on before the server answered"
    assert not alive(started()[0])


def test_a_run_that_ends_before_the_server_is_up_needs_no_server(fake):
    _, started, _, _, server = fake
    assert prefect_server.repro([], run=[sys.executable, "-c", "pass"], command=[*server, "5"], timeout=30) == 0
    assert not alive(started()[0])


def test_a_stage_waits_for_the_server_derd_repro_is_starting(fake, monkeypatch):
    _, _, _, port, server = fake
    url = f"http://127.0.0.1:{port}/api"
    monkeypatch.setenv("PREFECT_API_URL", url)
    monkeypatch.setenv(prefect_server.WAIT_ENV, "30")
    meanwhile = []
    with prefect_server.starting(command=[*server, "1"], port=port):
        cli._check_prefect_api(meanwhile=lambda: meanwhile.append(prefect_server.answers(url)))
        assert prefect_server.answers(url), "it returned once the server answered"
    assert meanwhile == [False], "the stage's own setup ran while the server was starting"
    monkeypatch.setenv(prefect_server.WAIT_ENV, "0.5")
    with pytest.raises(cli.PrefectUnreachable, match=r"`derd repro` started did not answer within 0.5 s"):
        cli._check_prefect_api()



def test_the_store_opened_while_the_server_starts_is_no_read_of_the_stage(tmp_path, monkeypatch):
    """A stage of `derd repro` opens the MLflow store while the server comes up; the store's experiment tags name
    stage2.methods, which e.g. the teachers stage does not read (tests/dependencies.py compares reads with dvc.yaml)."""
    monkeypatch.setattr(config, "_READS", None)  # the trace started below ends with the test
    monkeypatch.setattr(config, "_TRACED", False)
    params = write_params(tmp_path / "params.yaml")
    reads, seen = config.trace_reads(), {}  # as DERD_TRACE_READS does: before the stage loads its params

    def check(timeout: float = 5.0, meanwhile=None) -> None:
        before = set(reads)
        meanwhile()
        seen.update(reads=reads - before)
        raise cli.PrefectUnreachable("the test stops the stage here")

    monkeypatch.setattr(cli, "_check_prefect_api", check)
    assert cli.main(["teachers", "--params", str(params), "--root", str(tmp_path)]) == 2
    assert (tmp_path / "mlflow.db").is_file(), "the store was opened"
    assert seen["reads"] == set()


def test_a_server_that_never_answers_times_out_and_is_stopped(tmp_path, monkeypatch):
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    pid_file = tmp_path / "pid"
    mute = [sys.executable, "-c", f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(60)"]
    with pytest.raises(prefect_server.ReproError, match="did not answer .* within 1 s"), \
            prefect_server.server(command=mute, timeout=1):
        pass
    assert not alive(int(pid_file.read_text()))


def test_a_missing_dvc_is_named_and_the_cli_exits_2(fake, monkeypatch, capsys):
    _, started, _, _, server = fake
    monkeypatch.setattr(prefect_server, "server_command", lambda port: server)
    monkeypatch.setattr(cli, "prefect_environment", lambda root: None)
    monkeypatch.setenv("PATH", "/nonexistent")
    assert cli.main(["repro"]) == 2
    assert "`dvc` not found on PATH" in capsys.readouterr().err
    assert not any(alive(pid) for pid in started())  # the server (if it got as far as starting) is stopped


def test_a_server_already_set_is_used_and_none_is_started(fake, monkeypatch):
    run, started, seen, _, _ = fake
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:9/api")
    assert run(0) == 0
    assert started() == []
    assert json.loads(seen.read_text())["url"] == "http://127.0.0.1:9/api"


def test_the_servers_ui_is_pointed_at_its_own_api(tmp_path, monkeypatch):
    """Prefect's UI asks PREFECT_API_URL or port 4200 unless told; a stale PREFECT_UI_API_URL (an alias of the
    setting) must not win. The real server's answer: tests/test_ui.py (slow)."""
    monkeypatch.setenv("PREFECT_UI_API_URL", "http://127.0.0.1:4200/api")
    seen = tmp_path / "ui_api_url"
    dump = ("import json, os, sys, time; json.dump({k: v for k, v in os.environ.items() if 'UI_API_URL' in k}, "
            "open(sys.argv[1], 'w')); time.sleep(60)")
    record = [sys.executable, "-c", dump, str(seen)]
    with prefect_server.starting(command=record) as srv:
        deadline = time.monotonic() + 30
        while not seen.exists() or not seen.read_text():
            assert time.monotonic() < deadline
            time.sleep(0.05)
    assert json.loads(seen.read_text()) == {"PREFECT_SERVER_UI_API_URL": srv.url}
