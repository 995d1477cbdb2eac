"""Before/after ratios of the speed changes tried on Stage-II and the evaluation, each measured side by
side (interleaved) in one process on the offline default's nets; ``python -m bench`` keeps the numbers
and the verdict (a change is kept in the library only where it pays on this machine).

- SGA: the aggregator over a flattened gradient vector vs the per-parameter loop it replaced (the
  module as it was at ``SGA_BEFORE``, read from git), on the default student's real gradient shapes
- teachers: frozen-teacher forwards under ``torch.inference_mode`` vs ``torch.no_grad``
- channels_last / torch.compile: one DERD iteration with ``runtime.channels_last`` / ``runtime.compile``
  on vs off (compile: in a subprocess; its one-off compile time reported apart)
- evaluation batch: PGD-20 throughput over the evaluated examples at several ``eval.batch_size``
- PGD restarts on the survivors only (the sanity check's stronger PGD) vs every restart on every example
  (the algorithm before, replayed with the same random starts), on a trained model
"""
# ruff: noqa: ISC004  (the report's paragraphs are implicitly concatenated strings in lists, on purpose)
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path
from typing import Any

import torch

from bench import stage2
from bench.timing import interleaved
from derd import data as datasets
from derd.config import ConfigError

PROJECT = Path(__file__).resolve().parent.parent
SGA_BEFORE = "cdc497a"  # the last commit with the per-parameter sign-consistency mask


def module_at(commit: str, path: str, name: str) -> types.ModuleType:
    """A module's source as committed at ``commit``, imported under ``name`` (this process only)."""
    source = subprocess.run(["git", "show", f"{commit}:{path}"], cwd=PROJECT, capture_output=True, text=True,
                            check=True).stdout
    folder = Path(tempfile.mkdtemp(prefix="derd-before-"))
    (folder / f"{name}.py").write_text(source, encoding="utf-8")
    spec = importlib.util.spec_from_file_location(name, folder / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def sga(reps: int) -> dict[str, Any]:
    """GradientAggregator("sga") per student step: per-parameter (before) vs flattened (after)."""
    from derd.distill import aggregation

    before = module_at(SGA_BEFORE, "derd/distill/aggregation.py", "aggregation_before")
    cfg = stage2.make_config()
    ctx, method = stage2.build(cfg)
    try:
        shapes = [p.shape for p in ctx.student.parameters()]
    finally:
        method.close()
    torch.manual_seed(0)
    g_nat, g_rob = [torch.randn(s) for s in shapes], [torch.randn(s) for s in shapes]
    aggs = {"before": before.GradientAggregator("sga", 5e-4, seed=0),
            "after": aggregation.GradientAggregator("sga", 5e-4, seed=0)}
    same = all(torch.equal(a, b) for a, b in zip(aggs["before"](g_nat, g_rob, (1.0, 2.0))[0],
                                                 aggs["after"](g_nat, g_rob, (1.0, 2.0))[0]))
    t = interleaved({k: (lambda agg=agg: agg(g_nat, g_rob, (1.0, 2.0))) for k, agg in aggs.items()},
                    reps=reps, warmup=2)
    return {"student": stage2.describe(cfg)["student"], "parameters": len(shapes),
            "coordinates": sum(g.numel() for g in g_nat), "before_commit": SGA_BEFORE,
            "before_s": t["before"]["median_s"], "after_s": t["after"]["median_s"],
            "speedup": t["before"]["median_s"] / t["after"]["median_s"], "bit_identical": same}


def teachers(reps: int) -> dict[str, Any]:
    """Both frozen teachers' forward at the Stage-II batch: no_grad vs inference_mode."""
    cfg = stage2.make_config()
    ctx, method = stage2.build(cfg)
    try:
        nets = list(ctx.teachers.values())
        x = torch.rand(cfg.stage2.batch_size, *ctx.info.shape)

        def under(mode):
            def run():
                with mode():
                    return [net(x) for net in nets]
            return run

        t = interleaved({"no_grad": under(torch.no_grad), "inference_mode": under(torch.inference_mode)},
                        reps=reps, warmup=2)
    finally:
        method.close()
    return {"batch": cfg.stage2.batch_size, "teachers": len(nets), "no_grad_s": t["no_grad"]["median_s"],
            "inference_mode_s": t["inference_mode"]["median_s"],
            "speedup": t["no_grad"]["median_s"] / t["inference_mode"]["median_s"]}


def runtime_switch(key: str, reps: int) -> dict[str, Any]:
    """One DERD iteration (default nets) with ``runtime.<key>`` off vs on, interleaved."""
    try:
        cfgs = {v: stage2.make_config(runtime={key: v}) for v in (False, True)}
    except ConfigError as exc:  # the key is not in this checkout's config
        return {"key": key, "error": f"{type(exc).__name__}: {str(exc).splitlines()[0]}"}
    built = {v: stage2.build(c) for v, c in cfgs.items()}
    try:
        t = interleaved({str(v): (lambda b=b: stage2.iteration(*b)) for v, b in built.items()}, reps=reps, warmup=1)
    finally:
        for _, method in built.values():
            method.close()
    off, on = t["False"]["median_s"], t["True"]["median_s"]
    return {"key": key, "off_s": off, "on_s": on, "speedup": off / on, "reps": reps,
            "config": stage2.describe(cfgs[False])}


def compile_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """In a fresh process: the first DERD iteration with ``runtime.compile`` (compiles) and then the
    steady state, interleaved with an uncompiled copy."""
    torch.set_num_threads(spec["threads"])
    stage2.snapshot_params(spec["params"])
    cfg_on, cfg_off = stage2.make_config(runtime={"compile": True}), stage2.make_config(runtime={"compile": False})
    on, off = stage2.build(cfg_on), stage2.build(cfg_off)
    start = time.perf_counter()
    stage2.iteration(*on)
    first = time.perf_counter() - start
    t = interleaved({"off": lambda: stage2.iteration(*off), "on": lambda: stage2.iteration(*on)},
                    reps=spec["reps"], warmup=1)
    return {"first_iteration_s": first, "off_s": t["off"]["median_s"], "on_s": t["on"]["median_s"],
            "compile_s": first - t["on"]["median_s"], "speedup": t["off"]["median_s"] / t["on"]["median_s"],
            "reps": spec["reps"]}


def compile_case(threads: int, reps: int, limit_s: int) -> dict[str, Any]:
    spec = {"threads": threads, "reps": reps, "params": stage2.snapshot_params()}
    code = (f"import json; from bench.bench_opts import compile_worker; "
            f"print(json.dumps(compile_worker({spec!r})))")
    try:
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=PROJECT,
                              timeout=limit_s, check=False)
    except subprocess.TimeoutExpired:
        return {"error": f"did not finish within {limit_s} s (compile included)"}
    if done.returncode:
        return {"error": done.stderr.strip().splitlines()[-1][:300] if done.stderr.strip() else "failed"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def eval_batch(sizes: list[int], n: int, reps: int) -> dict[str, Any]:
    """PGD-20 (the table's PGD_S settings) over ``n`` examples split into batches of each size."""
    from derd.attacks import PGD
    from derd.teachers import build_for

    cfg = stage2.make_config()
    ev, info = cfg.eval, datasets.info(cfg.data)
    torch.manual_seed(0)
    model = build_for(cfg.stage2.student.arch, cfg.stage2.student.width, info).eval()
    x, y = torch.rand(n, *info.shape), torch.randint(0, info.num_classes, (n,))
    attack = PGD(model, ev.eps, steps=ev.pgd_s.steps, step_size=ev.pgd_s.step_size, seed=0)

    def run(b):
        return lambda: [attack(x[i : i + b], y[i : i + b]) for i in range(0, n, b)]

    sizes = sorted({*sizes, ev.batch_size})
    t = interleaved({str(b): run(b) for b in sizes}, reps=reps, warmup=0)
    return {"examples": n, "attack": f"PGD-{ev.pgd_s.steps}", "configured": ev.batch_size,
            "img_per_s": {str(b): n / t[str(b)]["median_s"] for b in sizes}}


def _restarts_on_everyone(pgd, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """PGD's restarts as they were before: each one attacks the whole batch (same random starts)."""
    gen = torch.Generator().manual_seed(pgd.seed)
    best = pgd.ascend(x, y, gen)
    with torch.no_grad():
        fooled = pgd.model(best).argmax(1) != y
    for _ in range(pgd.restarts - 1):
        if fooled.all():
            break
        candidate = pgd.ascend(x, y, gen)
        with torch.no_grad():
            now = pgd.model(candidate).argmax(1) != y
        best = torch.where((now & ~fooled).view(-1, 1, 1, 1), candidate, best)
        fooled |= now
    return best


def restarts(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, reps: int) -> dict[str, Any]:
    """The sanity check's stronger PGD (``strength``x the steps and restarts of PGD_S, on
    ``sanity.n_examples`` examples): restarts on the survivors (after) vs on every example (before)."""
    from derd.attacks import PGD, robust_flags

    ev = stage2.make_config().eval
    k, n = ev.sanity.strength, min(ev.sanity.n_examples, len(x))
    x, y = x[:n], y[:n]
    pgd = PGD(model, eps, steps=ev.pgd_s.steps * k, step_size=eps / 4, restarts=k, seed=0)
    t = interleaved({"before": lambda: _restarts_on_everyone(pgd, x, y), "after": lambda: pgd(x, y)},
                    reps=reps, warmup=0)
    single = robust_flags(model, PGD(model, eps, steps=ev.pgd_s.steps * k, step_size=eps / 4, seed=0), x, y, n)
    same = torch.equal(robust_flags(model, None, _restarts_on_everyone(pgd, x, y), y, n),
                       robust_flags(model, None, pgd(x, y), y, n))
    return {"examples": n, "steps": ev.pgd_s.steps * k, "restarts": k, "eps": eps,
            "survive_first_start": single.float().mean().item(), "before_s": t["before"]["median_s"],
            "after_s": t["after"]["median_s"], "speedup": t["before"]["median_s"] / t["after"]["median_s"],
            "same_flags": same}


def run_all(quick: bool, threads: int) -> dict[str, Any]:
    """Every case above at ``python -m bench``'s settings (quick: fewer repeats, no compile)."""
    n_eval = 128 if quick else stage2.make_config().eval.n_examples
    return {"sga": sga(10 if quick else 30), "teachers": teachers(5 if quick else 20),
            "channels_last": runtime_switch("channels_last", 1 if quick else 3),
            "compile": {"skipped": "quick mode"} if quick else compile_case(threads, reps=2, limit_s=300),
            "eval_batch": eval_batch([32, 64, 128, 256, 512], n_eval, reps=1)}


def render(O: dict[str, Any]) -> list[str]:
    """The results.md section: one row per change, with its ratio and whether the library keeps it."""
    s, t, cl, co, ev = O["sga"], O["teachers"], O["channels_last"], O["compile"], O["eval_batch"]
    rows = [f"| SGA over one flattened vector (`derd/distill/aggregation.py`) | per-parameter loop at {s['before_commit']}: "
            f"{1000 * s['before_s']:.1f} ms | {1000 * s['after_s']:.1f} ms | **×{s['speedup']:.2f}** | kept: "
            f"{'bit-identical outputs' if s['bit_identical'] else 'OUTPUTS DIFFER'} ({s['parameters']} tensors, "
            f"{s['coordinates']:,} coordinates, one call per student step) |",
            f"| `torch.inference_mode` for the frozen teachers (both, batch {t['batch']}) | no_grad "
            f"{1000 * t['no_grad_s']:.1f} ms | {1000 * t['inference_mode_s']:.1f} ms | ×{t['speedup']:.2f} | not kept: "
            "teacher outputs are KL targets of a loss that is differentiated, and inference tensors cannot be saved "
            "for backward (each would need a copy); the teachers' forwards are a small part of an iteration |"]
    for name, r in (("`runtime.channels_last` (one DERD iteration)", cl), ("`runtime.compile` (one DERD iteration)", co)):
        if "error" in r or "skipped" in r:
            rows.append(f"| {name} | | | | not measured: {r.get('error') or r.get('skipped')} |")
            continue
        extra = f"; compile time {r['compile_s']:.0f} s, paid once per process" if "compile_s" in r else ""
        rows.append(f"| {name} | off {r['off_s']:.2f} s | on {r['on_s']:.2f} s | ×{r['speedup']:.2f} | a config switch "
                    f"(default off){extra} |")
    if r := O.get("restarts"):
        rows.append(f"| PGD restarts on the survivors only (`derd/attacks/pgd.py`; the sanity check's PGD-{r['steps']} "
                    f"x {r['restarts']} restarts, {r['examples']} examples, {r['survive_first_start']:.0%} survive the "
                    f"first start) | every example: {r['before_s']:.2f} s | {r['after_s']:.2f} s | **×{r['speedup']:.2f}** "
                    f"| kept: {'same flags' if r['same_flags'] else 'FLAGS DIFFER'} (each example keeps its random "
                    "starts) |")
    best = max(ev["img_per_s"], key=lambda b: ev["img_per_s"][b])
    configured = ev["img_per_s"][str(ev["configured"])]
    sizes = ", ".join(f"{b}: {v:.0f}" for b, v in ev["img_per_s"].items())
    return ["## Optimisations: before/after, measured side by side", "",
            "Each pair timed interleaved (before, after, before, …) in this run, median; ratio = before / after "
            "(> 1: faster). A change stays in the library only where it pays here and changes no result.", "",
            "| change | before | after | ratio | verdict |", "|---|---|---|---|---|", *rows, "",
            f"Evaluation batch size: {ev['attack']} over {ev['examples']} examples (default student net), images/s by "
            f"batch size: {sizes}; the best, {best}, is ×{ev['img_per_s'][best] / configured:.2f} the configured "
            f"eval.batch_size {ev['configured']}'s throughput.", "",
            "No per-step `.item()` device syncs: on the CPU there is no device to wait for, so removing them "
            "cannot be measured here; the passes audit above shows the shared forwards (every module at its "
            "minimum).", ""]
