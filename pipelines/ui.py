"""``derd ui``: browse the project's runs on 127.0.0.1.

MLflow (the default) serves the project's store: every stage's run, their parents and artifacts. ``--prefect``
serves Prefect's UI on the project's flow-run history: the database in ``.prefect/`` that every stage command and
the server of ``derd repro`` write, so the flow runs stay browsable after the run's own server has stopped.

Each UI is a child in its own process group (a Ctrl-C in the terminal reaches this process alone, which stops the
group once). However this process is asked to stop (Ctrl-C, SIGTERM from ``kill`` or a service manager, SIGHUP
from a closed terminal), it stops the whole group, so no server or worker is left serving the port.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from pipelines import prefect_server

if TYPE_CHECKING:
    from derd.config import Config

MLFLOW_PORT, PREFECT_PORT = 5000, 4200
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class UIError(RuntimeError):
    """A UI cannot start: its port is taken, or there is nothing to browse."""


class _Stop(Exception):
    """Raised in the main thread by a stop signal."""


def _raise_stop(signum: int, frame: object) -> None:
    raise _Stop(signum)


def check_port(port: int) -> None:
    """:class:`UIError` when something already listens on 127.0.0.1:``port``."""
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            raise UIError(f"port {port} on 127.0.0.1 is in use (another `derd ui`?); stop it or choose another "
                          "with --port") from None


def serve(cmd: Sequence[str], env: Mapping[str, str]) -> int:
    """Run ``cmd`` in its own process group until it exits or a stop signal arrives; stop the group either way.
    The UI's exit status, 0 when it was stopped."""
    previous = {sig: signal.signal(sig, _raise_stop) for sig in STOP_SIGNALS}
    process = None
    try:
        process = subprocess.Popen(list(cmd), env=dict(env), start_new_session=True)
        return process.wait()
    except _Stop:
        return 0
    finally:
        for sig in STOP_SIGNALS:  # a second signal must not cut the stop short (it ends with SIGKILL anyway)
            signal.signal(sig, signal.SIG_IGN)
        if process is not None:
            prefect_server.stop(process)
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def mlflow(cfg: Config, root: str | Path, port: int = MLFLOW_PORT) -> int:
    """``mlflow ui`` for this project's store; prints the deep link to the experiment's runs table."""
    from pipelines import tracking

    check_port(port)
    uri = tracking.tracking_uri(cfg, root)
    cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", "127.0.0.1",
           "--port", str(port), "--workers", "1"]
    if uri.startswith("sqlite:"):
        cmd += ["--default-artifact-root", tracking.artifact_root(root).as_uri()]
    link = tracking.runs_url(tracking.Tracker(cfg, root).experiment_id, port)
    print(f"MLflow UI for {uri}\n  runs of {tracking.experiment_name(cfg)}: {link}\n(Ctrl-C stops it)", flush=True)
    return serve(cmd, {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})


def prefect(port: int = PREFECT_PORT) -> int:
    """Prefect's UI on the flow runs in the Prefect database this process's environment names (``PREFECT_HOME``,
    which the CLI sets to the project's ``.prefect/`` as for the stages); :class:`UIError` when it does not exist."""
    from prefect.settings import Settings

    check_port(port)
    database = Settings().server.database.connection_url.get_secret_value()  # as the server will read it
    if database.startswith("sqlite"):
        database = database.split(":///", 1)[1]
        if not Path(database).is_file():
            raise UIError(f"no Prefect database at {database}: no stage has run in this project yet (run `derd "
                          "repro`), or name the project with --root")
    else:
        database = "PREFECT_SERVER_DATABASE_CONNECTION_URL"
    url = f"http://127.0.0.1:{port}"
    print(f"Prefect UI for {database}\n  flow runs: {url} (once the server is up, ~15 s)\n(Ctrl-C stops it)",
          flush=True)
    return serve(prefect_server.server_command(port), prefect_server.server_environment(f"{url}/api"))
