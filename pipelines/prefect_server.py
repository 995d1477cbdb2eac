"""One Prefect server for a whole ``dvc repro`` (``derd repro``).

Without ``PREFECT_API_URL`` every stage command starts Prefect's temporary server (10-15 s each).
:func:`server` starts ``prefect server start`` once on a free local port, waits until its API answers
and stops it (its whole process group) on the way out, on success, error or signal alike;
:func:`repro` runs ``dvc repro`` (or any command) with ``PREFECT_API_URL`` pointing at it, and with a
warm process (``pipelines.warm``) that spares every stage its imports. A ``PREFECT_API_URL`` already
set is used as it is: no server is started.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager


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
    """SIGTERM to the server's process group, SIGKILL after ``grace`` seconds."""
    if process.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


@contextmanager
def server(command: Sequence[str] | None = None, port: int | None = None, timeout: float = 120.0,
           env: dict[str, str] | None = None) -> Iterator[str]:
    """A Prefect server for the block: yields its API URL (``http://127.0.0.1:<port>/api``), stops it on exit.

    ``command`` (default :func:`server_command`) must serve ``/api/health`` on ``port`` within ``timeout``
    seconds; otherwise :class:`ReproError` carries the end of its log."""
    port = port or free_port()
    url = f"http://127.0.0.1:{port}/api"
    cmd = list(command) if command is not None else server_command(port)
    with tempfile.TemporaryFile() as log:
        process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   env=env, start_new_session=True)  # its own group: Ctrl-C reaches DVC, not it
        try:
            deadline = time.monotonic() + timeout
            while not answers(url):
                if process.poll() is not None:
                    raise ReproError(f"`{' '.join(cmd)}` exited with status {process.returncode} before its API "
                                      f"answered at {url}; its log ends:\n{_tail(log)}")
                if time.monotonic() > deadline:
                    raise ReproError(f"`{' '.join(cmd)}` did not answer at {url} within {timeout:g} s; "
                                      f"its log ends:\n{_tail(log)}")
                time.sleep(0.2)
            yield url
        finally:
            stop(process)


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
        if own_server:
            start = time.monotonic()
            url = stack.enter_context(server(command=command, port=port, timeout=timeout, env=env))
            print(f"derd repro: Prefect server at {url} (UI {url[:-4]}) started in {time.monotonic() - start:.1f} s; "
                  "it stops when the run ends", file=sys.stderr, flush=True)
        try:
            child = subprocess.Popen([*run, *args], env=stages_env)
        except FileNotFoundError:
            raise ReproError(f"`{run[0]}` not found on PATH: install DVC (pip install -e .) or activate "
                              "the project's virtual environment") from None
        return _wait_forwarding_sigterm(child)
