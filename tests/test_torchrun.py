"""`runtime.nproc > 1` (pipelines/torchrun.py): when a command re-runs itself under torchrun, what the other ranks
run; and derd/distributed.py, the helpers the stages call, stays below the stages (imports none of them)."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

from derd import config, distill, teachers
from derd.config import ConfigError
from derd.stage1 import warmup
from pipelines import torchrun

ROOT = Path(__file__).resolve().parent.parent
STAGES = ("derd.distill", "derd.stage1", "derd.teachers", "derd.evaluation", "derd.report", "pipelines")


def imported_modules(path: Path, package: str) -> set[str]:
    """Every module the file at ``path`` (in ``package``) imports, at its top or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            parts = package.split(".")
            base = ".".join([*parts[: len(parts) - node.level + 1], node.module or ""] if node.level else
                            [node.module or ""]).strip(".")
            found |= {base} | {f"{base}.{alias.name}" for alias in node.names}
    return found


def stage_imports(path: Path, package: str) -> list[str]:
    return sorted(m for m in imported_modules(path, package) if any(m == s or m.startswith(s + ".") for s in STAGES))


def test_distributed_imports_no_stage():
    found = stage_imports(ROOT / "derd" / "distributed.py", "derd")
    assert not found, f"derd/distributed.py imports {found}; the torchrun entry lives in pipelines/torchrun.py"


def test_a_stage_imported_anywhere_in_a_file_is_found(tmp_path):
    """The check above fails on the code it names: the rank entry as it was (stages imported inside a function)."""
    probe = tmp_path / "probe.py"
    probe.write_text("import torch\n\ndef follow():\n    from derd import distill, teachers\n"
                     "    from .stage1 import warmup\n")
    assert stage_imports(probe, "derd") == ["derd.distill", "derd.stage1", "derd.stage1.warmup", "derd.teachers"]


@pytest.mark.parametrize("nproc, command, unit, env, launch", [
    (1, "distill", "derd-seed0", {}, False),
    (2, "distill", "derd-seed0", {}, True),
    (2, "warmup", "inversion_pool", {}, False),  # the DERD_inv pool is optimised in one process
    (2, "evaluate", None, {}, False),  # evaluation shards instead (derd evaluate --shard)
    (2, "teachers", None, {"WORLD_SIZE": "2", "LOCAL_RANK": "1"}, False),  # already launched
])
def test_which_commands_relaunch_under_torchrun(monkeypatch, nproc, command, unit, env, launch):
    for key in ("WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert torchrun.should_launch(config.parse({"runtime": {"nproc": nproc}}), command, unit) is launch


def test_a_torchrun_that_disagrees_with_runtime_nproc_is_a_config_error(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    with pytest.raises(ConfigError, match="runtime.nproc: 2, but torchrun started 4 processes"):
        torchrun.should_launch(config.parse({"runtime": {"nproc": 2}}), "distill", None)


def test_other_ranks_make_the_training_calls_of_their_stage(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(teachers, "run", lambda cfg, root: calls.append(("teachers",)))
    monkeypatch.setattr(warmup, "train_generator", lambda cfg, root, role, device, rows: calls.append(("warmup", role)))
    monkeypatch.setattr(distill, "train_student", lambda cfg, method, seed, root: calls.append(("distill", method, seed)))
    cfg = config.parse({"stage1": {"generators": ["natural", "robust"]},
                        "stage2": {"methods": ["derd", "dafl"], "seeds": [0, 1]}})
    torchrun.follow("teachers", cfg, tmp_path, None)
    torchrun.follow("warmup", cfg, tmp_path, None)  # every generator, never the pool
    torchrun.follow("distill", cfg, tmp_path, "dafl-seed1")
    assert calls == [("teachers",), ("warmup", "natural"), ("warmup", "robust"), ("distill", "dafl", 1)]
