"""One registry mechanism: a name -> entry table per kind, filled by a decorator where each entry is defined.

The six kinds and the module whose import fills each are listed in :data:`HOMES`; the config validates
names against them (:func:`names_of`), so adding an entry is one decorated definition.
"""
from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """Entries of one ``kind``; ``key`` is the params key that names them (for error messages)."""

    def __init__(self, kind: str, key: str | None = None):
        self.kind, self.key = kind, key
        self._entries: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator (or plain call) adding ``name``; a name registered twice is a programming error."""
        def add(entry: T) -> T:
            if name in self._entries and self._entries[name] is not entry:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._entries[name] = entry
            return entry

        return add

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __getitem__(self, name: str) -> T:
        if name not in self._entries:
            where = f"{self.key}: " if self.key else ""
            raise KeyError(f"{where}unknown {self.kind} {name!r}; registered: {self.names()}")
        return self._entries[name]


# kind -> (module whose import fills the registry, the registry's name in it)
HOMES = {
    "dataset": ("derd.data", "DATASETS"),
    "architecture": ("derd.models", "ARCHS"),
    "generator": ("derd.models", "GENERATORS"),
    "method": ("derd.distill", "METHODS"),
    "aggregation": ("derd.distill.aggregation", "AGGREGATIONS"),
    "attack": ("derd.attacks", "ATTACKS"),
}


def registry(kind: str) -> Registry:
    """The filled registry of ``kind`` (imports its home module)."""
    module, name = HOMES[kind]
    return getattr(importlib.import_module(module), name)


def names_of(kind: str, forget_imports: bool = False) -> list[str]:
    """The names registered for ``kind``. ``forget_imports``: unload the project modules the lookup
    imported, so a traced stage's record of imported code shows what it uses, not what validation read."""
    if not forget_imports:
        return registry(kind).names()
    with _forgetting_imports():
        return registry(kind).names()


@contextmanager
def _forgetting_imports() -> Iterator[None]:
    before = set(sys.modules)
    try:
        yield
    finally:
        for name in set(sys.modules) - before:
            if name.split(".")[0] in ("derd", "pipelines"):
                parent, _, child = name.rpartition(".")
                if parent in before and hasattr(sys.modules[parent], child):
                    delattr(sys.modules[parent], child)
                del sys.modules[name]
