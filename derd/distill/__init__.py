"""Stage-II: robust distillation. DERD, its variants and the data-free baselines, one registry.

``run(cfg, root)`` trains one student per (method in stage2.methods, seed in stage2.seeds) and
writes metrics/distill.json; ``train_student(cfg, method, seed, root)`` trains one (the pipeline
runs one task per call). Students: artifacts/students/<method>-seed<k>.pt (+ .json sidecar);
curves: plots/distill/<method>-seed<k>.csv; resume checkpoints: artifacts/checkpoints/.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..config import Config
from ..io import write_json
from ..runtime import Paths
from .loop import Context, Method, fit

_METHODS: dict[str, type[Method]] = {}


def register_method(name: str, label: str | None = None):
    """Class decorator: make a :class:`Method` available to ``stage2.methods`` as ``name``."""
    def wrap(cls: type[Method]) -> type[Method]:
        cls.name, cls.label = name, label or name
        _METHODS[name] = cls
        return cls

    return wrap


def registered_methods() -> list[str]:
    return sorted(_METHODS)


def get_method(name: str) -> type[Method]:
    if name not in _METHODS:
        raise KeyError(f"stage2.methods: unknown method {name!r}; registered: {registered_methods()}")
    return _METHODS[name]


def params_hash(cfg: Config) -> str:
    """Hash of everything a student depends on (stage2.methods/seeds excluded: they pick, not shape)."""
    data = cfg.model_dump(mode="json")
    data["stage2"] = {k: v for k, v in data["stage2"].items() if k not in ("methods", "seeds")}
    chosen = {k: data[k] for k in ("seed", "data", "teachers", "stage1", "stage2")}
    return hashlib.sha256(json.dumps(chosen, sort_keys=True).encode()).hexdigest()[:12]


def train_student(cfg: Config, method: str, seed: int, root: Path = Path(".")) -> dict[str, Any]:
    """Train (or resume) one student; returns its sidecar."""
    return fit(cfg, get_method(method), seed, Path(root), params_hash(cfg))


def run(cfg: Config, root: Path = Path("."), train: Callable[..., dict[str, Any]] = train_student) -> dict[str, Any]:
    """The distill stage: every method × seed of stage2 (each by ``train``, e.g. a pipeline task wrapping
    :func:`train_student`), then metrics/distill.json."""
    results = {}
    for method in cfg.stage2.methods:
        for seed in cfg.stage2.seeds:
            side = train(cfg, method, seed, root)
            results[f"{method}-seed{seed}"] = {
                "method": method, "label": side["label"], "seed": seed, "runtime_seconds": side["runtime_seconds"],
                "final": side["final"], "reading": side["reading"],
                "student": str(Paths(Path(root)).student(method, seed).relative_to(Path(root))),
            }
    write_json(Paths(Path(root)).metrics / "distill.json", results)
    return results


from . import cmi, dafl, derd, dfad, dfard, rslad_real, zskt  # noqa: E402,F401  (fill the registry)

__all__ = ["Context", "Method", "register_method", "registered_methods", "get_method", "train_student", "run",
           "params_hash"]
