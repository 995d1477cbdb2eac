"""Artifact contract: atomic writes, safe checkpoint loading, JSON sidecars, resume state.

Every ``x.pt`` has a sidecar ``x.json``. Checkpoints are plain tensor dicts loaded with
``torch.load(weights_only=True)`` (or safetensors): nothing is ever unpickled.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import platform
import re
import tempfile
from collections.abc import Mapping
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any

import torch


class CheckpointError(ValueError):
    """A checkpoint that cannot be used, with the file and the reason."""


class ArtifactWriteError(OSError):
    """An artifact could not be written (disk full, permissions); the previous version is untouched."""

    def __str__(self) -> str:  # the message alone (``errno``/``filename`` are attributes, not in the text)
        return str(self.args[0]) if self.args else ""


_UMASK = os.umask(0o022)
os.umask(_UMASK)


@contextmanager
def _atomic_path(path: Path):
    """A temp file beside ``path``, fsynced and renamed over it when the body succeeds. Any OS failure (a full disk:
    ENOSPC) removes the temp file, leaves the previous ``path`` as it was and raises
    :class:`ArtifactWriteError` naming ``path``."""
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; artifacts get the usual permissions
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)  # the bytes are on disk before the name points at them (a crash leaves old or new)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError as exc:
        if isinstance(exc, ArtifactWriteError):
            raise
        kept = "the previous version is unchanged" if path.exists() else "nothing was written"
        err = ArtifactWriteError(f"{path}: could not write it ({exc.strerror or exc}); {kept}. "
                                 "Free some disk space (or fix the folder's permissions) and rerun")
        err.errno, err.filename = exc.errno, str(path)
        raise err from exc
    finally:
        if tmp is not None and os.path.exists(tmp):
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
    buffer = io.BytesIO()  # serialise first: torch's zip writer reports a full disk as a RuntimeError
    torch.save(dict(tensors), buffer)
    with _atomic_path(path) as tmp:
        tmp.write_bytes(buffer.getbuffer())
    return path


def file_hash(path: str | Path) -> str:
    """Short SHA-256 of a file's bytes (an input's identity in resume keys and sidecars)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


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
        where = "" if path.is_absolute() else f" (relative to the working directory {Path.cwd()})"
        what = "is a directory, not a checkpoint file" if path.is_dir() else f"checkpoint not found{where}"
        raise CheckpointError(f"{path}: {what}; check the path")
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
        blocked = re.search(r"(?:Unsupported global: GLOBAL|unsupported GLOBAL|global) ([\w.]+)", text)
        if "Unsupported global" in text or "unsupported GLOBAL" in text or blocked:
            what = f" ({blocked.group(1)})" if blocked else ""
            raise CheckpointError(
                f"{path}: refusing to unpickle it: it holds Python objects{what} (a full pickled model?), "
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
    changed = True
    while changed:  # DataParallel/DDP ``module.``, RobustBench-style wrappers ``model.`` (in any nesting)
        changed = False
        for prefix in ("module.", "model."):
            if all(k.startswith(prefix) for k in tensors):
                tensors, changed = {k.removeprefix(prefix): v for k, v in tensors.items()}, True
    return map_wrn_keys(tensors)


_WRN_BLOCK = re.compile(r"^block(\d+)\.layer\.(\d+)\.(bn1|conv1|bn2|conv2|convShortcut)\.(.+)$")
_WRN_PARTS = {"bn1": "bn1", "conv1": "conv1", "bn2": "bn2", "conv2": "conv2", "convShortcut": "shortcut"}


def map_wrn_keys(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The official TRADES WideResNet naming (also RobustBench's WideResNet) onto ``wrn34_10``'s.

    TRADES: ``conv1``, ``block{1,2,3}.layer.{j}.{bn1,conv1,bn2,conv2,convShortcut}``, the unused
    ``sub_block1.*`` (dropped), the final ``bn1`` and ``fc``. Ours: ``net.stem``,
    ``net.layers.{(stage-1)·n + j}.{bn1,conv1,bn2,conv2,shortcut}``, ``net.final.0``, ``net.fc``. Any
    other layout is returned unchanged."""
    if not ("conv1.weight" in tensors and "fc.weight" in tensors and "block1.layer.0.conv1.weight" in tensors):
        return tensors
    per_stage = 1 + max(int(m.group(2)) for k in tensors if (m := _WRN_BLOCK.match(k)) and m.group(1) == "1")
    out = {}
    for key, value in tensors.items():
        if key.startswith("sub_block1."):
            continue  # built but never used in TRADES' forward
        if m := _WRN_BLOCK.match(key):
            stage, j, part, rest = int(m.group(1)), int(m.group(2)), m.group(3), m.group(4)
            out[f"net.layers.{(stage - 1) * per_stage + j}.{_WRN_PARTS[part]}.{rest}"] = value
        elif key.startswith("conv1."):
            out["net.stem." + key.removeprefix("conv1.")] = value
        elif key.startswith("bn1."):
            out["net.final.0." + key.removeprefix("bn1.")] = value
        elif key.startswith("fc."):
            out["net." + key] = value
        else:
            out[key] = value  # left for load_into to report as unexpected
    return out


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
            f"{path}: does not fit the configured architecture {type(model).__name__}{_sidecar_says(path)}: "
            + "; ".join(parts)
        )
    bad = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise CheckpointError(
            f"{path}: holds non-finite values (NaN/inf) in {bad[:3]}{' …' if len(bad) > 3 else ''}; the run "
            "that wrote it diverged: retrain it, or point at an earlier checkpoint"
        )
    model.load_state_dict(state, strict=False)
    return model


def _sidecar_says(path: str | Path) -> str:
    """What the file's sidecar records about its data, to explain a mismatch ('' without a sidecar)."""
    try:
        meta = read_json(sidecar_path(path))
    except (OSError, ValueError):
        return ""
    facts = [f"{k}={meta[k]}" for k in ("dataset", "num_classes", "shape", "arch") if isinstance(meta, dict) and k in meta]
    if not facts:
        return ""
    return (f" (its sidecar {sidecar_path(path).name} says {', '.join(facts)}: it was made for other data or "
            "another model; rerun the stage that writes it, or set data/arch in params to match)")


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
