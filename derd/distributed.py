"""Data parallelism for the training stages (teachers, Stage-I generators, Stage-II students) with
torch.distributed: ``runtime.nproc: N`` re-runs a stage command under ``torchrun --nproc_per_node=N``
(NCCL on GPUs, one per rank; gloo on the CPU; the launch and the other ranks' entry are
``pipelines/torchrun.py``). This module holds the helpers the stages call; it imports no stage. Decisions
(docs/SCALING.md):

- Batches: every rank draws the *global* batch's random numbers from the same seeded stream and keeps its
  rows ``rank::world`` (latents, crop offsets); real data is sharded by :func:`sampler`. A step on N ranks
  therefore sees the single-process step's global batch, split N ways.
- Gradients: averaged by one all-reduce on the flattened gradient vector after each backward
  (:func:`average`), not by wrapping in ``DistributedDataParallel``: the attacks and TRADES forward a
  model several times per step and Stage-II takes its per-expert gradients with ``torch.autograd.grad``,
  which DDP's bucketed hooks do not support. Stage-II all-reduces g_nat and g_rob separately, *then*
  aggregates (SGA's random mask is drawn from the same seeded stream on every rank), so every rank applies
  the single-process aggregation of the global gradients.
- BatchNorm: batch statistics are per rank (``runtime.sync_bn`` makes the student's global, CUDA only);
  running statistics are averaged across ranks before an artifact is saved. The frozen teachers'
  L_BN hooks and DAFL's L_ie compare per-rank batch statistics (as DeepInversion's multi-GPU code does):
  no all-reduce per BatchNorm layer in every forward; the per-rank batch must stay large (≥ 64).
- Side effects: only rank 0 writes artifacts, curves, resume state, and logs to MLflow.
"""
from __future__ import annotations

import atexit
import os
from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import nn

from derd.config import Config, ConfigError


def world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if world() > 1 else 0


def is_main() -> bool:
    return rank() == 0


def start(cfg: Config) -> bool:
    """Join the process group torchrun set up (no-op outside torchrun); True when distributed."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return dist.is_initialized()
    cuda = cfg.device != "cpu" and torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl" if cuda else "gloo")
    atexit.register(dist.destroy_process_group)
    return True


def local_device(device: torch.device) -> torch.device:
    """Under torchrun, each rank's own GPU (``cuda:LOCAL_RANK``); otherwise ``device`` unchanged."""
    if device.type == "cuda" and world() > 1:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return device


def share(n: int, key: str) -> int:
    """This rank's part of a global batch of ``n`` (rows ``rank::world``); ``key`` names the setting."""
    w = world()
    if n % w:
        raise ConfigError(f"{key}: {n} does not split evenly over runtime.nproc={w} processes; use a multiple of {w}")
    return n // w


def mine(x: torch.Tensor) -> torch.Tensor:
    """This rank's rows (``rank::world``) of a tensor drawn for the global batch."""
    return x[rank() :: world()] if world() > 1 else x


def average(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """The mean of each tensor over the ranks, by one all-reduce on their concatenation (identity on one rank)."""
    tensors = list(tensors)
    if world() == 1 or not tensors:
        return tensors
    flat = torch.cat([t.reshape(-1).float() for t in tensors])
    dist.all_reduce(flat)
    flat /= world()
    out, i = [], 0
    for t in tensors:
        out.append(flat[i : i + t.numel()].view_as(t).to(t.dtype))
        i += t.numel()
    return out


def average_grads(params: Sequence[nn.Parameter]) -> None:
    """Replace each parameter's ``.grad`` by its mean over the ranks (a missing grad counts as zero)."""
    if world() == 1:
        return
    params = list(params)
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    for p, g in zip(params, average(grads)):
        p.grad = g


def average_floats(values: dict[str, float]) -> dict[str, float]:
    """A dict of per-rank numbers (same keys on every rank) averaged over the ranks."""
    if world() == 1 or not values:
        return values
    keys = sorted(values)
    (mean,) = average([torch.tensor([float(values[k]) for k in keys], dtype=torch.float64)])
    return dict(zip(keys, mean.tolist()))


def average_buffers(module: nn.Module) -> None:
    """Average the floating-point buffers (BatchNorm running statistics) over the ranks, in place."""
    buffers = [b for b in module.buffers() if b.is_floating_point()]
    with torch.no_grad():
        for b, mean in zip(buffers, average(buffers)):
            b.copy_(mean)


def sampler(dataset, shuffle: bool, seed: int) -> torch.utils.data.Sampler | None:
    """A distinct shard of ``dataset`` per rank (None on one process: the loader's own shuffling)."""
    if world() == 1:
        return None
    return torch.utils.data.DistributedSampler(dataset, num_replicas=world(), rank=rank(), shuffle=shuffle,
                                               seed=seed, drop_last=True)


def barrier() -> None:
    if world() > 1:
        dist.barrier()
