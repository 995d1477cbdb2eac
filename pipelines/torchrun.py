"""``runtime.nproc: N`` for the training commands: the CLI re-runs itself under ``torchrun --nproc_per_node=N``,
rank 0 runs the stage's flow (Prefect, MLflow, every output) and the other ranks enter :func:`follow`, which makes
the same training calls so that their collectives line up (docs/SCALING.md, "N GPUs on one machine"). The
data-parallel helpers the stages themselves call are ``derd/distributed.py``.
"""
from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from derd.config import Config, ConfigError

TRAINING_COMMANDS = ("teachers", "warmup", "distill")
SINGLE_PROCESS_UNITS = ("inversion_pool",)  # a DERD_inv pool is optimised in one process


def should_launch(cfg: Config, command: str, unit: str | None) -> bool:
    """True when this command should re-run itself under torchrun (``runtime.nproc`` > 1, not yet launched)."""
    if command not in TRAINING_COMMANDS or unit in SINGLE_PROCESS_UNITS:
        return False
    nproc = cfg.runtime.nproc
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched > 1 and launched != nproc:
        raise ConfigError(f"runtime.nproc: {nproc}, but torchrun started {launched} processes; make them agree")
    return nproc > 1 and "LOCAL_RANK" not in os.environ


def launch(nproc: int, cli_args: Sequence[str]) -> int:
    """Run ``python -m pipelines.cli <cli_args>`` on ``nproc`` local processes with torchrun; its exit status."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "pipelines.cli", *cli_args]
    return subprocess.call(cmd)


def follow(command: str, cfg: Config, root: Path, unit: str | None) -> None:
    """A rank other than 0: the training calls the stage's flow makes on rank 0, without Prefect, MLflow or
    the stage's reports (collectives line up; this rank writes nothing)."""
    if command == "teachers":
        from derd import teachers

        teachers.run(cfg, root)
    elif command == "warmup":
        from derd.runtime import resolve_device
        from derd.stage1 import warmup

        units = [unit] if unit else [u for u in cfg.stage1_units() if u not in SINGLE_PROCESS_UNITS]
        for u in units:
            warmup.train_generator(cfg, root, u.removeprefix("generator_"), resolve_device(cfg.device), [])
    else:
        from derd import distill

        for u in [unit] if unit else cfg.student_units():
            method, seed = u.rsplit("-seed", 1)
            distill.train_student(cfg, method, int(seed), root)
