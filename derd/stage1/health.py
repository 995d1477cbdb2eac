"""Health of pseudo data (Stage-I generators, the DERD_inv pool, Stage-II generators).

A DAFL-style generator can collapse onto one class or one image; these numbers make that visible:
the teacher's argmax class histogram (balanced = healthy), its mean confidence, and a diversity
score (mean pairwise RMS pixel distance between samples, in [0,1] pixel units).
"""
from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

DIVERSITY_SAMPLES = 256  # pairwise distances are computed on at most this many samples


@contextmanager
def batch_statistics(generator: nn.Module) -> Iterator[nn.Module]:
    """``generator`` in train mode, as Stage-II samples it (BatchNorm normalises each batch with that batch's
    statistics); on exit its mode and buffers are put back (the running statistics train-mode forwards update)."""
    mode = generator.training
    buffers = {name: b.clone() for name, b in generator.named_buffers()}
    generator.train()
    try:
        yield generator
    finally:
        generator.train(mode)
        with torch.no_grad():
            for name, b in generator.named_buffers():
                b.copy_(buffers[name])


@torch.no_grad()
def teacher_predictions(teacher: nn.Module, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Softmax of the teacher over ``images`` (moved to the teacher's device batch by batch), on the CPU."""
    device = next(teacher.parameters()).device
    return torch.cat([teacher(images[i : i + batch_size].to(device)).softmax(1).cpu()
                      for i in range(0, len(images), batch_size)])


@torch.no_grad()
def mean_pairwise_rms(images: torch.Tensor) -> torch.Tensor:
    """Mean over pairs i≠j of sqrt(mean_pixels (x_i − x_j)²), as a tensor on the images' device (0 for identical
    samples or fewer than two)."""
    x = images.flatten(1).double()
    n = len(x)
    d = torch.cdist(x, x) / math.sqrt(x.shape[1])
    return d.sum() / max(n * (n - 1), 1)


def diversity(images: torch.Tensor, max_samples: int = DIVERSITY_SAMPLES) -> float:
    """:func:`mean_pairwise_rms` of at most ``max_samples`` samples, as a number."""
    return mean_pairwise_rms(images[:max_samples].cpu()).item()


def class_balance(share: torch.Tensor) -> torch.Tensor:
    """Entropy of a class-share vector over ln K: 1 = perfectly balanced, 0 = one class."""
    nonzero = share[share > 0]
    return -(nonzero * nonzero.log()).sum() / math.log(len(share)) if len(share) > 1 else share.new_tensor(1.0)


@torch.no_grad()
def batch_health(images: torch.Tensor, logits: torch.Tensor, other_logits: torch.Tensor | None = None) -> dict:
    """Stage-II's per-step view of one pseudo batch, as tensors (no device sync): the class balance and top-class
    share of ``logits``' argmax, the samples' diversity and, given a second expert's ``other_logits`` on the same
    images, the fraction of samples whose argmax the two experts agree on."""
    pred = logits.argmax(1)
    share = torch.bincount(pred, minlength=logits.shape[1]).double() / len(pred)
    out = {"balance": class_balance(share), "top_class_share": share.max(), "diversity": mean_pairwise_rms(images)}
    if other_logits is not None:
        out["agree_nat_rob"] = (pred == other_logits.argmax(1)).double().mean()
    return out


def generator_health(teacher: nn.Module, images: torch.Tensor, num_classes: int, collapse_threshold: float,
                     min_diversity: float = 0.02) -> dict:
    """Class histogram of the teacher's argmax, mean confidence, diversity and collapse warnings.

    ``balance`` is the histogram's entropy over ln K (1 = perfectly balanced, 0 = one class).
    ``collapsed`` is true when one class takes more than ``collapse_threshold`` of the samples or
    the diversity is below ``min_diversity``; ``warnings`` says which, in words.
    """
    if images.dim() != 4 or len(images) < 2:
        raise ValueError(f"generator_health needs a batch of ≥2 images N×C×H×W, got shape {tuple(images.shape)}")
    probs = teacher_predictions(teacher, images)
    counts = torch.bincount(probs.argmax(1), minlength=num_classes).double()
    share = counts / counts.sum()
    balance = class_balance(share).item()
    div = diversity(images)
    warnings = []
    top = int(share.argmax())
    if share[top] > collapse_threshold:
        warnings.append(f"class collapse: the teacher assigns {share[top]:.0%} of samples to class {top} "
                        f"(threshold {collapse_threshold:.0%})")
    if div < min_diversity:
        warnings.append(f"sample collapse: near-identical samples (diversity {div:.4f} < {min_diversity})")
    return {
        "n_samples": len(images),
        "class_histogram": [int(c) for c in counts.tolist()],
        "classes_seen": int((counts > 0).sum()),
        "max_class_share": round(share[top].item(), 4),
        "balance": round(balance, 4),
        "mean_confidence": round(probs.max(1).values.mean().item(), 4),
        "diversity": round(div, 4),
        "pixel_mean": round(images.mean().item(), 4),
        "collapsed": bool(warnings),
        "warnings": warnings,
    }
