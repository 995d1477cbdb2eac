"""Health of pseudo data (Stage-I generators, the DERD_inv pool, Stage-II generators).

A DAFL-style generator can collapse onto one class or one image; these numbers make that visible:
the teacher's argmax class histogram (balanced = healthy), its mean confidence, and a diversity
score (mean pairwise RMS pixel distance between samples, in [0,1] pixel units).
"""
from __future__ import annotations

import math

import torch
from torch import nn

DIVERSITY_SAMPLES = 256  # pairwise distances are computed on at most this many samples


@torch.no_grad()
def teacher_predictions(teacher: nn.Module, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Softmax of the teacher over ``images`` (moved to the teacher's device batch by batch), on the CPU."""
    device = next(teacher.parameters()).device
    return torch.cat([teacher(images[i : i + batch_size].to(device)).softmax(1).cpu()
                      for i in range(0, len(images), batch_size)])


@torch.no_grad()
def diversity(images: torch.Tensor, max_samples: int = DIVERSITY_SAMPLES) -> float:
    """Mean over pairs i≠j of sqrt(mean_pixels (x_i − x_j)²): 0 for identical samples."""
    x = images[:max_samples].flatten(1).double().cpu()
    n = len(x)
    if n < 2:
        return 0.0
    d = torch.cdist(x, x) / math.sqrt(x.shape[1])
    return (d.sum() / (n * (n - 1))).item()


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
    nonzero = share[share > 0]
    balance = (-(nonzero * nonzero.log()).sum() / math.log(num_classes)).item() if num_classes > 1 else 1.0
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
