"""Stage entry points (placeholder until the Prefect flows land: each calls its library stage)."""
from __future__ import annotations

from pathlib import Path

from derd import config


def teachers_flow(params: str = "params.yaml", root: str = ".") -> dict:
    from derd import teachers

    return teachers.run(config.load(params), Path(root))
