"""Time every evaluation attack side by side on one model (results printed, never asserted).

    python -m bench.bench_attacks --params params.yaml --root . --role robust --n 450 --aa standard custom

Uses the teacher artifact of ``--role`` under ``--root`` (or ``--checkpoint`` with ``--arch/--width``),
the test split and the ``eval`` settings of the params file. AutoAttack reports per-attack seconds.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from bench.timing import once
from derd import config, data
from derd.artifacts import load_into
from derd.attacks import PGD, robust_flags
from derd.evaluation.autoattack import AutoAttack
from derd.evaluation.evaluate import white_box
from derd.teachers import build_for, load_teacher


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--params", default="params.yaml")
    p.add_argument("--root", default=".")
    p.add_argument("--role", default="robust", choices=["natural", "robust"])
    p.add_argument("--checkpoint", help="evaluate this state dict instead of the teacher artifact")
    p.add_argument("--arch", default="small_cnn")
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--n", type=int, default=None, help="examples (default: eval.n_examples)")
    p.add_argument("--aa", nargs="*", default=["custom"], choices=["standard", "custom"])
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    cfg = config.load(args.params)
    ev = cfg.eval
    splits = data.load(cfg.data)
    x, y = data.first_n(splits.test, args.n or ev.n_examples)
    if args.checkpoint:
        model = load_into(build_for(args.arch, args.width, splits.info), args.checkpoint).eval()
        name = f"{args.arch}-w{args.width} ({args.checkpoint})"
    else:
        model = load_teacher(cfg, args.role, Path(args.root))
        name = f"{args.role} teacher"
    print(f"model: {name}; {len(x)} {splits.info.name} test examples; eps={ev.eps:g}; threads={args.threads}")
    print(f"{'attack':<34}{'accuracy %':>11}{'seconds':>9}")
    attacks = dict(white_box(ev, model, cfg.seed))
    k = ev.sanity.strength
    attacks[f"PGD_S x{k} steps, {k} restarts"] = PGD(model, ev.eps, ev.pgd_s.steps * k, ev.pgd_s.step_size, restarts=k,
                                                     seed=cfg.seed)
    for label, attack in attacks.items():
        flags, seconds = once(lambda attack=attack: robust_flags(model, attack, x, y, ev.batch_size))
        print(f"{label:<34}{100 * flags.float().mean().item():>11.2f}{seconds:>9.2f}")
    for version in args.aa:
        runs = [(version, ev.autoattack.attacks if version == "custom" else None, None)]
        if version == "custom":
            runs.append(("custom", ["square"], ev.sanity.square_queries))
        for v, names, queries in runs:
            r, seconds = once(lambda v=v, names=names, queries=queries: AutoAttack(
                model, ev.eps, v, names, cfg.seed, ev.autoattack.batch_size, package=ev.autoattack.package,
                square_queries=queries).run(x, y))
            label = f"AA {v} ({', '.join(r.attacks)})"
            print(f"{label:<34}{100 * r.accuracy:>11.2f}{seconds:>9.2f}   {r.package} {r.package_version}")
            for attack, acc in r.accuracy_after.items():
                print(f"    after {attack:<24}{100 * acc:>11.2f}{r.runtime_s.get(attack, 0):>9.2f}")
            for w in r.warnings:
                print(f"    warning: {w}")


if __name__ == "__main__":
    main()
