"""Stage-II: robust distillation. DERD, its variants and the data-free baselines, one registry.

One unit of work per (method in stage2.methods, seed in stage2.seeds), named ``<method>-seed<k>``
(DVC runs one stage per unit): ``run_unit`` trains it and writes artifacts/students/<unit>.pt (+ .json
sidecar), plots/distill/<unit>.csv and metrics/distill/<unit>.json; resume state lives in
artifacts/checkpoints/ until the student is saved.
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from derd.artifacts import write_json
from derd.config import Config, ConfigError, untraced
from derd.distill.loop import Context, Method, fit
from derd.registry import Registry
from derd.runtime import Paths

METHODS: Registry[type[Method]] = Registry("method", "stage2.methods")
registered_methods = METHODS.names
get_method = METHODS.__getitem__


def register_method(name: str, label: str | None = None):
    """Class decorator: make a :class:`Method` available to ``stage2.methods`` as ``name``."""
    def wrap(cls: type[Method]) -> type[Method]:
        cls.name, cls.label = name, label or name
        return METHODS.register(name)(cls)

    return wrap


STUDENT_KEYS = (  # what a student depends on besides its teachers' and generator's files (hashed separately)
    "data.name", "data.image_size", "data.augment", "teachers.natural.arch", "teachers.natural.width",
    "teachers.natural.normalize", "teachers.robust.arch", "teachers.robust.width", "teachers.robust.normalize", "stage1.generator", "stage1.lambda_oh", "stage1.lambda_ie",
    "stage1.lambda_bn", "stage1.lambda_a", "stage1.ie_log_base", "stage2",
)


def params_hash(cfg: Config) -> str:
    """Hash of everything a student depends on (stage2.methods/seeds excluded: they pick, not shape)."""
    return cfg.section_hash(*STUDENT_KEYS, exclude=("stage2.methods", "stage2.seeds"))


def train_student(cfg: Config, method: str, seed: int, root: Path = Path(".")) -> dict[str, Any]:
    """Train (or resume) one student; returns its sidecar."""
    return fit(cfg, get_method(method), seed, Path(root), params_hash(cfg))


def run_unit(cfg: Config, root: Path, unit: str, train: Callable[..., dict[str, Any]] = train_student) -> dict[str, Any]:
    """Train one student (by ``train``, e.g. a pipeline task wrapping :func:`train_student`) and write its
    :func:`finals` to metrics/distill/<unit>.json; returns its summary."""
    with untraced():  # naming a unit is not a dependency on the others
        known = cfg.student_units()
    if unit not in known:
        raise ConfigError(f"distill unit {unit!r}: not one of stage2.methods × stage2.seeds ({known})")
    method, seed = unit.rsplit("-seed", 1)
    side = train(cfg, method, int(seed), root)
    summary = {
        "method": method, "label": side["label"], "seed": int(seed), "runtime_seconds": side["runtime_seconds"],
        "final": side["final"], "reading": side["reading"],
        "student": str(Paths(Path(root)).student(method, int(seed)).relative_to(Path(root))),
    }
    write_json(Paths(Path(root)).metrics / "distill" / f"{unit}.json", finals(side["final"]))
    return summary


def finals(final: dict[str, float]) -> dict[str, float]:
    """What ``metrics/distill/<unit>.json`` holds, the numbers runs are compared by: the losses of the last logged
    iteration (``L_*``, ``*_loss``); every other reading is in the student's sidecar."""
    return {k: v for k, v in final.items() if k.startswith("L_") or k.endswith("_loss")}


def run(cfg: Config, root: Path = Path("."), train: Callable[..., dict[str, Any]] = train_student) -> dict[str, Any]:
    """Every student of stage2.methods × stage2.seeds, one unit each."""
    return {unit: run_unit(cfg, Path(root), unit, train) for unit in cfg.student_units()}


from derd.distill import cmi, dafl, derd, dfad, dfard, ferd, rslad_real, zskt  # noqa: F401  (fill the registry)

__all__ = [
    "METHODS",
    "Context",
    "Method",
    "get_method",
    "params_hash",
    "register_method",
    "registered_methods",
    "run",
    "run_unit",
    "train_student",
]
