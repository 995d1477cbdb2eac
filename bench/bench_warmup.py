"""Stage-I speed: seconds per generator step and per inversion step at several batch sizes.

Usage: python -m bench.bench_warmup ROOT  (ROOT holds artifacts/teachers/ from `derd teachers`;
uses params.yaml for the teacher/generator architectures). Prints one line per setting.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

from bench.timing import once, timed
from derd import config, data
from derd.losses import StageOneLoss
from derd.models import build_generator
from derd.stage1.inversion import optimise_batch
from derd.teachers import load_teacher


def time_generator_steps(cfg, teacher, batch: int, steps: int = 20) -> float:
    info = data.info(cfg.data)
    g = build_generator(cfg.stage1.generator.arch, cfg.stage1.generator.nz, info.shape)
    opt = torch.optim.Adam(g.parameters(), lr=cfg.stage1.lr)
    with StageOneLoss.from_config(teacher, cfg.stage1) as loss_fn:
        def step():
            loss = loss_fn(g(torch.randn(batch, g.nz))).total
            opt.zero_grad()
            loss.backward()
            opt.step()
        return timed(step, reps=steps, warmup=0)["median_s"]


def time_inversion_steps(cfg, teacher, batch: int, steps: int = 20) -> float:
    info = data.info(cfg.data)
    with StageOneLoss.from_config(teacher, cfg.stage1) as loss_fn:
        _, seconds = once(lambda: optimise_batch(loss_fn, (batch, *info.shape), steps, 0.05,
                                                 torch.Generator().manual_seed(0)))
    return seconds / steps


def main(root: str) -> None:
    torch.set_num_threads(int(sys.argv[2]) if len(sys.argv) > 2 else 1)
    cfg = config.load("params.yaml")
    teacher = load_teacher(cfg, "natural", Path(root))
    print(f"threads={torch.get_num_threads()} teacher={cfg.teachers.natural.arch} generator={cfg.stage1.generator.arch}")
    for batch in (32, 64, 128):
        print(f"batch {batch:4d}: generator step {time_generator_steps(cfg, teacher, batch) * 1e3:7.1f} ms, "
              f"inversion step {time_inversion_steps(cfg, teacher, batch) * 1e3:7.1f} ms")


if __name__ == "__main__":
    main(sys.argv[1])
