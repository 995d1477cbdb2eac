"""The one timing helper every benchmark uses, plus machine facts and the matmul yardsticks."""
from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable
from contextlib import contextmanager
from typing import Any

import torch


def timed(fn: Callable[[], Any], reps: int = 3, warmup: int = 1) -> dict[str, float]:
    """Run ``fn`` ``warmup`` times untimed, then ``reps`` times; seconds per call (median, min, max)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times), "reps": reps}


def once(fn: Callable[[], Any]) -> tuple[Any, float]:
    """(fn(), seconds) of a single run (for work too long to repeat, e.g. a pipeline stage)."""
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def interleaved(fns: dict[str, Callable[[], Any]], reps: int = 3, warmup: int = 1) -> dict[str, dict[str, float]]:
    """Time several functions round-robin, the order reversed every other round (a, b, b, a, a, b, ...), so
    load changes on a shared machine and whatever the one before leaves behind (caches, allocator, clock)
    hit all of them alike; per function seconds per call (median, min, max, and each round's in ``times_s``)."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    order = list(fns.items())
    for rep in range(reps):
        for k, fn in (order if rep % 2 == 0 else order[::-1]):
            start = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - start)
    return {k: {"median_s": statistics.median(v), "min_s": min(v), "max_s": max(v), "reps": reps, "times_s": v}
            for k, v in times.items()}


def paired_ratio(t: dict[str, dict[str, Any]], a: str, b: str) -> float:
    """Median over the rounds of ``interleaved`` of a's time / b's time in the same round: a neighbour that
    slows the host for a while slows both sides of a round, so the ratio holds where the medians drift."""
    return statistics.median(x / y for x, y in zip(t[a]["times_s"], t[b]["times_s"], strict=True))


@contextmanager
def threads(n: int):
    """torch intra-op threads set to ``n`` inside the block."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def loadavg() -> list[float]:
    """The 1-, 5- and 15-minute load averages, rounded (NaN where the OS has none)."""
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    return [round(x, 2) for x in load]


def machine(threads_used: int) -> dict[str, Any]:
    return {
        "cpu_model": cpu_model(), "logical_cpus": os.cpu_count(), "threads_used": threads_used,
        "torch": torch.__version__, "device": "cuda:" + torch.cuda.get_device_name(0) if torch.cuda.is_available()
        else "cpu", "python": platform.python_version(), "loadavg_at_start": loadavg(),
        "omp_num_threads_env": os.environ.get("OMP_NUM_THREADS"),
    }


def matmul_flops(n: int) -> float:
    return 2.0 * n**3


def matmul_peak(n: int = 2048, reps: int = 5) -> dict[str, float]:
    """fp32 n×n matmul throughput on the current thread count: best and median of ``reps`` (FLOP/s)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    t = timed(lambda: a @ b, reps=reps, warmup=2)
    return {"n": n, "threads": torch.get_num_threads(), "peak_flops": matmul_flops(n) / t["min_s"],
            "median_flops": matmul_flops(n) / t["median_s"], "reps": reps}


def reference_workload(count: int = 1000, n: int = 1024, n_threads: int = 2) -> dict[str, Any]:
    """The README's wall-time budget unit: ``count`` fp32 n×n matmuls on ``n_threads`` threads."""
    with threads(n_threads):
        a, b = torch.randn(n, n), torch.randn(n, n)
        for _ in range(3):
            a @ b
        start = time.perf_counter()
        for _ in range(count):
            a @ b
        seconds = time.perf_counter() - start
    return {"matmuls": count, "n": n, "threads": n_threads, "seconds": seconds,
            "seconds_per_1000": seconds * 1000 / count, "gflops": matmul_flops(n) * count / seconds / 1e9}
