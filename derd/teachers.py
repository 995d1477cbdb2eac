"""The two experts: load a user checkpoint safely, or train a natural / adversarially robust teacher.

Natural = cross-entropy. Robust = PGD-AT (Madry et al. 2018) or TRADES (Zhang et al. 2019, β).
Outputs ``artifacts/teachers/{natural,robust}.pt`` with JSON sidecars and ``metrics/teachers.json``.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from derd import data as datasets
from derd import distributed
from derd.artifacts import (
    CheckpointError,
    check_finite,
    load_into,
    read_json,
    save_artifact,
    sidecar_path,
    write_json,
)
from derd.attacks import KLPGD, PGD, robust_flags
from derd.config import Config, NaturalTeacher, RobustTeacher
from derd.models import Classifier, build_model
from derd.resume import ResumeState, make_key, restore_rng, rng_state
from derd.runtime import (Paths, autocast, check_stop, grad_scaler, log, prepare_model, progress, resolve_device,
                          runtime_record, seed_everything)

ROLES = ("natural", "robust")
CHECK_EXAMPLES, CHECK_PGD_STEPS = 1000, 10  # the sidecar's quick check on val (the table is the evaluate stage's)


def build_for(arch: str, width: int, info: datasets.DatasetInfo, normalize: str = "dataset") -> Classifier:
    """An architecture sized for a dataset (channels, classes, statistics; ``normalize="none"``: identity)."""
    c, h, _ = info.shape
    return build_model(arch, c, info.num_classes, info.mean, info.std, image_size=h, width=width, normalize=normalize)


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 256) -> float:
    """Clean accuracy (the shared :func:`~derd.attacks.robust_flags` without an attack)."""
    return robust_flags(model, None, x, y, batch_size).sum().item() / max(1, len(x))


def robust_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, steps: int,
                    batch_size: int = 256) -> float:
    """Accuracy under PGD (uniform start, step 2.5·eps/steps) — the sidecar's quick robustness figure."""
    attack = PGD(model, eps, steps=steps, step_size=2.5 * eps / steps, seed=0)
    return robust_flags(model, attack, x, y, batch_size).sum().item() / max(1, len(x))


def trades_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, x_adv: torch.Tensor, beta: float) -> torch.Tensor:
    """CE(f(x), y) + β·KL(σ(f(x)) ‖ σ(f(x_adv))), batchmean (TRADES)."""
    logits, logits_adv = model(x), model(x_adv)
    kl = F.kl_div(F.log_softmax(logits_adv, 1), F.softmax(logits, 1), reduction="batchmean")
    return F.cross_entropy(logits, y) + beta * kl


def train_teacher(model: nn.Module, train_set, spec: NaturalTeacher, cfg: Config, device: torch.device,
                  desc: str, resume: ResumeState | None = None) -> list[dict]:
    """Train in place; returns per-epoch records. ``spec`` is robust when it carries an attack. With
    ``resume``, the state after every epoch is saved there and an interrupted run continues from it.
    Under torchrun each rank trains on its shard with ``batch_size / nproc`` examples per step and the
    gradients are averaged (derd.distributed); ``runtime.amp`` autocasts the forward passes."""
    opt_cfg = spec.train
    opt = torch.optim.SGD(model.parameters(), lr=opt_cfg.lr, momentum=opt_cfg.momentum, weight_decay=opt_cfg.weight_decay)
    sampler = distributed.sampler(train_set, shuffle=True, seed=cfg.seed)
    loader = datasets.loader(train_set, distributed.share(opt_cfg.batch_size, f"teachers.{_role(spec)}.train.batch_size"), shuffle=True,
                             seed=cfg.seed, num_workers=cfg.data.num_workers, pin_memory=device.type == "cuda",
                             sampler=sampler)
    scaler = grad_scaler(cfg, device)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, opt_cfg.lr, total_steps=opt_cfg.epochs * len(loader))
    aug = cfg.data.augment
    history: list[dict] = []
    start = 0
    if resume is not None and (state := resume.load()):
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        loader.generator.set_state(state["loader_rng"])
        restore_rng(state, device)
        start, history = int(state["epoch"]), list(state["history"])
        log.info("%s: resuming after epoch %d (%s)", desc, start, resume.path)
    for i in progress(opt_cfg.epochs - start, desc):
        epoch = start + i
        if sampler is not None:
            sampler.set_epoch(epoch)
        model.train()
        total, seen = torch.zeros(()), 0
        for x, y in loader:
            check_stop()
            x = datasets.augment_batch(x, aug.crop_padding, aug.hflip).to(device, non_blocking=True)
            y = y.to(device, non_blocking=True)
            with autocast(cfg, device):
                loss = _teacher_loss(model, x, y, spec)
            check_finite(loss, f"{desc} loss", epoch)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            distributed.average_grads(model.parameters())
            scaler.step(opt)
            scaler.update()
            sched.step()
            total, seen = total + loss.detach().float().cpu() * len(x), seen + len(x)
        history.append({"epoch": epoch, **distributed.average_floats({"loss": total.item() / seen})})
        if resume is not None and epoch + 1 < opt_cfg.epochs and distributed.is_main():
            resume.save(epoch=epoch + 1, model=model.state_dict(), opt=opt.state_dict(), sched=sched.state_dict(),
                        loader_rng=loader.generator.get_state(), history=history, **rng_state(device))
    model.eval()
    return history


def _teacher_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, spec: NaturalTeacher) -> torch.Tensor:
    if not isinstance(spec, RobustTeacher):
        return F.cross_entropy(model(x), y)
    a = spec.attack
    if spec.method == "trades":
        x_adv = KLPGD(model, a.eps, steps=a.steps, step_size=a.step_size)(x)
        return trades_loss(model, x, y, x_adv, spec.trades_beta)
    x_adv = PGD(model, a.eps, steps=a.steps, step_size=a.step_size)(x, y)
    return F.cross_entropy(model(x_adv), y)


def _role(spec: NaturalTeacher) -> str:
    return "robust" if isinstance(spec, RobustTeacher) else "natural"


def _spec(cfg: Config, role: str) -> NaturalTeacher:
    return getattr(cfg.teachers, role)


def load_teacher(cfg: Config, role: str, root: Path = Path("."), device: str | torch.device = "cpu") -> Classifier:
    """The teacher artifact written by the teachers stage, frozen and in eval mode."""
    path = Paths(root).teacher(role)
    spec = _spec(cfg, role)
    info = datasets.info(cfg.data)
    model = build_for(spec.arch, spec.width, info, spec.normalize)
    load_into(model, path)
    meta = read_json(sidecar_path(path)) if sidecar_path(path).exists() else {}
    if meta and (meta.get("arch") != spec.arch or meta.get("num_classes") != info.num_classes):
        raise CheckpointError(
            f"{path}: built for {meta.get('arch')}/{meta.get('num_classes')} classes, but params say "
            f"teachers.{role}.arch={spec.arch} with {info.num_classes} classes; rerun `derd teachers`"
        )
    model.to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def prepare_teacher(cfg: Config, role: str, splits: datasets.Splits, root: Path = Path(".")) -> dict:
    """Load (``teachers.<role>.checkpoint``) or train one teacher; write it and its sidecar."""
    spec = _spec(cfg, role)
    device = resolve_device(cfg.device)
    seed_everything(cfg.seed + ROLES.index(role))
    model = build_for(spec.arch, spec.width, splits.info, spec.normalize).to(device)
    start = time.monotonic()
    history: list[dict] = []
    if spec.checkpoint:
        load_into(model, spec.checkpoint)
        source = f"checkpoint:{spec.checkpoint}"
        log.info("teachers.%s: loaded %s", role, spec.checkpoint)
    else:
        key = make_key(cfg.section_hash("seed", "data", f"teachers.{role}", exclude=("data.root", "data.download")))
        resume = ResumeState(Paths(root).checkpoints / f"teacher_{role}.pt", key)
        history = train_teacher(prepare_model(model, cfg), splits.train, spec, cfg, device, f"teacher[{role}]", resume)
        distributed.average_buffers(model)  # BatchNorm running statistics of every rank's shard
        source = "trained:" + ("cross_entropy" if role == "natural" else spec.method)
    seconds = time.monotonic() - start
    if not distributed.is_main():  # rank 0 checks and writes the artifact
        return {}
    x, y = datasets.stratified_n(splits.val, CHECK_EXAMPLES)
    eps = cfg.teachers.robust.attack.eps
    metrics = {
        "split": "val",
        "clean_acc": accuracy(model, x, y),
        "pgd_acc": robust_accuracy(model, x, y, eps, CHECK_PGD_STEPS),
        "pgd_eps": eps,
        "pgd_steps": CHECK_PGD_STEPS,
        "train_seconds": round(seconds, 2),
        "n_test": len(y),
    }
    sidecar = {
        "role": role, "arch": spec.arch, "width": spec.width, "dataset": splits.info.name,
        "num_classes": splits.info.num_classes, "shape": list(splits.info.shape), "source": source,
        "params_hash": cfg.section_hash("data", "teachers"), "metrics": metrics, "history": history,
        "runtime": runtime_record(cfg),
    }
    save_artifact(Paths(root).teacher(role), model.state_dict(), sidecar)
    if not spec.checkpoint:
        resume.clear()
    log.info("teachers.%s: clean %.3f pgd %.3f (%.0fs)", role, metrics["clean_acc"], metrics["pgd_acc"], seconds)
    return metrics


def run(cfg: Config, root: Path = Path("."), prepare: Callable[..., dict] = prepare_teacher) -> dict:
    """The teachers stage: both experts (each by ``prepare``, e.g. a pipeline task wrapping
    :func:`prepare_teacher`), then ``metrics/teachers.json``: each one's accuracies (the check's settings and
    timing are in its sidecar)."""
    splits = datasets.load(cfg.data)
    results = {role: prepare(cfg, role, splits, root) for role in ROLES}
    if distributed.is_main():
        write_json(Paths(root).metrics / "teachers.json",
                   {role: {k: r[k] for k in ("clean_acc", "pgd_acc")} for role, r in results.items()})
    return results
