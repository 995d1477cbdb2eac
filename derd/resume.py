"""Resume state of long stages, keyed so that a stale state is never picked up.

A state file is reused only when its key matches: a hash of the params the unit of work depends on,
its input files and the source code that computes it (:func:`code_hash`), plus :data:`FORMAT`.
A state with another key, an older format, or a corrupt file is discarded with a warning; a finished
unit deletes its state (:meth:`ResumeState.clear`), so a rerun never "resumes" at its last step.
:func:`rng_state` / :func:`restore_rng` carry torch's global random streams (the CPU's and, on a CUDA run,
the run's GPU's: KL-PGD's start noise is drawn there) across an interruption.
"""
from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from functools import cache
from pathlib import Path
from typing import Any

import torch

from derd.artifacts import CheckpointError, load_tensors, save_tensors
from derd.config import json_hash
from derd.runtime import log

FORMAT = 3  # bump when the layout of a resume state changes
PACKAGE = Path(__file__).resolve().parent


@cache
def code_hash(*parts: str) -> str:
    """Hash of the library's source files under ``parts`` (paths relative to ``derd/``; none = all of it)."""
    digest = hashlib.sha256()
    roots = [PACKAGE / p for p in parts] if parts else [PACKAGE]
    for root in roots:
        files = sorted(root.rglob("*.py")) if root.is_dir() else [root]
        for f in files:
            digest.update(str(f.relative_to(PACKAGE)).encode())
            digest.update(f.read_bytes())
    return digest.hexdigest()[:16]


def make_key(params: Mapping[str, Any] | str, inputs: Iterable[str] = (), code: str | None = None) -> str:
    """One key from params (a mapping or a hash), input hashes and the code hash (default: whole library)."""
    return json_hash({"params": params, "inputs": list(inputs), "code": code or code_hash(), "format": FORMAT})


class ResumeState:
    """One resume file: :meth:`load` returns its state when the key matches, :meth:`save` writes it
    atomically, :meth:`clear` removes it once the work it resumes is complete."""

    def __init__(self, path: Path, key: str):
        self.path, self.key = Path(path), key

    def load(self) -> dict | None:
        if not self.path.is_file():
            return None
        try:
            state = load_tensors(self.path)
        except CheckpointError as exc:
            log.warning("discarding unreadable resume state (%s)", exc)
            self.clear()
            return None
        if state.get("key") != self.key:
            log.warning("%s: discarding resume state written for other params, inputs, code or format", self.path)
            self.clear()
            return None
        return state

    def save(self, **state: Any) -> None:
        save_tensors(self.path, {"key": self.key, **state})

    def clear(self) -> None:
        self.path.unlink(missing_ok=True)


def rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    """torch's global random streams a run on ``device`` draws from: the CPU's, and the GPU's on a CUDA device.
    Under torchrun rank 0's state is saved: every rank seeds alike and draws the same shapes, so it is each one's."""
    state = {"torch_rng": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda_rng"] = torch.cuda.get_rng_state(device)
    return state


def restore_rng(state: Mapping[str, Any], device: torch.device) -> None:
    """Put back what :func:`rng_state` saved. A CUDA stream saved by a run on a GPU and resumed without one (or
    the reverse) cannot continue: the run goes on with a warning that its draws differ from an uninterrupted
    run's, rather than refusing a resume that is otherwise valid."""
    torch.set_rng_state(state["torch_rng"])
    saved, on_cuda = state.get("cuda_rng"), device.type == "cuda"
    if on_cuda and saved is not None:
        torch.cuda.set_rng_state(saved, device)
    elif on_cuda or saved is not None:
        log.warning("resume state written on %s, resumed on %s: the CUDA random stream is not restored, so random "
                    "draws (KL-PGD's start noise) differ from an uninterrupted run's",
                    "a GPU" if saved is not None else "the CPU", device)
