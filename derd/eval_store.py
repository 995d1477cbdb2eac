"""Per-example robust flags of one model, saved after every attack so an evaluation resumes.

``artifacts/eval_flags/<model>-<key>.json`` holds, for each attack name, the settings it ran with, one 0/1
flag per evaluated example (1 = still correctly classified), its runtime and any extra record (e.g.
AutoAttack's warnings). The file is keyed by the weights, the examples, the attack code and the
AutoAttack package and version: a change to any of them starts over, a changed attack setting reruns
that attack only. ``indices`` names the
test-split examples, so flags of shards evaluated on disjoint indices merge exactly.
"""
from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import torch

from .io import read_json, write_json
from .runtime import log


def _canonical(settings: dict) -> dict:
    return json.loads(json.dumps(settings, sort_keys=True, default=str))


class FlagStore:
    def __init__(self, path: Path, model_key: str, indices: list[int]):
        self.path = Path(path)
        data = None
        if self.path.exists():
            try:
                data = read_json(self.path)
            except ValueError:
                log.warning("%s: unreadable, starting this model's evaluation over", self.path)
        if not data or data.get("model_key") != model_key or data.get("indices") != indices:
            data = {"model_key": model_key, "indices": indices, "entries": {}}
        self.data = data

    def run(self, name: str, settings: dict, attack: Callable[[], torch.Tensor | tuple[torch.Tensor, dict]]
            ) -> tuple[torch.Tensor, float, dict]:
        """Flags of ``name`` from the file when its settings match, else from ``attack()`` (then saved)."""
        settings = _canonical(settings)
        entry = self.data["entries"].get(name)
        if entry is None or entry["settings"] != settings:
            start = time.monotonic()
            out = attack()
            flags, extra = out if isinstance(out, tuple) else (out, {})
            entry = {"settings": settings, "flags": flags.int().tolist(), "seconds": time.monotonic() - start,
                     "extra": _canonical(extra)}
            self.data["entries"][name] = entry
            write_json(self.path, self.data)
        return torch.tensor(entry["flags"], dtype=torch.bool), entry["seconds"], entry["extra"]

    def seconds(self, prefix: str) -> float:
        """Total runtime of the entries whose name starts with ``prefix`` (also when loaded from disk)."""
        return sum(e["seconds"] for n, e in self.data["entries"].items() if n.startswith(prefix))
