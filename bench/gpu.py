"""python -m bench.gpu [--micro] [--device auto|cpu|cuda] [--only SECTIONS] [--presets P,...] [--out DIR]
[--threads N]: the one-shot device check to run before a first GPU run of the paper presets (cifar10, cifar100,
imagenet100), sized for about ten minutes on one GPU. Writes <out>/gpu.md and <out>/gpu.json, prints one line
per check; exit status 0 when every check passed or was skipped (a skip names its reason), 1 when one failed.

Sections (``--only`` takes a comma list of them), everything through the library:
- presets: each preset through every stage (inputs, teachers, Stage-I, Stage-II, evaluate, report: the library
  calls the flows make) on synthetic data in the real on-disk formats, a few steps each, with the preset's
  networks (bench/synthetic.py's fake data and micro override, on this device);
- numerics: the losses and gradients of one DERD student step (the registered method under ``runtime.autocast``,
  its pseudo batch and adversarial examples pinned) with bf16 / fp16 autocast, TF32, channels_last off,
  cudnn_benchmark off and torch.compile, each against the preset's fp32 step (TF32 off) within TOLERANCE;
- torchrun: ``derd distill`` under torchrun on 1 process, and on 2 (NCCL, ``runtime.nproc: 2``, the CLI launching
  torchrun itself) when the machine has >= 2 GPUs;
- timing: fp32 / TF32 / bf16 matmul peaks, one full-batch DERD iteration of each preset (its batch, networks, k_S
  and PGD steps; fp32 as the preset runs, and bf16 autocast) with its MFU against those peaks (FLOPs:
  bench.stage2.count_flops), and each preset's full run time projected from the measured steps.
Without CUDA the same code runs on the CPU with the CUDA-only parts skipped and named (reduced batches, said so);
``--micro`` (CI) swaps in small networks and tiny batches.
"""
# ruff: noqa: ISC004  (the report's paragraphs are implicitly concatenated strings in lists, on purpose)
from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import math
import re
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from bench import stage2, synthetic
from bench.__main__ import library_state
from bench.timing import machine, matmul_flops, matmul_peak, timed
from derd import config, distill
from derd import data as datasets
from derd.artifacts import read_json, write_json, write_text
from derd.attacks import PGD
from derd.distill import loop
from derd.evaluation.evaluate import COLUMNS
from derd.losses import StageOneLoss
from derd.models import build_generator
from derd.runtime import Paths, autocast, prepare_model
from derd.teachers import CHECK_EXAMPLES, CHECK_PGD_STEPS, _teacher_loss, build_for

PROJECT = Path(__file__).resolve().parent.parent
PRESETS = ("cifar10", "cifar100", "imagenet100")
SECTIONS = ("presets", "numerics", "torchrun", "timing")
# Relative error (loss, gradient) allowed against the fp32 step: |a - b| / |b| for L_nat and L_rob, ||a - b|| / ||b||
# for g_nat and g_rob (flattened). The student is a random network in train mode, whose BatchNorm backward amplifies
# rounding (measured on the CPU: bf16 gradients 0.31-0.37 off for the presets' students at 32x32, 56x56 and
# 224x224, at batch 2 to 32; 0.02 in eval mode; one conv's weight gradient 0.003; channels_last off 0.002-0.006):
# the gradient limits catch a broken cast, scaler or layout (errors >= 1, NaN), not rounding. bf16 keeps 8 mantissa
# bits, fp16 and TF32 11; the fp32 variants only reorder fp32 operations.
TOLERANCE = {"amp-bf16": (0.02, 0.5), "amp-fp16": (0.01, 0.25), "tf32": (0.01, 0.25),
             "channels_last": (1e-3, 0.05), "cudnn_benchmark": (1e-3, 0.05), "compile": (1e-3, 0.05)}
# name: (runtime keys of the compared step, TF32 on, why it needs CUDA); channels_last / cudnn_benchmark are turned
# off (the presets turn them on); fp16 runs on the CPU at --micro only
VARIANTS = {"amp-bf16": ({"amp": "bf16"}, False, None),
            "amp-fp16": ({"amp": "fp16"}, False, "CPU fp16 convolutions take minutes per step at the presets' networks"),
            "tf32": ({}, True, "TF32 tensor cores"), "channels_last": ({"channels_last": False}, False, None),
            "cudnn_benchmark": ({"cudnn_benchmark": False}, False, "cuDNN"), "compile": ({"compile": True}, False, None)}
# the in-memory teachers' final layer is scaled to this logit standard deviation on the pinned batch: random weights
# give near-uniform outputs whose KL to the student (~0.02) is mostly cancellation, bf16's rounding ~20 % of it;
# a trained teacher is confident (KL ~ 1)
TEACHER_LOGIT_STD = 5.0
MAX_OVERFLOWS = 3  # fp16: steps the loss scaler may skip (halving its scale) before the comparison gives up
NO_CUDA = "skipped: no CUDA"
# training images before the validation split, for the teachers' steps per epoch (ImageNet-100: the CMC subset)
TRAIN_IMAGES = {"cifar10": 50_000, "cifar100": 50_000, "imagenet100": 126_689}
# AutoAttack cost per attacked example in gradient-step equivalents, our estimate of the official settings (an
# upper bound: AutoAttack attacks only the examples still robust): APGD 100 iterations (APGD-T: 9 target classes),
# FAB-T 9 targets x 100 iterations, Square 5000 queries of a forward (1/3 of a gradient step) each
AA_STEPS = {"apgd-ce": 100, "apgd-dlr": 100, "apgd-t": 900, "fab": 500, "fab-t": 900, "square": 5000 / 3}
AA_VERSIONS = {"standard": ("apgd-ce", "apgd-t", "fab-t", "square"), "standard-apgd": ("apgd-ce", "apgd-t")}


@dataclass(frozen=True)
class Scale:
    """How big the run is: ``gpu`` (the presets' sizes), ``cpu`` (no CUDA: the presets' networks, reduced batches)
    or ``micro`` (CI: small stand-in networks, tiny batches)."""

    name: str
    nets: dict[str, str]  # role -> architecture standing in for the preset's (empty: the preset's own)
    image_size: int  # ImageNet-100's crop in the end-to-end runs and the numerics (CIFAR: 32)
    time_image_size: int  # ... in the timed iteration
    compare_batch: int | None  # batch of the numerics (None: the preset's stage2.batch_size)
    time_batch: int | None  # batch of every timed step (None: the preset's, per step)
    reps: int  # timed repetitions per step
    compile_presets: tuple[str, ...]  # presets whose student step is compared under torch.compile
    matmul_n: int


SCALES = {
    "gpu": Scale("gpu", {}, 224, 224, None, None, 3, ("cifar10",), 8192),
    "cpu": Scale("cpu", {}, 56, 224, 4, 2, 1, (), 2048),
    "micro": Scale("micro", {"natural": "small_resnet", "robust": "small_resnet", "student": "small_cnn"},
                   28, 28, 4, 4, 1, (), 512),
}


@dataclass
class Check:
    name: str
    status: str = "PASS"  # PASS | FAIL | SKIP
    summary: str = ""
    data: dict[str, Any] = field(default_factory=dict)

    def line(self) -> str:
        return f"{self.status:4}  {self.name}: {self.summary}"


class Failed(AssertionError):
    """A check's own verdict (its numbers are kept in the report)."""

    def __init__(self, summary: str, data: dict[str, Any] | None = None):
        super().__init__(summary)
        self.data = data or {}


class Run:
    """The checks so far, each printed as it ends."""

    def __init__(self):
        self.checks: list[Check] = []

    def add(self, check: Check) -> Check:
        self.checks.append(check)
        print(check.line(), flush=True)
        return check

    def skip(self, name: str, reason: str) -> Check:
        return self.add(Check(name, "SKIP", reason))

    def run(self, name: str, body: Callable[[], tuple[str, dict[str, Any]]]) -> Check:
        """``body()`` -> (summary, data); a :class:`Failed` or any exception makes the check FAIL (the others go on)."""
        try:
            summary, data = body()
            return self.add(Check(name, "PASS", summary, data))
        except Failed as exc:
            return self.add(Check(name, "FAIL", str(exc), exc.data))
        except Exception as exc:  # noqa: BLE001  (a crash on the device is what this command is for: record it)
            return self.add(Check(name, "FAIL", crash(exc), {"traceback": traceback.format_exc()[-4000:]}))

    def guarded(self, name: str, body: Callable[[], None]) -> None:
        """``body()`` adds its own checks; a crash outside them (its setup) is recorded as the check ``name``."""
        try:
            body()
        except Exception as exc:  # noqa: BLE001
            self.add(Check(name, "FAIL", crash(exc), {"traceback": traceback.format_exc()[-4000:]}))

    def data(self, name: str) -> dict[str, Any] | None:
        return next((c.data for c in self.checks if c.name == name and c.status == "PASS"), None)


def crash(exc: BaseException) -> str:
    """One line: the exception's message (its lines joined), or where it was raised when it has none (an assert)."""
    text = " / ".join(line.strip() for line in str(exc).splitlines() if line.strip())[:400]
    if not text and exc.__traceback__ is not None:
        where = traceback.extract_tb(exc.__traceback__)[-1]
        text = f"at {Path(where.filename).name}:{where.lineno}: {where.line}"
    return f"{type(exc).__name__}: {text}"


# ---------------------------------------------------------------------------- configs and builds
def preset_raw(preset: str, scale: Scale, image_size: int) -> dict[str, Any]:
    """presets/<preset>.yaml with the scale's stand-in networks and ImageNet-100 crop."""
    raw = yaml.safe_load((PROJECT / "presets" / f"{preset}.yaml").read_text(encoding="utf-8"))
    for role, arch in scale.nets.items():
        (raw["stage2"]["student"] if role == "student" else raw["teachers"][role])["arch"] = arch
    if preset == "imagenet100":
        raw["data"]["image_size"] = image_size
    return raw


def preset_config(preset: str, scale: Scale, image_size: int, **changes: Any) -> config.Config:
    """The preset as bench.stage2.make_config builds a Stage-II config (monitoring off, ``changes`` applied)."""
    stage2.snapshot_params(preset_raw(preset, scale, image_size))
    return stage2.make_config(**changes)


def variant(cfg: config.Config, runtime: dict[str, Any]) -> config.Config:
    return cfg.model_copy(update={"runtime": cfg.runtime.model_copy(update=runtime)})


def release(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def tf32(on: bool) -> Iterator[None]:
    """TF32 for CUDA matmuls and cuDNN convolutions on or off inside the block."""
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = on
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def nets(cfg: config.Config) -> str:
    t = cfg.teachers
    return f"{t.natural.arch}/{t.robust.arch} -> {cfg.stage2.student.arch}, G {cfg.stage1.generator.arch}"


# ---------------------------------------------------------------------------- presets end to end
def micro_project(preset: str, scale: Scale, device: torch.device, work: Path) -> config.Config:
    """:func:`bench.synthetic.micro_project` under ``work`` on ``device``, with the scale's stand-in networks and
    ImageNet-100 crop."""
    extra = {"device": device.type,
             **{f"teachers.{r}.arch" if r != "student" else "stage2.student.arch": a for r, a in scale.nets.items()}}
    if preset == "imagenet100":
        extra["data.image_size"] = scale.image_size
    return synthetic.micro_project(work, preset, extra)


def end_to_end(preset: str, scale: Scale, device: torch.device, work: Path) -> tuple[str, dict[str, Any]]:
    """Every stage of ``preset`` at micro scale (:func:`bench.synthetic.all_stages`), with its checks."""
    work.mkdir(parents=True)
    printed = io.StringIO()
    start = time.monotonic()
    with synthetic.cifar_checksums_waived(preset), contextlib.redirect_stdout(printed):  # stages print their seconds
        cfg = micro_project(preset, scale, device, work)
        results = synthetic.all_stages(cfg, work / "project")
    seconds = {m[1]: float(m[2]) for m in re.finditer(r"^\S+ (\w+): ([\d.]+) s$", printed.getvalue(), re.MULTILINE)}
    paths = Paths(work / "project")
    side = {role: read_json(paths.teachers / f"{role}.json") for role in ("natural", "robust")}
    student = read_json(paths.student("derd", 0).with_suffix(".json"))
    table = results.get("table", {})
    data = {"networks": nets(cfg), "input": "x".join(map(str, datasets.info(cfg.data).shape)), "stage_s": seconds,
            "total_s": time.monotonic() - start, "eval_table": table, "project": str(work / "project"),
            "params": str(work / "params.yaml")}
    problems = [f"{role} teacher is {side[role]['arch']}, params say {getattr(cfg.teachers, role).arch}"
                for role in side if side[role]["arch"] != getattr(cfg.teachers, role).arch]
    problems += [f"{role} teacher's sidecar does not record the preset's runtime.channels_last"
                 for role in side if side[role]["runtime"]["channels_last"] is not cfg.runtime.channels_last]
    if (student["arch"], student["iterations"]) != (cfg.stage2.student.arch, cfg.stage2.iterations):
        problems.append(f"student sidecar: {student['arch']}, {student['iterations']} iterations")
    if not (paths.reports / "report.html").is_file():
        problems.append("no reports/report.html")
    bad = [f"{m} {c}" for m, row in table.items() for c in COLUMNS if not math.isfinite(float(row.get(c, "nan")))]
    if bad or not table:
        problems.append(f"non-finite evaluation numbers: {bad[:4]}" if bad else "metrics/eval.json has no table")
    if problems:
        raise Failed("; ".join(problems), data)
    stages = ", ".join(f"{k} {v:.1f}" for k, v in seconds.items())
    return f"all stages ran ({stages} s) with {data['networks']} at {data['input']}", data


# ---------------------------------------------------------------------------- numerics
def pinned_step(ctx: loop.Context, method: distill.Method, batch: tuple[torch.Tensor, torch.Tensor]) -> dict[str, Any]:
    """One DERD student step as the loop runs it (under ``runtime.autocast``) with its inputs pinned to ``batch`` =
    (x, x_adv): its two losses and the two gradients it took (g_nat, g_rob; fp32, flattened, on the CPU). An fp16
    step whose scaled gradients overflowed (skipped and the loss scale halved, as in training) is taken again."""
    x, x_adv = batch
    method.student_batch = lambda: x
    ctx.adversarial = lambda _x: x_adv
    grads: list[torch.Tensor] = []
    take = ctx.student_grads

    def recorded(loss: torch.Tensor, retain_graph: bool = False) -> list[torch.Tensor]:
        out = take(loss, retain_graph)
        grads.append(torch.cat([g.detach().float().reshape(-1) for g in out]).cpu())
        return out

    ctx.student_grads = recorded
    for overflows in range(MAX_OVERFLOWS + 1):
        grads.clear()
        scale = ctx.scale_s.scale
        start = time.perf_counter()
        with autocast(ctx.cfg, ctx.device):
            logs = method.student_step(0)
        sync(ctx.device)
        if ctx.scale_s.scale >= scale:
            break
    else:
        raise Failed(f"the fp16 loss scale overflowed {MAX_OVERFLOWS + 1} steps in a row "
                     f"(scale now {ctx.scale_s.scale:g})")
    return {"L_nat": float(logs["L_nat"]), "L_rob": float(logs["L_rob"]), "g_nat": grads[0], "g_rob": grads[1],
            "overflows": overflows, "step_s": time.perf_counter() - start}


def fingerprint(module: torch.nn.Module) -> str:
    """A hash of the parameters' values (whatever their memory format)."""
    digest = hashlib.sha256()
    for p in module.parameters():
        digest.update(p.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def relative_errors(out: dict[str, Any], ref: dict[str, Any]) -> dict[str, float]:
    """|a - b| / |b| of the losses, ||a - b|| / ||b|| of the gradients."""
    errs = {k: abs(out[k] - ref[k]) / max(abs(ref[k]), 1e-30) for k in ("L_nat", "L_rob")}
    errs.update({k: float((out[k] - ref[k]).norm() / ref[k].norm().clamp_min(1e-30)) for k in ("g_nat", "g_rob")})
    return errs


def compared(name: str, out: dict[str, Any], ref: dict[str, Any], extra: dict[str, Any]) -> tuple[str, dict]:
    errs = relative_errors(out, ref)
    loss_tol, grad_tol = TOLERANCE[name.split("/")[0]]
    loss, grad = max(errs["L_nat"], errs["L_rob"]), max(errs["g_nat"], errs["g_rob"])
    data = {**extra, "errors": errs, "tolerance": [loss_tol, grad_tol], "overflows": out["overflows"],
            "losses": {k: out[k] for k in ("L_nat", "L_rob")}, "fp32_losses": {k: ref[k] for k in ("L_nat", "L_rob")}}
    summary = f"loss rel err {loss:.1e} (tol {loss_tol:g}), gradient rel err {grad:.1e} (tol {grad_tol:g})"
    if out["overflows"]:
        summary += f"; {out['overflows']} overflowed step(s) skipped by the loss scaler"
    if not (loss <= loss_tol and grad <= grad_tol):  # NaN fails too
        raise Failed(summary, data)
    return summary, data


def one_step(cfg: config.Config, device: torch.device, batch: tuple[torch.Tensor, torch.Tensor],
             tf32_on: bool) -> dict[str, Any]:
    """A fresh build's pinned student step (compiled: its own label-free PGD first, which must run too)."""
    ctx, method = stage2.build(cfg, device=device)
    try:
        with tf32(tf32_on):
            extra = {"batch": cfg.stage2.batch_size, "networks": nets(cfg), "init_fingerprint": fingerprint(ctx.net),
                     "eps": cfg.stage2.attack.eps, "input": "x".join(map(str, datasets.info(cfg.data).shape))}
            if cfg.runtime.compile:
                start = time.perf_counter()
                x_adv = ctx.adversarial(batch[0])
                sync(device)
                extra["compiled_pgd"] = {"seconds_with_compilation": time.perf_counter() - start,
                                         "max_delta": float((x_adv - batch[0]).abs().max())}
            return {**pinned_step(ctx, method, batch), **extra}
    finally:
        method.close()
        del ctx, method
        release(device)


@torch.no_grad()
def sharpen(teacher: torch.nn.Module, x: torch.Tensor) -> None:
    """Scale a random teacher's final layer so that its logits on ``x`` have TEACHER_LOGIT_STD."""
    factor = TEACHER_LOGIT_STD / teacher(x).float().std()
    for p in teacher.net.fc.parameters():
        p.mul_(factor)


def numerics(run: Run, preset: str, scale: Scale, device: torch.device) -> None:
    """Every variant's pinned DERD student step against the preset's fp32 step (TF32 off) on the same batch."""
    base = preset_config(preset, scale, scale.image_size, batch=scale.compare_batch)
    todo = []
    for name, (_, _, needs) in VARIANTS.items():
        if needs and device.type != "cuda" and not (name == "amp-fp16" and scale.name == "micro"):
            run.skip(f"{name}/{preset}", f"{NO_CUDA} ({needs})")
        elif name == "compile" and preset not in scale.compile_presets:
            run.skip(f"{name}/{preset}", f"{NO_CUDA} (torch.compile: minutes of compilation on a CPU, ~2 min for "
                     "the --micro student's PGD here)" if device.type != "cuda" else "skipped: --micro" if not
                     scale.compile_presets else f"skipped: compared on {', '.join(scale.compile_presets)} only")
        else:
            todo.append(name)
    steps: dict[str, dict[str, Any] | Exception] = {}
    with stage2.in_memory_artifacts(base), tf32(False):
        ctx, method = stage2.build(variant(base, {"channels_last": False}), device=device)  # builds the cached teachers
        try:
            x = ctx.pseudo_batch()
            batch = (x, ctx.adversarial(x))  # G(z) and its label-free PGD examples, fp32
            for teacher in ctx.teachers.values():  # the cached teachers every later build reads
                sharpen(teacher, x)
        finally:
            method.close()
            del ctx, method
        # channels_last off first: a build with it on leaves the cached teachers in that format
        for name in sorted(["reference", *todo], key=lambda n: n != "channels_last"):
            changes, tf32_on, _ = VARIANTS.get(name, ({}, False, None))
            try:
                steps[name] = one_step(variant(base, changes), device, batch, tf32_on)
            except Exception as exc:  # noqa: BLE001  (that comparison fails with it; the others go on)
                steps[name] = exc
    ref = steps.pop("reference")
    for name, out in steps.items():
        run.run(f"{name}/{preset}", lambda name=name, out=out: compare_one(name, out, ref))


def compare_one(name: str, out: dict[str, Any] | Exception, ref: dict[str, Any] | Exception) -> tuple[str, dict]:
    if isinstance(ref, Exception):
        raise Failed(f"the fp32 reference step failed: {crash(ref)}")
    if isinstance(out, Exception):
        raise out
    extra = {k: v for k, v in out.items() if k not in ("g_nat", "g_rob", "L_nat", "L_rob", "overflows")}
    if out["init_fingerprint"] != ref["init_fingerprint"]:
        raise Failed("the compared build's student did not start from the reference's weights (bench bug)", extra)
    pgd = out.get("compiled_pgd")
    if pgd and not pgd["max_delta"] <= out["eps"] + 1e-6:
        raise Failed(f"the compiled student's PGD left the eps-ball: max |x_adv - x| = {pgd['max_delta']:.4g}", extra)
    return compared(name, out, ref, extra)


# ---------------------------------------------------------------------------- torchrun
def upstream_project(scale: Scale, device: torch.device, work: Path) -> tuple[Path, Path]:
    """A cifar10 micro project with its teachers and natural Stage-I generator (when the presets section did not
    leave one): (project root, params file)."""
    from derd import teachers
    from derd.stage1 import warmup

    work.mkdir(parents=True)
    with synthetic.cifar_checksums_waived("cifar10"), contextlib.redirect_stdout(io.StringIO()):
        cfg = micro_project("cifar10", scale, device, work)
        teachers.run(cfg, work / "project")
        warmup.run_unit(cfg, work / "project", "generator_natural")
    return work / "project", work / "params.yaml"


def torchrun(nproc: int, project: Path, params: Path, timeout: int) -> tuple[str, dict[str, Any]]:
    """``derd distill --only derd-seed0`` on ``nproc`` processes with ``runtime.nproc: nproc``: 1 under an explicit
    torchrun, more by the CLI launching torchrun itself (NCCL on GPUs); rank 0's student must record them."""
    raw = yaml.safe_load(params.read_text(encoding="utf-8"))
    raw["runtime"]["nproc"] = nproc
    raw["stage2"].update(methods=["derd"], seeds=[0])
    mine = write_text(params.with_name(f"params-nproc{nproc}.yaml"), yaml.safe_dump(raw, sort_keys=False))
    paths = Paths(project)
    for old in paths.students.glob("derd-seed0.*"):
        old.unlink()
    cli = ["-m", "pipelines.cli", "distill", "--only", "derd-seed0", "--params", str(mine), "--root", str(project)]
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1"] if nproc == 1 else []
    start = time.monotonic()
    done = subprocess.run([sys.executable, *launcher, *cli], cwd=PROJECT, capture_output=True, text=True,
                          timeout=timeout, check=False)
    data = {"command": " ".join(["python", *launcher, *cli[:5]]) + f" (runtime.nproc: {nproc})",
            "seconds": time.monotonic() - start, "returncode": done.returncode}
    if done.returncode:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise Failed(f"exit status {done.returncode}: {last[:300]}", {**data, "stderr": done.stderr[-4000:]})
    side = read_json(paths.student("derd", 0).with_suffix(".json"))
    data.update(runtime=side["runtime"], final=side["final"])
    finite = all(math.isfinite(v) for v in side["final"].values())
    if side["runtime"]["world_size"] != nproc or not finite:
        raise Failed(f"the student records world_size {side['runtime']['world_size']} (want {nproc}); "
                     f"final losses finite: {finite}", data)
    return (f"exit 0 in {data['seconds']:.0f} s (start-up and Prefect's temporary server included), student "
            f"written once with world_size {nproc}, final L_nat {side['final'].get('L_nat', float('nan')):.4g}"), data


# ---------------------------------------------------------------------------- timing
def peak(name: str, device: torch.device, n: int, reps: int) -> tuple[str, dict[str, Any]]:
    """Matmul throughput (FLOP/s) of n x n matrices: fp32 (TF32 off), TF32 or bf16; best and median of ``reps``."""
    if device.type != "cuda":
        p = matmul_peak(n, reps=reps)
    else:
        inner = 10
        with tf32(name == "tf32"):
            a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16 if name == "bf16" else torch.float32)
                    for _ in range(2))

            def product():
                for _ in range(inner):
                    a @ b
                sync(device)

            t = timed(product, reps=reps, warmup=2)
        p = {"n": n, "peak_flops": inner * matmul_flops(n) / t["min_s"],
             "median_flops": inner * matmul_flops(n) / t["median_s"], "reps": reps}
    return f"{rate(p['peak_flops'])} (best of {reps}; median {rate(p['median_flops'])}) on {n}x{n}", p


def iteration(cfg: config.Config, full: config.Config, device: torch.device, scale: Scale,
              peaks: dict[str, float]) -> tuple[str, dict[str, Any]]:
    """One DERD iteration (the generator step and k_S student steps of the registered method, under
    ``runtime.autocast``) timed step by step after its FLOP count (bench.stage2.count_flops, the warm-up); MFU."""
    cuda = device.type == "cuda"
    ctx, method = stage2.build(cfg, device=device)

    def step(fn):
        def run():
            with autocast(cfg, device):
                fn(0)
            sync(device)
        return run

    steps = {"generator_step": step(method.generator_step), "student_step": step(method.student_step)}
    try:
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        flops = {k: stage2.count_flops(run) for k, run in steps.items()}  # also the warm-up (cuDNN's search)
        seconds = {k: timed(run, reps=scale.reps, warmup=0)["median_s"] for k, run in steps.items()}
        memory = torch.cuda.max_memory_allocated(device) if cuda else None
    finally:
        method.close()
        del ctx, method
        release(device)
    k, s2 = cfg.stage2.k_student, cfg.stage2
    it_s = seconds["generator_step"] + k * seconds["student_step"]
    it_flops = flops["generator_step"] + k * flops["student_step"]
    achieved = it_flops / it_s
    against = ("fp32", "tf32") if cfg.runtime.amp == "off" else (cfg.runtime.amp,)
    mfu = {p: achieved / peaks[p] for p in against if p in peaks}
    factor = full.stage2.batch_size / s2.batch_size  # 1 at the preset's batch; CPU: linear in the batch
    data = {"amp": cfg.runtime.amp, "batch": s2.batch_size, "preset_batch": full.stage2.batch_size, "k_student": k,
            "pgd_steps": s2.attack.steps, "networks": nets(cfg),
            "input": "x".join(map(str, datasets.info(cfg.data).shape)),
            "step_s": seconds, "step_flops": flops, "iteration_s": it_s, "iteration_flops": it_flops,
            "flops_per_s": achieved, "mfu": mfu, "peak_memory_bytes": memory, "preset_iteration_s": it_s * factor,
            "reduced_batch": factor != 1, "tf32_convolutions": torch.backends.cudnn.allow_tf32 if cuda else None}
    reduced = f" (preset {full.stage2.batch_size}; reduced: no CUDA)" if factor != 1 else ""
    shares = ", ".join(f"{100 * v:.1f}% of {p} peak" for p, v in mfu.items()) or "no peak measured"
    return (f"batch {s2.batch_size}{reduced}, k_S {k}, PGD-{s2.attack.steps}: {it_s:.3g} s/iteration, "
            f"{it_flops / 1e12:.3g} TFLOP, {rate(achieved)} = MFU {shares}"), data


def train_step(cfg: config.Config, role: str, device: torch.device, batch: int,
               reps: int) -> tuple[torch.nn.Module, float]:
    """(the net, seconds) of one training step of a teacher as the teachers stage takes it (cross-entropy, or the
    robust loss with its PGD), on random images at ``batch``."""
    spec, info = getattr(cfg.teachers, role), datasets.info(cfg.data)
    torch.manual_seed(0)
    model = prepare_model(build_for(spec.arch, spec.width, info, spec.normalize).to(device), cfg).train()
    opt = torch.optim.SGD(model.parameters(), lr=spec.train.lr, momentum=spec.train.momentum,
                          weight_decay=spec.train.weight_decay)
    x = torch.rand(batch, *info.shape, device=device)
    y = torch.randint(0, info.num_classes, (batch,), device=device)

    def step():
        with autocast(cfg, device):
            loss = _teacher_loss(model, x, y, spec)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sync(device)

    return model, timed(step, reps=reps, warmup=int(device.type == "cuda"))["median_s"]


def stage1_step(cfg: config.Config, teacher: torch.nn.Module, device: torch.device, batch: int, reps: int) -> float:
    """Seconds of one Stage-I generator step (L_G^I on the frozen natural teacher, Adam), as the warm-up takes it."""
    s1, info = cfg.stage1, datasets.info(cfg.data)
    for p in teacher.parameters():
        p.requires_grad_(False)
    teacher.eval()
    generator = build_generator(s1.generator.arch, s1.generator.nz, info.shape, s1.generator.width).to(device).train()
    opt = torch.optim.Adam(generator.parameters(), lr=s1.lr)
    z = torch.randn(batch, s1.generator.nz, device=device)
    with StageOneLoss.from_config(teacher, s1) as loss_fn:
        def step():
            with autocast(cfg, device):
                result = loss_fn(generator(z))
            opt.zero_grad(set_to_none=True)
            result.total.backward()
            opt.step()
            sync(device)

        return timed(step, reps=reps, warmup=int(device.type == "cuda"))["median_s"]


def attack_step(model: torch.nn.Module, cfg: config.Config, device: torch.device, batch: int, reps: int) -> float:
    """Seconds per example of one PGD step (a forward and an input gradient, fp32) at ``batch``."""
    info, ev, steps = datasets.info(cfg.data), cfg.eval, 3
    x = torch.rand(batch, *info.shape, device=device)
    y = torch.randint(0, info.num_classes, (batch,), device=device)
    attack = PGD(model.eval(), ev.eps, steps=steps, step_size=ev.pgd_s.step_size, seed=0)

    def run():
        attack(x, y)
        sync(device)

    return timed(run, reps=reps, warmup=int(device.type == "cuda"))["median_s"] / steps / batch


def eval_steps(ev: config.Eval) -> dict[str, float]:
    """Gradient steps per evaluated example of each part of the evaluate stage; upper bounds (no attack stops
    early, AutoAttack attacks every example, restarts run on every example)."""
    n = ev.n_examples
    parts = {"FGSM": 1.0, "PGD_S": ev.pgd_s.steps, "PGD_T": ev.pgd_t.steps, "CW": ev.cw.steps,
             "eps_curve": ev.pgd_s.steps * len({m for m in ev.eps_curve if m not in (0.0, 1.0)})}
    parts["AA"] = sum(AA_STEPS[a] for a in AA_VERSIONS.get(ev.autoattack.version) or ev.autoattack.attacks)
    if ev.sanity.enabled:
        k, steps = ev.sanity.strength, ev.pgd_s.steps
        parts["sanity"] = (steps + steps * k * k + ev.sanity.square_queries / 3) * min(ev.sanity.n_examples, n) / n
    return parts


def projection(full: config.Config, device: torch.device, scale: Scale,
               it: dict[str, Any] | None) -> tuple[str, dict[str, Any]]:
    """The preset's full run on this device: each part's step, timed here, times its count in the preset (linear
    in the batch where a reduced batch was timed)."""
    if it is None:
        raise Failed("no fp32 iteration timing to project from")
    reps = scale.reps

    def at(n: int) -> int:  # the batch timed for a preset batch of n
        return min(scale.time_batch or n, n)

    s1, s2, ev, info = full.stage1, full.stage2, full.eval, datasets.info(full.data)
    parts: dict[str, dict[str, Any]] = {}
    students = len(s2.methods) * len(s2.seeds)
    student_net = build_for(s2.student.arch, s2.student.width, info).to(device)
    per_example = {"student": attack_step(student_net, full, device, at(ev.batch_size), reps)}
    monitors = math.ceil(s2.iterations / s2.monitor_every) if s2.monitor_every else 0
    monitor_s = monitors * s2.monitor_examples * (s2.monitor_pgd_steps + 2) * per_example["student"]
    parts["Stage-II"] = {"seconds": students * (s2.iterations * it["preset_iteration_s"] + monitor_s),
                         "what": f"{students} student(s) x {s2.iterations} iterations (1 generator + {s2.k_student} "
                                 f"student steps) + {monitors} monitor passes each; every method costed as DERD"}
    for role in ("natural", "robust"):
        spec = getattr(full.teachers, role)
        model, step_s = train_step(full, role, device, at(spec.train.batch_size), reps)
        per_example[role] = attack_step(model, full, device, at(ev.batch_size), reps)
        del model
        if spec.checkpoint:
            parts[f"{role} teacher"] = {"seconds": 0.0, "what": "given (teachers.*.checkpoint)"}
            continue
        steps = spec.train.epochs * math.ceil(TRAIN_IMAGES[full.data.name] * (1 - full.data.val_fraction) /
                                              spec.train.batch_size)
        check = CHECK_EXAMPLES * (CHECK_PGD_STEPS + 2) * per_example[role]
        per_step = step_s * spec.train.batch_size / at(spec.train.batch_size)
        parts[f"{role} teacher"] = {"seconds": steps * per_step + check,
                                    "what": f"{spec.train.epochs} epochs = {steps} steps of {spec.train.batch_size} "
                                            f"+ the sidecar's PGD-{CHECK_PGD_STEPS} check"}
    teacher = build_for(full.teachers.natural.arch, full.teachers.natural.width, info).to(device)
    g_s = stage1_step(full, prepare_model(teacher, full), device, at(s1.batch_size), reps)
    g_s *= s1.batch_size / at(s1.batch_size)
    inv = s1.inversion
    pool_steps = math.ceil(inv.pool_size / inv.batch_size) * inv.steps if inv.pool_size else 0
    pool_s = pool_steps * g_s * inv.batch_size / s1.batch_size
    parts["Stage-I"] = {"seconds": len(s1.generators) * s1.iterations * g_s + pool_s,
                        "what": f"{len(s1.generators)} generator(s) x {s1.iterations} steps of {s1.batch_size}"
                                + (f" + inversion pool: {pool_steps} steps of {inv.batch_size} (costed as generator "
                                   "steps)" if pool_steps else "")}
    grad_steps = eval_steps(ev)
    models = {"natural": 1, "robust": 1, "student": students}
    parts["evaluation"] = {"seconds": sum(m * ev.n_examples * sum(grad_steps.values()) * per_example[r]
                                          for r, m in models.items()),
                           "what": f"{students + 2} models x {ev.n_examples} examples x {sum(grad_steps.values()):.0f} "
                                   "gradient steps each (upper bound)", "grad_steps_per_example": grad_steps}
    total = sum(p["seconds"] for p in parts.values())
    data = {"parts": parts, "total_s": total, "attack_step_s_per_example": per_example,
            "timed_batches_reduced": bool(scale.time_batch), "sat_student": ev.sat_student}
    return f"full preset run ≈ {duration(total)} on this device (" + ", ".join(
        f"{k} {duration(p['seconds'])}" for k, p in parts.items()) + ")", data


def timing(run: Run, preset: str, scale: Scale, device: torch.device, peaks: dict[str, float]) -> None:
    cfg = preset_config(preset, scale, scale.time_image_size, batch=scale.time_batch)
    full = config.parse(preset_raw(preset, scale, scale.time_image_size))  # the preset's counts (iterations, ...)
    with stage2.in_memory_artifacts(cfg):
        run.run(f"timing/{preset}", lambda: iteration(cfg, full, device, scale, peaks))
        if device.type == "cuda":
            run.run(f"timing-bf16/{preset}", lambda: iteration(variant(cfg, {"amp": "bf16"}), full, device, scale, peaks))
        else:
            run.skip(f"timing-bf16/{preset}", f"{NO_CUDA} (the bf16 iteration is timed on GPUs)")
    run.run(f"projection/{preset}", lambda: projection(full, device, scale, run.data(f"timing/{preset}")))


# ---------------------------------------------------------------------------- report
def rate(flops_per_s: float) -> str:
    return f"{flops_per_s / 1e12:.1f} TFLOP/s" if flops_per_s >= 1e12 else f"{flops_per_s / 1e9:.1f} GFLOP/s"


def duration(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= 2 * size:
            return f"{seconds / size:.1f} {unit}"
    return f"{seconds:.1f} s"


def device_facts(device: torch.device) -> dict[str, Any]:
    facts = {**machine(torch.get_num_threads()), "torch_cuda_build": torch.version.cuda, "run_on": str(device)}
    if device.type == "cuda":
        props, nccl = torch.cuda.get_device_properties(device), torch.cuda.nccl.version()
        try:
            smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=30, check=True).stdout.split()
        except (OSError, subprocess.SubprocessError):
            smi = []
        facts.update(gpu=props.name, gpus=torch.cuda.device_count(), capability=f"{props.major}.{props.minor}",
                     gpu_memory_gib=round(props.total_memory / 2**30, 1), cudnn=torch.backends.cudnn.version(),
                     nccl=".".join(map(str, nccl)) if isinstance(nccl, tuple) else str(nccl),
                     driver=smi[0] if smi else "unknown (no nvidia-smi)",
                     tf32_defaults={"cudnn": torch.backends.cudnn.allow_tf32,
                                    "matmul": torch.backends.cuda.matmul.allow_tf32})
    return facts


def table(header: list[str], rows: list[list[Any]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(str(c) for c in row) + " |" for row in rows)]


def preset_table(R: dict[str, Any], by: dict[str, Check], section: str, header: list[str],
                 cells: Callable[[Check], list[Any] | None]) -> list[str]:
    """A row per preset with a ``<section>/<preset>`` check: its ``cells(check)``, or its outcome where those are
    None (header: the columns after "preset")."""
    rows = []
    for preset in R["presets"]:
        if c := by.get(f"{section}/{preset}"):
            rows.append([preset, *(cells(c) or [*[""] * (len(header) - 1), f"{c.status}: {c.summary}"])])
    return table(["preset", *header], rows) if rows else ["Not run."]


def render(R: dict[str, Any]) -> str:
    """gpu.md: the device, every check's outcome, then each section's numbers."""
    d, checks = R["device"], [Check(**c) for c in R["checks"]]
    by = {c.name: c for c in checks}
    counts = {s: sum(c.status == s for c in checks) for s in ("PASS", "FAIL", "SKIP")}
    cuda = d["run_on"].startswith("cuda")
    head = (f"GPU run on {d['gpu']} ({d['gpus']} visible)." if cuda else
            "**CPU run: no GPU was available to this run.** The same code ran on the CPU with the CUDA-only parts "
            "skipped and named below, the presets' networks at reduced batches; its times and MFU describe this CPU, "
            "not a GPU. Run `python -m bench.gpu` on the GPU machine before its first preset run.")
    L = ["# Device check for the paper presets (`python -m bench.gpu`)", "", head, "",
         f"Command `{R['command']}` ({R['scale']} scale), library git {R['library']['commit']}"
         + (f" plus uncommitted edits to {', '.join(R['library']['uncommitted'])}" if R["library"]["uncommitted"] else "")
         + f"; {R['seconds']:.0f} s in all; **{counts['PASS']} passed, {counts['FAIL']} failed, {counts['SKIP']} "
         f"skipped** (exit status {R['exit_status']}).", "", "## Device", "",
         f"- run on `{d['run_on']}`" + (f": {d['gpu']}, compute capability {d['capability']}, {d['gpu_memory_gib']} GiB; "
                                       f"{d['gpus']} GPU(s) visible" if cuda else ""),
         f"- torch {d['torch']} (CUDA build {d['torch_cuda_build']})"
         + (f", driver {d['driver']}, cuDNN {d['cudnn']}, NCCL {d['nccl']}; TF32 defaults: cuDNN convolutions "
            f"{'on' if d['tf32_defaults']['cudnn'] else 'off'}, matmuls {'on' if d['tf32_defaults']['matmul'] else 'off'} "
            "(the project sets neither: the presets' fp32 convolutions run as these say)" if cuda else ", no CUDA device"),
         f"- CPU {d['cpu_model']}, {d['logical_cpus']} logical CPUs, torch threads {d['threads_used']}, Python "
         f"{d['python']}, load average at start {d['loadavg_at_start']}", "", "## Checks", ""]
    L += table(["check", "outcome", "summary"], [[c.name, f"**{c.status}**" if c.status == "FAIL" else c.status,
                                                   c.summary.replace("|", "/")] for c in checks])
    skipped = [c for c in checks if c.status == "SKIP"]
    L += ["", "## Skipped", ""] + ([f"- {c.name}: {c.summary}" for c in skipped] or ["Nothing was skipped."])
    if not R["sections"]:
        return "\n".join(L) + "\n"

    L += ["", "## Presets end to end", "",
          "Each preset's params (`derd preset <name>`) with bench/synthetic.py's micro override (a few fake "
          "images in the dataset's real on-disk format, 1 epoch, 2 iterations, 1 evaluation example) through "
          "every stage as the flows call them, on this device; seconds per stage.", ""]
    def stage_cells(c: Check) -> list[Any] | None:
        st = c.data.get("stage_s")
        stages = ("inputs", "teachers", "warmup", "distill", "evaluate", "report")
        return [c.data["networks"], c.data["input"], *(f"{st.get(k, math.nan):.1f}" for k in stages), c.status] \
            if st else None

    L += preset_table(R, by, "presets", ["networks", "input", "inputs", "teachers", "Stage-I", "Stage-II", "evaluate",
                                         "report", "outcome"], stage_cells)

    L += ["", "## Numerics: one DERD student step against fp32", "",
          "The registered DERD method's student step as the loop runs it (under `runtime.autocast`), its pseudo batch "
          "x = G(z) and label-free PGD examples pinned (drawn once in fp32), each variant a fresh build from the same "
          "weights; reference: the preset's own runtime (channels_last and cudnn_benchmark on, amp off) in fp32 with "
          "TF32 off. Relative error: |a − b| / |b| for L_nat and L_rob, ‖a − b‖ / ‖b‖ for the flattened gradients "
          "g_nat and g_rob (fp16: after the loss scaler's unscaling). Tolerances (loss / gradient): "
          + "; ".join(f"{k} {a:g} / {b:g}" for k, (a, b) in TOLERANCE.items()) + ".", ""]
    rows = []
    for c in checks:
        if c.name.split("/")[0] in VARIANTS and c.status != "SKIP":
            e = c.data.get("errors")
            errs = [f"{e[k]:.1e}" for k in ("L_nat", "L_rob", "g_nat", "g_rob")] if e else ["", "", "", ""]
            tol = "{:g} / {:g}".format(*TOLERANCE[c.name.split("/")[0]])
            rows.append([c.name, c.data.get("batch", ""), c.data.get("input", ""), *errs, tol,
                         c.status if e else f"{c.status}: {c.summary}"])
    L += table(["comparison", "batch", "input", "L_nat", "L_rob", "g_nat", "g_rob", "tolerance", "outcome"], rows) \
        if rows else ["Not run."]
    comp = [c for c in checks if c.name.startswith("compile/") and c.data.get("compiled_pgd")]
    L += [f"\n{c.name}: the compiled student's first label-free PGD (compilation included) took "
          f"{c.data['compiled_pgd']['seconds_with_compilation']:.1f} s; max |x_adv − x| = "
          f"{c.data['compiled_pgd']['max_delta']:.4g} (ε = {c.data['eps']:.4g})." for c in comp]

    L += ["", "## torchrun", "",
          "`derd distill --only derd-seed0` on the cifar10 micro project (its teachers and Stage-I generator from "
          "above) with `runtime.nproc` set: 1 process under an explicit torchrun; 2 processes by the CLI launching "
          "torchrun itself (NCCL on GPUs). Passes when it exits 0 and rank 0 wrote the one "
          "student with the process count in its sidecar.", ""]
    rows = [[c.name, c.data.get("command", ""), f"{c.data['seconds']:.1f}" if "seconds" in c.data else "",
             c.status if c.status == "PASS" else f"{c.status}: {c.summary}"]
            for c in checks if c.name.startswith("torchrun/")]
    L += table(["check", "command", "seconds", "outcome"], rows) if rows else ["Not run."]

    L += ["", "## Matmul peaks", ""]
    rows = [[c.name, c.data.get("n", ""), rate(c.data["peak_flops"]) if "peak_flops" in c.data else "",
             rate(c.data["median_flops"]) if "median_flops" in c.data else "",
             c.status if c.status != "SKIP" else c.summary]
            for c in checks if c.name.startswith("peak/")]
    L += table(["peak", "n", "best", "median", "outcome"], rows) if rows else ["Not run."]

    L += ["", "## One full-batch DERD iteration and its MFU", "",
          "One iteration = the generator step + k_S student steps (label-free PGD, both teachers) of the registered "
          "method, built with `derd.distill.loop.Context` on in-memory teachers and generator (random weights, "
          "bench/stage2.py), under the preset's runtime (channels_last, cudnn_benchmark; amp as the row says); each "
          "step's FLOPs counted by `torch.utils.flop_counter` (matmul/conv only, `bench.stage2.count_flops`) on a "
          "first run that is also the warm-up, then timed (median). MFU = FLOPs / time / the matmul peak above.", ""]
    rows = []
    for c in checks:
        if c.name.startswith("timing") and c.status == "PASS":
            t = c.data
            mem = f"{t['peak_memory_bytes'] / 2**30:.1f}" if t["peak_memory_bytes"] else "n/a"
            mfu = ", ".join(f"{100 * v:.1f}% ({p})" for p, v in t["mfu"].items()) or "no peak"
            rows.append([c.name, t["networks"], t["input"], t["amp"], f"{t['batch']} of {t['preset_batch']}",
                         t["k_student"], t["pgd_steps"], f"{t['step_s']['generator_step']:.3g}",
                         f"{t['step_s']['student_step']:.3g}", f"{t['iteration_s']:.3g}",
                         f"{t['iteration_flops'] / 1e9:.0f}", rate(t["flops_per_s"]), mfu, mem])
        elif c.name.startswith("timing"):
            rows.append([c.name, *[""] * 12, f"{c.status}: {c.summary}"])
    L += table(["timing", "networks", "input", "amp", "batch", "k_S", "PGD", "G step s", "S step s", "iteration s",
                "GFLOP/iter", "achieved", "MFU", "peak GiB"], rows) if rows else ["Not run."]
    if any(c.data.get("reduced_batch") for c in checks if c.name.startswith("timing")):
        L += ["", "Reduced batch (no CUDA): the preset's iteration is projected linearly in the batch from these steps."]

    L += ["", "## Projected full runs", "",
          "Each part's step timed on this device times its count in the preset (at the preset's batch; linear in "
          "the batch where a reduced batch was timed). Included: teacher training (the robust one with its PGD, "
          "its training-set size before the validation split) and the sidecar's PGD check; Stage-I generator steps "
          "and the DERD_inv pool (costed as generator steps); Stage-II for every method × seed of the preset, each "
          "costed as a DERD iteration (the baselines read one teacher: cheaper), with its monitor passes; the "
          "evaluation of every model (FGSM, PGD_S, PGD_T, CW, ε-curve, AutoAttack, sanity checks) as gradient steps "
          "per example × the measured PGD-step time, an upper bound (no attack stops early; AutoAttack on every "
          "example). Not included: data loading (assumed to keep up), process start-up, checkpoints, reports, "
          "`runtime.nproc` > 1 and evaluation shards (divide by the processes), the SAT-student row.", ""]
    def projection_cells(c: Check) -> list[Any] | None:
        parts = ("natural teacher", "robust teacher", "Stage-I", "Stage-II", "evaluation")
        return [*(duration(c.data["parts"][k]["seconds"]) for k in parts), f"**{duration(c.data['total_s'])}**"] \
            if c.status == "PASS" else None

    L += preset_table(R, by, "projection", ["natural teacher", "robust teacher", "Stage-I", "Stage-II",
                                            "evaluation (≤)", "total"], projection_cells)
    for preset in R["presets"]:
        c = by.get(f"projection/{preset}")
        if c and c.status == "PASS":
            L += ["", f"{preset}: " + "; ".join(f"{k}: {p['what']}" for k, p in c.data["parts"].items()) + "."]
    return "\n".join(L) + "\n"


# ---------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.gpu", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--micro", action="store_true", help="CI scale: small stand-in networks, tiny batches")
    ap.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                    help="auto: cuda when available (default)")
    ap.add_argument("--only", default=",".join(SECTIONS), help=f"comma list of sections (default: all of {SECTIONS})")
    ap.add_argument("--presets", default=",".join(PRESETS), help=f"comma list of presets (default: all of {PRESETS})")
    ap.add_argument("--out", default=str(PROJECT / "bench"), help="folder for gpu.md and gpu.json (default: bench/)")
    ap.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    a = ap.parse_args(argv)
    sections, presets = ([s.strip() for s in text.split(",") if s.strip()] for text in (a.only, a.presets))
    for flag, given, known in (("--only", sections, SECTIONS), ("--presets", presets, PRESETS)):
        if unknown := sorted(set(given) - set(known)):
            ap.error(f"{flag}: unknown {unknown}; choose from {', '.join(known)}")
    if a.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: torch sees no CUDA device")
    if a.threads:
        torch.set_num_threads(a.threads)
    device = torch.device("cuda" if a.device == "cuda" or (a.device == "auto" and torch.cuda.is_available()) else "cpu")
    scale = SCALES["micro" if a.micro else device.type.replace("cuda", "gpu")]
    start = time.monotonic()
    run = Run()
    R: dict[str, Any] = {"command": " ".join(["python -m bench.gpu", *(argv if argv is not None else sys.argv[1:])]),
                         "scale": scale.name, "sections": sections, "presets": presets, "device": device_facts(device),
                         "library": library_state()}
    with tempfile.TemporaryDirectory(prefix="derd-gpu-check-") as tmp:
        work = Path(tmp)
        if "presets" in sections:
            for preset in presets:
                run.run(f"presets/{preset}", lambda p=preset: end_to_end(p, scale, device, work / p))
        if "numerics" in sections:
            for preset in presets:
                run.guarded(f"numerics/{preset}", lambda p=preset: numerics(run, p, scale, device))
        if "torchrun" in sections:
            made = run.data("presets/cifar10")
            where = (Path(made["project"]), Path(made["params"])) if made else None

            def distill_on(nproc: int) -> tuple[str, dict[str, Any]]:
                nonlocal where
                where = where or upstream_project(scale, device, work / "torchrun")
                return torchrun(nproc, *where, timeout=300)

            run.run("torchrun/1", lambda: distill_on(1))
            gpus = torch.cuda.device_count() if device.type == "cuda" else 0
            if gpus >= 2:
                run.run("torchrun/2-nccl", lambda: distill_on(2))
            else:
                run.skip("torchrun/2-nccl", f"{NO_CUDA} (NCCL)" if not gpus else "skipped: 1 GPU (NCCL needs 2)")
        if "timing" in sections:
            peaks = {}
            for name in ("fp32", "tf32", "bf16"):
                if device.type != "cuda" and name != "fp32":
                    why = "TF32 tensor cores" if name == "tf32" else "bf16 timed on GPUs"
                    run.skip(f"peak/{name}", f"{NO_CUDA} ({why})")
                elif (c := run.run(f"peak/{name}", lambda n=name: peak(n, device, scale.matmul_n, 5))).status == "PASS":
                    peaks[name] = c.data["peak_flops"]
            for preset in presets:
                run.guarded(f"timing/{preset}", lambda p=preset: timing(run, p, scale, device, peaks))
    R["checks"] = [c.__dict__ for c in run.checks]
    R["exit_status"] = int(any(c.status == "FAIL" for c in run.checks))
    R["seconds"] = time.monotonic() - start
    out = Path(a.out)
    write_json(out / "gpu.json", R)
    write_text(out / "gpu.md", render(R))
    counts = {s: sum(c.status == s for c in run.checks) for s in ("PASS", "FAIL", "SKIP")}
    print(f"bench.gpu: {counts['PASS']} passed, {counts['FAIL']} failed, {counts['SKIP']} skipped in "
          f"{R['seconds']:.0f} s; wrote {out / 'gpu.md'} and {out / 'gpu.json'}", flush=True)
    return R["exit_status"]


if __name__ == "__main__":
    sys.exit(main())
