"""Artifact contract: atomic writes, safe checkpoint loading, JSON sidecars, resume state.

Every ``x.pt`` has a sidecar ``x.json``. Checkpoints are plain tensor dicts loaded with
``torch.load(weights_only=True)`` (or safetensors): nothing is ever unpickled.
"""
from __future__ import annotations

import json
import os
import platform
import tempfile
from collections.abc import Mapping
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any

import torch


class CheckpointError(ValueError):
    """A checkpoint that cannot be used, with the file and the reason."""


_UMASK = os.umask(0o022)
os.umask(_UMASK)


@contextmanager
def _atomic_path(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; artifacts get the usual permissions
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_json(path: str | Path, data: Any) -> Path:
    """Write ``data`` as indented JSON, atomically."""
    return write_text(path, json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text())


def write_text(path: str | Path, text: str) -> Path:
    """Write UTF-8 text, atomically."""
    return write_bytes(path, text.encode())


def write_bytes(path: str | Path, data: bytes) -> Path:
    """Write raw bytes (e.g. a PNG rendered in memory), atomically."""
    path = Path(path)
    with _atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return path


def save_tensors(path: str | Path, tensors: Mapping[str, Any]) -> Path:
    """Save a (nested) dict of tensors/numbers atomically with ``torch.save``."""
    path = Path(path)
    with _atomic_path(path) as tmp:
        torch.save(dict(tensors), tmp)
    return path


def sidecar_path(path: str | Path) -> Path:
    return Path(path).with_suffix(".json")


def save_artifact(path: str | Path, state_dict: Mapping[str, torch.Tensor], sidecar: dict) -> Path:
    """Save a state dict and its JSON sidecar (sidecar last, so it only exists for complete files)."""
    save_tensors(path, {k: v.detach().cpu() for k, v in state_dict.items()})
    write_json(sidecar_path(path), {**sidecar, "versions": versions()})
    return Path(path)


def load_tensors(path: str | Path) -> dict:
    """Load a checkpoint without unpickling code: safetensors, or ``torch.load(weights_only=True)``."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as exc:  # safetensors raises several types for bad headers
            raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        text = str(exc)
        if "Unsupported global" in text:
            raise CheckpointError(
                f"{path}: refusing to unpickle it: it holds Python objects (a full pickled model?), "
                "not a plain state dict. Re-save it with torch.save(model.state_dict(), path)."
            ) from None
        reason = text.split("WeightsUnpickler error:")[-1].strip().splitlines()[0] if text.strip() else type(exc).__name__
        raise CheckpointError(f"{path}: corrupted or not a PyTorch checkpoint ({reason})") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a dict of tensors, found {type(obj).__name__}")
    return obj


_NESTED_KEYS = ("state_dict", "model_state_dict", "model", "net", "student")


def extract_state_dict(obj: dict, path: str | Path = "<checkpoint>") -> dict[str, torch.Tensor]:
    """Map common foreign layouts onto a flat state dict.

    Handles ``{"state_dict": ...}``, ``{"model_state_dict": ...}``, ``{"model": ...}`` wrappers
    and ``module.`` (DataParallel/DDP) prefixes.
    """
    for key in _NESTED_KEYS:
        if key in obj and isinstance(obj[key], dict):
            obj = obj[key]
            break
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError(f"{path}: no tensors found (keys: {sorted(obj)[:8]})")
    if all(k.startswith("module.") for k in tensors):
        tensors = {k.removeprefix("module."): v for k, v in tensors.items()}
    return tensors


def load_into(model: torch.nn.Module, path: str | Path) -> torch.nn.Module:
    """Load a checkpoint into ``model`` strictly, explaining any mismatch."""
    state = extract_state_dict(load_tensors(path), path)
    own = model.state_dict()
    if not any(k in own for k in state) and any(f"net.{k}" in own for k in state):
        state = {f"net.{k}": v for k, v in state.items()}  # checkpoint of the bare network
    missing = sorted(set(own) - set(state) - {k for k in own if k.startswith("normalize.")})
    unexpected = sorted(set(state) - set(own))
    shapes = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in state
        if k in own and state[k].shape != own[k].shape
    ]
    if missing or unexpected or shapes:
        parts = []
        if shapes:
            parts.append("shape mismatch " + "; ".join(shapes[:5]))
        if missing:
            parts.append(f"missing keys {missing[:5]}{' …' if len(missing) > 5 else ''}")
        if unexpected:
            parts.append(f"unexpected keys {unexpected[:5]}{' …' if len(unexpected) > 5 else ''}")
        raise CheckpointError(
            f"{path}: does not fit the configured architecture {type(model).__name__}: " + "; ".join(parts)
        )
    model.load_state_dict(state, strict=False)
    return model


def versions() -> dict[str, str]:
    """Versions of the packages that shape results."""
    out = {"python": platform.python_version()}
    for pkg in ("torch", "torchvision", "pyautoattack", "autoattack", "derd"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return out


def check_finite(value: torch.Tensor | float, what: str, step: int | None = None) -> None:
    """Stop loudly when a loss becomes NaN/inf."""
    v = torch.as_tensor(value)
    if not torch.isfinite(v).all():
        where = f" at step {step}" if step is not None else ""
        raise FloatingPointError(f"{what} became non-finite{where} ({v.flatten()[:4].tolist()}); stopping")
