"""One Prefect server for a whole ``dvc repro`` (``derd repro``).

Without ``PREFECT_API_URL`` every stage command starts Prefect's temporary server (10-15 s each).
:func:`server` starts ``prefect server start`` once on a free local port, waits until its API answers
and stops it (its whole process group) on the way out, on success, error or signal alike;
:func:`repro` runs ``dvc repro`` (or any command) with ``PREFECT_API_URL`` pointing at it, and with a
warm process (``pipelines.warm``) that spares every stage its imports. DVC starts while the server does
(its migrations take ~15 s on a fresh database): a stage that needs Prefect waits for it (``WAIT_ENV``), and
a server that cannot come up stops the run with the end of its log. A ``PREFECT_API_URL`` already set is
used as it is: no server is started. The UI a server serves talks to that server's API
(:func:`server_environment`); its flow runs stay in the project's database (``.prefect/``), which
``derd ui --prefect`` serves after the run (``pipelines.ui``).
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager

WAIT_ENV = "DERD_PREFECT_WAIT"  # set by repro: seconds a stage waits for the server it started


class ReproError(RuntimeError):
    """``derd repro`` could not start: the Prefect server did not come up (its log's end says why) or the
    command to run is missing."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_command(port: int) -> list[str]:
    """``prefect server start`` on 127.0.0.1:``port``, API and UI only (no scheduler/late-run services:
    DVC starts every run), no analytics."""
    return [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port),
            "--no-services", "--analytics-off", "--log-level", "WARNING"]


def answers(api_url: str, timeout: float = 2.0) -> bool:
    """True when ``<api_url>/health`` answers 200."""
    try:
        with urllib.request.urlopen(api_url.rstrip("/") + "/health", timeout=timeout) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


def _tail(log, lines: int = 15) -> str:
    log.flush()
    log.seek(0)
    return "\n".join(log.read().decode(errors="replace").strip().splitlines()[-lines:])


def stop(process: subprocess.Popen, grace: float = 10.0) -> None:
    """SIGTERM to the process group that ``process`` leads (a server and its workers), SIGKILL to what is left of
    it after ``grace`` seconds; returns once the group is gone (or 5 s after the SIGKILL)."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            process.poll()
            return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            process.poll()  # reap the leader: a zombie still counts as a member of the group
            try:
                os.killpg(process.pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.05)


class Starting:
    """A ``prefect server start`` on its way up: :meth:`wait` blocks until its API answers."""

    def __init__(self, process: subprocess.Popen, log, url: str, cmd: Sequence[str]):
        self.process, self.log, self.url, self.cmd = process, log, url, list(cmd)

    def wait(self, timeout: float, cancel: threading.Event | None = None) -> bool:
        """True once ``<url>/health`` answers, False once ``cancel`` is set; :class:`ReproError` (with the end of
        the server's log) when the server exits first or ``timeout`` seconds pass."""
        deadline = time.monotonic() + timeout
        while not answers(self.url):
            if cancel is not None and cancel.is_set():
                return False
            if self.process.poll() is not None:
                raise ReproError(f"`{' '.join(self.cmd)}` exited with status {self.process.returncode} before its "
                                 f"API answered at {self.url}; its log ends:\n{_tail(self.log)}")
            if time.monotonic() > deadline:
                raise ReproError(f"`{' '.join(self.cmd)}` did not answer at {self.url} within {timeout:g} s; "
                                 f"its log ends:\n{_tail(self.log)}")
            time.sleep(0.2)
        return True


def server_environment(url: str, env: Mapping[str, str] | None = None) -> dict[str, str]:
    """``env`` (default: this process's) for a server whose API is ``url``: its UI talks to that API. Prefect's
    UI otherwise asks PREFECT_API_URL or the default port 4200, not the port the server was started on."""
    out = {k: v for k, v in (os.environ if env is None else env).items() if k != "PREFECT_UI_API_URL"}  # an alias
    return {**out, "PREFECT_SERVER_UI_API_URL": url}


@contextmanager
def starting(command: Sequence[str] | None = None, port: int | None = None,
             env: Mapping[str, str] | None = None) -> Iterator[Starting]:
    """Start a Prefect server (API at ``http://127.0.0.1:<port>/api``, its UI pointed at that API) without
    waiting for it; stop it on exit. ``command`` (default :func:`server_command`) must serve ``/api/health`` on
    ``port``."""
    port = port or free_port()
    url = f"http://127.0.0.1:{port}/api"
    cmd = list(command) if command is not None else server_command(port)
    with tempfile.TemporaryFile() as log:
        process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   env=server_environment(url, env),
                                   start_new_session=True)  # its own group: Ctrl-C reaches DVC, not it
        try:
            yield Starting(process, log, url, cmd)
        finally:
            stop(process)


@contextmanager
def server(command: Sequence[str] | None = None, port: int | None = None, timeout: float = 120.0,
           env: Mapping[str, str] | None = None) -> Iterator[str]:
    """A Prefect server for the block, up: yields its API URL, stops it on exit (:func:`starting`, then
    :meth:`Starting.wait` for ``timeout`` seconds)."""
    with starting(command, port, env) as srv:
        srv.wait(timeout)
        yield srv.url


def await_api(url: str, timeout: float) -> bool:
    """Poll ``<url>/health`` for up to ``timeout`` seconds; whether it answered."""
    deadline = time.monotonic() + timeout
    while not answers(url):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


def _wait_forwarding_sigterm(child: subprocess.Popen) -> int:
    """Wait for ``child``, however long it takes to unwind, so that the server stops after it: a SIGTERM
    to this process is passed on to it; Ctrl-C reaches it from the terminal (same process group), so
    here SIGINT is only ignored (passing it on would be a second, hard stop)."""
    def forward(signum, frame):
        if child.poll() is None:
            child.send_signal(signum)

    previous = {signal.SIGTERM: signal.signal(signal.SIGTERM, forward),
                signal.SIGINT: signal.signal(signal.SIGINT, signal.SIG_IGN)}
    try:
        return child.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def repro(args: Sequence[str], run: Sequence[str] = ("dvc", "repro"), command: Sequence[str] | None = None,
          timeout: float = 120.0, preload: Sequence[str] | None = None) -> int:
    """``dvc repro <args>`` (or ``run + args``) with one Prefect server and one warm process (``pipelines.warm``,
    importing ``preload``) shared by every stage; its exit status."""
    from pipelines import warm

    env = dict(os.environ)
    stages_env = dict(env)
    own_server = not env.get("PREFECT_API_URL", "").strip()
    if own_server:
        port = free_port()
        stages_env["PREFECT_API_URL"] = f"http://127.0.0.1:{port}/api"
    else:
        print(f"derd repro: using the Prefect server at PREFECT_API_URL={env['PREFECT_API_URL']}", file=sys.stderr)
    with ExitStack() as stack:
        if warm.enabled(env):  # its imports run while the server starts
            stages_env[warm.SOCKET_ENV] = stack.enter_context(
                warm.process(stages_env, warm.PRELOAD if preload is None else preload))
        srv = stack.enter_context(starting(command=command, port=port, env=env)) if own_server else None
        if srv is not None:  # DVC starts at once; a stage that needs Prefect waits for it (pipelines.cli)
            stages_env[WAIT_ENV] = f"{timeout:g}"
        try:
            child = subprocess.Popen([*run, *args], env=stages_env)
        except FileNotFoundError:
            raise ReproError(f"`{run[0]}` not found on PATH: install DVC (pip install -e .) or activate "
                              "the project's virtual environment") from None
        done, failed = threading.Event(), []
        watcher = threading.Thread(target=_announce, args=(srv, timeout, child, done, failed), daemon=True)
        if srv is not None:
            watcher.start()
        code = _wait_forwarding_sigterm(child)
        done.set()  # a run that ended before the server came up did not need it
        if srv is not None:
            watcher.join()
        if failed:
            raise failed[0]
        return code


def _announce(srv: Starting, timeout: float, child: subprocess.Popen, done: threading.Event, failed: list) -> None:
    """Say when the server is up; if it cannot come up while the run goes on, record why and stop the run."""
    start = time.monotonic()
    try:
        if not srv.wait(timeout, cancel=done):
            return
    except ReproError as exc:
        failed.append(exc)
        if child.poll() is None:
            child.terminate()
        return
    print(f"derd repro: Prefect server at {srv.url} (UI {srv.url.removesuffix('/api')}) started in "
          f"{time.monotonic() - start:.1f} s; it stops when the run ends (`derd ui --prefect` shows the flow runs "
          "afterwards)", file=sys.stderr, flush=True)
