"""A replay memory of pseudo images that student batches draw from (METHOD.md "Memory bank").

Any generator-based Stage-II method can use it (``stage2.memory_bank``): batches enter as they are made,
the oldest leave once ``size`` images are held, and each student batch takes ``fraction`` of its rows from
the bank (uniform draws, with replacement) and the rest fresh from the generator. FERD keeps its own bank
(``stage2.ferd.bank_*``: each synthesis round's lowest-objective batch enters; :mod:`derd.distill.ferd`).
The bank lives on the run's device; :meth:`MemoryBank.state_dict` holds it on the CPU for resume states.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from derd import distributed
from derd.config import ConfigError

ENTRIES = {"generator": "every batch a generator step makes", "student": "the fresh rows of every student batch"}


class MemoryBank:
    """At most ``size`` images (first in, first out) on ``device``; ``enters`` names which batches the
    :class:`~derd.distill.loop.Context` adds by itself (None: the method adds them with :meth:`add`)."""

    def __init__(self, size: int, fraction: float, device: torch.device, enters: str | None = None):
        if size < 1:
            raise ValueError(f"memory bank size must be ≥ 1, got {size}")
        if not 0 < fraction <= 1:
            raise ValueError(f"memory bank fraction must be in (0, 1], got {fraction}")
        if enters is not None and enters not in ENTRIES:
            raise ValueError(f"memory bank enters: must be one of {sorted(ENTRIES)} or None, got {enters!r}")
        self.size, self.fraction, self.device, self.enters = size, fraction, torch.device(device), enters
        self.images = torch.empty(0, device=self.device)
        self.next = 0  # the row the next image overwrites once the bank is full

    @classmethod
    def from_config(cls, opts, has_generator: bool, device: torch.device) -> MemoryBank | None:
        """The bank ``stage2.memory_bank`` asks for (None when its capacity is 0 or the method has no generator)."""
        if opts.capacity == 0 or not has_generator:
            return None
        if opts.enters == "student" and opts.fraction == 1:
            raise ConfigError("stage2.memory_bank.enters: student with fraction 1 admits only the first batch (no "
                              "later batch has fresh rows); lower stage2.memory_bank.fraction below 1 or use generator")
        return cls(opts.capacity, opts.fraction, device, opts.enters)

    def __len__(self) -> int:
        return len(self.images)

    @torch.no_grad()
    def add(self, x: torch.Tensor) -> None:
        """Keep the images of ``x`` (detached, float32, on the bank's device), dropping the oldest beyond ``size``."""
        x = x.detach().float().to(self.device)[-self.size :]
        room = self.size - len(self.images)
        if room > 0:
            self.images = torch.cat([self.images.reshape(-1, *x.shape[1:]), x[:room]])
            x = x[room:]
        while len(x):  # full: overwrite the oldest rows
            row = x[: self.size - self.next]
            self.images[self.next : self.next + len(row)] = row
            self.next = (self.next + len(row)) % self.size
            x = x[len(row) :]

    def offer(self, source: str, x: torch.Tensor) -> None:
        """Add ``x`` when batches from ``source`` (a key of :data:`ENTRIES`) enter this bank."""
        if source == self.enters:
            self.add(x)

    @torch.no_grad()
    def batch(self, n: int, fresh: Callable[[int], torch.Tensor], rng: torch.Generator) -> torch.Tensor:
        """This rank's rows of a global batch of ``n``: ``fraction``·n (rounded to whole rows per rank) drawn
        from the bank with ``rng`` (the same draws on every rank), the rest ``fresh(k)`` (k global rows; those
        enter the bank when it admits student rows). All fresh while the bank is empty."""
        w = distributed.world()
        k = w * round(self.fraction * n / w) if len(self) else 0
        parts = []
        if k:
            idx = distributed.mine(torch.randint(0, len(self), (k,), generator=rng))
            parts.append(self.images[idx.to(self.device)])
        if k < n:
            new = fresh(n - k).float()
            self.offer("student", new)
            parts.append(new)
        return torch.cat(parts)

    def describe(self) -> str:
        """One line for a method's reading."""
        enters = ENTRIES.get(self.enters, "what the method adds")
        return (f"last {self.size} images ({enters}); student batches: {self.fraction:g} from the bank, the rest "
                "fresh G(z)")

    def state_dict(self) -> dict[str, Any]:
        return {"images": self.images.cpu(), "next": self.next}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.images = state["images"].to(self.device)
        self.next = int(state["next"])
