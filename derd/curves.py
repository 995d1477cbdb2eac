"""Per-step curves as CSV: one writer and one reader for every stage's ``plots/`` files."""
from __future__ import annotations

import csv
import io
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from derd.artifacts import write_text


def write_rows(path: str | Path, rows: Iterable[Mapping[str, Any]]) -> Path:
    """Rows as CSV (columns: the union of their keys, first-seen order; missing cells empty), atomically."""
    rows = list(rows)
    columns = list(dict.fromkeys(k for r in rows for k in r))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, columns, restval="", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return write_text(path, buf.getvalue())


def read_rows(path: str | Path) -> list[dict[str, str]]:
    """The rows of a CSV written by :func:`write_rows` (cells as text)."""
    with open(path, newline="") as f:
        return list(csv.DictReader(f))
