"""Per-example robust flags of one model, saved after every attack so an evaluation resumes.

``artifacts/eval_flags/<model>-<key>.json`` holds, for each attack name, the settings it ran with, one 0/1
flag per evaluated example (1 = still correctly classified), its runtime and any extra record (e.g.
AutoAttack's warnings). The file is keyed by the weights, the examples, the attack code and the
AutoAttack package and version: a change to any of them starts over, a changed attack setting reruns
that attack only. ``indices`` names the evaluated split's examples the store's attacks run on; an entry
whose attack covered other examples (a shard's AutoAttack chunks, the sanity prefix) records its own
``indices``; otherwise its flags cover ``indices[:len(flags)]``. So flags of shards evaluated on disjoint
indices merge exactly (:func:`merge_entries`).
"""
from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from derd.artifacts import read_json, write_json
from derd.runtime import log


def _canonical(settings: dict) -> dict:
    return json.loads(json.dumps(settings, sort_keys=True, default=str))


class MissingFlags(RuntimeError):
    """A read-only store (``derd evaluate --merge``) lacks an attack's flags for the asked settings."""


class FlagStore:
    def __init__(self, path: Path, model_key: str, indices: list[int], readonly: bool = False):
        self.path, self.readonly = Path(path), readonly
        data = None
        if self.path.exists():
            try:
                data = read_json(self.path)
            except ValueError:
                log.warning("%s: unreadable, starting this model's evaluation over", self.path)
        if not data or data.get("model_key") != model_key or data.get("indices") != indices:
            data = {"model_key": model_key, "indices": indices, "entries": {}}
        self.data = data

    def run(self, name: str, settings: dict, attack: Callable[[], torch.Tensor | tuple[torch.Tensor, dict]],
            cover: Sequence[int] | None = None) -> tuple[torch.Tensor, float, dict]:
        """Flags of ``name`` from the file when its settings match, else from ``attack()`` (then saved).
        ``cover``: the global indices ``attack()`` runs on, in order (its flags may cover a prefix of them);
        default: the store's ``indices``."""
        settings = _canonical(settings)
        entry = self.data["entries"].get(name)
        if entry is None or entry["settings"] != settings:
            if self.readonly:
                have = "no flags" if entry is None else f"flags for other settings {entry['settings']}"
                raise MissingFlags(f"{self.path}: {name!r} has {have}, wanted {settings}")
            start = time.monotonic()
            out = attack()
            flags, extra = out if isinstance(out, tuple) else (out, {})
            entry = {"settings": settings, "flags": flags.int().tolist(), "seconds": time.monotonic() - start,
                     "extra": _canonical(extra)}
            if cover is not None:
                entry["indices"] = [int(i) for i in list(cover)[: len(flags)]]
            self.data["entries"][name] = entry
            write_json(self.path, self.data)
        return torch.tensor(entry["flags"], dtype=torch.bool), entry["seconds"], entry["extra"]

    def covered(self, name: str) -> list[int]:
        """The global indices the flags of entry ``name`` belong to, in order."""
        entry = self.data["entries"][name]
        return entry.get("indices", self.data["indices"][: len(entry["flags"])])

    def seconds(self, prefix: str) -> float:
        """Total runtime of the entries whose name starts with ``prefix`` (also when loaded from disk)."""
        return sum(e["seconds"] for n, e in self.data["entries"].items() if n.startswith(prefix))


class Covering:
    """A view of a store whose attacks run on the examples ``cover`` (e.g. shard 0's sanity prefix)."""

    def __init__(self, store: FlagStore, cover: Sequence[int]):
        self.store, self.cover = store, list(cover)

    def run(self, name: str, settings: dict, attack: Callable) -> tuple[torch.Tensor, float, dict]:
        return self.store.run(name, settings, attack, cover=self.cover)

    def seconds(self, prefix: str) -> float:
        return self.store.seconds(prefix)


def merge_entries(stores: list[FlagStore], combine_extra: Callable[[str, list[dict]], dict]) -> dict[str, dict]:
    """Entries of disjoint shard stores as one store's: flags placed by global index (which must form
    ``0..L-1`` exactly once), settings identical in every shard holding the entry, seconds summed, the
    extras combined by ``combine_extra(name, extras)``. Returned entries carry no ``indices`` (they cover
    the merged store's ``indices[:L]``)."""
    names = list(dict.fromkeys(n for s in stores for n in s.data["entries"]))
    merged = {}
    for name in names:
        holders = [s for s in stores if name in s.data["entries"]]
        settings = [s.data["entries"][name]["settings"] for s in holders]
        if any(x != settings[0] for x in settings):
            raise ValueError(f"{name}: the shards ran it with different settings {settings}; rerun the odd shard")
        by_index: dict[int, int] = {}
        for s in holders:
            for i, f in zip(s.covered(name), s.data["entries"][name]["flags"], strict=True):
                if i in by_index:
                    raise ValueError(f"{name}: example {i} evaluated by two shards (shards overlap)")
                by_index[i] = f
        if sorted(by_index) != list(range(len(by_index))):
            missing = sorted(set(range(max(by_index, default=-1) + 1)) - set(by_index))
            raise ValueError(f"{name}: examples {missing[:10]} are in no shard")
        merged[name] = {"settings": settings[0], "flags": [by_index[i] for i in range(len(by_index))],
                        "seconds": sum(s.data["entries"][name]["seconds"] for s in holders),
                        "extra": combine_extra(name, [s.data["entries"][name]["extra"] for s in holders])}
    return merged
