"""Stage-II iterations built with the library (derd.config + derd.distill.loop.Context + the registered
methods), with teachers, Stage-I generators and the inversion pool created in memory (random weights;
the loaders are monkeypatched inside this process only). Used for FLOPs / MFU, scaling and the
forward/backward passes audit."""
from __future__ import annotations

import copy
import itertools
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import yaml
from torch.utils.flop_counter import FlopCounterMode

from bench.timing import timed
from derd import config, distill
from derd import data as datasets
from derd.distill import loop
from derd.models import build_generator
from derd.stage1 import warmup
from derd.teachers import build_for

PROJECT = Path(__file__).resolve().parent.parent


_SNAPSHOT: dict[str, Any] | None = None


def snapshot_params(raw: dict[str, Any] | None = None) -> dict[str, Any]:
    """Read params.yaml once per benchmark run (or take the run's copy, in a worker process), so every
    configuration of the run comes from the same file even if someone edits it meanwhile."""
    global _SNAPSHOT
    if raw is not None:
        _SNAPSHOT = copy.deepcopy(raw)
    if _SNAPSHOT is None:
        _SNAPSHOT = yaml.safe_load((PROJECT / "params.yaml").read_text(encoding="utf-8"))
    return copy.deepcopy(_SNAPSHOT)


def base_raw() -> dict[str, Any]:
    """params.yaml of the project (read only, the run's snapshot), Stage-II monitoring off."""
    raw = snapshot_params()
    raw["stage2"]["monitor_every"] = 0
    raw["device"] = "cpu"
    return raw


def make_config(*, arch: str | None = None, student_arch: str | None = None, dataset: str | None = None,
                image_size: int | None = None, batch: int | None = None, k_student: int | None = None,
                pgd_steps: int | None = None, runtime: dict[str, Any] | None = None, **stage2: Any) -> config.Config:
    raw = base_raw()
    if runtime:
        raw.setdefault("runtime", {}).update(runtime)
    if dataset:
        raw["data"]["name"] = dataset
    if image_size:
        raw["data"]["image_size"] = image_size
    if arch:
        for role in ("natural", "robust"):
            raw["teachers"][role]["arch"] = arch
    if student_arch:
        raw["stage2"]["student"]["arch"] = student_arch
    s2 = raw["stage2"]
    s2["iterations"] = 1000  # cosine length only; never run to the end here
    if batch:
        s2["batch_size"] = batch
    if k_student:
        s2["k_student"] = k_student
    if pgd_steps:
        s2["attack"]["steps"] = pgd_steps
    s2.update(stage2)
    return config.parse(raw)


def describe(cfg: config.Config) -> dict[str, Any]:
    info, s2, g = datasets.info(cfg.data), cfg.stage2, cfg.stage1.generator
    t = cfg.teachers
    return {"dataset": cfg.data.name, "input": "x".join(map(str, info.shape)), "batch": s2.batch_size,
            "k_student": s2.k_student, "pgd_steps": s2.attack.steps,
            "student": f"{s2.student.arch} w{s2.student.width}" if "small" in s2.student.arch else s2.student.arch,
            "teachers": sorted({f"{t.natural.arch}", f"{t.robust.arch}"}),
            "generator": f"{g.arch} w{g.width} nz{g.nz}"}


@contextmanager
def in_memory_artifacts(cfg: config.Config, seed: int = 0):
    """Teachers (random weights, non-trivial BN statistics, frozen, eval), Stage-I generators and an
    inversion pool built in memory instead of read from artifacts/ (this process only). Each teacher is built
    once per block; a block inside another one changes nothing (the outer block's teachers serve it)."""
    if loop.load_teacher.__module__ == __name__:  # already ours: inside another block
        yield
        return
    info = datasets.info(cfg.data)
    cache: dict[str, torch.nn.Module] = {}

    def load_teacher(cfg_, role, root=Path("."), device="cpu"):
        if role not in cache:
            spec = getattr(cfg_.teachers, role)
            torch.manual_seed(seed + (role == "robust"))
            model = build_for(spec.arch, spec.width, info)
            with torch.no_grad():
                model.train()
                model(torch.rand(16, *info.shape))
            model.eval()
            for p in model.parameters():
                p.requires_grad_(False)
            cache[role] = model
        return cache[role].to(device)

    def load_generator(cfg_, root=Path("."), teacher_role="natural", device="cpu"):
        g = cfg_.stage1.generator
        return build_generator(g.arch, g.nz, info.shape, g.width).to(device).eval()

    def load_pool(root=Path(".")):
        return torch.rand(256, *info.shape)

    saved = (loop.load_teacher, warmup.load_generator, warmup.load_inversion_pool)
    loop.load_teacher, warmup.load_generator, warmup.load_inversion_pool = load_teacher, load_generator, load_pool
    try:
        yield
    finally:
        loop.load_teacher, warmup.load_generator, warmup.load_inversion_pool = saved


def build(cfg: config.Config, method: str = "derd", seed: int = 0, device: torch.device | str = "cpu"):
    """(ctx, method instance) of one registered Stage-II method on ``device``, on in-memory artifacts (those of
    an enclosing :func:`in_memory_artifacts` block when there is one)."""
    cls = distill.get_method(method)
    with in_memory_artifacts(cfg, seed):
        ctx = loop.Context(cfg, cls, seed, PROJECT, torch.device(device))
        return ctx, cls(ctx)


def iteration(ctx, method) -> None:
    """One Stage-II iteration as the loop runs it: a generator step, then k_student student steps."""
    method.generator_step(0)
    for _ in range(ctx.s2.k_student):
        method.student_step(0)


class _GlobalOnly:
    """Stands in for FlopCounterMode's ModuleTracker: its module backward hooks break
    ``torch.autograd.grad`` w.r.t. an input leaf (every PGD step); we only need the global total."""
    parents = frozenset({"Global"})

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None


def count_flops(fn) -> int:
    """matmul/conv FLOPs (forward and backward) of ``fn()``, counted by torch's FlopCounterMode."""
    counter = FlopCounterMode(display=False)
    counter.mod_tracker = _GlobalOnly()
    with counter:
        fn()
    return int(counter.get_total_flops())


def plain_step(ctx):
    """Reference: one plain supervised fwd+bwd+SGD step of the student at the same batch and input."""
    x = torch.rand(ctx.s2.batch_size, *ctx.info.shape)
    y = torch.randint(0, ctx.info.num_classes, (ctx.s2.batch_size,))
    opt = torch.optim.SGD(ctx.student.parameters(), lr=1e-3)

    def step():
        ctx.student.train()
        loss = torch.nn.functional.cross_entropy(ctx.student(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def mfu_case(cfg: config.Config, peak_flops: float, reps: int, plain_reps: int = 3) -> dict[str, Any]:
    """FLOPs (FlopCounterMode, counted on the warm-up iteration) and median time of one DERD iteration,
    and of a plain fwd+bwd step of the student, with MFU against ``peak_flops``."""
    ctx, method = build(cfg)
    try:
        flops = count_flops(lambda: iteration(ctx, method))  # also the warm-up
        t = timed(lambda: iteration(ctx, method), reps=reps, warmup=0)
        step = plain_step(ctx)
        plain_flops = count_flops(step)
        tp = timed(step, reps=plain_reps, warmup=1)
    finally:
        method.close()
    return {**describe(cfg), "iteration_flops": flops, "iteration_s": t["median_s"], "iteration_min_s": t["min_s"],
            "reps": reps, "mfu": flops / t["median_s"] / peak_flops,
            "plain_fwd_bwd_flops": plain_flops, "plain_fwd_bwd_s": tp["median_s"],
            "plain_mfu": plain_flops / tp["median_s"] / peak_flops}


# ---------------------------------------------------------------------------- scaling (one subprocess each)
def scaling_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Run in a fresh process: time ``spec['reps']`` DERD iterations after one warm-up; memory = peak of the
    process's current RSS (/proc/self/statm, sampled every 2 ms by a thread) during warm-up + timed iterations
    minus the RSS just before them (and the getrusage ru_maxrss growth, a high-water mark); then FLOPs."""
    import os
    import resource
    import threading

    page = os.sysconf("SC_PAGE_SIZE")

    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * page

    torch.set_num_threads(spec["threads"])
    snapshot_params(spec.get("params"))
    cfg = make_config(batch=spec["batch"], image_size=spec["image_size"], k_student=spec["k_student"])
    ctx, method = build(cfg)
    max0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    base, peak, stop = rss(), [0], threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], rss())
            stop.wait(0.002)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        t = timed(lambda: iteration(ctx, method), reps=spec["reps"], warmup=1)
    finally:
        stop.set()
        sampler.join()
    max1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    flops = count_flops(lambda: iteration(ctx, method))
    method.close()
    return {**describe(cfg), "iteration_s": t["median_s"], "iteration_min_s": t["min_s"], "reps": spec["reps"],
            "iteration_flops": flops, "peak_rss_growth_mib": (peak[0] - base) / 2**20,
            "maxrss_growth_mib": (max1 - max0) / 1024, "rss_before_mib": base / 2**20}


# ---------------------------------------------------------------------------- passes audit
class PassCounter:
    """Forward/backward passes of whole modules (student, each teacher, generator).

    A forward = one call of the module (forward hook). Its key is (module, train/eval mode, input
    fingerprint): a second forward with a key already seen in the same step is a duplicate (the same
    function of the same input; mode matters because BatchNorm differs). A backward pass = one
    autograd call (torch.autograd.grad / backward) whose gradient reaches that forward's output; the
    autograd entry points are wrapped to number the calls."""

    def __init__(self, modules: dict[str, torch.nn.Module]):
        self.call = [0]
        self.fid = itertools.count()
        self.handles = [m.register_forward_hook(self._hook(name)) for name, m in modules.items()]
        self.reset()
        self._orig = (torch.autograd.grad, torch.autograd.backward)
        counter = self.call
        grad, backward = self._orig

        def wrapped_grad(*a, **k):
            counter[0] += 1
            return grad(*a, **k)

        def wrapped_backward(*a, **k):
            counter[0] += 1
            return backward(*a, **k)

        torch.autograd.grad, torch.autograd.backward = wrapped_grad, wrapped_backward

    def reset(self) -> None:
        self.call_start = self.call[0] if hasattr(self, "call") else 0
        self.forwards: list[dict[str, Any]] = []
        self.seen: set = set()
        self.backward: dict[int, set[int]] = defaultdict(set)

    def _hook(self, name: str):
        def hook(module, args, output):
            x = args[0] if args and isinstance(args[0], torch.Tensor) else None
            with torch.no_grad():
                d = x.detach().double() if x is not None else torch.zeros(1, dtype=torch.float64)
                key = (name, module.training, tuple(d.shape), d.sum().item(), (d * d).sum().item())
            fid = next(self.fid)
            if x is not None and x.requires_grad and not module.training:
                key = (key, fid)  # an attack iterate: unknown in advance, never a duplicate (even if unchanged)
            outs = output if isinstance(output, (tuple, list)) else (output,)
            grad_out = [o for o in outs if isinstance(o, torch.Tensor) and o.requires_grad]
            self.forwards.append({"module": name, "id": fid, "duplicate": key in self.seen, "grad": bool(grad_out),
                                  "training": module.training, "input_requires_grad": bool(x is not None and x.requires_grad)})
            self.seen.add(key)
            for o in grad_out:
                o.register_hook(lambda g, fid=fid: self.backward[fid].add(self.call[0]))
        return hook

    def summary(self, allowed_backward) -> dict[str, dict[str, int]]:
        """Per module: forwards, minimum forwards (distinct keys), backward passes, minimum backward
        (``allowed_backward(forward)`` per forward that any gradient reached)."""
        out: dict[str, dict[str, int]] = {}
        for f in self.forwards:
            m = out.setdefault(f["module"], {"fwd": 0, "fwd_min": 0, "bwd": 0, "bwd_min": 0, "fwd_grad_unused": 0})
            m["fwd"] += 1
            m["fwd_min"] += not f["duplicate"]
            n = len(self.backward.get(f["id"], ()))
            m["bwd"] += n
            m["bwd_min"] += min(n, allowed_backward(f)) if not f["duplicate"] else 0
            m["fwd_grad_unused"] += f["grad"] and n == 0
        return out

    def close(self) -> None:
        for h in self.handles:
            h.remove()
        torch.autograd.grad, torch.autograd.backward = self._orig


def audit_method(name: str, cfg: config.Config, student_steps: int = 2) -> dict[str, Any]:
    """Passes per generator step and per student step (mean over ``student_steps``) of one method."""
    ctx, method = build(cfg, name)
    modules = {"student": ctx.student, **{f"T_{r[:3]}": t for r, t in ctx.teachers.items()}}
    if ctx.generator is not None:
        modules["generator"] = ctx.generator
    separate = (name.startswith("derd") and cfg.stage2.aggregation != "sum")

    def allowed(f):  # SGA needs g_nat and g_rob separately: two autograd calls may share one student graph
        return 2 if separate and f["module"] == "student" and f["training"] and not f["input_requires_grad"] else 1

    counter = PassCounter(modules)
    try:
        method.generator_step(0)
        gen = counter.summary(allowed)
        gen_calls = counter.call[0] - counter.call_start
        calls = 0.0
        per_step: dict[str, dict[str, float]] = {}
        for _ in range(student_steps):
            counter.reset()
            method.student_step(0)
            calls += (counter.call[0] - counter.call_start) / student_steps
            for mod, row in counter.summary(allowed).items():
                acc = per_step.setdefault(mod, defaultdict(float))
                for k, v in row.items():
                    acc[k] += v / student_steps
    finally:
        counter.close()
        method.close()
    return {"method": name, "teachers": list(method.teachers), "generator_step": gen,
            "generator_step_autograd_calls": gen_calls, "student_step_autograd_calls": calls,
            "student_step": {m: dict(v) for m, v in per_step.items()}}
