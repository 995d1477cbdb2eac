"""Which offline profile can be the default: the cost of a fresh `dvc repro` of presets/fashion.yaml against
presets/digits.yaml, measured side by side in one process.

The two presets differ only in the data and the teachers' training (the check below fails otherwise), plus
``eval.n_examples``: Stage-I, Stage-II and every evaluated network are the same work on the same image size.
So the run-time ratio is bounded by max(teachers ratio, evaluation-size ratio), and the teachers ratio is what
is measured: loading the data and ``--batches`` training batches of each teacher (interleaved a, b, a, b),
scaled by each profile's batches per epoch and epochs. ``python -m bench.profiles`` writes bench/profiles.md and bench/profiles.json.
"""
from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch
from torch.utils.data import Subset

from bench.timing import interleaved, machine
from derd import config
from derd import data as datasets
from derd.artifacts import write_json, write_text
from derd.teachers import ROLES, build_for, train_teacher

PROJECT = Path(__file__).resolve().parent.parent
PROFILES = ("digits", "fashion")
# keys allowed to differ; everything else must be equal for the bound to hold
MEASURED = ("data.", "teachers.natural.train.epochs", "teachers.robust.train.epochs", "teachers.robust.method",
            "eval.n_examples")


def _leaves(value: object, prefix: str = "") -> dict[str, object]:
    if isinstance(value, dict):
        return {k: v for key, sub in value.items() for k, v in _leaves(sub, f"{prefix}{key}.").items()}
    return {prefix.rstrip("."): value}


def unmeasured_differences(a: config.Config, b: config.Config) -> list[str]:
    la, lb = _leaves(a.model_dump(mode="json")), _leaves(b.model_dump(mode="json"))
    return sorted(k for k in la.keys() | lb.keys() if la.get(k) != lb.get(k) and not k.startswith(MEASURED))


def _batches(cfg: config.Config, role: str, splits: datasets.Splits, batches: int):
    """One teacher trained for one epoch over its first ``batches`` batches."""
    full = getattr(cfg.teachers, role)
    spec = full.model_copy(update={"train": full.train.model_copy(update={"epochs": 1})})
    part = Subset(splits.train, range(min(len(splits.train), batches * spec.train.batch_size)))
    info = datasets.info(cfg.data)

    def run() -> None:
        model = build_for(spec.arch, spec.width, info, spec.normalize)
        train_teacher(model, part, spec, cfg, torch.device("cpu"), f"{role} batches")

    return run


def measure(reps: int, batches: int) -> dict:
    cfgs = {p: config.load(PROJECT / "presets" / f"{p}.yaml") for p in PROFILES}
    if diff := unmeasured_differences(*cfgs.values()):
        raise SystemExit(f"presets differ in keys this benchmark does not measure: {diff}")
    splits = {p: datasets.load(c.data) for p, c in cfgs.items()}
    work = {f"{p} load": (lambda c=c: datasets.load(c.data)) for p, c in cfgs.items()}
    for p, c in cfgs.items():
        for role in ROLES:
            work[f"{p} {role} batches"] = _batches(c, role, splits[p], batches)
    times = interleaved(work, reps=reps, warmup=0)
    out: dict = {"machine": machine(torch.get_num_threads()), "reps": reps, "batches": batches, "profiles": {}}
    for p, c in cfgs.items():
        epochs = {r: getattr(c.teachers, r).train.epochs for r in ROLES}
        per_epoch = {r: math.ceil(len(splits[p].train) / getattr(c.teachers, r).train.batch_size) for r in ROLES}
        teachers = times[f"{p} load"]["median_s"] + sum(
            times[f"{p} {r} batches"]["median_s"] / min(batches, per_epoch[r]) * per_epoch[r] * epochs[r] for r in ROLES)
        out["profiles"][p] = {"train_images": len(splits[p].train), "epochs": epochs, "batches_per_epoch": per_epoch,
                              "robust_method": c.teachers.robust.method, "eval_n": c.eval.n_examples,
                              "seconds": {k.split(" ", 1)[1]: v for k, v in times.items() if k.startswith(p)},
                              "teachers_s": teachers}
    f, d = out["profiles"]["fashion"], out["profiles"]["digits"]
    out["teachers_ratio"] = f["teachers_s"] / d["teachers_s"]
    out["eval_ratio"] = f["eval_n"] / d["eval_n"]
    out["bound"] = max(out["teachers_ratio"], out["eval_ratio"], 1.0)
    return out


def markdown(r: dict) -> str:
    rows = [f"| profile | train images | epochs nat / rob (robust method) | load s | {r['batches']} nat batches s | "
            f"{r['batches']} rob batches s | teachers s (projected) | eval n |", "|---|---|---|---|---|---|---|---|"]
    for p, v in r["profiles"].items():
        s = v["seconds"]
        rows.append(f"| {p} | {v['train_images']} | {v['epochs']['natural']} / {v['epochs']['robust']} "
                    f"({v['robust_method']}) | {s['load']['median_s']:.2f} | {s['natural batches']['median_s']:.2f} | "
                    f"{s['robust batches']['median_s']:.2f} | {v['teachers_s']:.0f} | {v['eval_n']} |")
    m = r["machine"]
    return "\n".join([
        "# Offline profiles side by side: fashion vs digits",
        "",
        "Generated by `python -m bench.profiles` (medians of "
        f"{r['reps']} interleaved runs; {m['cpu_model']}, {m['threads_used']} threads, torch {m['torch']}).",
        "Everything else in the two presets is the same work (checked by the script), so a fresh `dvc repro`",
        "of fashion costs at most max(teachers ratio, evaluation-size ratio) times digits'.",
        "",
        *rows,
        "",
        f"Teachers ratio fashion/digits: **{r['teachers_ratio']:.2f}**; evaluation-size ratio: {r['eval_ratio']:.2f}; "
        f"bound on the whole-run ratio: **{r['bound']:.2f}** (the default may switch at <= 1.5).",
        "",
    ])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.profiles", description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--batches", type=int, default=20, help="training batches timed per teacher (default: 20)")
    args = ap.parse_args(argv)
    result = measure(args.reps, args.batches)
    write_json(PROJECT / "bench" / "profiles.json", result)
    write_text(PROJECT / "bench" / "profiles.md", markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
