"""Does computing DERD's two expert gradients via autograd.grad on one shared graph cost less than
two separate forwards? Measured side by side on the configured student (no assertions).

Cases, per student step on a clean batch x and its adversarial batch x_adv (B each):
  separate   forward S(x) and S(x_adv) separately, one autograd.grad per expert loss (what derd runs:
             each loss owns its graph, so nothing is recomputed and no graph is retained)
  shared     one forward of cat([x, x_adv]) (2B), two autograd.grad calls with retain_graph
             (both walk the whole 2B graph)
  sum        one backward of L_nat + L_rob (the floor: no separate gradients, no SGA possible)
and, for the lambda_rob_clean reading where both experts read S(x):
  same-input shared  one forward of S(x), two autograd.grad calls with retain_graph
  same-input twice   two forwards of S(x), one autograd.grad each

Usage: python -m bench.bench_sga [--arch small_cnn --width 16 --size 16 --batch 128 --reps 20]

``--strategies``: instead, each registered aggregation strategy (gradrefine also with 1 and 4 chunks) on
the profile of params.yaml (bench.stage2's in-memory teachers and generator): one whole DERD student
step, and the aggregator call alone on that student's gradients, each against ``sum`` in the same
interleaved round (bench.timing.paired_ratio).
"""
from __future__ import annotations

import argparse

import torch

from bench.timing import interleaved, paired_ratio
from bench.timing import timed as _timed
from derd.distill.aggregation import AGGREGATIONS
from derd.losses import kd_kl
from derd.models import build_model


def timed(fn, reps: int) -> float:
    """Median seconds per call after one warm-up (the shared helper)."""
    return _timed(fn, reps=reps, warmup=1)["median_s"]


def strategy_costs(reps: int) -> None:
    """Per strategy: a DERD student step and the aggregator call, as multiples of ``sum``'s (see the docstring)."""
    from bench import stage2

    cases = {name: {"aggregation": name} for name in AGGREGATIONS.names()}
    cases |= {f"gradrefine m={m}": {"aggregation": "gradrefine", "gradrefine": {"chunks": m}} for m in (1, 4)}
    steps, calls, size = {}, {}, 0
    for name, overrides in cases.items():
        ctx, method = stage2.build(stage2.make_config(**overrides))
        steps[name] = lambda method=method: method.student_step(0)
        params = list(ctx.student.parameters())
        g_nat, g_rob = [torch.randn_like(q) for q in params], [torch.randn_like(q) for q in params]
        calls[name] = lambda agg=method.aggregator, a=g_nat, b=g_rob: agg(a, b, (1.0, 1.0))
        size = sum(q.numel() for q in params)
    cfg = stage2.describe(ctx.cfg)
    print(f"{cfg['student']} on {cfg['input']}, batch {cfg['batch']}, {size} parameters, {reps} interleaved rounds")
    t_step, t_call = interleaved(steps, reps=reps), interleaved(calls, reps=reps)
    print(f"  {'strategy':18s} {'student step':>13s} {'x sum':>6s}   {'aggregator':>10s} {'x sum':>6s}")
    for name in cases:
        print(f"  {name:18s} {1000 * t_step[name]['median_s']:10.1f} ms {paired_ratio(t_step, name, 'sum'):6.2f}"
              f"   {1000 * t_call[name]['median_s']:7.2f} ms {paired_ratio(t_call, name, 'sum'):6.2f}")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--arch", default="small_cnn")
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--size", type=int, default=16)
    p.add_argument("--channels", type=int, default=1)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--strategies", action="store_true", help="time each aggregation strategy instead (see above)")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    if a.strategies:
        return strategy_costs(a.reps)
    torch.manual_seed(0)
    c = a.channels
    student = build_model(a.arch, c, 10, [0.5] * c, [0.25] * c, image_size=a.size, width=a.width).train()
    params = list(student.parameters())
    x = torch.rand(a.batch, c, a.size, a.size)
    x_adv = (x + 0.1 * torch.randn_like(x)).clamp(0, 1)
    t_nat, t_rob = torch.randn(a.batch, 10), torch.randn(a.batch, 10)

    def separate():
        g1 = torch.autograd.grad(kd_kl(t_nat, student(x)), params)
        g2 = torch.autograd.grad(kd_kl(t_rob, student(x_adv)), params)
        return g1, g2

    def shared():
        out = student(torch.cat([x, x_adv]))
        s, s_adv = out[: a.batch], out[a.batch :]
        g1 = torch.autograd.grad(kd_kl(t_nat, s), params, retain_graph=True)
        g2 = torch.autograd.grad(kd_kl(t_rob, s_adv), params)
        return g1, g2

    def summed():
        (kd_kl(t_nat, student(x)) + kd_kl(t_rob, student(x_adv))).backward()
        student.zero_grad(set_to_none=True)

    def same_shared():
        s = student(x)
        g1 = torch.autograd.grad(kd_kl(t_nat, s), params, retain_graph=True)
        g2 = torch.autograd.grad(kd_kl(t_rob, s), params)
        return g1, g2

    def same_twice():
        g1 = torch.autograd.grad(kd_kl(t_nat, student(x)), params)
        g2 = torch.autograd.grad(kd_kl(t_rob, student(x)), params)
        return g1, g2

    print(f"student {a.arch} width {a.width}, input {c}x{a.size}x{a.size}, batch {a.batch}, "
          f"threads {a.threads}, {a.reps} reps")
    base = timed(summed, a.reps)
    rows = [("sum (floor)", base), ("separate", timed(separate, a.reps)), ("shared 2B graph", timed(shared, a.reps))]
    same = [("same-input shared", timed(same_shared, a.reps)), ("same-input twice", timed(same_twice, a.reps))]
    for name, t in rows:
        print(f"  {name:20s} {1000 * t:8.1f} ms   x{t / base:.2f} of sum")
    print(f"  shared / separate     x{rows[2][1] / rows[1][1]:.2f}")
    for name, t in same:
        print(f"  {name:20s} {1000 * t:8.1f} ms   x{t / base:.2f} of sum")
    print(f"  same-input shared / twice  x{same[0][1] / same[1][1]:.2f}")


if __name__ == "__main__":
    main()
