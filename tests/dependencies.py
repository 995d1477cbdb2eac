"""What each pipeline stage really reads, against what dvc.yaml declares.

Every ``derd`` stage process run with ``DERD_TRACE_READS=<folder>`` writes ``<folder>/<command>[-<unit>].json``:
the project modules it imported and the params keys it read (attribute reads, dumps and hashes; validation
and MLflow bookkeeping excluded). :func:`mismatches` compares them with the resolved stages of ``dvc.lock``
both ways: a read that no dep covers is a stale-cache bug, a declared dep that is never read reruns a stage
for nothing.
"""
from __future__ import annotations

import json
import shlex
from pathlib import Path

import yaml

from derd.config import WHERE_NOT_WHAT

CODE = ("derd", "pipelines")


def _leaves(value: object, prefix: str) -> set[str]:
    if isinstance(value, dict):
        return {leaf for k, v in value.items() for leaf in _leaves(v, f"{prefix}.{k}" if prefix else k)}
    return {prefix}


def _outside(key: str) -> bool:
    return any(key == p or key.startswith(p + ".") for p in WHERE_NOT_WHAT)


def declared(root: Path, stage: dict) -> tuple[set[str], set[str], set[str]]:
    """(code files, other deps, params leaves) of one resolved dvc.lock stage."""
    code, other = set(), set()
    for dep in stage.get("deps", []):
        path = dep["path"]
        if path.split("/")[0] not in CODE:
            other.add(path)
        elif (root / path).is_dir():
            code |= {str(p.relative_to(root)) for p in (root / path).rglob("*.py")}
        else:
            code.add(path)
    params = set()
    for values in (stage.get("params") or {}).values():
        for key, value in values.items():
            params |= _leaves(value, key)
    return code, other, {p for p in params if not _outside(p)}


def trace_name(cmd: str) -> str:
    """``python -m pipelines.cli distill --only derd-seed0`` -> ``distill-derd-seed0.json``."""
    words = shlex.split(cmd)
    args = words[words.index("pipelines.cli") + 1:]
    unit = args[args.index("--only") + 1] if "--only" in args else None
    return f"{args[0]}-{unit}.json" if unit else f"{args[0]}.json"


def mismatches(root: Path, traces: Path) -> dict[str, dict[str, list[str]]]:
    """Per dvc.yaml stage (a foreach/matrix template: the union of its instances, which share one
    declaration): reads not declared, and declared deps never read. Empty: all agree."""
    lock = yaml.safe_load((root / "dvc.lock").read_text())["stages"]
    templates = yaml.safe_load((root / "dvc.yaml").read_text())["stages"]
    union: dict[str, dict[str, set[str]]] = {}
    problems: dict[str, dict[str, list[str]]] = {}
    for name, stage in lock.items():
        if name == "inputs":
            continue  # always run (always_changed): it has no deps to compare, it *is* the dataset's dep
        trace_file = traces / trace_name(stage["cmd"])
        if not trace_file.is_file():
            problems[name] = {"not traced (did the stage run with DERD_TRACE_READS?)": [trace_file.name]}
            continue
        trace = json.loads(trace_file.read_text())
        if Path(trace["code_root"]).resolve() != root.resolve():
            problems[name] = {"ran the code of another checkout": [trace["code_root"]]}
            continue
        code, other, params = declared(root, stage)
        entry = union.setdefault(name.split("@")[0], {k: set() for k in ("code", "other", "params", "modules", "read")})
        entry["code"] |= code
        entry["other"] |= other
        entry["params"] |= {_generic(p, name) for p in params}
        entry["modules"] |= set(trace["modules"])
        entry["read"] |= {_generic(p, name) for p in trace["params"] if not _outside(p)}
    for template, e in union.items():
        spec = templates[template]
        whole_file = any(isinstance(p, dict) and None in p.values() for p in (spec.get("do") or spec).get("params", []))
        found = {
            "code read, not a dep": sorted(e["modules"] - e["code"]),
            "code dep, never imported": sorted(e["code"] - e["modules"]),
            "params read, not declared": sorted(e["read"] - e["params"]),
            "params declared, never read": sorted(e["params"] - e["read"]),
        }
        loads_data = any(p == "data.split_seed" or p.endswith(".checkpoint") for p in e["read"])
        if loads_data and not whole_file and "artifacts/inputs.json" not in e["other"]:
            found["reads the dataset or a user checkpoint without depending on artifacts/inputs.json"] = [template]
        if any(found.values()):
            problems[template] = {k: v for k, v in found.items() if v}
    return problems


def _generic(key: str, instance: str) -> str:
    """``teachers.robust.arch`` read by ``warmup@robust`` -> ``teachers.${item}.arch`` (the template's key)."""
    item = instance.partition("@")[2]
    return key.replace(f".{item}.", ".${item}.") if item and "-" not in item else key
