"""Every entry of every registry (derd/registry.py): build it, one forward or step, and a round trip
of what it saves. The config accepts exactly the registered names."""
from __future__ import annotations

import hashlib
import pickle
import sys

import numpy as np
import pytest
import torch
from test_data import _write_cifar, _write_fashion, _write_imagefolder
from test_distill import micro_config, root  # noqa: F401  (the fixture: tiny teachers and Stage-I artifacts)

from derd import config, data, distill
from derd.artifacts import (
    load_into,
    load_tensors,
    read_json,
    save_artifact,
    save_tensors,
    sidecar_path,
)
from derd.attacks import ATTACKS
from derd.config import Data
from derd.distill.aggregation import AGGREGATIONS, GradientAggregator
from derd.models import ARCHS, GENERATORS, build_generator, build_model
from derd.registry import HOMES, names_of, registry

EXPECTED = {  # the names params.yaml accepted before the registries were the source of truth
    "dataset": {"digits", "fashion_mnist", "cifar10", "cifar100", "imagenet100"},
    "architecture": {"small_cnn", "small_resnet", "resnet18", "resnet34", "preact_resnet18", "wrn34_10",
                     "mobilenet_v2", "resnet18_imagenet", "resnet50_imagenet"},
    "generator": {"dafl", "dcgan"},
    "method": {"derd", "derd_inv", "derd_no_tnat", "dafl", "dfad", "zskt", "cmi", "dfard", "ferd", "rslad_real"},
    "aggregation": {"sga", "sum", "pcgrad", "graddrop", "mtard", "agree", "gradrefine"},
    "attack": {"fgsm", "pgd", "kl_pgd", "cw"},
}
SIZE = {"resnet18_imagenet": 32, "resnet50_imagenet": 32}  # ImageNet stems downsample 32x
GENERATOR_SHAPE = {"dafl": (1, 8, 8), "dcgan": (3, 14, 14)}


def test_every_kind_has_its_registry_and_the_expected_names():
    assert set(HOMES) == set(EXPECTED)
    for kind, names in EXPECTED.items():
        assert set(names_of(kind)) == names, kind


@pytest.mark.parametrize("kind,key", [("dataset", "data.name"), ("architecture", "teachers.robust.arch"),
                                      ("generator", "stage1.generator.arch"), ("method", "stage2.methods.0"),
                                      ("aggregation", "stage2.aggregation")])
def test_config_names_come_from_the_registry(kind, key, monkeypatch):
    *sections, field = key.split(".")
    raw = value = {}
    for part in sections[:-1] if field == "0" else sections:
        value = value.setdefault(part, {})
    name = "brand_new"
    if field == "0":
        value[sections[-1]] = [name]
    else:
        value[field] = name
    first = min(EXPECTED[kind])
    with pytest.raises(config.ConfigError, match=rf"{key}: must be one of .*'{first}'"):
        config.parse(raw)
    entry = registry(kind)[first]
    monkeypatch.setitem(registry(kind)._entries, name, entry)  # a new entry is accepted without another edit
    if kind != "generator":  # a generator's image sizes are a separate rule
        config.parse(raw)


def test_a_traced_process_keeps_no_module_imported_only_to_validate_names(monkeypatch):
    """The dependency test reads a stage's imported modules: validation must not add any."""
    monkeypatch.setattr(config, "_TRACED", True)
    gone = [m for m in sys.modules if m == "derd.distill" or m.startswith("derd.distill.")]
    saved = {m: sys.modules.pop(m) for m in gone}
    try:
        config.parse({"stage2": {"methods": ["derd"], "aggregation": "sum"}})
        assert not any(m == "derd.distill" or m.startswith("derd.distill.") for m in sys.modules)
    finally:
        sys.modules.update(saved)


def test_a_name_registered_twice_is_refused():
    with pytest.raises(ValueError, match="registered twice"):
        ARCHS.register("small_cnn")(lambda **kw: None)


# ---------------------------------------------------------------- architectures and generators
@pytest.mark.parametrize("arch", ARCHS.names())
def test_architecture_builds_forwards_and_round_trips(arch, tmp_path):
    torch.manual_seed(0)
    size = SIZE.get(arch, 8)
    model = build_model(arch, 3, 5, (0.5,) * 3, (0.25,) * 3, image_size=size, width=4).eval()
    x = torch.rand(2, 3, size, size)
    logits = model(x)
    assert logits.shape == (2, 5) and torch.isfinite(logits).all()
    path = save_artifact(tmp_path / f"{arch}.pt", model.state_dict(), {"arch": arch, "width": 4})
    again = build_model(arch, 3, 5, (0.5,) * 3, (0.25,) * 3, image_size=size, width=4).eval()
    load_into(again, path)
    assert torch.equal(again(x), logits) and read_json(sidecar_path(path))["arch"] == arch


@pytest.mark.parametrize("arch", GENERATORS.names())
def test_generator_builds_forwards_and_round_trips(arch, tmp_path):
    torch.manual_seed(0)
    shape = GENERATOR_SHAPE[arch]
    g = build_generator(arch, 6, shape).eval()
    z = torch.randn(3, 6)
    x = g(z)
    assert x.shape == (3, *shape) and 0 <= x.min() and x.max() <= 1
    path = save_artifact(tmp_path / f"{arch}.pt", g.state_dict(), {"arch": arch, "nz": 6, "shape": list(shape)})
    again = build_generator(arch, 6, shape).eval()
    load_into(again, path)
    assert torch.equal(again(z), x)


# ---------------------------------------------------------------- datasets (embedded or fake files)
def _write_cifar100(folder_root, monkeypatch):
    """Fake CIFAR-100 python files, with torchvision pointed at their checksums."""
    import torchvision

    folder = folder_root / "cifar-100-python"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    md5 = {}
    for name, n in (("train", 300), ("test", 10), ("meta", 0)):  # 3 per class: a stratified val split
        payload = ({"fine_label_names": [f"c{i}" for i in range(100)]} if name == "meta" else
                   {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), "fine_labels": [i % 100 for i in range(n)]})
        (folder / name).write_bytes(pickle.dumps(payload))
        md5[name] = hashlib.md5((folder / name).read_bytes()).hexdigest()
    cls = torchvision.datasets.CIFAR100
    monkeypatch.setattr(cls, "train_list", [["train", md5["train"]]])
    monkeypatch.setattr(cls, "test_list", [["test", md5["test"]]])
    monkeypatch.setattr(cls, "meta", {**cls.meta, "md5": md5["meta"]})


def _dataset_cfg(name, tmp_path, monkeypatch) -> Data:
    import torchvision

    if name == "fashion_mnist":
        _write_fashion(tmp_path / "FashionMNIST" / "raw", n_train=60, n_test=10)
        return Data(name=name, root=str(tmp_path), image_size=16, val_fraction=0.2)
    if name == "cifar10":
        train, test, meta = _write_cifar(tmp_path, n_train=50)
        for attr, value in (("train_list", train), ("test_list", test), ("meta", meta)):
            monkeypatch.setattr(torchvision.datasets.CIFAR10, attr, value)
    if name == "cifar100":
        _write_cifar100(tmp_path, monkeypatch)
        return Data(name=name, root=str(tmp_path), val_fraction=0.4)
    if name == "imagenet100":
        _write_imagefolder(tmp_path, ["n01", "n02"], per_class=4)
        return Data(name=name, root=str(tmp_path), image_size=32, val_fraction=0.25)
    return Data(name=name, root=str(tmp_path), image_size=8, val_fraction=0.2)  # digits: embedded in scikit-learn


@pytest.mark.parametrize("name", data.DATASETS.names())
def test_dataset_loads_its_splits_and_matches_its_info(name, tmp_path, monkeypatch):
    cfg = _dataset_cfg(name, tmp_path, monkeypatch)
    if name == "fashion_mnist":
        monkeypatch.setattr(data, "fashion_folder", lambda c: tmp_path / "FashionMNIST" / "raw")
    splits, info = data.load(cfg), data.info(cfg)
    assert splits.info == info and info.name == name
    for split in (splits.train, splits.val, splits.test):
        x, y = split[0]
        assert tuple(x.shape) == info.shape and 0 <= x.min() and x.max() <= 1 and 0 <= int(y) < info.num_classes


# ---------------------------------------------------------------- Stage-II methods and aggregations
@pytest.mark.parametrize("method", distill.METHODS.names())
def test_method_takes_one_step_and_its_state_round_trips(method, root, tmp_path):  # noqa: F811
    cfg = micro_config(methods=[method])
    cls = distill.get_method(method)
    ctx = distill.Context(cfg, cls, 0, root, torch.device("cpu"))
    instance = cls(ctx)
    logs = {**instance.generator_step(0), **instance.student_step(0)}
    assert logs and all(np.isfinite(float(v)) for v in logs.values())
    save_tensors(tmp_path / "state.pt", instance.state_dict())
    instance.load_state_dict(load_tensors(tmp_path / "state.pt"))
    for hook in instance.hooks():
        hook.close()


@pytest.mark.parametrize("strategy", AGGREGATIONS.names())
def test_aggregation_aggregates_and_its_state_round_trips(strategy, tmp_path):
    torch.manual_seed(0)
    g_nat, g_rob = [torch.randn(4, 3), torch.randn(5)], [torch.randn(4, 3), torch.randn(5)]
    agg = GradientAggregator(strategy, 0.5, seed=1)
    out, _ = agg(g_nat, g_rob, (1.0, 2.0))
    assert [o.shape for o in out] == [g.shape for g in g_nat] and all(torch.isfinite(o).all() for o in out)
    save_tensors(tmp_path / "agg.pt", agg.state_dict())
    again = GradientAggregator(strategy, 0.5, seed=99)
    again.load_state_dict(load_tensors(tmp_path / "agg.pt"))
    assert all(torch.equal(a, b) for a, b in zip(agg(g_nat, g_rob, (1.0, 1.0))[0], again(g_nat, g_rob, (1.0, 1.0))[0]))


# ---------------------------------------------------------------- attacks
@pytest.mark.parametrize("name", ATTACKS.names())
def test_attack_stays_in_the_ball_and_restores_the_mode(name):
    torch.manual_seed(0)
    model = build_model("small_cnn", 1, 3, (0.5,), (0.25,), image_size=8, width=4).train()
    x, y = torch.rand(4, 1, 8, 8), torch.tensor([0, 1, 2, 0])
    x_adv = ATTACKS[name](model, eps=0.1)(x, y)
    assert x_adv.shape == x.shape and (x_adv - x).abs().max() <= 0.1 + 1e-6
    assert 0 <= x_adv.min() and x_adv.max() <= 1 and model.training
