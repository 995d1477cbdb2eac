"""The loop skeleton every Stage-II method shares (METHOD.md "Stage-II").

One iteration = one generator step, then ``stage2.k_student`` student steps. A method supplies the
two steps (and the reconstructed choices it ran); the loop owns everything else: the student and
its SGD/cosine optimiser, the generator and its Adam optimiser, the teachers (frozen, eval mode),
the random stream, label-free PGD, NaN/inf checks, per-step curves, resume checkpoints, test/val
monitoring (curves only) and the final artifact. The saved student is the last one.
Under torchrun (``runtime.nproc``) each rank takes its rows of every global batch and averages each
gradient over the ranks before it is used (derd.distributed); ``runtime.amp`` autocasts both steps.
"""
from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from derd import data as datasets
from derd import distributed
from derd.artifacts import check_finite, file_hash, save_artifact
from derd.attacks import KLPGD, PGD
from derd.config import Config, ConfigError
from derd.curves import read_rows, write_rows
from derd.distill.memory_bank import MemoryBank
from derd.resume import ResumeState, make_key, restore_rng, rng_state
from derd.runtime import (STUDENT_KEYS, Paths, LossScale, autocast, log, prepare_model, progress, resolve_device,
                          runtime_record, seed_everything)
from derd.teachers import accuracy, build_for, load_teacher


# offsets of a Stage-II seed for its own random streams (see Context), far apart so that no two seeds' streams meet
LATENT_SEED_OFFSET = 1_000_000
MASK_SEED_OFFSET = 2_000_000


class Context:
    """What a method's steps act on: models, optimisers, the random stream, and shared helpers."""

    def __init__(self, cfg: Config, method: type[Method], seed: int, root: Path, device: torch.device):
        self.cfg, self.s2, self.seed, self.root, self.device = cfg, cfg.stage2, seed, Path(root), device
        self.info = datasets.info(cfg.data)
        # Three random streams, one seed each, so that drawing more from one never shifts another: the global
        # stream (KL-PGD's start noise) seeds with `seed`; latents, augmentation and pool indices (CPU, the same
        # on every rank) with seed + LATENT_SEED_OFFSET; the SGA mask with seed + MASK_SEED_OFFSET (its own
        # generator, on the gradients' device; METHOD.md "Stage-II").
        seed_everything(seed)
        self.rng = torch.Generator().manual_seed(seed + LATENT_SEED_OFFSET)
        self.mask_seed = seed + MASK_SEED_OFFSET
        self.teachers = {role: prepare_model(load_teacher(cfg, role, root, device), cfg) for role in method.teachers}
        self.net = prepare_model(_student(cfg, self.info).to(device), cfg)  # the module whose weights are saved
        self.student = torch.compile(self.net) if cfg.runtime.compile else self.net  # what the steps call
        self.opt_s = torch.optim.SGD(self.student.parameters(), lr=self.s2.lr_student, momentum=self.s2.momentum,
                                     weight_decay=self.s2.weight_decay)
        self.sched_s = torch.optim.lr_scheduler.CosineAnnealingLR(self.opt_s, self.s2.iterations * self.s2.k_student)
        self.scale_s, self.scale_g = LossScale(cfg), LossScale(cfg)  # fp16 loss scaling (student, generator)
        self.generator: nn.Module | None = None
        self.generator_params: list[nn.Parameter] = []
        self.generator_extra: list[nn.Parameter] = []  # trainable parts of the objective beside G (CMI's head)
        self.opt_g: torch.optim.Optimizer | None = None
        self.monitor_data: tuple[torch.Tensor, torch.Tensor] | None = None
        # stage2.memory_bank: pseudo images student batches replay (None: off; a method may install its own)
        self.bank = MemoryBank.from_config(self.s2.memory_bank, method.generator_source is not None, device)

    # ---------------------------------------------------------------- generator
    def set_generator(self, generator: nn.Module, extra_params: Sequence[nn.Parameter] = ()) -> None:
        """Install the generator (and any extra trainable parts of the generator objective)."""
        self.generator = generator.to(self.device).train()
        self.generator_extra = list(extra_params)
        self.generator_params = [*generator.parameters(), *self.generator_extra]
        self.opt_g = torch.optim.Adam(self.generator_params, lr=self.s2.lr_generator)

    def sample_z(self, n: int) -> torch.Tensor:
        """This rank's rows of n latents (n: the global batch, drawn whole on every rank)."""
        distributed.share(n, "stage2.batch_size")
        z = torch.randn(n, self.cfg.stage1.generator.nz, generator=self.rng)
        return distributed.mine(z).to(self.device)

    def generate(self, n: int | None = None) -> torch.Tensor:
        """G(z) with the graph to G (for generator steps); it enters a memory bank that admits generator batches."""
        x = self.generator(self.sample_z(n or self.s2.batch_size))
        if self.bank is not None:
            self.bank.offer("generator", x)
        return x

    @torch.no_grad()
    def pseudo_batch(self) -> torch.Tensor:
        """Detached G(z) for student steps (its memory-bank share drawn from the bank), with the optional crop+flip."""
        if self.bank is None:
            return self.augment(self.generate())
        return self.augment(self.bank.batch(self.s2.batch_size, lambda k: self.generator(self.sample_z(k)), self.rng))

    def augment(self, x: torch.Tensor) -> torch.Tensor:
        if not self.s2.augment:
            return x
        aug = self.cfg.data.augment  # the dataset's own crop/flip policy (CIFAR: pad 4 + flip)
        part = (distributed.rank(), distributed.world())  # this rank's rows of the global batch's draws
        return datasets.augment_batch(x, aug.crop_padding, aug.hflip, self.rng, part)  # draws on CPU, applied on x's device

    def update_generator(self, loss: torch.Tensor, step: int) -> None:
        """One Adam step on the generator's parameters only (the student and teachers get no grads)."""
        check_finite(loss, "generator loss", step)
        params = self.generator_params
        grads = torch.autograd.grad(self.scale_g(loss), params, allow_unused=True)
        grads = distributed.average([torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)])
        for p, g in zip(params, self.scale_g.unscale(grads)):
            p.grad = g
        if self.scale_g.step_taken():
            self.opt_g.step()
        self.opt_g.zero_grad(set_to_none=True)

    # ---------------------------------------------------------------- student
    def adversarial(self, x: torch.Tensor, target_probs: torch.Tensor | None = None) -> torch.Tensor:
        """Label-free KL-PGD pseudo examples against the student (eval mode while attacking, mode restored):
        x_adv maximises KL(p ‖ σ(S(x_adv))), p = ``target_probs`` (B×K rows of probabilities, e.g. RSLAD's
        σ_τ(T_rob(x))) or, when None, the student's own σ(S(x)) (TRADES, DERD)."""
        a = self.s2.attack
        return KLPGD(self.student, a.eps, steps=a.steps, step_size=a.step_size)(x, target=target_probs)

    def student_grads(self, loss: torch.Tensor, retain_graph: bool = False) -> list[torch.Tensor]:
        """∇θ loss averaged over the ranks (fp16: through the loss scale; zeros when it overflowed, and the
        step that applies them is skipped)."""
        params = list(self.student.parameters())
        grads = torch.autograd.grad(self.scale_s(loss), params, retain_graph=retain_graph, allow_unused=True)
        grads = distributed.average([torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)])
        return self.scale_s.unscale(grads)

    def global_losses(self, *losses: torch.Tensor) -> list[float]:
        """Loss values averaged over the ranks (what the global batch's loss is)."""
        return list(distributed.average_floats({str(i): float(v.detach()) for i, v in enumerate(losses)}).values())

    def apply_student_grads(self, grads: Sequence[torch.Tensor]) -> None:
        """One SGD step with the given (rank-averaged) gradients, then the cosine schedule."""
        for p, g in zip(self.student.parameters(), grads):
            p.grad = g
        if self.scale_s.step_taken():
            self.opt_s.step()
        self.opt_s.zero_grad(set_to_none=True)
        self.sched_s.step()

    def update_student(self, loss: torch.Tensor, step: int) -> None:
        check_finite(loss, "student loss", step)
        self.apply_student_grads(self.student_grads(loss))


class Method:
    """A Stage-II method: its generator step, its student step, and the choices it ran."""

    name: ClassVar[str] = ""
    label: ClassVar[str] = ""  # how tables name the row (e.g. "DFARD-style")
    teachers: ClassVar[tuple[str, ...]] = ("robust",)
    generator_source: ClassVar[str | None] = "scratch"  # stage1:natural | stage1:robust | scratch | None
    uses_pool: ClassVar[bool] = False  # reads the Stage-I inversion pool (DERD_inv)

    def __init__(self, ctx: Context):
        self.ctx = ctx

    @classmethod
    def stage1_role(cls, s2) -> str | None:
        """The teacher whose Stage-I generator this method starts from under ``s2`` (None: no Stage-I artifact)."""
        source = cls.generator_source or ""
        return source.split(":")[1] if source.startswith("stage1:") and s2.generator_init == "stage1" else None

    def generator_step(self, it: int) -> dict[str, Any]:
        return {}

    def student_step(self, it: int) -> dict[str, Any]:
        raise NotImplementedError

    def reading(self) -> dict[str, Any]:
        """The reconstructed choices this method ran (recorded in the sidecar and the report)."""
        s2 = self.ctx.s2
        return {
            "generator": self.generator_source or "none",
            "k_student": s2.k_student,
            "generator_warmup": s2.generator_warmup,
            "memory_bank": "off" if self.ctx.bank is None else self.ctx.bank.describe(),
            "augment": s2.augment,
            "adversarial_examples": f"label-free KL-PGD on the student: eps={s2.attack.eps}, "
                                    f"{s2.attack.steps} steps of {s2.attack.step_size}, start x+0.001·N",
            "student_optimiser": f"SGD lr={s2.lr_student} momentum={s2.momentum} wd={s2.weight_decay}, cosine",
            "generator_optimiser": f"Adam lr={s2.lr_generator}" if self.generator_source else "none",
        }

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def hooks(self) -> list[Any]:
        """Objects holding forward hooks on a teacher (closed when training ends)."""
        return []

    def close(self) -> None:
        for h in self.hooks():
            h.close()


# -------------------------------------------------------------------- curves and checkpoints
def read_curves(path: Path, before: int) -> list[dict[str, float]]:
    """Rows of an earlier (interrupted) run up to its checkpoint after ``before`` iterations (inclusive: a row is
    logged before the checkpoint of the same iteration is saved)."""
    if not path.is_file():
        return []
    rows = [{k: float(v) for k, v in r.items() if v != ""} for r in read_rows(path)]
    return [r for r in rows if r["iteration"] <= before]


def _floats(logs: dict[str, Any], what: str, step: int) -> dict[str, float]:
    out = {}
    for k, v in logs.items():
        check_finite(v, f"{what} {k}", step)
        out[k] = float(v)
    return out


def _mean(rows: list[dict[str, float]]) -> dict[str, float]:
    keys = dict.fromkeys(k for r in rows for k in r)
    return {k: sum(r[k] for r in rows if k in r) / sum(k in r for r in rows) for k in keys}


def monitor(ctx: Context) -> dict[str, float]:
    """Clean and cheap PGD accuracy (at stage2.attack.eps) of the student on the monitored split (curves only,
    never selection)."""
    s2 = ctx.s2
    x, y = ctx.monitor_data
    eps = s2.attack.eps
    steps = s2.monitor_pgd_steps
    attack = PGD(ctx.student, eps, steps=steps, step_size=2.5 * eps / steps, seed=0)
    x_adv = torch.cat([attack(x[i : i + 256], y[i : i + 256]).cpu() for i in range(0, len(x), 256)])
    return {"monitor_clean": accuracy(ctx.student, x, y), "monitor_pgd": accuracy(ctx.student, x_adv, y)}


def _student(cfg: Config, info: datasets.DatasetInfo) -> nn.Module:
    """The Stage-II student (SyncBatchNorm under torchrun with ``runtime.sync_bn``)."""
    s = cfg.stage2.student
    net = build_for(s.arch, s.width, info)
    if cfg.runtime.sync_bn and distributed.world() > 1:
        if resolve_device(cfg.device).type != "cuda":
            raise ConfigError("runtime.sync_bn: SyncBatchNorm needs CUDA devices (torch has no CPU kernel); "
                              "set it to false on the CPU")
        net = nn.SyncBatchNorm.convert_sync_batchnorm(net)
    return net


def _checkpoint_state(ctx: Context, method: Method, it: int, seconds: float) -> dict:
    state = {
        "iteration": it, "seconds": seconds,
        "student": ctx.net.state_dict(), "opt_s": ctx.opt_s.state_dict(), "sched_s": ctx.sched_s.state_dict(),
        "rng": ctx.rng.get_state(), **rng_state(ctx.device), "method": method.state_dict(),
        "loss_scales": [ctx.scale_s.state_dict(), ctx.scale_g.state_dict()],
        "memory_bank": {} if ctx.bank is None else ctx.bank.state_dict(),
    }
    if ctx.generator is not None:
        state["generator"] = ctx.generator.state_dict()
        state["generator_extra"] = [p.detach() for p in ctx.generator_extra]
        state["opt_g"] = ctx.opt_g.state_dict()
    return state


def _restore(ctx: Context, method: Method, state: dict) -> None:
    ctx.net.load_state_dict(state["student"])
    ctx.opt_s.load_state_dict(state["opt_s"])
    ctx.sched_s.load_state_dict(state["sched_s"])
    ctx.rng.set_state(state["rng"])
    restore_rng(state, ctx.device)
    method.load_state_dict(state["method"])
    if ctx.bank is not None:
        ctx.bank.load_state_dict(state["memory_bank"])
    for scale, saved in zip((ctx.scale_s, ctx.scale_g), state.get("loss_scales", ())):
        scale.load_state_dict(saved)
    if ctx.generator is not None:
        ctx.generator.load_state_dict(state["generator"])
        with torch.no_grad():
            for p, v in zip(ctx.generator_extra, state["generator_extra"]):
                p.copy_(v)
        ctx.opt_g.load_state_dict(state["opt_g"])


def _train(ctx: Context, method: Method, start: int, seconds_before: float, rows: list[dict[str, float]],
           resume: ResumeState, curves: Path, tag: str) -> tuple[list[dict[str, float]], float]:
    """Iterations ``start`` … end: generator step, k_student student steps, curves, checkpoints."""
    s2, main = ctx.s2, distributed.is_main()
    t0 = time.monotonic()
    window: list[dict[str, float]] = []
    total, warmup = s2.generator_warmup + s2.iterations, s2.generator_warmup
    for i in progress(total - start, f"distill[{tag}]"):
        it = start + i
        k = s2.k_student if it >= warmup else 0  # generator-only iterations first (stage2.generator_warmup)
        with autocast(ctx.cfg, ctx.device):
            logs = _floats(method.generator_step(it), "generator", it)
            student_logs = [_floats(method.student_step(it), "student", it) for _ in range(k)]
        logs.update(_mean(student_logs))
        window.append(distributed.average_floats(logs))  # the global batch's values (one all-reduce)
        done = it + 1
        if done % s2.log_every == 0 or done == total:
            row = {"iteration": float(done), "student_steps": float(max(0, done - warmup) * s2.k_student),
                   "lr_student": ctx.sched_s.get_last_lr()[0], **_mean(window),
                   "seconds": seconds_before + time.monotonic() - t0}
            if main and s2.monitor_every and (done % s2.monitor_every == 0 or done == total):
                row.update(monitor(ctx))
            rows.append(row)
            window = []
        if done % s2.checkpoint_every == 0 and done < total and main:
            resume.save(**_checkpoint_state(ctx, method, done, seconds_before + time.monotonic() - t0))
            write_rows(curves, rows)
    runtime = seconds_before + time.monotonic() - t0
    if main:
        write_rows(curves, rows)
    return rows, runtime


def input_hashes(ctx: Context, method_cls: type[Method]) -> list[str]:
    """Hashes of the files a student is computed from: its teachers and its Stage-I artifact."""
    paths = Paths(ctx.root)
    files = [paths.teacher(role) for role in method_cls.teachers]
    if role := method_cls.stage1_role(ctx.s2):
        files.append(paths.generator(role))
    files += [paths.inversion_pool] if method_cls.uses_pool else []
    return [f"{f.name}:{file_hash(f)}" for f in files if f.is_file()]


def fit(cfg: Config, method_cls: type[Method], seed: int, root: Path, params_hash: str) -> dict[str, Any]:
    """Train one student with ``method_cls``; write its artifact, sidecar and curves; return the summary."""
    paths = Paths(root)
    s2 = cfg.stage2
    device = resolve_device(cfg.device)
    ctx = Context(cfg, method_cls, seed, root, device)
    if s2.monitor_every and distributed.is_main():
        splits = datasets.load(cfg.data)
        ctx.monitor_data = datasets.stratified_n(getattr(splits, s2.monitor_split), s2.monitor_examples)
    if s2.generator_warmup and not method_cls.generator_source:
        raise ConfigError(f"stage2.generator_warmup: {method_cls.name} has no generator to warm up; set it to 0")
    method = method_cls(ctx)
    tag = f"{method_cls.name}-seed{seed}"
    curves = paths.plots / "distill" / f"{tag}.csv"  # one directory: a single DVC out for any methods
    resume = ResumeState(paths.checkpoints / f"distill_{tag}.pt", make_key(params_hash, input_hashes(ctx, method_cls)))
    start, seconds_before = 0, 0.0
    if state := resume.load():
        _restore(ctx, method, state)
        start, seconds_before = int(state["iteration"]), float(state["seconds"])
        log.info("distill[%s]: resuming from iteration %d (%s)", tag, start, resume.path)
    rows = read_curves(curves, start) if start else []
    try:
        rows, runtime = _train(ctx, method, start, seconds_before, rows, resume, curves, tag)
    finally:
        method.close()
    distributed.average_buffers(ctx.net)  # BatchNorm running statistics of every rank's batches
    ctx.student.eval()
    final = {k: round(v, 6) for k, v in rows[-1].items()} if rows else {}
    sidecar = {
        "method": method_cls.name, "label": method_cls.label or method_cls.name, "seed": seed,
        "arch": s2.student.arch, "width": s2.student.width, "dataset": ctx.info.name,
        "num_classes": ctx.info.num_classes, "shape": list(ctx.info.shape), "params_hash": params_hash,
        "teachers_used": list(method_cls.teachers), "reading": method.reading(),
        "iterations": s2.iterations, "generator_warmup": s2.generator_warmup,
        "student_steps": s2.iterations * s2.k_student,
        "runtime_seconds": round(runtime, 2), "final": final, "curves": str(curves.relative_to(paths.root)),
        "selection": "last iterate (no test-set selection)", "runtime": runtime_record(cfg, STUDENT_KEYS),
    }
    path = paths.student(method_cls.name, seed)
    if not distributed.is_main():
        return sidecar
    save_artifact(path, ctx.net.state_dict(), sidecar)  # SyncBatchNorm keeps BatchNorm's keys
    resume.clear()
    log.info("distill[%s]: done in %.0fs -> %s", tag, runtime, path)
    return sidecar
