"""Adapter for the official AutoAttack code (Croce & Hein 2020), resumable attack by attack.

Backends: PyPI's ``pyautoattack`` (a repackaging of the official code) or the upstream ``autoattack``
package when a user has it installed; :func:`backend` says which one runs and its version.

The official cascade runs each attack of the version only on the points that every earlier attack
failed to flip. We drive that cascade ourselves — one official ``run_standard_evaluation`` call per
attack on the still-robust points, with the version's own hyperparameters (exactly what the official
``run_standard_evaluation_individual`` does per attack) — so that the per-example flags can be written
atomically after every attack and an interrupted evaluation resumes from the last finished attack.
(pyautoattack 0.2.0's own ``state_path`` resume cannot return labels after a restore, and writes its
state file non-atomically.) AutoAttack's own warnings (randomised or dynamic defence, zero gradients,
Square stronger than the white-box attacks) are collected and returned, never swallowed.
"""
from __future__ import annotations

import hashlib
import importlib
import logging
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import torch
from torch import nn

from derd.artifacts import read_json, write_json
from derd.attacks.base import eval_mode, model_device, robust_flags

STANDARD = ("apgd-ce", "apgd-t", "fab-t", "square")
VERSIONS = {"standard": STANDARD, "standard-apgd": STANDARD[:2], "custom": None}  # None: the attacks given
KNOWN = ("apgd-ce", "apgd-dlr", "apgd-t", "fab", "fab-t", "square")


class AutoAttackError(RuntimeError):
    """AutoAttack cannot run as configured (missing package, unknown attack, foreign state file)."""


def backend(package: str = "auto") -> tuple[type, str, str]:
    """(AutoAttack class, package name, version). ``auto`` prefers upstream ``autoattack`` if installed."""
    names = ("autoattack", "pyautoattack") if package == "auto" else (package,)
    for name in names:
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        try:
            version = metadata.version(name)
        except metadata.PackageNotFoundError:
            version = getattr(module, "__version__", "unknown")
        return module.AutoAttack, name, version
    raise AutoAttackError(
        f"eval.autoattack.package={package!r}: none of {names} is importable; `pip install pyautoattack` "
        "(PyPI) or install the upstream package from github.com/fra31/auto-attack"
    )


@dataclass
class AutoAttackResult:
    robust: torch.Tensor  # bool per example: correct after every attack run
    accuracy_after: dict[str, float]  # cumulative robust accuracy: "clean", then after each attack
    runtime_s: dict[str, float]
    warnings: list[str]
    package: str
    package_version: str
    version: str  # standard | standard-apgd | custom
    attacks: list[str]

    @property
    def accuracy(self) -> float:
        return self.robust.float().mean().item() if len(self.robust) else 0.0


class _Collector(logging.Handler):
    """Keeps the WARNING records of AutoAttack's logger."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def fingerprint(model: nn.Module, x: torch.Tensor, y: torch.Tensor, **settings) -> str:
    """Hash of the weights, the examples and the settings: a state file is only reused for all three."""
    h = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    h.update(x.detach().cpu().contiguous().numpy().tobytes())
    h.update(y.detach().cpu().numpy().tobytes())
    h.update(repr(sorted(settings.items())).encode())
    return h.hexdigest()[:16]


class AutoAttack:
    """Run AutoAttack (L-inf, inputs in [0,1]) on ``model``.

    Args: eps; version ``standard`` (APGD-CE, APGD-T, FAB-T, Square), ``standard-apgd`` (the standard
    version's first two attacks with its hyperparameters: APGD-CE with 1 restart, APGD-T on 9 targets) or
    ``custom`` with ``attacks`` (the official custom version: the constructors' defaults, e.g. APGD-CE with 5
    restarts);
    seed; batch_size; state_path (JSON written after every attack; a rerun with the same model,
    examples and settings resumes); package ``auto`` | ``pyautoattack`` | ``autoattack``;
    square_queries overrides Square's query budget (None: the version's own, 5000).
    """

    def __init__(self, model: nn.Module, eps: float, version: str = "standard", attacks: list[str] | None = None,
                 seed: int = 0, batch_size: int = 256, state_path: str | Path | None = None,
                 package: str = "auto", square_queries: int | None = None):
        if version not in VERSIONS:
            raise AutoAttackError(f"eval.autoattack.version: must be one of {list(VERSIONS)}, got {version!r}")
        attacks = list(VERSIONS[version] or attacks or [])
        unknown = [a for a in attacks if a not in KNOWN]
        if unknown or not attacks:
            raise AutoAttackError(f"eval.autoattack.attacks: {unknown or 'empty'}; choose from {list(KNOWN)}")
        self.model, self.eps, self.version, self.attacks = model, eps, version, attacks
        self.seed, self.batch_size, self.square_queries = seed, batch_size, square_queries
        self.state_path = Path(state_path) if state_path else None
        self.cls, self.package, self.package_version = backend(package)

    def _official(self) -> object:
        """The official object with the version's per-attack hyperparameters."""
        device = model_device(self.model)
        custom = self.version == "custom"
        version = "custom" if custom else "standard"  # standard-apgd: the standard object, its first two attacks
        if self.package == "pyautoattack":
            kw = {"attacks": self.attacks} if custom else {}
            aa = self.cls(self.model, eps=self.eps, norm="Linf", seed=self.seed, version=version, device=device, **kw)
        else:
            aa = self.cls(self.model, norm="Linf", eps=self.eps, seed=self.seed, version=version,
                          attacks_to_run=self.attacks if custom else [], device=device, verbose=False)
        aa.verbose = False
        if self.square_queries is not None:
            aa.square.n_queries = self.square_queries
        return aa

    def _attack_one(self, aa, name: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Official evaluation with ``name`` alone; True where the model is still correct."""
        aa.attacks_to_run = [name]
        if self.package == "pyautoattack":
            _, y_adv = aa.run_standard_evaluation(x, y, batch_size=self.batch_size)
        else:
            _, y_adv = aa.run_standard_evaluation(x, y, bs=self.batch_size, return_labels=True)
        return (y_adv.cpu() == y.cpu())

    def _load_state(self, key: str) -> dict | None:
        if self.state_path is None or not self.state_path.exists():
            return None
        try:
            state = read_json(self.state_path)
        except ValueError:
            return None  # a torn file from a crash: start over
        return state if state.get("fingerprint") == key else None

    def run(self, x: torch.Tensor, y: torch.Tensor,
            on_attack_done: Callable[[str], None] | None = None) -> AutoAttackResult:
        """Evaluate ``x, y`` (CPU tensors); ``on_attack_done(name)`` fires after each attack is saved."""
        x, y = x.detach().cpu(), y.detach().cpu()
        key = fingerprint(self.model, x, y, eps=self.eps, version=self.version, attacks=self.attacks,
                          seed=self.seed, square_queries=self.square_queries, package=self.package)
        state = self._load_state(key) or {"fingerprint": key, "done": [], "robust": None,
                                          "accuracy_after": {}, "runtime_s": {}, "warnings": []}
        collector = _Collector()
        loggers = [logging.getLogger(n) for n in ("auto-attack", "autoattack")]
        for lg in loggers:
            lg.addHandler(collector)
        try:
            with eval_mode(self.model), warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                aa = self._official()
                if state["robust"] is None:
                    start = time.monotonic()
                    robust = robust_flags(self.model, None, x, y, self.batch_size)
                    state.update(robust=robust.int().tolist(), runtime_s={"clean": time.monotonic() - start})
                    state["accuracy_after"]["clean"] = robust.float().mean().item()
                    self._save(state)
                for name in self.attacks:
                    if name in state["done"]:
                        continue
                    robust = torch.tensor(state["robust"], dtype=torch.bool)
                    idx = robust.nonzero().flatten()
                    start = time.monotonic()
                    if len(idx):
                        robust[idx] = self._attack_one(aa, name, x[idx], y[idx])
                    state["robust"] = robust.int().tolist()
                    state["done"].append(name)
                    state["runtime_s"][name] = time.monotonic() - start
                    state["accuracy_after"][name] = robust.float().mean().item()
                    if name == "square":  # the official "Square stronger than the white-box attacks" flag
                        importlib.import_module(f"{self.package}.checks").check_square_sr(state["accuracy_after"])
                    self._record_warnings(state, name, [str(w.message) for w in caught] + collector.messages)
                    caught.clear()
                    collector.messages.clear()
                    self._save(state)
                    if on_attack_done is not None:
                        on_attack_done(name)
        finally:
            for lg in loggers:
                lg.removeHandler(collector)
        return AutoAttackResult(
            robust=torch.tensor(state["robust"], dtype=torch.bool), accuracy_after=state["accuracy_after"],
            runtime_s=state["runtime_s"], warnings=state["warnings"], package=self.package,
            package_version=self.package_version, version=self.version, attacks=self.attacks,
        )

    @staticmethod
    def _record_warnings(state: dict, attack: str, messages: list[str]) -> None:
        for message in dict.fromkeys(messages):
            if f"{attack}: {message}" not in state["warnings"]:
                state["warnings"].append(f"{attack}: {message}")

    def _save(self, state: dict) -> None:
        if self.state_path is not None:
            write_json(self.state_path, state)
