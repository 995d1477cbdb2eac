"""Dataset registry: the digits split is stable; CIFAR and ImageNet-100 loaders read real on-disk formats."""
from __future__ import annotations

import hashlib
import pickle

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from derd import data
from derd.config import Data


def test_digits_split_is_stable_and_stratified():
    a, b = data.load(Data()), data.load(Data())
    assert (len(a.train), len(a.val), len(a.test)) == (1212, 135, 450)
    xa, ya = data.first_n(a.test, 450)
    xb, yb = data.first_n(b.test, 450)
    assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert xa.shape[1:] == (1, 16, 16) and 0 <= xa.min() and xa.max() <= 1
    counts = torch.bincount(ya, minlength=10)
    assert counts.min() >= 43 and counts.max() <= 47  # stratified: ~45 of each digit
    train_idx, val_idx = set(a.train.indices), set(a.val.indices)
    assert not train_idx & val_idx


def test_digits_info_matches_data():
    info = data.info(Data(image_size=12))
    assert info.shape == (1, 12, 12) and info.num_classes == 10
    x, _ = data.first_n(data.load(Data(image_size=12)).train, 2000)
    assert abs(x.mean().item() - info.mean[0]) < 0.02


def test_augment_batch_keeps_shape_range_and_is_seeded():
    x = torch.rand(8, 1, 16, 16)
    a = data.augment_batch(x, 2, True, torch.Generator().manual_seed(1))
    b = data.augment_batch(x, 2, True, torch.Generator().manual_seed(1))
    assert a.shape == x.shape and torch.equal(a, b)
    assert not torch.equal(a, x)
    assert torch.equal(data.augment_batch(x, 0, False), x)


def _write_cifar(root, n_train=100, n_test=10):
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)

    def batch(name, n):
        payload = {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), "labels": [i % 10 for i in range(n)]}
        (folder / name).write_bytes(pickle.dumps(payload))
        return [name, hashlib.md5((folder / name).read_bytes()).hexdigest()]

    train = [batch(f"data_batch_{i}", n_train // 5) for i in range(1, 6)]
    test = [batch("test_batch", n_test)]
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": [f"c{i}" for i in range(10)]}))
    meta = {"filename": "batches.meta", "key": "label_names",
            "md5": hashlib.md5((folder / "batches.meta").read_bytes()).hexdigest()}
    return train, test, meta


def test_cifar_loader_reads_the_real_format(tmp_path, monkeypatch):
    train, test, meta = _write_cifar(tmp_path)
    # the fake files have their own checksums; the rest of torchvision's reading path is the real one
    monkeypatch.setattr(torchvision.datasets.CIFAR10, "train_list", train)
    monkeypatch.setattr(torchvision.datasets.CIFAR10, "test_list", test)
    monkeypatch.setattr(torchvision.datasets.CIFAR10, "meta", meta)
    splits = data.load(Data(name="cifar10", root=str(tmp_path), val_fraction=0.2))
    assert splits.info.shape == (3, 32, 32) and splits.info.num_classes == 10
    assert len(splits.train) + len(splits.val) == 100 and len(splits.test) == 10
    x, y = splits.test[0]
    assert x.shape == (3, 32, 32) and 0 <= x.min() and x.max() <= 1


def test_missing_cifar_root_says_where_and_how(tmp_path):
    with pytest.raises(data.DataError, match="data.download: true"):
        data.load(Data(name="cifar100", root=str(tmp_path / "nowhere")))


def _write_imagefolder(root, classes, per_class=3):
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in classes:
            (root / split / c).mkdir(parents=True)
            for i in range(per_class):
                Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(root / split / c / f"{i}.png")
    (root / "classes.txt").write_text("\n".join(classes) + "\n")


def test_imagenet100_reads_an_imagefolder(tmp_path):
    _write_imagefolder(tmp_path, ["n01", "n02", "n03"], per_class=4)
    splits = data.load(Data(name="imagenet100", root=str(tmp_path), image_size=32, val_fraction=0.25))
    assert splits.info.num_classes == 3 and splits.info.shape == (3, 32, 32)
    assert len(splits.test) == 12 and len(splits.train) + len(splits.val) == 12
    x, y = splits.test[5]
    assert x.shape == (3, 32, 32) and 0 <= y < 3


def test_imagenet100_missing_class_folder_is_named(tmp_path):
    _write_imagefolder(tmp_path, ["n01"], per_class=2)
    (tmp_path / "classes.txt").write_text("n01\nn99\n")
    with pytest.raises(data.DataError, match="n99"):
        data.load(Data(name="imagenet100", root=str(tmp_path), image_size=32))


def test_imagenet100_missing_root_explains_layout(tmp_path):
    with pytest.raises(data.DataError, match="classes.txt"):
        data.load(Data(name="imagenet100", root=str(tmp_path)))
