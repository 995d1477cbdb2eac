"""Fingerprints of the inputs that live outside the repository: the dataset's files and the teachers'
user checkpoints (``teachers.<role>.checkpoint``).

The ``inputs`` DVC stage runs on every ``dvc repro`` (it takes about a second) and writes
``artifacts/inputs.json``. Every stage that reads the data or a user checkpoint depends on that file,
so replacing a file reruns what it feeds, while moving the same files (``data.root``) or
``data.download`` changes nothing. Folders larger than :data:`CONTENT_LIMIT` are fingerprinted by
file names, sizes and modification times instead of their bytes (ImageNet-100 is ~15 GB).
"""
from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path

from derd import data as datasets
from derd.artifacts import CheckpointError, file_hash, write_json
from derd.config import Config, Data
from derd.runtime import Paths
from derd.teachers import ROLES

CONTENT_LIMIT = 1 << 30


def _digits_files(cfg: Data) -> list[Path]:
    from importlib import resources

    return [Path(str(resources.files("sklearn.datasets.data") / "digits.csv.gz"))]


def _folder_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file())


def _cifar_files(cfg: Data) -> list[Path]:
    sub = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}[cfg.name]
    return _folder_files(Path(cfg.root) / sub)


def _fashion_files(cfg: Data) -> list[Path]:
    return _folder_files(datasets.fashion_folder(cfg))


def _imagenet_files(cfg: Data) -> list[Path]:
    return _folder_files(Path(cfg.root))


SOURCES: dict[str, Callable[[Data], list[Path]]] = {
    "digits": _digits_files, "fashion_mnist": _fashion_files, "cifar10": _cifar_files, "cifar100": _cifar_files,
    "imagenet100": _imagenet_files,
}


def dataset_fingerprint(cfg: Data) -> dict:
    """Per-file hashes of the dataset (relative names, so the folder's location does not matter)."""
    files = SOURCES[cfg.name](cfg)
    if not files:
        raise datasets.DataError(f"{cfg.name}: no files found for data.root={cfg.root!r}")
    base = Path(os.path.commonpath([str(f.parent) for f in files]))
    if sum(f.stat().st_size for f in files) <= CONTENT_LIMIT:
        return {"name": cfg.name, "by": "content", "files": {str(f.relative_to(base)): file_hash(f) for f in files}}
    digest = hashlib.sha256()
    for f in files:
        st = f.stat()
        digest.update(f"{f.relative_to(base)}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return {"name": cfg.name, "by": "name+size+mtime", "n_files": len(files), "digest": digest.hexdigest()[:16]}


def fingerprint(cfg: Config) -> dict:
    """What ``artifacts/inputs.json`` holds: the dataset's and each user checkpoint's hash."""
    checkpoints = {}
    for role in ROLES:
        path = getattr(cfg.teachers, role).checkpoint
        if path and not Path(path).is_file():
            raise CheckpointError(f"teachers.{role}.checkpoint={path}: file not found")
        checkpoints[role] = file_hash(path) if path else None
    return {"dataset": dataset_fingerprint(cfg.data), "checkpoints": checkpoints}


def run(cfg: Config, root: Path = Path(".")) -> dict:
    result = fingerprint(cfg)
    write_json(Paths(Path(root)).inputs, result)
    return result
