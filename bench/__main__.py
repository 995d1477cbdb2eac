"""python -m bench [--quick] [--threads N]: measure this machine, DERD Stage-II and the peers side by side
in ONE run and write bench/results.md + bench/results.json (ratios and MFU; no absolute claims)."""
# ruff: noqa: ISC004  (the report's paragraphs are implicitly concatenated strings in lists, on purpose)
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from bench import bench_opts, bench_pipeline, peers, stage2
from bench.timing import loadavg, machine, matmul_peak, reference_workload

HERE = Path(__file__).resolve().parent
# written by `python -m bench.bench_pipeline` (its own, long run) on the default profile; a run on a committed
# params file (`--params FILE --out bench/pipeline_<name>.json`) can be added here
PIPELINE_JSON = (HERE / "pipeline.json",)


def pipeline_results() -> list[dict[str, Any]]:
    return [json.loads(path.read_text(encoding="utf-8")) for path in PIPELINE_JSON if path.exists()]


def help_time(repeats: int) -> dict[str, Any]:
    exe = Path(sys.executable).parent / "derd"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "pipelines.cli"]
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run([*cmd, "--help"], capture_output=True, check=True, cwd=HERE.parent)
        times.append(time.perf_counter() - start)
    return {"command": " ".join([Path(cmd[0]).name, *cmd[1:], "--help"]), "repeats": repeats,
            "median_s": statistics.median(times), "all_s": times, "goal_s": 1.0}


def scaling(specs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for spec in specs:
        code = f"import json,sys; from bench.stage2 import scaling_worker; print(json.dumps(scaling_worker({spec!r})))"
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=HERE.parent,
                              check=False)
        if done.returncode:
            rows.append({**{k: v for k, v in spec.items() if k != "params"}, "error": done.stderr[-800:]})
        else:
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    return rows


def library_state() -> dict[str, Any]:
    """The commit the library was measured at, and whether derd/ or pipelines/ had uncommitted edits."""
    def git(*args):
        done = subprocess.run(["git", *args], capture_output=True, text=True, cwd=HERE.parent, check=False)
        return done.stdout.rstrip() if done.returncode == 0 else None
    dirty = git("status", "--porcelain", "--", "derd", "pipelines")
    return {"commit": git("rev-parse", "--short", "HEAD"),
            "uncommitted": sorted({line[3:] for line in dirty.splitlines()}) if dirty else []}


def busy(m: dict[str, Any]) -> str:
    """Whether other work shared the machine, read off the 1-minute load averages around the run."""
    loads = [m["loadavg_at_start"][0], *([m["loadavg_at_end"][0]] if "loadavg_at_end" in m else [])]
    if max(loads) > 1.5:
        return "**other work shared the machine during this run**, so absolute times are pessimistic and noisy"
    return "no other work ran beside it"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="smaller settings, about 2 minutes")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads for everything but the reference workload (default 1: leave a core free)")
    ap.add_argument("--out", default=str(HERE), help="folder for results.md / results.json")
    ap.add_argument("--render-only", action="store_true", help="rewrite results.md from results.json (no measuring)")
    a = ap.parse_args()
    if a.render_only:
        out = Path(a.out)
        R = json.loads((out / "results.json").read_text())
        R["pipeline"] = pipeline_results()  # its own run: take its latest phases
        (out / "results.json").write_text(json.dumps(R, indent=1, default=str) + "\n", encoding="utf-8")
        (out / "results.md").write_text(render(R), encoding="utf-8")
        return
    q = a.quick
    torch.set_num_threads(a.threads)
    t_start = time.monotonic()
    stage2.snapshot_params()
    R: dict[str, Any] = {"mode": "quick" if q else "full", "machine": machine(a.threads), "library": library_state()}

    def stamp(name):
        print(f"[bench {time.monotonic() - t_start:6.1f}s] {name}", flush=True)

    stamp("reference workload")
    count = 100 if q else 1000
    ref = reference_workload(count=count, n=1024, n_threads=2)
    ref["budget_unit_s"] = ref["seconds"] * 1000 / count
    ref["note"] = ("quick mode: 100 matmuls timed, scaled x10" if q else "1,000 matmuls timed")
    R["reference_workload"] = ref
    if not q:  # the same matmuls on the threads the rest of the run uses
        one = reference_workload(count=100, n=1024, n_threads=a.threads)
        ref["same_on_threads_used"] = {"threads": a.threads, "budget_unit_s": one["seconds"] * 10,
                                       "gflops": one["gflops"], "note": "100 matmuls timed, scaled x10"}

    stamp("matmul peak")
    peak_a = matmul_peak(2048, reps=3 if q else 5)

    stamp("MFU: offline default nets")
    mfu = [stage2.mfu_case(stage2.make_config(), peak_a["peak_flops"], reps=1 if q else 5)]
    mfu[0]["config"], mfu[0]["goal"] = "offline default (params.yaml)", 0.35
    stamp("MFU: CIFAR ResNet-18")
    r18 = stage2.make_config(dataset="cifar10", image_size=32, arch="resnet18", student_arch="resnet18",
                             batch=8 if q else 64, k_student=1, pgd_steps=1 if q else 2)
    mfu.append(stage2.mfu_case(r18, peak_a["peak_flops"], reps=1 if q else 3, plain_reps=3))  # medians: one rep swung ×1.4
    mfu[1]["config"], mfu[1]["goal"] = "CIFAR ResNet-18 (student + both teachers)", 0.60
    peak_b = matmul_peak(2048, reps=3 if q else 5)
    peak = max(peak_a["peak_flops"], peak_b["peak_flops"])
    for row in mfu:  # against the better of the two peak measurements (start and end of the MFU block)
        row["mfu"] = row["iteration_flops"] / row["iteration_s"] / peak
        row["plain_mfu"] = row["plain_fwd_bwd_flops"] / row["plain_fwd_bwd_s"] / peak
    R["matmul_peak"] = {"before": peak_a, "after": peak_b, "peak_flops": peak}
    R["mfu"] = mfu

    stamp("scaling")
    sizes = [(32, 16), (64, 16), (64, 32)] if q else [(32, 16), (64, 16), (128, 16), (64, 32), (64, 64)]
    R["scaling"] = scaling([{"batch": b, "image_size": s, "k_student": 1, "reps": 1 if q or s == 64 else 2,
                             "threads": a.threads, "params": stage2.snapshot_params()} for b, s in sizes])

    stamp("passes audit")
    cfg = stage2.make_config(batch=8, k_student=2, pgd_steps=3)
    from derd import distill
    R["passes"] = {"config": stage2.describe(cfg), "aggregation": cfg.stage2.aggregation,
                   "lambda_rob_clean": cfg.stage2.lambda_rob_clean, "rob_target": cfg.stage2.rob_target,
                   "methods": [stage2.audit_method(m, cfg) for m in distill.registered_methods()]}

    stamp("optimisations")
    R["optimisations"] = bench_opts.run_all(q, a.threads)

    stamp("peers: model")
    model, x, y, desc = peers.digits_model(epochs=1 if q else 2)
    stamp("optimisations: PGD restarts")
    R["optimisations"]["restarts"] = bench_opts.restarts(model, x, y, 0.05, reps=1 if q else 3)
    stamp("peers: attacks")
    n_att = 64 if q else 128
    R["attacks"] = {"model": desc, **peers.attacks_vs_torchattacks(model, x[:n_att], y[:n_att], 0.05, reps=1 if q else 9)}
    stamp("peers: AutoAttack")
    n_aa = 16
    R["autoattack"] = {"model": desc, **peers.autoattack_overhead(model, x[:n_aa], y[:n_aa], 0.05, reps=1 if q else 9,
                                                                  warmup=0 if q else 1),
                       "goal_overhead": 0.05}

    stamp("derd --help")
    R["help"] = help_time(3 if q else 5)
    R["total_bench_s"] = time.monotonic() - t_start
    R["machine"]["loadavg_at_end"] = loadavg()
    R["pipeline"] = pipeline_results()
    stamp("writing results")
    out = Path(a.out)
    (out / "results.json").write_text(json.dumps(R, indent=1, default=str) + "\n", encoding="utf-8")
    (out / "results.md").write_text(render(R), encoding="utf-8")
    print(f"wrote {out / 'results.md'} and {out / 'results.json'} in {R['total_bench_s']:.0f}s")


# ---------------------------------------------------------------------------- markdown
def g(flops: float) -> str:
    return f"{flops / 1e9:.2f}"


def passes_table(R) -> list[str]:
    lines = ["| method | step | module | forwards (min) | backward passes (min) | autograd calls |",
             "|---|---|---|---|---|---|"]
    excess = []
    for m in R["passes"]["methods"]:
        for step, key, calls in (("generator", "generator_step", m["generator_step_autograd_calls"]),
                                 ("student", "student_step", m["student_step_autograd_calls"])):
            for mod, c in m[key].items():
                lines.append(f"| {m['method']} | {step} | {mod} | {c['fwd']:g} ({c['fwd_min']:g}) | "
                             f"{c['bwd']:g} ({c['bwd_min']:g}) | {calls:g} |")
                if c["fwd"] > c["fwd_min"] or c["bwd"] > c["bwd_min"] or c.get("fwd_grad_unused"):
                    excess.append(f"{m['method']} {step} step, {mod}: {c}")
    return lines + [""] + (["Excess found:"] + [f"- {e}" for e in excess] if excess else
                           ["**No excess pass found**: every method runs the minimum number of forward and backward "
                            "passes of every module by the rules above."])


def render(R: dict[str, Any]) -> str:
    m, ref, pk = R["machine"], R["reference_workload"], R["matmul_peak"]
    L = [f"# derd benchmark results ({R['mode']} mode)", "",
         "Generated by `python -m bench" + (" --quick" if R["mode"] == "quick" else "") + "` — every number below was "
         "measured in this one run; compare ratios, not absolute times, across machines.", "",
         "## Machine", "",
         f"- CPU: {m['cpu_model']}, {m['logical_cpus']} logical CPUs; torch threads used: {m['threads_used']} "
         f"(the reference workload uses 2 by definition)",
         f"- torch {m['torch']}, device {m['device']}, Python {m['python']}",
         *([f"- Library measured: git {R['library']['commit']}"
            + (f" plus uncommitted edits (by others, in progress) to {', '.join(R['library']['uncommitted'])}"
               if R['library']['uncommitted'] else " (clean derd/ and pipelines/)")] if R.get("library") else []),
         f"- Load average at start {m['loadavg_at_start']}, at the end {m.get('loadavg_at_end', '?')} (the benchmark "
         f"itself keeps one core busy): {busy(m)}; ratios measured side by side (interleaved where two "
         "implementations are compared) are the result.", "",
         "## Wall-time budget reference workload", "",
         f"{ref['matmuls']} fp32 1024×1024 matmuls on {ref['threads']} threads: **{ref['seconds']:.2f} s** "
         f"({ref['gflops']:.1f} GFLOP/s). Budget unit (1,000 matmuls): **{ref['budget_unit_s']:.1f} s** "
         f"({ref['note']}). README rule: the default `dvc repro` must cost at most 40× this "
         f"= {40 * ref['budget_unit_s'] / 60:.1f} min on this machine."
         + (f" The same matmuls on {ref['same_on_threads_used']['threads']} thread(s): "
            f"{ref['same_on_threads_used']['budget_unit_s']:.1f} s per 1,000 ({ref['same_on_threads_used']['gflops']:.1f} "
            f"GFLOP/s), ×{ref['same_on_threads_used']['budget_unit_s'] / ref['budget_unit_s']:.2f} the 2-thread time."
            if "same_on_threads_used" in ref else ""),
         "",
         "## Peak fp32 matmul (roofline)", "",
         f"2048×2048 fp32 matmul on {pk['before']['threads']} thread(s): best {g(pk['before']['peak_flops'])} GFLOP/s "
         f"before and {g(pk['after']['peak_flops'])} GFLOP/s after the MFU runs; MFU uses the better, "
         f"**{g(pk['peak_flops'])} GFLOP/s**.", "",
         "## MFU of one DERD Stage-II iteration", "",
         "One iteration = generator step + k_S student steps (label-free KL-PGD, both teachers), built with "
         "`derd.config.parse` + `derd.distill.loop.Context` + the registered `derd` method (teachers/generator created "
         "in memory with random weights). FLOPs from `torch.utils.flop_counter.FlopCounterMode` (matmul/conv, forward "
         "and backward), time = median of the timed iterations after a warm-up. Plain = one supervised "
         "fwd+bwd+SGD step of the student at the same batch.", "",
         "| config | input | batch | k_S | PGD | GFLOP/iter | s/iter | GFLOP/s | MFU | goal | plain fwd+bwd GFLOP | plain s | plain MFU |",
         "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in R["mfu"]:
        L.append(f"| {r['config']}: student {r['student']}, teachers {'/'.join(r['teachers'])}, G {r['generator']} | "
                 f"{r['input']} | {r['batch']} | {r['k_student']} | {r['pgd_steps']} | {g(r['iteration_flops'])} | "
                 f"{r['iteration_s']:.2f} | {g(r['iteration_flops'] / r['iteration_s'])} | **{100 * r['mfu']:.1f}%** | "
                 f"≥{100 * r['goal']:.0f}% {'met' if r['mfu'] >= r['goal'] else 'NOT met'} | {g(r['plain_fwd_bwd_flops'])} | "
                 f"{r['plain_fwd_bwd_s']:.3f} | {100 * r['plain_mfu']:.1f}% |")
    L += ["", "FlopCounterMode counts matmul/conv FLOPs only (BatchNorm, ReLU, softmax, the optimiser's updates "
          "are not counted), so MFU is a lower bound of the useful work rate. "
          "The ResNet-18 row uses k_S = 1 and fewer PGD steps than the paper (10) to fit a CPU run; MFU is a "
          "rate, so it is comparable across k_S and PGD steps.", "",
          "## Scaling of one DERD iteration (offline default nets, k_S = 1)", "",
          "One fresh process per row. Time: median after one warm-up (rows at 64×64: one timed iteration). Memory: "
          "peak of the process's current RSS (`/proc/self/statm`, sampled every 2 ms by a thread) during warm-up and "
          "timed iterations minus the RSS just before them; `maxrss growth` is the `resource.getrusage` high-water "
          "mark's growth (0 when an earlier peak, e.g. at import, was higher). tracemalloc is not used: it does not "
          "see torch's CPU allocator.", "",
          "| batch | input | GFLOP/iter | s/iter | GFLOP/s | FLOPs ratio | time ratio | time ratio / FLOPs ratio | peak RSS growth MiB | maxrss growth MiB |",
          "|---|---|---|---|---|---|---|---|---|---|"]
    rows = [r for r in R["scaling"] if "error" not in r]
    base = next((r for r in rows if r["batch"] == 64 and r["input"].endswith("16x16")), rows[0] if rows else None)
    for r in R["scaling"]:
        if "error" in r:
            L.append(f"| {r['batch']} | {r['image_size']} | error: {r['error'][-200:]!r} | | | | | | | |")
            continue
        L.append(f"| {r['batch']} | {r['input']} | {g(r['iteration_flops'])} | {r['iteration_s']:.2f} | "
                 f"{g(r['iteration_flops'] / r['iteration_s'])} | ×{r['iteration_flops'] / base['iteration_flops']:.2f} | "
                 f"×{r['iteration_s'] / base['iteration_s']:.2f} | "
                 f"{(r['iteration_s'] / base['iteration_s']) / (r['iteration_flops'] / base['iteration_flops']):.2f} | "
                 f"{r['peak_rss_growth_mib']:.0f} | {r.get('maxrss_growth_mib', float('nan')):.0f} |")
    eff = [(r['batch'], r['input'], (r['iteration_s'] / base['iteration_s']) / (r['iteration_flops'] / base['iteration_flops']))
           for r in rows] if base else []
    L += ["", f"Ratios are against batch 64 at {base['input'] if base else '?'}. FLOPs grow ∝ batch × pixels "
          "(measured FLOPs ratios above). Time per FLOP relative to the base row (last ratio column; 1 = time grows "
          "exactly like FLOPs, < 1 = bigger work runs more efficiently): "
          + ", ".join(f"batch {b} {i}: {e:.2f}" for b, i, e in eff)
          + ". Small batches/inputs pay a fixed per-op cost (Python, dispatch, small kernels), so their time "
          "shrinks less than their FLOPs.", "",
          "## Passes audit (per generator step and per student step)", "",
          f"Micro settings of params.yaml: {R['passes']['config']}, aggregation={R['passes']['aggregation']}, "
          f"lambda_rob_clean={R['passes']['lambda_rob_clean']}, rob_target={R['passes']['rob_target']}. "
          "Counted with forward hooks on the whole student, each teacher and the generator, tensor hooks on their "
          "outputs and wrapped `torch.autograd.grad`/`backward` (a backward pass = one autograd call whose gradient "
          "reaches that forward's output). Minimum (in parentheses): forwards = distinct (module, train/eval mode, "
          "input) per step (a repeated one is waste; teachers then run once per distinct input, no-grad in the "
          "student step); backward = one per forward that needs a gradient, except DERD-family students with "
          "SGA-style aggregation, where a clean-input student graph may be walked twice (g_nat and g_rob from one "
          "graph). PGD iterates are never counted as duplicates. Student step: k PGD forwards+backwards of the "
          "student, its clean eval-mode forward for the KL-PGD target, and the training forwards.", ""]
    L += passes_table(R)
    if "optimisations" in R:
        L += ["", *bench_opts.render(R["optimisations"])]
    at = R["attacks"]
    L += ["", "## Peer ratio: attacks (derd.attacks vs torchattacks)", "",
          f"Model: {at['model']}; {at['n']} test images; clean accuracy {100 * at['clean_accuracy']:.1f}%. "
          f"Peer: {at['peer']}. Timed interleaved (derd, peer, peer, derd, …): img/s from the medians, the ratio "
          "is the median of the per-round ratios (a round's two runs are adjacent, so a slow spell of the host "
          "hits both).", ""]
    if "PGD-20" in at:
        L += ["| attack | settings | derd img/s | torchattacks img/s | derd/peer throughput | derd acc | torchattacks acc |",
              "|---|---|---|---|---|---|---|"]
        for name in ("PGD-20", "FGSM"):
            r = at[name]
            L.append(f"| {name} | {r['settings']} | {r['derd_img_per_s']:.0f} | {r['torchattacks_img_per_s']:.0f} | "
                     f"**×{r['throughput_ratio_derd_over_peer']:.2f}** | {100 * r['derd_accuracy']:.1f}% | "
                     f"{100 * r['torchattacks_accuracy']:.1f}% |")
    aa = R["autoattack"]
    L += ["", "## Peer ratio: AutoAttack adapter vs pyautoattack directly", "",
          f"{aa['attack']}, eps {aa['eps']:g}, {aa['n']} images, model as above; adapter backend {aa['adapter_backend']} "
          f"(pinned: package=\"pyautoattack\"). Interleaved, median: adapter {aa['adapter_s']:.2f} s, direct "
          f"{aa['direct_s']:.2f} s; median of the per-round ratios → **overhead {100 * aa['overhead']:+.1f}%** (goal ≤ {100 * aa['goal_overhead']:.0f}%; "
          f"{'met' if aa['overhead'] <= aa['goal_overhead'] else 'NOT met'}). Robust accuracy: adapter "
          f"{100 * aa['adapter_accuracy']:.1f}%, direct {100 * aa['direct_accuracy']:.1f}%. The adapter adds a clean "
          "forward pass, the state fingerprint and warning capture.", "",
          "## `derd --help`", "",
          f"`{R['help']['command']}` in a subprocess, {R['help']['repeats']} runs: median **{R['help']['median_s']:.2f} s** "
          f"(goal < 1 s: {'met' if R['help']['median_s'] < 1 else 'NOT met'}); all: "
          f"{', '.join(f'{t:.2f}' for t in R['help']['all_s'])} s.", "",
          f"Total benchmark wall time: {R['total_bench_s']:.0f} s.", ""]
    if R.get("pipeline"):
        for P in R["pipeline"]:
            L += bench_pipeline.render(P)
    else:
        L += ["## Pipeline overhead: not measured", "", "Run `python -m bench.bench_pipeline` (a fresh clone's "
              "default `dvc repro`, reruns and a sweep point; it writes bench/pipeline.json), then "
              "`python -m bench --render-only`.", ""]
    return "\n".join(L)


if __name__ == "__main__":
    main()
