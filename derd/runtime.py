"""Run-time helpers shared by the stages: device choice, seeding, artifact paths, progress lines."""
from __future__ import annotations

import logging
import random
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger("derd")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device: 'cuda' requested but no CUDA device is available (use 'auto' or 'cpu')")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@dataclass(frozen=True)
class Paths:
    """Where each stage reads and writes, relative to the project root."""

    root: Path = Path(".")

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
    def metrics(self) -> Path:
        return self.root / "metrics"

    @property
    def plots(self) -> Path:
        return self.root / "plots"

    @property
    def reports(self) -> Path:
        return self.root / "reports"


def progress(total: int, desc: str, every: float = 0.1) -> Iterator[int]:
    """``range(total)`` with a tqdm bar on a terminal, else a log line every ``every`` of the way."""
    if sys.stderr.isatty():
        from tqdm import tqdm

        yield from tqdm(range(total), desc=desc, dynamic_ncols=True)
        return
    start, stride = time.monotonic(), max(1, int(total * every))
    for i in range(total):
        yield i
        done = i + 1
        if done % stride == 0 or done == total:
            elapsed = time.monotonic() - start
            eta = elapsed / done * (total - done)
            log.info("%s: %d/%d (%.0f%%) elapsed %.0fs eta %.0fs", desc, done, total, 100 * done / total, elapsed, eta)
