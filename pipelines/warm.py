"""A warm process for the stage commands of one ``derd repro``.

Each DVC stage is a fresh ``python -m pipelines.cli <stage>``, and importing torch, Prefect and MLflow
costs it ~12 s before any work (``python -m bench.bench_pipeline``, imports phase). ``derd repro``
starts this process once: it imports them, then listens on a Unix socket. A stage command that finds
``DERD_WARM_SOCKET`` in its environment imports nothing heavy: it sends its arguments, working directory,
environment and standard streams to the warm process, which forks a child that runs the command exactly
as :func:`pipelines.cli.main` would (every stage a fresh copy of the warm interpreter: stages share no
state), and relays the child's exit status. SIGINT and SIGTERM sent to the stage command reach the child.

Only imports are shared, never work: the warm process runs no torch op, starts no thread (it checks: a
fork would copy a thread's locks) and opens no connection. It starts with the stages' environment, so what
is read at import time (OMP_NUM_THREADS, Prefect's settings) is what a fresh stage process would read.
Where it cannot start, a stage command says so and runs in its own process as before; ``DERD_WARM=0``
turns it off.
"""
from __future__ import annotations

import atexit
import importlib
import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

SOCKET_ENV = "DERD_WARM_SOCKET"
SWITCH_ENV = "DERD_WARM"  # "0": no warm process
PRELOAD = ("torch", "prefect", "mlflow.tracking", "mlflow.store.tracking.sqlalchemy_store", "pipelines.flows",
           "pipelines.tracking", "derd.teachers", "derd.stage1.warmup", "derd.distill", "derd.evaluation.evaluate",
           "derd.report.tables")
FAILED = "failed"  # written next to the socket when the warm process cannot serve (its reason inside)


def enabled(env: Mapping[str, str]) -> bool:
    return env.get(SWITCH_ENV, "1").strip() != "0"


# ---------------------------------------------------------------- the warm process

def serve(path: Path, preload: Sequence[str] = PRELOAD) -> None:
    """Import ``preload``, then fork one child per request on the socket at ``path`` (until killed)."""
    try:
        for name in preload:
            importlib.import_module(name)
        if threading.active_count() > 1:
            raise RuntimeError(f"importing {', '.join(preload)} started threads "
                               f"({', '.join(t.name for t in threading.enumerate())}): forking would copy their locks")
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(str(path))  # clients wait for this path: it appears once the imports are done
        listener.listen()
    except BaseException as exc:
        (path.parent / FAILED).write_text(f"{type(exc).__name__}: {exc}")
        raise
    waiting: dict[int, socket.socket] = {}  # child pid -> its client's connection
    while True:
        if select.select([listener], [], [], 0.2)[0]:
            conn, _ = listener.accept()
            pid = _fork(conn, listener)
            if pid:
                waiting[pid] = conn
        while waiting:
            pid, status = os.waitpid(-1, os.WNOHANG)
            if not pid:
                break
            conn = waiting.pop(pid)
            try:
                conn.sendall(f"{os.waitstatus_to_exitcode(status)}\n".encode())
            except OSError:  # the client is gone (killed): nothing to tell
                pass
            conn.close()


def _fork(conn: socket.socket, listener: socket.socket) -> int:
    """Read one request and fork its child; the parent gets the child's pid (0 if the request was bad)."""
    try:
        data, fds, _, _ = socket.recv_fds(conn, 1 << 20, 3)
        while not data.endswith(b"\n"):
            more = conn.recv(1 << 20)
            if not more:
                raise ConnectionError("the request ended early")
            data += more
        request = json.loads(data)
    except (OSError, ValueError) as exc:
        print(f"derd warm: a bad request ({exc}); ignored", file=sys.stderr)
        conn.close()
        return 0
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # the child: becomes the stage command, and exits as one
        listener.close()
        conn.close()
        _exit(_child(request, fds))
    for fd in fds:
        os.close(fd)
    conn.sendall(f"{pid}\n".encode())
    return pid


def _child(request: dict, fds: list[int]) -> int:
    """The command's exit status, whatever it raises (a traceback on its stderr then, as Python prints it)."""
    try:
        return _run_child(request, fds)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else int(exc.code is not None)
    except BaseException:  # noqa: BLE001  (reported as Python would, as the exit status)
        traceback.print_exc()
        return 1


def _run_child(request: dict, fds: list[int]) -> int:
    for target, fd in enumerate(fds):  # the client's stdin, stdout, stderr
        os.dup2(fd, target)
        os.close(fd)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    sys.argv = ["derd", *request["argv"]]
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    from pipelines import cli

    print(f"derd {request['argv'][0]}: forked from the warm process (imports done)", file=sys.stderr, flush=True)
    return cli.main(request["argv"])


def _exit(code: int) -> None:
    """End the child as the interpreter would (its threads joined, atexit handlers run, streams flushed), but
    without tearing down every module of torch, Prefect and MLflow one by one (seconds each time)."""
    threading._shutdown()  # the interpreter's own first step at exit: join the non-daemon threads
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(code)


# ---------------------------------------------------------------- the stage command's side

def forward(argv: Sequence[str], path: str, timeout: float = 120.0) -> int | None:
    """Run ``derd argv`` in the warm process at ``path``; its exit status, or None when there is none to use
    (the caller then runs the command itself)."""
    conn = _connect(Path(path), timeout)
    if conn is None:
        return None
    env = {k: v for k, v in os.environ.items() if k != SOCKET_ENV}  # the child runs the command itself
    request = json.dumps({"argv": list(argv), "cwd": os.getcwd(), "env": env}) + "\n"
    with conn, conn.makefile("rb") as replies:
        socket.send_fds(conn, [request.encode()], [0, 1, 2])
        first = replies.readline()
        if not first:
            print("derd: the warm process closed the connection; running this stage in its own process",
                  file=sys.stderr)
            return None
        pid = int(first)

        def relay(signum: int, frame) -> None:
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass

        previous = {sig: signal.signal(sig, relay) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            status = replies.readline()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
    if not status:
        print(f"derd: the warm process ended while it ran this stage (pid {pid})", file=sys.stderr)
        return 1
    code = int(status)
    if code < 0:  # killed by a signal: end the same way, so that DVC sees what the child saw
        signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
    return code


def _connect(path: Path, timeout: float) -> socket.socket | None:
    """A connection to the warm process once it listens; None (and why, on stderr) when it failed or never came."""
    deadline = time.monotonic() + timeout
    while True:
        failed = path.parent / FAILED
        if not path.parent.is_dir():  # derd repro removes it when the warm process stops
            print(f"derd: no warm process at {path}; running this stage in its own process", file=sys.stderr)
            return None
        if failed.exists():
            print(f"derd: the warm process could not start ({failed.read_text().strip()}); running this stage in "
                  "its own process", file=sys.stderr)
            return None
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            conn.connect(str(path))
            return conn
        except (FileNotFoundError, ConnectionRefusedError):
            conn.close()
        if time.monotonic() > deadline:
            print(f"derd: no warm process answered at {path} within {timeout:g} s; running this stage in its own "
                  "process", file=sys.stderr)
            return None
        time.sleep(0.05)


# ---------------------------------------------------------------- derd repro's side

@contextmanager
def process(env: Mapping[str, str], preload: Sequence[str] = PRELOAD, cwd: str | Path | None = None) -> Iterator[str]:
    """A warm process for the block, started in ``cwd`` (the project whose code the stages run; default: here)
    with ``env`` (the stages' environment); yields its socket path and stops it (its process group) on the way out."""
    from pipelines.prefect_server import stop

    folder = Path(tempfile.mkdtemp(prefix="derd-warm-"))
    path = folder / "socket"
    with open(folder / "log", "wb") as log:
        child = subprocess.Popen([sys.executable, "-m", "pipelines.warm", str(path), *preload], env=dict(env),
                                 stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                 cwd=cwd, start_new_session=True)
        try:
            yield str(path)
        finally:
            stop(child)
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    serve(Path(sys.argv[1]), sys.argv[2:] or PRELOAD)
