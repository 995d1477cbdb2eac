"""Calibrate the Fashion-MNIST profile: teachers, image size and ε, measured on the VALIDATION split.

    python -m sweeps.calibrate_fashion            # the grid below; writes docs/calibration_fashion.{md,json}
    python -m sweeps.calibrate_fashion --quick    # smoke test (1 tiny row) into a temporary folder

For every row it trains a natural teacher (cross-entropy) and a robust teacher (PGD-AT) with
:func:`derd.teachers.train_teacher` on the configured data (a stratified subset of the official
training set, minus the stratified validation split) and measures, on the validation split, clean and
PGD-20 accuracy of both (:func:`derd.teachers.accuracy` / :func:`derd.teachers.robust_accuracy`).
The test split is never read.

A row passes when: natural PGD-20 ≤ 10 %, robust PGD-20 ≥ 50 % of robust clean, and robust clean is at
least 5 points below natural clean (a real clean/robust trade-off for DERD's two experts to span).
Chosen: among passing rows, the smallest image size (the cost of every later stage scales with it),
then the largest ε (the harder threat model), then the highest robust PGD-20.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from derd import config
from derd import data as datasets
from derd.runtime import seed_everything
from derd.teachers import accuracy, build_for, robust_accuracy, train_teacher

ROOT = Path(__file__).resolve().parents[1]
PGD_STEPS = 20  # evaluation attack (uniform start, step 2.5·ε/20)
TRAIN_STEPS = 5  # PGD-AT training attack: 5 steps of 2.5·ε/5 = ε/2


@dataclass(frozen=True)
class Setting:
    image_size: int
    arch: str
    width: int
    train_subset: int
    epochs: int
    eps: float

    @property
    def teacher_key(self) -> tuple:
        """What the natural teacher depends on (it is shared by rows that differ only in ε)."""
        return (self.image_size, self.arch, self.width, self.train_subset, self.epochs)


GRID = [
    Setting(16, "small_resnet", 16, 10000, 5, 0.10),
    Setting(16, "small_resnet", 16, 10000, 5, 0.15),
    Setting(28, "small_resnet", 16, 10000, 5, 0.10),
]
QUICK = [Setting(16, "small_resnet", 8, 1000, 1, 0.10)]

CHECKS = {
    "nat_pgd_le_10": "natural PGD-20 ≤ 10 %",
    "rob_pgd_ge_half_clean": "robust PGD-20 ≥ 50 % of robust clean",
    "tradeoff_ge_5pts": "robust clean ≥ 5 points below natural clean",
}


def make_config(s: Setting) -> config.Config:
    step = round(2.5 * s.eps / TRAIN_STEPS, 6)
    train = {"epochs": s.epochs, "batch_size": 64, "lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4}
    return config.parse({
        "seed": 0,
        "device": "cpu",
        "data": {"name": "fashion_mnist", "image_size": s.image_size, "train_subset": s.train_subset,
                 "val_fraction": 0.1, "split_seed": 0, "augment": {"crop_padding": 2, "hflip": True}},
        "teachers": {
            "natural": {"arch": s.arch, "width": s.width, "train": train},
            "robust": {"arch": s.arch, "width": s.width, "method": "pgd_at", "train": train,
                       "attack": {"eps": s.eps, "steps": TRAIN_STEPS, "step_size": step}},
        },
    }, "calibrate_fashion")


def train_and_measure(cfg: config.Config, role: str, splits: datasets.Splits, x: torch.Tensor,
                      y: torch.Tensor) -> dict:
    spec = getattr(cfg.teachers, role)
    seed_everything(cfg.seed + (0 if role == "natural" else 1))  # as derd.teachers.prepare_teacher
    model = build_for(spec.arch, spec.width, splits.info)
    start = time.monotonic()
    train_teacher(model, splits.train, spec, cfg, torch.device("cpu"), f"calibrate[{role}]")
    seconds = time.monotonic() - start
    return {"model": model, "clean": accuracy(model, x, y), "seconds": seconds}


def run_grid(grid: list[Setting]) -> list[dict]:
    rows, naturals = [], {}
    for s in grid:
        cfg = make_config(s)
        splits = datasets.load(cfg.data)
        x, y = datasets.first_n(splits.val, len(splits.val))
        if s.teacher_key not in naturals:
            naturals[s.teacher_key] = train_and_measure(cfg, "natural", splits, x, y)
        nat = naturals[s.teacher_key]
        rob = train_and_measure(cfg, "robust", splits, x, y)
        nat_pgd = robust_accuracy(nat["model"], x, y, s.eps, PGD_STEPS)
        rob_pgd = robust_accuracy(rob["model"], x, y, s.eps, PGD_STEPS)
        params = sum(p.numel() for p in rob["model"].parameters())
        row = {
            **asdict(s), "params": params, "n_train": len(splits.train), "n_val": len(y),
            "nat_clean": nat["clean"], "nat_pgd20": nat_pgd, "rob_clean": rob["clean"], "rob_pgd20": rob_pgd,
            "nat_seconds": round(nat["seconds"], 1), "rob_seconds": round(rob["seconds"], 1),
            "nat_s_per_epoch": round(nat["seconds"] / s.epochs, 1), "rob_s_per_epoch": round(rob["seconds"] / s.epochs, 1),
        }
        row["checks"] = {
            "nat_pgd_le_10": nat_pgd <= 0.10,
            "rob_pgd_ge_half_clean": rob_pgd >= 0.5 * rob["clean"],
            "tradeoff_ge_5pts": rob["clean"] <= nat["clean"] - 0.05,
        }
        row["passes"] = all(row["checks"].values())
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "checks"}), flush=True)
    return rows


def choose(rows: list[dict]) -> int | None:
    passing = [i for i, r in enumerate(rows) if r["passes"]]
    if not passing:
        return None
    return min(passing, key=lambda i: (rows[i]["image_size"], -rows[i]["eps"], -rows[i]["rob_pgd20"]))


def machine(threads: int) -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    return {"commit": commit, "cpu": cpu, "cores_visible": os.cpu_count(), "torch_threads": threads,
            "torch": torch.__version__, "python": platform.python_version()}


def _pct(v: float) -> str:
    return f"{100 * v:.1f}"


def markdown(rows: list[dict], chosen: int | None, meta: dict, total_seconds: float) -> str:
    lines = [
        "# Fashion-MNIST calibration (validation split)",
        "",
        f"Produced by `python -m sweeps.calibrate_fashion` on commit `{meta['commit']}`, {meta['cpu']} "
        f"({meta['cores_visible']} cores visible, torch {meta['torch']} with {meta['torch_threads']} thread(s)); "
        f"whole grid {total_seconds / 60:.1f} min.",
        "",
        "Teachers: natural = cross-entropy, robust = PGD-AT (5 steps of ε/2, uniform start), SGD + one-cycle "
        "lr 0.05, batch 64, crop (pad 2) + horizontal flip. Data: a stratified subset of the official training "
        "set (`data.train_subset`), of which 10 % is the stratified validation split every figure below is "
        "measured on (the t10k test set is never read). PGD-20: uniform start, step 2.5·ε/20.",
        "",
        "| # | size | arch | width | params | train imgs | epochs | ε | nat clean | nat PGD-20 | rob clean | "
        "rob PGD-20 | nat s (s/ep) | rob s (s/ep) | checks |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for i, r in enumerate(rows):
        failed = [k for k, ok in r["checks"].items() if not ok]
        verdict = "pass" if not failed else "fail: " + ", ".join(CHECKS[k] for k in failed)
        mark = " **(chosen)**" if i == chosen else ""
        lines.append(
            f"| {i}{mark} | {r['image_size']} | {r['arch']} | {r['width']} | {r['params']:,} | {r['n_train']:,} | "
            f"{r['epochs']} | {r['eps']:g} | {_pct(r['nat_clean'])} | {_pct(r['nat_pgd20'])} | {_pct(r['rob_clean'])} | "
            f"{_pct(r['rob_pgd20'])} | {r['nat_seconds']:.0f} ({r['nat_s_per_epoch']:.1f}) | "
            f"{r['rob_seconds']:.0f} ({r['rob_s_per_epoch']:.1f}) | {verdict} |"
        )
    lines += ["", "Accuracies in %, on the validation split (n = {}). Checks: {}.".format(
        rows[0]["n_val"] if rows else 0, "; ".join(CHECKS.values())), ""]
    if chosen is None:
        lines.append("**No row passes every check**; widen the grid before writing presets/fashion.yaml.")
    else:
        r = rows[chosen]
        lines.append(
            f"**Chosen: row {chosen}** — {r['image_size']}×{r['image_size']}, {r['arch']} w{r['width']}, "
            f"{r['train_subset']:,}-image subset, {r['epochs']} epochs, ε = {r['eps']:g}. Rule: among rows passing "
            "every check, the smallest image size (every later stage's cost scales with it), then the largest ε "
            "(the harder threat model), then the highest robust PGD-20. Here: natural "
            f"{_pct(r['nat_clean'])} / {_pct(r['nat_pgd20'])}, robust {_pct(r['rob_clean'])} / {_pct(r['rob_pgd20'])} "
            f"(trade-off {100 * (r['nat_clean'] - r['rob_clean']):.1f} points); teachers train in "
            f"{r['nat_seconds'] + r['rob_seconds']:.0f} s together on {meta['torch_threads']} thread(s)."
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one tiny row (smoke test), written to a temp folder")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: docs/, or a temp folder with --quick)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")  # training progress lines
    out = args.out or (Path(tempfile.mkdtemp(prefix="calibrate_fashion_")) if args.quick else ROOT / "docs")
    out.mkdir(parents=True, exist_ok=True)
    grid = QUICK if args.quick else GRID
    began = time.monotonic()
    rows = run_grid(grid)
    total = time.monotonic() - began
    chosen = choose(rows)
    meta = machine(args.threads)
    (out / "calibration_fashion.md").write_text(markdown(rows, chosen, meta, total))
    payload = {"produced_by": "python -m sweeps.calibrate_fashion" + (" --quick" if args.quick else ""),
               **meta, "split": "val", "pgd_eval_steps": PGD_STEPS, "pgd_train_steps": TRAIN_STEPS,
               "checks": CHECKS, "total_seconds": round(total, 1), "chosen": chosen, "rows": rows}
    (out / "calibration_fashion.json").write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {out / 'calibration_fashion.md'} and {out / 'calibration_fashion.json'} (chosen row: {chosen})")


if __name__ == "__main__":
    main()
