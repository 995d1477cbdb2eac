"""The paper presets at micro scale on synthetic data: a few random images written in each dataset's real on-disk
format (CIFAR-10/100's pickled batches, an ImageNet-100 folder of JPEGs), the preset's params (``derd preset``)
with the MICRO override, and every stage run as the flows call it, in this process. Used by tests/test_presets.py
and ``python -m bench.gpu``."""
from __future__ import annotations

import contextlib
import json
import pickle
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np
import yaml

from derd import config, distill, inputs, teachers
from derd.evaluation import evaluate
from derd.report import tables
from derd.runtime import Paths
from derd.stage1 import warmup
from pipelines.cli import main as cli

LABELS = (0, 1)  # the fake images use two classes (a stratified val split needs each class twice)

# dotted params key -> value (a dict merges into the preset's dict): 1 epoch, 2 iterations, 1 evaluation example
# (every column, AutoAttack included, runs on all of them, and AutoAttack on a WRN-34-10 is costly)
MICRO: dict[str, Any] = {
    "device": "cpu", "data.num_workers": 0, "data.val_fraction": 0.5,
    "teachers.natural.train": {"epochs": 1, "batch_size": 2},
    "teachers.robust.train": {"epochs": 1, "batch_size": 2},
    "teachers.robust.attack.steps": 1,
    "stage1.iterations": 2, "stage1.batch_size": 4, "stage1.health_samples": 10, "stage1.inversion.pool_size": 0,
    "stage2.methods": ["derd"], "stage2.seeds": [0], "stage2.iterations": 2, "stage2.k_student": 1,
    "stage2.batch_size": 4, "stage2.attack.steps": 1, "stage2.monitor_every": 0,
    "eval.n_examples": 1, "eval.batch_size": 8, "eval.pgd_s.steps": 1, "eval.pgd_t.steps": 1, "eval.cw.steps": 1,
    "eval.autoattack": {"version": "custom", "attacks": ["apgd-ce"]},
    "eval.sanity.enabled": False, "eval.eps_curve": [0.0, 1.0], "tracking.enabled": False,
}


def fake_images(n: int, size: int, seed: int) -> tuple[np.ndarray, list[int]]:
    """``n`` random uint8 HxWx3 images of ``size`` and their labels, cycling through LABELS from ``seed``."""
    rng = np.random.default_rng(seed)
    labels = [LABELS[(seed + i) % len(LABELS)] for i in range(n)]
    return rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8), labels


def cifar(root: Path, name: str) -> None:
    """CIFAR's python-version archive layout: pickled dicts of uint8 rows (N×3072, channel-major) and labels."""
    folder, train, test, meta, key, names = {
        "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], "test_batch", "batches.meta",
                    "labels", "label_names"),
        "cifar100": ("cifar-100-python", ["train"], "test", "meta", "fine_labels", "fine_label_names"),
    }[name]
    (root / folder).mkdir(parents=True)
    for i, file in enumerate([*train, test]):
        images, labels = fake_images(8 if file == test else max(1, 4 // len(train)), 32, i)  # 4-5 training images
        rows = images.transpose(0, 3, 1, 2).reshape(len(images), -1)
        (root / folder / file).write_bytes(pickle.dumps({"data": rows, key: labels}))
    classes = 10 if name == "cifar10" else 100
    (root / folder / meta).write_bytes(pickle.dumps({names: [f"class{i}" for i in range(classes)]}))


def imagenet100(root: Path) -> None:
    """An ImageFolder root: classes.txt (its wnids: two here, so the nets have two outputs), train/<wnid>/*.JPEG
    and val/<wnid>/*.JPEG, JPEGs larger than the crop."""
    from PIL import Image

    wnids = [f"n{i:08d}" for i in LABELS]
    root.mkdir(parents=True, exist_ok=True)
    (root / "classes.txt").write_text("\n".join(wnids) + "\n")
    for split, per_class in (("train", 2), ("val", 4)):
        for label, wnid in enumerate(wnids):
            (root / split / wnid).mkdir(parents=True)
            images, _ = fake_images(per_class, 72, label)
            for j, img in enumerate(images):
                Image.fromarray(img).save(root / split / wnid / f"{j}.JPEG")


@contextlib.contextmanager
def cifar_checksums_waived(preset: str) -> Iterator[None]:
    """The fake CIFAR files cannot match the archives' MD5 sums; everything after that check is the real reader."""
    if preset == "imagenet100":
        yield
        return
    with mock.patch("torchvision.datasets.cifar.check_integrity", lambda *args, **kwargs: True):
        yield


def micro_params(work: Path, preset: str, extra: dict[str, Any]) -> config.Config:
    """``work/params.yaml``: ``derd preset <preset>`` with MICRO and then ``extra`` (dotted keys) applied."""
    params = work / "params.yaml"
    if cli(["preset", preset, "--params", str(params)]) != 0:
        raise RuntimeError(f"derd preset {preset} --params {params} failed")
    raw = yaml.safe_load(params.read_text())
    for key, value in {**MICRO, **extra}.items():
        *parents, leaf = key.split(".")
        node = raw
        for part in parents:
            node = node.setdefault(part, {})
        merge = isinstance(value, dict) and isinstance(node.get(leaf), dict)
        node[leaf] = {**node[leaf], **value} if merge else value
    params.write_text(yaml.safe_dump(raw, sort_keys=False))
    return config.load(params)


def micro_project(work: Path, preset: str, extra: dict[str, Any]) -> config.Config:
    """Fake data in ``preset``'s on-disk format under ``work/data`` and :func:`micro_params` reading it."""
    data = work / "data"
    if preset == "imagenet100":
        imagenet100(data)
    else:
        cifar(data, preset)
    return micro_params(work, preset, {"data.root": str(data), **extra})


def all_stages(cfg: config.Config, root: Path) -> dict:
    """inputs, teachers, warmup (every unit), distill (every unit), evaluate, report under ``root``; prints each
    one's seconds (``<dataset> <stage>: <s> s``) and returns metrics/eval.json."""
    steps = {"inputs": lambda: inputs.run(cfg, root), "teachers": lambda: teachers.run(cfg, root),
             "warmup": lambda: [warmup.run_unit(cfg, root, u) for u in cfg.stage1_units()],
             "distill": lambda: [distill.run_unit(cfg, root, u) for u in cfg.student_units()],
             "evaluate": lambda: evaluate.run(cfg, root), "report": lambda: tables.run(cfg, root)}
    for name, step in steps.items():
        start = time.monotonic()
        step()
        print(f"{cfg.data.name} {name}: {time.monotonic() - start:.1f} s")
    return json.loads((Paths(root).metrics / "eval.json").read_text())
