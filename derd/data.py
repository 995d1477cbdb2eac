"""Dataset registry: every dataset yields [0,1] image tensors and reports its shape and statistics.

``digits`` (the offline default) ships inside scikit-learn; ``fashion_mnist`` reads the four
standard IDX files (Debian's ``dataset-fashion-mnist`` package, or torchvision's download);
``cifar10``/``cifar100`` use the torchvision loaders (with their real download code);
``imagenet100`` reads an ImageFolder root.
Augmentation is applied batch-wise on tensors (:func:`augment_batch`) so that the same code
serves real images and Stage-II pseudo images.
"""
from __future__ import annotations

import copy
import gzip
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, Subset, TensorDataset

from derd.config import Data
from derd.registry import Registry


class DataError(FileNotFoundError):
    """A dataset that cannot be found or read, with where it was expected and how to get it."""


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    shape: tuple[int, int, int]  # C, H, W of model inputs
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]


@dataclass
class Splits:
    info: DatasetInfo
    train: Dataset
    val: Dataset
    test: Dataset


class Source(NamedTuple):
    """A registered dataset: its loader and its cheap description (shape, classes, statistics)."""

    load: Callable[[Data], Splits]
    info: Callable[[Data], DatasetInfo]


DATASETS: Registry[Source] = Registry("dataset", "data.name")


def load(cfg: Data) -> Splits:
    """Load the configured dataset's train/val/test splits."""
    return DATASETS[cfg.name].load(cfg)


def info(cfg: Data) -> DatasetInfo:
    """Shape, classes and statistics without loading images (cheap for every dataset)."""
    return DATASETS[cfg.name].info(cfg)


def _channel_stats(x: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    return tuple(x.mean(dim=(0, 2, 3)).tolist()), tuple(x.std(dim=(0, 2, 3)).tolist())


def _stratified_split(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (keep, held_out) with ``fraction`` of each class held out, reproducibly."""
    if fraction == 0:
        return np.arange(len(labels)), np.arange(0)
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(labels))
    keep, held = train_test_split(idx, test_size=fraction, stratify=labels, random_state=seed)
    return np.sort(keep), np.sort(held)


def _carve_val(train: Dataset, labels: np.ndarray, cfg: Data) -> tuple[Dataset, Dataset]:
    """(train, val) from the training data: the stratified, seeded ``data.train_subset`` of it (all when null),
    then a stratified ``data.val_fraction`` of that held out as val."""
    pool = _train_subset(labels, cfg.train_subset, cfg.split_seed)
    keep, val = _stratified_split(labels[pool], cfg.val_fraction, cfg.split_seed + 1)
    return Subset(train, pool[keep].tolist()), Subset(train, pool[val].tolist())


# ---------------------------------------------------------------- digits (offline default)
@lru_cache(maxsize=4)
def _digits_tensors(size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """All 1,797 digits resized to size×size in [0,1] (cached: info() and load() both need them)."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False).clamp(0, 1)
    return x, torch.tensor(bunch.target, dtype=torch.long)


def _digits(cfg: Data) -> Splits:
    x, y = _digits_tensors(cfg.image_size)
    trainval, test = _stratified_split(y.numpy(), cfg.test_fraction, cfg.split_seed)
    full_train = TensorDataset(x[trainval], y[trainval])
    train, val = _carve_val(full_train, y[trainval].numpy(), cfg)
    return Splits(_digits_info(cfg), train, val, TensorDataset(x[test], y[test]))


def _digits_info(cfg: Data) -> DatasetInfo:
    x, _ = _digits_tensors(cfg.image_size)
    mean, std = _channel_stats(x)
    return DatasetInfo("digits", (1, cfg.image_size, cfg.image_size), 10, mean, std)


# ---------------------------------------------------------------- Fashion-MNIST (IDX files)
FASHION_SYSTEM_ROOT = Path("/usr/share/datasets/fashion-mnist")  # Debian's dataset-fashion-mnist
FASHION_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
_DEFAULT_ROOTS = ("data", "auto", "")
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def _fashion_candidates(root: str) -> list[Path]:
    """Folders searched for the IDX files, in order.

    The default root (``data`` / ``auto``) means: the system package's folder, then torchvision's
    layout ``data/FashionMNIST/raw``. Any root may hold the files itself or under ``FashionMNIST/raw``.
    """
    if root in _DEFAULT_ROOTS:
        return [FASHION_SYSTEM_ROOT, Path("data") / "FashionMNIST" / "raw", Path("data")]
    return [Path(root), Path(root) / "FashionMNIST" / "raw"]


def _idx_file(folder: Path, stem: str) -> Path | None:
    for name in (stem, stem + ".gz"):
        if (folder / name).is_file():
            return folder / name
    return None


def _fashion_folder(root: str) -> Path | None:
    for folder in _fashion_candidates(root):
        if all(_idx_file(folder, stem) for stem in FASHION_FILES.values()):
            return folder
    return None


def _fashion_missing(root: str) -> DataError:
    searched = ", ".join(str(p.resolve()) for p in _fashion_candidates(root))
    names = ", ".join(f"{s}[.gz]" for s in FASHION_FILES.values())
    return DataError(
        f"fashion_mnist: the four IDX files ({names}) were not found; searched {searched}. Get them with "
        f"`apt-get install -y dataset-fashion-mnist` (puts them in {FASHION_SYSTEM_ROOT}; keep data.root: data "
        f"or point data.root there), or set data.download: true (torchvision download into "
        f"<data.root>/FashionMNIST/raw, needs internet)."
    )


def read_idx(path: Path) -> np.ndarray:
    """Parse one IDX file (gzipped or not) into an array; a malformed file raises :class:`DataError`."""
    path = Path(path)
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, zlib.error) as exc:  # BadGzipFile is an OSError
        raise DataError(f"{path}: not a readable gzip file ({exc}); delete it and fetch it again") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES or raw[3] == 0:
        raise DataError(f"{path}: not an IDX file (bad magic number {raw[:4].hex() or 'empty'})")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path}: truncated IDX header ({len(raw)} bytes, need {header})")
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    expected = header + int(np.prod(dims)) * dtype.itemsize
    if len(raw) != expected:
        raise DataError(f"{path}: truncated or malformed IDX data ({len(raw)} bytes, header {dims} needs {expected})")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims)


def _fashion_part(folder: Path, images: str, labels: str) -> tuple[np.ndarray, np.ndarray]:
    x_path, y_path = _idx_file(folder, FASHION_FILES[images]), _idx_file(folder, FASHION_FILES[labels])
    x, y = read_idx(x_path), read_idx(y_path)
    if x.ndim != 3 or x.dtype != np.uint8:
        raise DataError(f"{x_path}: expected N×H×W unsigned bytes, got shape {x.shape} of {x.dtype}")
    if y.ndim != 1 or len(y) != len(x):
        raise DataError(f"{y_path}: expected {len(x)} labels (one per image in {x_path.name}), got shape {y.shape}")
    if len(y) and (y.min() < 0 or y.max() > 9):
        raise DataError(f"{y_path}: labels must lie in 0..9, found {int(y.min())}..{int(y.max())}")
    return x, y


@lru_cache(maxsize=4)
def _fashion_tensors(folder: str, size: int) -> tuple[torch.Tensor, ...]:
    """(x_train, y_train, x_test, y_test) in [0,1], resized to size×size (cached: info() and load())."""
    out: list[torch.Tensor] = []
    for images, labels in (("train_images", "train_labels"), ("test_images", "test_labels")):
        x, y = _fashion_part(Path(folder), images, labels)
        xt = torch.from_numpy(x.astype(np.float32) / 255.0).unsqueeze(1)
        if xt.shape[-2:] != (size, size):
            xt = F.interpolate(xt, size=(size, size), mode="bilinear", align_corners=False, antialias=True).clamp(0, 1)
        out += [xt.contiguous(), torch.from_numpy(y.astype(np.int64))]
    return tuple(out)


def fashion_folder(cfg: Data) -> Path:
    folder = _fashion_folder(cfg.root)
    if folder is None and cfg.download:
        import torchvision

        root = Path(cfg.root or "data")
        try:
            torchvision.datasets.FashionMNIST(str(root), train=True, download=True)
            torchvision.datasets.FashionMNIST(str(root), train=False, download=True)
        except (RuntimeError, OSError) as exc:
            raise DataError(f"fashion_mnist: torchvision download into {root.resolve()} failed ({exc}); "
                            f"offline, use `apt-get install -y dataset-fashion-mnist` instead") from None
        folder = _fashion_folder(str(root)) or _fashion_folder(cfg.root)
    if folder is None:
        raise _fashion_missing(cfg.root)
    return folder


def _train_subset(labels: np.ndarray, n: int | None, seed: int) -> np.ndarray:
    """Indices of a stratified, seeded subset of n training examples (all of them when n is None)."""
    if n is None or n >= len(labels):
        return np.arange(len(labels))
    from sklearn.model_selection import train_test_split

    keep, _ = train_test_split(np.arange(len(labels)), train_size=n, stratify=labels, random_state=seed)
    return np.sort(keep)


def _fashion_mnist(cfg: Data) -> Splits:
    x_train, y_train, x_test, y_test = _fashion_tensors(str(fashion_folder(cfg).resolve()), cfg.image_size)
    train, val = _carve_val(TensorDataset(x_train, y_train), y_train.numpy(), cfg)
    return Splits(_fashion_info(cfg), train, val, TensorDataset(x_test, y_test))


def _fashion_info(cfg: Data) -> DatasetInfo:
    x_train, _, _, _ = _fashion_tensors(str(fashion_folder(cfg).resolve()), cfg.image_size)
    mean, std = _channel_stats(x_train)  # all training images (the statistics do not depend on the subset)
    return DatasetInfo("fashion_mnist", (1, cfg.image_size, cfg.image_size), 10, mean, std)


# ---------------------------------------------------------------- CIFAR-10 / CIFAR-100
_CIFAR = {
    "cifar10": ("CIFAR10", 10, (0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616)),
    "cifar100": ("CIFAR100", 100, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}


def _cifar(cfg: Data) -> Splits:
    import torchvision

    cls_name, _, _, _ = _CIFAR[cfg.name]
    cls = getattr(torchvision.datasets, cls_name)
    root = Path(cfg.root)
    tensor = torchvision.transforms.ToTensor()
    try:
        train = cls(str(root), train=True, transform=tensor, download=cfg.download)
        test = cls(str(root), train=False, transform=tensor, download=cfg.download)
    except RuntimeError as exc:
        raise DataError(
            f"{cfg.name}: no dataset under data.root={root.resolve()} ({exc}). Set data.download: true "
            f"on a machine with internet access, or place the extracted python-version archive "
            f"({cls.base_folder}/) under {root}."
        ) from None
    train_set, val_set = _carve_val(train, np.asarray(train.targets), cfg)
    return Splits(_cifar_info(cfg), train_set, val_set, test)


def _cifar_info(cfg: Data) -> DatasetInfo:
    _, classes, mean, std = _CIFAR[cfg.name]
    return DatasetInfo(cfg.name, (3, 32, 32), classes, mean, std)


# ---------------------------------------------------------------- ImageNet-100 (ImageFolder)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
IMAGENET100_CLASSES = "classes.txt"


def _imagenet100(cfg: Data) -> Splits:
    import torchvision
    from torchvision import transforms as T

    root = Path(cfg.root)
    class_file = root / IMAGENET100_CLASSES
    hint = (
        f"expected {root}/train/<wnid>/*.JPEG, {root}/val/<wnid>/*.JPEG and {class_file} listing the "
        "100 class folder names (one per line), e.g. the CMC ImageNet-100 subset of ILSVRC-2012"
    )
    if not class_file.is_file() or not (root / "train").is_dir() or not (root / "val").is_dir():
        raise DataError(f"imagenet100: dataset not found under data.root={root.resolve()}; {hint}")
    wanted = [c.strip() for c in class_file.read_text().splitlines() if c.strip()]
    size = cfg.image_size
    train_tf = T.Compose([T.RandomResizedCrop(size), T.ToTensor()])
    test_tf = T.Compose([T.Resize(int(size * 256 / 224)), T.CenterCrop(size), T.ToTensor()])

    class Subset100(torchvision.datasets.ImageFolder):
        def find_classes(self, directory):
            missing = [c for c in wanted if not (Path(directory) / c).is_dir()]
            if missing:
                raise DataError(f"imagenet100: class folders {missing[:3]} missing in {directory}; {hint}")
            return wanted, {c: i for i, c in enumerate(wanted)}

    train = Subset100(str(root / "train"), transform=train_tf)
    test = Subset100(str(root / "val"), transform=test_tf)
    train_set, val_set = _carve_val(train, np.asarray(train.targets), cfg)
    # val is carved from the training folder but evaluated like test: the deterministic eval transform
    # (one folder scan: a shallow copy of the training ImageFolder with the other transform)
    val_set = Subset(_with_transform(train, test_tf), val_set.indices)
    return Splits(_imagenet_info(cfg), train_set, val_set, test)


def _with_transform(folder, transform):
    """A shallow copy of a torchvision ImageFolder reading the same files through ``transform``."""
    from torchvision.datasets.vision import StandardTransform

    out = copy.copy(folder)
    out.transform, out.transforms = transform, StandardTransform(transform, folder.target_transform)
    return out


def _imagenet_info(cfg: Data) -> DatasetInfo:
    root = Path(cfg.root) / IMAGENET100_CLASSES
    classes = len([c for c in root.read_text().splitlines() if c.strip()]) if root.is_file() else 100
    return DatasetInfo("imagenet100", (3, cfg.image_size, cfg.image_size), classes, IMAGENET_MEAN, IMAGENET_STD)


DATASETS.register("digits")(Source(_digits, _digits_info))
DATASETS.register("fashion_mnist")(Source(_fashion_mnist, _fashion_info))
DATASETS.register("cifar10")(Source(_cifar, _cifar_info))
DATASETS.register("cifar100")(Source(_cifar, _cifar_info))
DATASETS.register("imagenet100")(Source(_imagenet100, _imagenet_info))


# ---------------------------------------------------------------- augmentation and batching
def augment_batch(x: torch.Tensor, padding: int, hflip: bool, generator: torch.Generator | None = None,
                  part: tuple[int, int] = (0, 1)) -> torch.Tensor:
    """Random crop after zero padding, and optional horizontal flip, per image of a batch.

    Vectorised, on ``x``'s device: the offsets (and flip coins) are drawn from ``generator`` on its own
    device (CPU by default: the draws of a seeded CPU generator are the same whatever ``x``'s device),
    then every crop is gathered at once by advanced indexing. ``part=(i, k)``: ``x`` holds rows ``i::k``
    of a batch k times larger (one rank's share); the draws are the whole batch's, rows ``i::k`` used."""
    n, c, h, w = x.shape
    draw_on = generator.device if generator is not None else torch.device("cpu")
    i, k = part

    def draw(make) -> torch.Tensor:
        return make((n * k,))[i::k].to(x.device)

    if padding > 0:
        padded = F.pad(x, (padding,) * 4)
        dx = draw(lambda shape: torch.randint(0, 2 * padding + 1, shape, generator=generator, device=draw_on))
        dy = draw(lambda shape: torch.randint(0, 2 * padding + 1, shape, generator=generator, device=draw_on))
        rows = (dy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]  # n,1,h,1
        cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, None, :]  # n,1,1,w
        batch = torch.arange(n, device=x.device)[:, None, None, None]
        channel = torch.arange(c, device=x.device)[None, :, None, None]
        x = padded[batch, channel, rows, cols]
    if hflip:
        flip = draw(lambda shape: torch.rand(shape, generator=generator, device=draw_on)) < 0.5
        x = torch.where(flip.view(-1, 1, 1, 1), x.flip(3), x)
    return x


def loader(dataset: Dataset, batch_size: int, shuffle: bool, seed: int = 0, num_workers: int = 0,
           pin_memory: bool | None = None, sampler: torch.utils.data.Sampler | None = None) -> torch.utils.data.DataLoader:
    """Seeded batches of ``dataset``: ``num_workers`` worker processes (``data.num_workers``; kept alive
    between epochs when > 0), page-locked batches for fast host-to-GPU copies when CUDA is available
    (``pin_memory=None``) or asked; ``sampler`` (a rank's shard) replaces the seeded shuffling."""
    g = torch.Generator().manual_seed(seed)
    pin = torch.cuda.is_available() if pin_memory is None else pin_memory
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=shuffle and sampler is None,
                                       sampler=sampler, generator=g, drop_last=False,
                                       num_workers=num_workers, pin_memory=pin, persistent_workers=num_workers > 0)


def _stack(dataset: Dataset, indices) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = zip(*(dataset[int(i)] for i in indices))
    return torch.stack(xs), torch.as_tensor(ys)


def first_n(dataset: Dataset, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``n`` examples of a dataset as two stacked tensors. Only those ``n`` are read (an
    ImageFolder decodes n files), never the whole split."""
    return _stack(dataset, range(min(n, len(dataset))))


SUBSET_SEED = 0  # the evaluation subsets' fixed seed: every run, stage and experiment evaluates the same examples


def labels_of(dataset: Dataset) -> np.ndarray:
    """Every example's label, read from what the dataset keeps (``targets`` of torchvision's datasets, a
    :class:`TensorDataset`'s second tensor, through :class:`Subset` indices) without decoding an image; a
    dataset that keeps none is read item by item."""
    if isinstance(dataset, Subset):
        return labels_of(dataset.dataset)[np.asarray(dataset.indices, dtype=np.int64)]
    if isinstance(dataset, TensorDataset) and len(dataset.tensors) > 1:
        return dataset.tensors[1].numpy()
    targets = getattr(dataset, "targets", None)
    if targets is not None:
        return np.asarray(targets)
    return np.asarray([int(dataset[i][1]) for i in range(len(dataset))])


def stratified_order(labels: np.ndarray, n: int, seed: int = SUBSET_SEED) -> list[int]:
    """Indices of ``n`` examples, classes as balanced as ``n`` allows: each class's examples in a seeded
    random order, then taken round-robin (rank 0 of every class in class order, then rank 1, ...). So any
    prefix is balanced too (counts differ by at most 1 while every class has examples left), a smaller
    ``n`` picks a prefix of a larger one's, and a class-sorted split is covered as evenly as a shuffled one."""
    rng = np.random.default_rng(seed)
    per_class = [rng.permutation(np.flatnonzero(labels == c)) for c in np.unique(labels)]
    order: list[int] = []
    for rank in range(max((len(p) for p in per_class), default=0)):
        if len(order) >= n:
            break
        order += [int(p[rank]) for p in per_class if rank < len(p)]
    return order[:n]


def stratified_n(dataset: Dataset, n: int, seed: int = SUBSET_SEED) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed stratified subset of ``n`` examples (:func:`stratified_order`; the evaluation's examples, the
    teachers' check, the Stage-II monitor) as two stacked tensors. Only those ``n`` images are read when the
    dataset keeps its labels (:func:`labels_of`)."""
    return _stack(dataset, stratified_order(labels_of(dataset), n, seed))
