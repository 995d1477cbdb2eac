"""Stage-I (METHOD.md "Stage-I"): warm the generator up against a frozen teacher with L_G^I,
and build DERD_inv's inversion pool.

Units of work (DVC runs one stage each): ``generator_<role>`` for each role in ``stage1.generators``
(``robust``: the same warm-up on the robust teacher, for derd_no_tnat) and ``inversion_pool`` (empty
when ``stage1.inversion.pool_size`` is 0). Each writes ``artifacts/stage1/<unit>.pt`` with a JSON
sidecar, ``metrics/warmup/<unit>.json`` (:func:`finals`), ``plots/warmup/<unit>.csv`` (every
raw and weighted term per step) and ``plots/warmup/<unit>.png`` (samples labelled with the
teacher's class and confidence).
Training resumes from ``artifacts/checkpoints/stage1_<artifact>.pt`` when its key (params, teacher weights,
library code) matches; the file is deleted once the artifact is saved.
"""
from __future__ import annotations

import math
import time
from pathlib import Path

import torch
from torch import nn

from derd import data as datasets
from derd import distributed
from derd.artifacts import (
    CheckpointError,
    check_finite,
    file_hash,
    load_into,
    load_tensors,
    read_json,
    save_artifact,
    sidecar_path,
    write_bytes,
    write_json,
)
from derd.config import Config, ConfigError, untraced
from derd.curves import write_rows
from derd.losses import StageOneLoss
from derd.models import build_generator
from derd.report import plots
from derd.resume import ResumeState, make_key
from derd.runtime import (Paths, autocast, grad_scaler, log, prepare_model, progress, resolve_device, runtime_record,
                          seed_everything)
from derd.stage1.health import batch_statistics, generator_health, teacher_predictions
from derd.stage1.inversion import optimise_batch
from derd.teachers import load_teacher

POOL = "inversion_pool"
HEALTH_SEED_OFFSET = 10_000  # health samples use their own latent seed, the same for every artifact


GENERATOR_ONLY = ("stage1.generator", "stage1.iterations", "stage1.batch_size", "stage1.lr", "stage1.schedule")


def params_hash(cfg: Config, unit: str) -> str:
    """Hash of the settings one Stage-I unit depends on (its teacher's weights are hashed separately)."""
    role = "natural" if unit == POOL else unit.removeprefix("generator_")
    other = GENERATOR_ONLY if unit == POOL else ("stage1.inversion",)
    return cfg.section_hash("seed", "data.name", "data.image_size", "stage1", f"teachers.{role}.arch",
                            f"teachers.{role}.width", f"teachers.{role}.normalize",
                            exclude=("stage1.generators", *other))


def resume_state(cfg: Config, root: Path, unit: str, teacher_hash: str, device: torch.device) -> ResumeState:
    """A unit's resume state, keyed by its params, its teacher's weights and the device type (its random streams
    live on the device that wrote it: a GPU's state is discarded on the CPU, not fed to a CPU generator)."""
    key = make_key(params_hash(cfg, unit), [teacher_hash, f"device:{device.type}"])
    return ResumeState(Paths(root).checkpoints / f"stage1_{unit}.pt", key)


def lr_at(step: int, base_lr: float, total: int, schedule: str) -> float:
    """Adam's learning rate at ``step``: constant, or cosine from ``base_lr`` to 0 over ``total`` steps."""
    if schedule == "constant":
        return base_lr
    return 0.5 * base_lr * (1 + math.cos(math.pi * step / total))


def _row(name: str, role: str, step: int, lr: float, terms: dict[str, float]) -> dict:
    return {"artifact": name, "teacher_role": role, "step": step, "lr": lr, **terms}


def _terms_of(row: dict) -> dict[str, float]:
    return {k: v for k, v in row.items() if k not in ("artifact", "teacher_role", "step", "lr")}


def _log_terms(name: str, step: int, terms: dict[str, float]) -> None:
    raw = " ".join(f"{k}={terms[k]:.4g}" for k in StageOneLoss.TERMS if k in terms)
    weighted = " ".join(f"{k}={terms['w_' + k]:.3g}" for k in StageOneLoss.TERMS if k in terms)
    log.info("%s step %d: L_G^I=%.4f | raw %s | weighted %s", name, step, terms["total"], raw, weighted)


@torch.no_grad()
def sample(generator: nn.Module, n: int, seed: int, batch_size: int = 256) -> torch.Tensor:
    """``n`` samples G(z), z ~ N(0, I) from a seeded RNG, on the CPU (the generator's mode is kept), in batches
    of at most ``batch_size`` and of near-equal sizes (in train mode each batch is normalised by its own statistics)."""
    device = next(generator.parameters()).device
    rng = torch.Generator(device).manual_seed(seed)
    batches = -(-n // batch_size)
    out = []
    for i in range(batches):
        z = torch.randn(n // batches + (i < n % batches), generator.nz, generator=rng, device=device)
        out.append(generator(z).cpu())
    return torch.cat(out)


@torch.no_grad()
def pool_terms(loss_fn: StageOneLoss, images: torch.Tensor, batch_size: int) -> dict[str, float]:
    """L_G^I terms averaged over batches of fixed images (for final numbers of pools and generators)."""
    device = next(loss_fn.teacher.parameters()).device
    parts = [loss_fn(images[i : i + batch_size].to(device)).as_floats() for i in range(0, len(images), batch_size)]
    return {k: sum(p[k] for p in parts) / len(parts) for k in parts[0]}


def train_generator(cfg: Config, root: Path, role: str, device: torch.device, rows: list[dict]) -> dict:
    """Warm a generator up on the ``role`` teacher with L_G^I; save it with its sidecar. Under torchrun each
    rank takes its rows of every global latent batch, L_BN and L_ie use that rank's batch statistics, and the
    gradients are averaged (derd.distributed); only rank 0 goes on past training (it returns {} elsewhere)."""
    s1, paths, info = cfg.stage1, Paths(root), datasets.info(cfg.data)
    name = f"generator_{role}"
    teacher = prepare_model(load_teacher(cfg, role, root, device), cfg)
    teacher_hash = file_hash(paths.teacher(role))
    seed_everything(cfg.seed)
    generator = build_generator(s1.generator.arch, s1.generator.nz, info.shape, s1.generator.width).to(device)
    opt = torch.optim.Adam(generator.parameters(), lr=s1.lr)
    scaler = grad_scaler(cfg, device)
    distributed.share(s1.batch_size, "stage1.batch_size")
    z_rng = torch.Generator(device).manual_seed(cfg.seed)
    resume = resume_state(cfg, root, name, teacher_hash, device)
    own_rows: list[dict] = []
    start = 0
    if state := resume.load():
        generator.load_state_dict(state["generator"])
        opt.load_state_dict(state["optimizer"])
        z_rng.set_state(state["z_rng"])
        start, own_rows = state["step"], list(state["rows"])
        log.info("%s: resuming at step %d from %s", name, start, resume.path)
    began = time.monotonic()
    generator.train()
    with StageOneLoss.from_config(teacher, s1) as loss_fn:
        for i in progress(s1.iterations - start, f"stage1[{name}]"):
            step = start + i
            lr = lr_at(step, s1.lr, s1.iterations, s1.schedule)
            for group in opt.param_groups:
                group["lr"] = lr
            z = distributed.mine(torch.randn(s1.batch_size, s1.generator.nz, generator=z_rng, device=device))
            with autocast(cfg, device):
                result = loss_fn(generator(z))
            check_finite(result.total, f"{name} L_G^I", step)
            opt.zero_grad(set_to_none=True)
            scaler.scale(result.total).backward()
            distributed.average_grads(generator.parameters())
            scaler.step(opt)
            scaler.update()
            terms = distributed.average_floats(result.as_floats())
            own_rows.append(_row(name, role, step, lr, terms))
            if (step % s1.log_every == 0 or step == s1.iterations - 1) and distributed.is_main():
                _log_terms(name, step, terms)
            if (step + 1) % s1.checkpoint_every == 0 and step + 1 < s1.iterations and distributed.is_main():
                resume.save(step=step + 1, generator=generator.state_dict(), optimizer=opt.state_dict(),
                            z_rng=z_rng.get_state(), rows=own_rows)
        distributed.average_buffers(generator)  # BatchNorm running statistics of every rank's batches
        if not distributed.is_main():
            return {}
        with batch_statistics(generator):  # health of the samples Stage-II draws (train mode)
            images = sample(generator, s1.health_samples, cfg.seed + HEALTH_SEED_OFFSET, s1.batch_size)
        final = pool_terms(loss_fn, images, s1.batch_size)
    seconds = time.monotonic() - began
    health = generator_health(teacher, images, info.num_classes, s1.collapse_threshold, s1.min_diversity)
    _warn(name, health)
    summary = {
        "teacher_role": role, "teacher_sha256": teacher_hash, "steps": s1.iterations, "seconds": round(seconds, 2),
        "initial_terms": _terms_of(own_rows[0]), "last_step_terms": _terms_of(own_rows[-1]),
        "final_terms": final, "health": health,
    }
    sidecar = {
        "kind": "generator", "arch": s1.generator.arch, "nz": s1.generator.nz, "width": s1.generator.width,
        "shape": list(info.shape),
        "dataset": info.name, "num_classes": info.num_classes, "params_hash": params_hash(cfg, name),
        "lambdas": loss_fn.lambdas, "ie_log_base": s1.ie_log_base, "runtime": runtime_record(cfg), **summary,
    }
    save_artifact(paths.generator(role), generator.state_dict(), sidecar)
    resume.clear()
    rows.extend(own_rows)
    return {**summary, "samples": images}


def build_inversion_pool(cfg: Config, root: Path, device: torch.device, rows: list[dict]) -> dict:
    """DERD_inv: optimise ``pool_size`` images against the natural teacher; save the pool."""
    s1, inv, paths, info = cfg.stage1, cfg.stage1.inversion, Paths(root), datasets.info(cfg.data)
    teacher = load_teacher(cfg, "natural", root, device)
    teacher_hash = file_hash(paths.teacher("natural"))
    if inv.pool_size == 0:  # DERD_inv off: an empty pool keeps the DVC stage's outputs defined
        images = torch.zeros(0, *info.shape)
        summary = {"teacher_role": "natural", "teacher_sha256": teacher_hash, "disabled": "stage1.inversion.pool_size is 0"}
        save_artifact(paths.inversion_pool, {"images": images}, {"kind": "inversion_pool", "pool_size": 0,
                                                                  "dataset": info.name,
                                                                  "params_hash": params_hash(cfg, POOL), **summary})
        return {**summary, "samples": images}
    rng = torch.Generator(device).manual_seed(cfg.seed + 1)
    resume = resume_state(cfg, root, POOL, teacher_hash, device)
    sizes = [min(inv.batch_size, inv.pool_size - i) for i in range(0, inv.pool_size, inv.batch_size)]
    batches: list[torch.Tensor] = []
    own_rows: list[dict] = []
    if state := resume.load():
        batches = list(state["images"].split(sizes[: state["batches_done"]]))
        own_rows = list(state["rows"])
        rng.set_state(state["rng"])
        log.info("%s: resuming after batch %d/%d", POOL, len(batches), len(sizes))
    began = time.monotonic()
    with StageOneLoss.from_config(teacher, s1) as loss_fn:
        for b in progress(len(sizes) - len(batches), f"stage1[{POOL}]"):
            index = len(batches)

            def on_step(step: int, terms: dict[str, float], index: int = index) -> None:
                global_step = index * inv.steps + step
                own_rows.append(_row(POOL, "natural", global_step, inv.lr, terms))
                if step % s1.log_every == 0 or step == inv.steps - 1:
                    _log_terms(f"{POOL}[batch {index}]", step, terms)

            batches.append(optimise_batch(loss_fn, (sizes[index], *info.shape), inv.steps, inv.lr, rng, on_step).cpu())
            if len(batches) % s1.checkpoint_every == 0 and len(batches) < len(sizes):
                resume.save(images=torch.cat(batches), batches_done=len(batches), rng=rng.get_state(), rows=own_rows)
        images = torch.cat(batches)
        final = pool_terms(loss_fn, images, inv.batch_size)
    seconds = time.monotonic() - began
    health = generator_health(teacher, images, info.num_classes, s1.collapse_threshold, s1.min_diversity)
    _warn(POOL, health)
    first = [r for r in own_rows if r["step"] % inv.steps == 0]
    initial = {k: sum(r[k] for r in first) / len(first) for k in final} if first else {}
    summary = {
        "teacher_role": "natural", "teacher_sha256": teacher_hash, "steps": inv.steps, "batches": len(sizes),
        "seconds": round(seconds, 2), "initial_terms": initial, "final_terms": final, "health": health,
    }
    sidecar = {
        "kind": "inversion_pool", "pool_size": inv.pool_size, "shape": list(info.shape), "dataset": info.name,
        "num_classes": info.num_classes, "params_hash": params_hash(cfg, POOL), "lambdas": loss_fn.lambdas, **summary,
    }
    save_artifact(paths.inversion_pool, {"images": images}, sidecar)
    resume.clear()
    rows.extend(own_rows)
    return {**summary, "samples": images}


def _warn(name: str, health: dict) -> None:
    log.info("%s: class histogram %s, balance %.3f, mean confidence %.3f, diversity %.4f", name,
             health["class_histogram"], health["balance"], health["mean_confidence"], health["diversity"])
    for w in health["warnings"]:
        log.warning("%s: COLLAPSE WARNING: %s", name, w)


def run_unit(cfg: Config, root: Path, unit: str) -> dict:
    """One Stage-I artifact, its metrics/warmup/<unit>.json, plots/warmup/<unit>.csv and sample grid <unit>.png."""
    with untraced():  # naming a unit is not a dependency on the others
        known = cfg.stage1_units()
    if unit not in known:
        raise ConfigError(f"warmup unit {unit!r}: not one of {known} (stage1.generators, the pool)")
    device, paths = resolve_device(cfg.device), Paths(root)
    rows: list[dict] = []
    if unit == POOL:
        result = build_inversion_pool(cfg, root, device, rows)
    else:
        result = train_generator(cfg, root, unit.removeprefix("generator_"), device, rows)
    samples = result.pop("samples")
    teacher = load_teacher(cfg, result["teacher_role"], root, device)
    write_rows(paths.plots / "warmup" / f"{unit}.csv", rows)
    probs = teacher_predictions(teacher, samples[:40]) if len(samples) else torch.zeros(0, 1)
    write_bytes(paths.plots / "warmup" / f"{unit}.png", plots.sample_grid_png({unit: samples}, {unit: probs}))
    write_json(paths.metrics / "warmup" / f"{unit}.json", finals(result))
    return result


def finals(result: dict) -> dict[str, float]:
    """What ``metrics/warmup/<unit>.json`` holds, the numbers runs are compared by: the final L_G^I and the
    samples' health (every term, the class histogram and the warnings are in the unit's sidecar; none for an
    empty pool)."""
    health = result.get("health") or {}
    out = {"total": result["final_terms"]["total"]} if "final_terms" in result else {}
    return out | {k: health[k] for k in ("balance", "diversity", "mean_confidence", "max_class_share") if k in health}


def run(cfg: Config, root: Path = Path(".")) -> dict:
    """Every Stage-I unit."""
    return {unit: run_unit(cfg, root, unit) for unit in cfg.stage1_units()}


def load_generator(cfg: Config, root: Path = Path("."), teacher_role: str = "natural",
                   device: str | torch.device = "cpu") -> nn.Module:
    """The Stage-I generator warmed up on ``teacher_role``'s teacher, in eval mode, checked against the config."""
    path = Paths(root).generator(teacher_role)
    if not sidecar_path(path).is_file():
        raise CheckpointError(f"{path}: no Stage-I generator for the {teacher_role} teacher; run `derd warmup`"
                              + f" with {teacher_role} in stage1.generators")
    meta, g, info = read_json(sidecar_path(path)), cfg.stage1.generator, datasets.info(cfg.data)
    want = {"arch": g.arch, "nz": g.nz, "width": g.width, "shape": list(info.shape)}
    have = {k: meta.get(k) for k in want}
    if have != want:
        raise CheckpointError(f"{path}: built with {have}, but params say stage1.generator/data give {want}; "
                              "rerun `derd warmup`")
    generator = build_generator(g.arch, g.nz, info.shape, g.width)
    load_into(generator, path)
    return generator.to(device).eval()


def load_inversion_pool(root: Path = Path(".")) -> torch.Tensor:
    """DERD_inv's pool (N×C×H×W in [0,1]) written by the warmup stage."""
    path = Paths(root).inversion_pool
    state = load_tensors(path)
    images = state.get("images")
    if not isinstance(images, torch.Tensor) or images.dim() != 4:
        raise CheckpointError(f"{path}: expected {{'images': N×C×H×W tensor}}; rerun `derd warmup`")
    if images.min() < 0 or images.max() > 1:
        raise CheckpointError(f"{path}: pool values outside [0,1]; rerun `derd warmup`")
    return images
