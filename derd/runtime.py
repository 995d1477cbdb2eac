"""Run-time helpers shared by the stages: device choice, seeding, artifact paths, progress lines."""
from __future__ import annotations

import logging
import random
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger("derd")
STOP = threading.Event()  # set by the CLI's SIGTERM/SIGINT handler; long loops check it between steps


class Stopped(RuntimeError):
    """The run was told to stop (SIGTERM / Ctrl-C); resume state written so far is kept."""


def check_stop() -> None:
    """Raise :class:`Stopped` in whichever thread does the work once a stop was requested."""
    if STOP.is_set():
        raise Stopped("stopped by a signal; the resume state is kept: rerun the same command to continue")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda"):
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        index = int(name.partition(":")[2] or 0)
        if index >= count:
            raise RuntimeError(f"device: {name!r} requested but this machine has {count} CUDA device(s) "
                               "(use 'auto', 'cpu' or an existing cuda:N)")
    return torch.device(name)


def git_commit(root: Path) -> str | None:
    """The checked-out commit of the repository holding ``root`` (None outside git)."""
    try:
        done = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


_EXPERIMENT_TMP = (".dvc", "tmp", "exps")


def project_root(root: str | Path) -> Path:
    """The project owning ``root``: DVC runs queued and temp experiments in ``<project>/.dvc/tmp/exps/...``
    copies, whose MLflow runs and evaluation flags belong to the project."""
    parts = Path(root).resolve().parts
    for i in range(len(parts) - len(_EXPERIMENT_TMP) + 1):
        if parts[i : i + len(_EXPERIMENT_TMP)] == _EXPERIMENT_TMP:
            return Path(*parts[:i])
    return Path(root).resolve()


@dataclass(frozen=True)
class Paths:
    """Where each stage reads and writes, relative to the project root."""

    root: Path = Path(".")

    @property
    def inputs(self) -> Path:
        """Fingerprints of the dataset files and user checkpoints (the ``inputs`` stage)."""
        return self.root / "artifacts" / "inputs.json"

    @property
    def teachers(self) -> Path:
        return self.root / "artifacts" / "teachers"

    def teacher(self, role: str) -> Path:
        return self.teachers / f"{role}.pt"

    @property
    def stage1(self) -> Path:
        return self.root / "artifacts" / "stage1"

    def generator(self, teacher_role: str = "natural") -> Path:
        """The Stage-I generator warmed up on that teacher (robust: for derd_no_tnat)."""
        return self.stage1 / f"generator_{teacher_role}.pt"

    @property
    def inversion_pool(self) -> Path:
        return self.stage1 / "inversion_pool.pt"

    @property
    def students(self) -> Path:
        return self.root / "artifacts" / "students"

    def student(self, method: str, seed: int) -> Path:
        return self.students / f"{method}-seed{seed}.pt"

    @property
    def checkpoints(self) -> Path:
        return self.root / "artifacts" / "checkpoints"

    @property
    def eval_flags(self) -> Path:
        """Per-example attack flags, shared by every experiment of the project (content-keyed, so safe)."""
        return project_root(self.root) / "artifacts" / "eval_flags"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics"

    @property
    def plots(self) -> Path:
        return self.root / "plots"

    @property
    def reports(self) -> Path:
        return self.root / "reports"


def progress(total: int, desc: str, every: float = 0.1) -> Iterator[int]:
    """``range(total)`` with a tqdm bar on a terminal, else a log line every ``every`` of the way;
    each step first checks for a requested stop."""
    if sys.stderr.isatty():
        from tqdm import tqdm

        for i in tqdm(range(total), desc=desc, dynamic_ncols=True):
            check_stop()
            yield i
        return
    start, stride = time.monotonic(), max(1, int(total * every))
    for i in range(total):
        check_stop()
        yield i
        done = i + 1
        if done % stride == 0 or done == total:
            elapsed = time.monotonic() - start
            eta = elapsed / done * (total - done)
            log.info("%s: %d/%d (%.0f%%) elapsed %.0fs eta %.0fs", desc, done, total, 100 * done / total, elapsed, eta)
