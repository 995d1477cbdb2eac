"""Resume state of long stages, keyed so that a stale state is never picked up.

A state file is reused only when its key matches: a hash of the params the unit of work depends on,
its input files and the source code that computes it (:func:`code_hash`), plus :data:`FORMAT`.
A state with another key, an older format, or a corrupt file is discarded with a warning; a finished
unit deletes its state (:meth:`ResumeState.clear`), so a rerun never "resumes" at its last step.
"""
from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from functools import cache
from pathlib import Path
from typing import Any

from derd.artifacts import CheckpointError, load_tensors, save_tensors
from derd.config import json_hash
from derd.runtime import log

FORMAT = 2  # bump when the layout of a resume state changes
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
