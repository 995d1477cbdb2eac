"""Peer ratios on one model, inputs and settings: derd.attacks vs torchattacks (PGD-20, FGSM), and the
AutoAttack adapter (derd.attacks.autoattack) vs calling pyautoattack directly.

torchattacks is never installed into the project's environment (its wheel ships packages that shadow
the AutoAttack backends): it lives in a separate folder appended to sys.path in this process only, and
the adapter is pinned to package="pyautoattack" so a bundled ``autoattack``/``robustbench`` there is never
picked."""
from __future__ import annotations

import importlib
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from bench.timing import interleaved, paired_ratio
from derd import config
from derd import data as datasets
from derd.attacks import FGSM, PGD
from derd.teachers import accuracy, build_for

PEERS = Path("/tmp/peers")
INSTALL = f".venv/bin/pip install --no-deps --target {PEERS} torchattacks"


def load_torchattacks():
    """torchattacks from the peers folder (appended, so it never shadows the project's packages), or None."""
    if PEERS.is_dir() and str(PEERS) not in sys.path:
        sys.path.append(str(PEERS))
    try:
        return importlib.import_module("torchattacks")
    except Exception:  # noqa: BLE001 - any import failure means "no peer"
        return None


def digits_model(epochs: int, image_size: int = 16) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor, str]:
    """small_resnet w16 trained naturally for a few epochs on the offline default's digits (so accuracies
    mean something), and the test split."""
    cfg = config.parse({"data": {"name": "digits", "image_size": image_size}})
    splits = datasets.load(cfg.data)
    x, y = datasets.first_n(splits.train, len(splits.train))
    torch.manual_seed(0)
    model = build_for("small_resnet", 16, splits.info)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(x))
        for i in range(0, len(x), 64):
            idx = perm[i : i + 64]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    xt, yt = datasets.first_n(splits.test, len(splits.test))
    return model, xt, yt, f"small_resnet w16, digits {image_size}x{image_size}, natural training {epochs} epochs"


def attacks_vs_torchattacks(model, x, y, eps: float, reps: int) -> dict[str, Any]:
    ta = load_torchattacks()
    out: dict[str, Any] = {"n": len(x), "eps": eps, "clean_accuracy": accuracy(model, x, y)}
    if ta is None:
        out["peer"] = f"peer not installed: {INSTALL}"
        return out
    out["peer"] = f"torchattacks {ta.__version__} (from {PEERS}, this process only)"
    step = eps / 4
    cases = {
        "PGD-20": (PGD(model, eps, steps=20, step_size=step, seed=0),
                   ta.PGD(model, eps=eps, alpha=step, steps=20, random_start=True)),
        "FGSM": (FGSM(model, eps), ta.FGSM(model, eps=eps)),
    }
    for name, (ours, peer) in cases.items():
        adv = {}

        def run_ours(ours=ours, adv=adv):
            adv["derd"] = ours(x, y)

        def run_peer(peer=peer, adv=adv):
            adv["torchattacks"] = peer(x, y)

        t = interleaved({"derd": run_ours, "torchattacks": run_peer}, reps=reps, warmup=1)
        model.eval()
        out[name] = {
            "settings": f"eps={eps:g}" + (f", 20 steps of {step:g}, uniform random start" if name != "FGSM" else ""),
            "derd_s": t["derd"]["median_s"], "torchattacks_s": t["torchattacks"]["median_s"],
            "derd_img_per_s": len(x) / t["derd"]["median_s"], "torchattacks_img_per_s": len(x) / t["torchattacks"]["median_s"],
            "throughput_ratio_derd_over_peer": paired_ratio(t, "torchattacks", "derd"),
            "derd_accuracy": accuracy(model, adv["derd"], y), "torchattacks_accuracy": accuracy(model, adv["torchattacks"], y),
            "max_perturbation": {k: float((v - x).abs().max()) for k, v in adv.items()},
        }
    return out


def autoattack_overhead(model, x, y, eps: float, reps: int, warmup: int = 1) -> dict[str, Any]:
    """Adapter (custom, apgd-ce) vs pyautoattack.AutoAttack called directly, same model/inputs/seed."""
    from pyautoattack import AutoAttack as Direct

    from derd.evaluation.autoattack import AutoAttack as Adapter

    res = {}

    def adapter():
        r = Adapter(model, eps, "custom", ["apgd-ce"], seed=0, batch_size=256, package="pyautoattack").run(x, y)
        res["adapter"] = (r.accuracy, r.package, r.package_version)

    def direct():
        aa = Direct(model, eps=eps, norm="Linf", seed=0, version="custom", attacks=["apgd-ce"], device="cpu")
        aa.verbose = False
        _, y_adv = aa.run_standard_evaluation(x, y, batch_size=256)
        res["direct"] = float((y_adv.cpu() == y).float().mean())

    t = interleaved({"adapter": adapter, "direct": direct}, reps=reps, warmup=warmup)
    return {"n": len(x), "eps": eps, "attack": "apgd-ce (custom version), seed 0",
            "adapter_s": t["adapter"]["median_s"], "direct_s": t["direct"]["median_s"],
            "overhead": paired_ratio(t, "adapter", "direct") - 1,
            "adapter_accuracy": res["adapter"][0], "direct_accuracy": res["direct"],
            "adapter_backend": f"{res['adapter'][1]} {res['adapter'][2]}"}
