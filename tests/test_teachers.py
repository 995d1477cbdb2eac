"""Teachers: a micro-config trains both experts; checkpoints load safely or are refused clearly."""
from __future__ import annotations

import pytest
import torch

from derd import artifacts, config, teachers
from derd.runtime import Paths

MICRO = {
    "teachers": {
        "natural": {"arch": "small_cnn", "width": 8, "train": {"epochs": 6, "batch_size": 32, "lr": 0.1}},
        "robust": {"arch": "small_cnn", "width": 8, "method": "pgd_at", "train": {"epochs": 6, "batch_size": 32, "lr": 0.1},
                   "attack": {"eps": 0.1, "steps": 3, "step_size": 0.04}},
    },
}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("teachers")
    cfg = config.parse(MICRO)
    return cfg, root, teachers.run(cfg, root)


def test_both_teachers_train_and_robust_beats_natural_under_pgd(trained):
    cfg, root, metrics = trained
    assert metrics["natural"]["clean_acc"] > 0.8
    assert metrics["robust"]["pgd_acc"] > metrics["natural"]["pgd_acc"] + 0.1
    side = artifacts.read_json(Paths(root).teachers / "robust.json")
    assert side["arch"] == "small_cnn" and side["num_classes"] == 10 and side["source"] == "trained:pgd_at"
    assert side["metrics"]["pgd_acc"] == metrics["robust"]["pgd_acc"]
    assert "torch" in side["versions"]
    assert artifacts.read_json(root / "metrics" / "teachers.json") == {  # the accuracies; the rest: sidecars
        role: {k: metrics[role][k] for k in ("clean_acc", "pgd_acc")} for role in metrics}


def test_teacher_round_trips_and_is_frozen(trained):
    cfg, root, _ = trained
    model = teachers.load_teacher(cfg, "natural", root)
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    x = torch.rand(4, 1, 16, 16)
    again = teachers.load_teacher(cfg, "natural", root)
    torch.testing.assert_close(model(x), again(x))


@pytest.mark.parametrize("layout", ["state_dict", "model_state_dict", "module_prefix", "bare_net"])
def test_foreign_layouts_are_mapped(trained, tmp_path, layout):
    cfg, root, _ = trained
    state = artifacts.load_tensors(Paths(root).teacher("natural"))
    if layout == "module_prefix":
        obj = {f"module.{k}": v for k, v in state.items()}
    elif layout == "bare_net":
        obj = {k.removeprefix("net."): v for k, v in state.items() if k.startswith("net.")}
    else:
        obj = {layout: state, "epoch": 3}
    path = tmp_path / "foreign.pt"
    torch.save(obj, path)
    model = teachers.build_for("small_cnn", 8, teachers.datasets.info(cfg.data))
    artifacts.load_into(model, path)
    torch.testing.assert_close(model.state_dict()["net.fc.weight"], state["net.fc.weight"])


def test_user_checkpoint_is_used_instead_of_training(trained, tmp_path):
    cfg, root, metrics = trained
    raw = config.parse(MICRO).model_dump()
    raw["teachers"]["natural"]["checkpoint"] = str(Paths(root).teacher("natural"))
    cfg2 = config.parse(raw)
    splits = teachers.datasets.load(cfg2.data)
    got = teachers.prepare_teacher(cfg2, "natural", splits, tmp_path)
    assert got["clean_acc"] == metrics["natural"]["clean_acc"]
    assert artifacts.read_json(Paths(tmp_path).teachers / "natural.json")["source"].startswith("checkpoint:")


def test_pickled_full_model_is_refused(trained, tmp_path):
    cfg, _, _ = trained
    model = teachers.build_for("small_cnn", 8, teachers.datasets.info(cfg.data))
    path = tmp_path / "full_model.pt"
    torch.save(model, path)
    with pytest.raises(artifacts.CheckpointError, match="refusing to unpickle"):
        artifacts.load_into(model, path)


def test_shape_mismatch_names_file_and_layer(trained, tmp_path):
    cfg, root, _ = trained
    wider = teachers.build_for("small_cnn", 16, teachers.datasets.info(cfg.data))
    with pytest.raises(artifacts.CheckpointError) as err:
        artifacts.load_into(wider, Paths(root).teacher("natural"))
    text = str(err.value)
    assert "natural.pt" in text and "shape mismatch" in text and "checkpoint (8," in text and "model (16," in text


def test_wrong_architecture_and_corrupted_file(trained, tmp_path):
    cfg, root, _ = trained
    resnet = teachers.build_for("small_resnet", 8, teachers.datasets.info(cfg.data))
    with pytest.raises(artifacts.CheckpointError, match="missing keys"):
        artifacts.load_into(resnet, Paths(root).teacher("natural"))
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"\x00not a checkpoint")
    with pytest.raises(artifacts.CheckpointError, match="corrupted"):
        artifacts.load_tensors(junk)
    with pytest.raises(artifacts.CheckpointError, match="not found"):
        artifacts.load_tensors(tmp_path / "absent.pt")


def test_safetensors_checkpoints_load(trained, tmp_path):
    from safetensors.torch import save_file

    cfg, root, _ = trained
    state = artifacts.load_tensors(Paths(root).teacher("natural"))
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "t.safetensors")
    model = teachers.build_for("small_cnn", 8, teachers.datasets.info(cfg.data))
    artifacts.load_into(model, tmp_path / "t.safetensors")
    original = teachers.load_teacher(cfg, "natural", root)
    x = torch.rand(16, *teachers.datasets.info(cfg.data).shape)
    torch.testing.assert_close(model.eval()(x), original(x), rtol=0, atol=0)

