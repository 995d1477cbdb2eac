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


def _augment_per_image(x, padding, hflip, generator):
    """The former implementation (one Python crop per image), kept as the reference."""
    n, _, h, w = x.shape
    if padding > 0:
        padded = torch.nn.functional.pad(x, (padding,) * 4)
        dx = torch.randint(0, 2 * padding + 1, (n,), generator=generator).tolist()
        dy = torch.randint(0, 2 * padding + 1, (n,), generator=generator).tolist()
        x = torch.stack([padded[i, :, dy[i] : dy[i] + h, dx[i] : dx[i] + w] for i in range(n)])
    if hflip:
        flip = torch.rand(n, generator=generator) < 0.5
        x = torch.where(flip.view(-1, 1, 1, 1), x.flip(3), x)
    return x


@pytest.mark.parametrize("padding,hflip,shape", [(4, True, (16, 3, 32, 32)), (2, False, (7, 1, 16, 12)),
                                                 (0, True, (5, 3, 8, 8)), (1, True, (1, 2, 5, 6))])
def test_vectorised_augment_equals_the_per_image_crops(padding, hflip, shape):
    x = torch.rand(shape)
    mine, theirs = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    for _ in range(3):  # the same draws, batch after batch: the streams stay in step
        assert torch.equal(data.augment_batch(x, padding, hflip, mine), _augment_per_image(x, padding, hflip, theirs))
    assert torch.equal(mine.get_state(), theirs.get_state())


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


def test_imagenet100_val_uses_the_deterministic_eval_transform(tmp_path):
    """Val is carved from the training folder but must not see the training random crop."""
    _write_imagefolder(tmp_path, ["n01", "n02"], per_class=4)
    splits = data.load(Data(name="imagenet100", root=str(tmp_path), image_size=32, val_fraction=0.25))
    train_tf, val_tf = splits.train.dataset.transform, splits.val.dataset.transform
    assert any(type(t).__name__ == "RandomResizedCrop" for t in train_tf.transforms)
    assert not any("Random" in type(t).__name__ for t in val_tf.transforms)
    assert [type(t).__name__ for t in val_tf.transforms] == [type(t).__name__ for t in splits.test.transform.transforms]
    torch.manual_seed(0)
    a = splits.val[0][0]
    torch.manual_seed(1)
    assert torch.equal(a, splits.val[0][0]) and a.shape == (3, 32, 32)
    assert splits.val.dataset.samples is splits.train.dataset.samples  # the same files, scanned once
    assert set(splits.val.indices).isdisjoint(splits.train.indices)


def test_first_n_reads_only_n_examples():
    class Counting(torch.utils.data.Dataset):
        reads = 0

        def __len__(self):
            return 10**6

        def __getitem__(self, i):
            Counting.reads += 1
            return torch.full((1, 2, 2), float(i)), i

    x, y = data.first_n(Counting(), 5)
    assert Counting.reads == 5 and x.shape == (5, 1, 2, 2) and y.tolist() == [0, 1, 2, 3, 4]


class ClassSorted(torch.utils.data.Dataset):
    """A split stored in class order (like an ImageFolder: 0 0 0 ... 1 1 ...), labels kept in ``targets``;
    counts the images it decodes."""

    def __init__(self, counts: list[int]):
        self.targets = [c for c, k in enumerate(counts) for _ in range(k)]
        self.reads = 0

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, i):
        self.reads += 1
        return torch.full((1, 2, 2), float(i)), self.targets[i]


def test_stratified_subset_covers_every_class_evenly_and_is_fixed():
    """Issue 25: the first n images of a class-sorted split cover only its first classes; the evaluation
    subsets take every class, counts differing by at most 1, the same examples on every call."""
    counts = [40, 25, 60, 31, 33, 50, 27]  # 7 classes, class-sorted, unequal sizes
    for n in (7, 20, 100):
        split = ClassSorted(counts)
        x, y = data.stratified_n(split, n)
        per_class = torch.bincount(y, minlength=len(counts))
        assert len(y) == n and per_class.min() >= 1 and per_class.max() - per_class.min() <= 1, (n, per_class)
        assert split.reads == n  # only the chosen images are decoded
        again_x, again_y = data.stratified_n(ClassSorted(counts), n)
        assert torch.equal(x, again_x) and torch.equal(y, again_y)  # identical across calls, order included
        assert len(set(x[:, 0, 0, 0].tolist())) == n  # n distinct examples
    assert data.first_n(ClassSorted(counts), 100)[1].unique().tolist() == [0, 1, 2]  # what it replaces
    # any prefix is balanced too (the sanity checks take the first eval.sanity.n_examples), and a smaller n
    # picks a prefix of a larger n's subset
    _, y = data.stratified_n(ClassSorted(counts), 150)
    prefix = torch.bincount(y[:50], minlength=len(counts))
    assert prefix.max() - prefix.min() <= 1
    assert torch.equal(data.stratified_n(ClassSorted(counts), 50)[1], y[:50])
    # a class smaller than its share gives all it has; the others stay within 1 of each other
    _, y = data.stratified_n(ClassSorted([3, 40, 40, 40]), 60)
    assert torch.bincount(y).tolist()[0] == 3 and max(torch.bincount(y)[1:]) - min(torch.bincount(y)[1:]) <= 1


def test_stratified_subset_reads_labels_through_subsets_and_tensor_datasets():
    labels = torch.arange(30) // 10  # class-sorted: 0 x10, 1 x10, 2 x10
    tensors = torch.utils.data.TensorDataset(torch.arange(30.0)[:, None], labels)
    subset = torch.utils.data.Subset(tensors, list(range(5, 30)))
    assert data.labels_of(subset).tolist() == labels[5:].tolist()
    x, y = data.stratified_n(subset, 6)
    assert torch.bincount(y).tolist() == [2, 2, 2] and all(x[:, 0] >= 5)


def test_loader_workers_and_pinning():
    ds = torch.utils.data.TensorDataset(torch.arange(10.0))
    plain = data.loader(ds, 4, shuffle=True, seed=0)
    assert plain.num_workers == 0 and not plain.persistent_workers
    assert plain.pin_memory == torch.cuda.is_available()
    two = data.loader(ds, 4, shuffle=True, seed=0, num_workers=2, pin_memory=False)
    assert two.num_workers == 2 and two.persistent_workers and not two.pin_memory
    assert [b[0].tolist() for b in two] == [b[0].tolist() for b in plain]  # same seeded order
    assert Data().num_workers == 0


def test_imagenet100_missing_class_folder_is_named(tmp_path):
    _write_imagefolder(tmp_path, ["n01"], per_class=2)
    (tmp_path / "classes.txt").write_text("n01\nn99\n")
    with pytest.raises(data.DataError, match="n99"):
        data.load(Data(name="imagenet100", root=str(tmp_path), image_size=32))


def test_imagenet100_missing_root_explains_layout(tmp_path):
    with pytest.raises(data.DataError, match="classes.txt"):
        data.load(Data(name="imagenet100", root=str(tmp_path)))


# ---------------------------------------------------------------- Fashion-MNIST (fake IDX files)
def _idx_bytes(array: np.ndarray) -> bytes:
    """The IDX format: two zero bytes, dtype code 0x08 (ubyte), ndim, big-endian uint32 dims, data."""
    header = bytes([0, 0, 0x08, array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
    return header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()


def _write_fashion(folder, n_train=200, n_test=30, size=28, gz=True, seed=0):
    """Fake Fashion-MNIST: class c images are filled with 20*c + noise, so labels are recoverable."""
    import gzip

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    parts = {}
    for split, n in (("train", n_train), ("t10k", n_test)):
        y = (np.arange(n) % 10).astype(np.uint8)
        rng.shuffle(y)
        x = (20 * y[:, None, None] + rng.integers(0, 10, (n, size, size))).astype(np.uint8)
        parts[split] = (x, y)
        for kind, arr in (("images-idx3", x), ("labels-idx1", y)):
            name, payload = f"{split}-{kind}-ubyte", _idx_bytes(arr)
            if gz:
                (folder / f"{name}.gz").write_bytes(gzip.compress(payload))
            else:
                (folder / name).write_bytes(payload)
    return parts


def test_read_idx_roundtrip_gzipped_and_plain(tmp_path):
    arr = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    (tmp_path / "a").write_bytes(_idx_bytes(arr))
    import gzip

    (tmp_path / "a.gz").write_bytes(gzip.compress(_idx_bytes(arr)))
    assert np.array_equal(data.read_idx(tmp_path / "a"), arr)
    assert np.array_equal(data.read_idx(tmp_path / "a.gz"), arr)


@pytest.mark.parametrize("gz", [True, False])
def test_fashion_mnist_reads_idx_files(tmp_path, gz):
    parts = _write_fashion(tmp_path / "fm", gz=gz)
    cfg = Data(name="fashion_mnist", root=str(tmp_path / "fm"), image_size=28, val_fraction=0.1)
    splits = data.load(cfg)
    assert splits.info.shape == (1, 28, 28) and splits.info.num_classes == 10 and splits.info.name == "fashion_mnist"
    assert (len(splits.train), len(splits.val), len(splits.test)) == (180, 20, 30)
    # test = the official t10k set, in file order and unresized at the native 28x28
    x_test, y_test = data.first_n(splits.test, 30)
    assert torch.equal(y_test, torch.from_numpy(parts["t10k"][1].astype(np.int64)))
    assert torch.allclose(x_test[:, 0], torch.from_numpy(parts["t10k"][0] / 255.0).float())
    # val: stratified (2 of each class), disjoint from train, seeded
    _, y_val = data.first_n(splits.val, 20)
    assert torch.bincount(y_val, minlength=10).tolist() == [2] * 10
    assert not set(splits.train.indices) & set(splits.val.indices)
    assert data.load(cfg).val.indices == splits.val.indices
    assert data.load(cfg.model_copy(update={"split_seed": 1})).val.indices != splits.val.indices
    # statistics come from the training images
    x_all = torch.from_numpy(parts["train"][0] / 255.0).float()
    assert abs(splits.info.mean[0] - x_all.mean().item()) < 1e-4
    assert abs(splits.info.std[0] - x_all.std().item()) < 1e-3
    assert data.info(cfg) == splits.info


def test_fashion_mnist_resizes_and_subsets(tmp_path):
    _write_fashion(tmp_path / "FashionMNIST" / "raw", gz=False)  # torchvision's layout under root
    cfg = Data(name="fashion_mnist", root=str(tmp_path), image_size=16, train_subset=100, val_fraction=0.2)
    splits = data.load(cfg)
    assert splits.info.shape == (1, 16, 16)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (80, 20, 30)
    x, y = data.first_n(splits.train, 80)
    assert x.shape == (80, 1, 16, 16) and 0 <= x.min() and x.max() <= 1
    assert torch.bincount(y, minlength=10).tolist() == [8] * 10  # subset and val both stratified
    # bilinear + antialias keeps each fake image's level (class c ≈ (20c + 4.5) / 255)
    assert torch.allclose(x.mean(dim=(1, 2, 3)), (20 * y + 4.5) / 255.0, atol=0.01)
    a, b = data.load(cfg), data.load(cfg.model_copy(update={"split_seed": 3}))
    assert torch.equal(data.first_n(a.train, 80)[0], x)
    assert not torch.equal(data.first_n(b.train, 80)[0], x)


def test_fashion_mnist_default_root_prefers_the_system_package(tmp_path, monkeypatch):
    _write_fashion(tmp_path / "system", n_train=100, n_test=10)
    monkeypatch.setattr(data, "FASHION_SYSTEM_ROOT", tmp_path / "system")
    monkeypatch.chdir(tmp_path)
    splits = data.load(Data(name="fashion_mnist", image_size=28))
    assert len(splits.test) == 10 and len(splits.train) + len(splits.val) == 100


def test_fashion_mnist_missing_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "FASHION_SYSTEM_ROOT", tmp_path / "no-system")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(data.DataError) as err:
        data.load(Data(name="fashion_mnist"))
    msg = str(err.value)
    assert "apt-get install -y dataset-fashion-mnist" in msg and "data.download: true" in msg
    assert str((tmp_path / "no-system").resolve()) in msg
    assert str((tmp_path / "data" / "FashionMNIST" / "raw").resolve()) in msg
    with pytest.raises(data.DataError, match="elsewhere"):
        data.load(Data(name="fashion_mnist", root=str(tmp_path / "elsewhere")))


def test_fashion_mnist_download_goes_through_torchvision(tmp_path, monkeypatch):
    calls = []

    def fake_fashion(root, train, download):
        calls.append((root, train, download))
        _write_fashion(tmp_path / "dl" / "FashionMNIST" / "raw", n_train=100, n_test=10, gz=False)

    monkeypatch.setattr(torchvision.datasets, "FashionMNIST", fake_fashion)
    splits = data.load(Data(name="fashion_mnist", root=str(tmp_path / "dl"), download=True, image_size=28))
    assert calls and all(c[2] for c in calls) and calls[0][0] == str(tmp_path / "dl")
    assert len(splits.test) == 10


@pytest.mark.parametrize("damage", ["truncated_gz", "truncated_data", "bad_magic"])
def test_fashion_mnist_corrupt_file_is_named(tmp_path, damage):
    import gzip

    folder = tmp_path / damage
    _write_fashion(folder)
    target = folder / "train-images-idx3-ubyte.gz"
    payload = gzip.decompress(target.read_bytes())
    if damage == "truncated_gz":
        target.write_bytes(target.read_bytes()[:200])
    elif damage == "truncated_data":
        target.write_bytes(gzip.compress(payload[:-100]))
    else:
        target.write_bytes(gzip.compress(b"\x00\x00\x07\x03" + payload[4:]))
    with pytest.raises(data.DataError, match="train-images-idx3-ubyte.gz"):
        data.load(Data(name="fashion_mnist", root=str(folder), image_size=28))


def test_fashion_mnist_label_count_must_match(tmp_path):
    folder = tmp_path / "fm"
    _write_fashion(folder, gz=False)
    (folder / "t10k-labels-idx1-ubyte").write_bytes(_idx_bytes(np.zeros(7, dtype=np.uint8)))
    with pytest.raises(data.DataError, match="t10k-labels-idx1-ubyte"):
        data.load(Data(name="fashion_mnist", root=str(folder)))
