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

from derd.config import Config

log = logging.getLogger("derd")
STOP = threading.Event()  # set by the CLI's SIGTERM/SIGINT handler; long loops check it between steps


class Stopped(RuntimeError):
    """The run was told to stop (SIGTERM / Ctrl-C); resume state written so far is kept."""


def check_stop() -> None:
    """Raise :class:`Stopped` in whichever thread does the work once a stop was requested."""
    if STOP.is_set():
        raise Stopped("stopped by a signal; the resume state is kept: rerun the same command to continue")


def resolve_device(name: str) -> torch.device:
    """The device ``device:`` names; under torchrun each rank's own GPU (cuda:LOCAL_RANK)."""
    from derd import distributed

    if name == "auto":
        return distributed.local_device(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    if name.startswith("cuda") and distributed.world() > 1:
        return distributed.local_device(torch.device("cuda"))
    if name.startswith("cuda"):
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        index = int(name.partition(":")[2] or 0)
        if index >= count:
            raise RuntimeError(f"device: {name!r} requested but this machine has {count} CUDA device(s) "
                               "(use 'auto', 'cpu' or an existing cuda:N)")
    return torch.device(name)


AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(cfg: Config, device: torch.device):
    """``runtime.amp``'s autocast context for forward passes (a disabled one when off)."""
    amp = cfg.runtime.amp
    return torch.autocast(device.type, dtype=AMP_DTYPES.get(amp, torch.float32), enabled=amp != "off")


def grad_scaler(cfg: Config, device: torch.device) -> torch.amp.GradScaler:
    """A loss scaler for ``runtime.amp: fp16`` (a pass-through one otherwise)."""
    return torch.amp.GradScaler(device.type, enabled=cfg.runtime.amp == "fp16")


class LossScale:
    """Dynamic fp16 loss scaling for gradients taken with ``torch.autograd.grad`` (Stage-II), by GradScaler's
    rule: gradients of ``scale·loss`` are divided by ``scale``; a non-finite one halves the scale and the step
    is skipped; 2000 finite steps in a row double it. A pass-through unless ``runtime.amp`` is fp16."""

    def __init__(self, cfg: Config, scale: float = 2.0**16, growth_interval: int = 2000):
        self.enabled, self.scale, self.growth_interval, self.good = cfg.runtime.amp == "fp16", scale, growth_interval, 0
        self.overflow = False  # the current step's gradients overflowed: skip it

    def __call__(self, loss: torch.Tensor) -> torch.Tensor:
        return loss * self.scale if self.enabled else loss

    def unscale(self, grads: list[torch.Tensor]) -> list[torch.Tensor]:
        """The true gradients; zeros (and ``overflow`` set) when a scaled one was not finite."""
        if not self.enabled:
            return grads
        grads = [g / self.scale for g in grads]
        if not all(torch.isfinite(g).all() for g in grads):
            self.overflow = True
            return [torch.zeros_like(g) for g in grads]
        return grads

    def step_taken(self) -> bool:
        """Close the step: False (and the scale halved) when it overflowed, else True (the scale may grow)."""
        if not self.overflow:
            self.good += 1
            if self.enabled and self.good == self.growth_interval:
                self.scale, self.good = self.scale * 2, 0
            return True
        self.scale, self.good, self.overflow = self.scale / 2, 0, False
        log.warning("fp16 loss scale: non-finite gradients, step skipped, scale now %g", self.scale)
        return False

    def state_dict(self) -> dict:
        return {"scale": self.scale, "good": self.good}

    def load_state_dict(self, state: dict) -> None:
        self.scale, self.good = float(state["scale"]), int(state["good"])


def prepare_model(model: torch.nn.Module, cfg: Config) -> torch.nn.Module:
    """Apply ``runtime.channels_last`` and ``runtime.cudnn_benchmark`` to a network about to train or be read."""
    torch.backends.cudnn.benchmark = cfg.runtime.cudnn_benchmark
    return model.to(memory_format=torch.channels_last) if cfg.runtime.channels_last else model


TRAINING_KEYS = ("nproc", "amp", "channels_last", "cudnn_benchmark")  # read by every training stage
STUDENT_KEYS = (*TRAINING_KEYS, "compile", "sync_bn")  # and by Stage-II


def runtime_record(cfg: Config, keys: tuple[str, ...] = TRAINING_KEYS) -> dict:
    """What a sidecar records about how its artifact was computed: those runtime keys and the process count."""
    from derd import distributed

    return {**{k: getattr(cfg.runtime, k) for k in keys}, "world_size": distributed.world()}


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
