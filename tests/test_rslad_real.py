"""rslad_real: RSLAD from T_rob on the real training split (the data-ful ceiling row), on a tiny digits config."""
from __future__ import annotations

import pytest
import torch

from derd import config, distill
from derd import data as datasets
from derd.artifacts import load_tensors, read_json, save_artifact
from derd.report.tables import METHOD_LABELS, table_rows
from derd.runtime import Paths
from derd.teachers import build_for


def tiny(**stage2):
    net = {"arch": "small_cnn", "width": 4}
    return config.parse({
        "device": "cpu", "data": {"image_size": 8},
        "teachers": {"natural": net, "robust": net},
        "stage2": {"methods": ["rslad_real"], "seeds": [0], "student": net, "iterations": 2, "k_student": 2,
                   "batch_size": 8, "attack": {"eps": 0.1, "steps": 2, "step_size": 0.05},
                   "checkpoint_every": 1, "log_every": 1, **stage2},
    })


@pytest.fixture
def root(tmp_path):
    """A random tiny robust teacher (the only model rslad_real reads) in the artifact layout."""
    info = datasets.info(tiny().data)
    torch.manual_seed(0)
    model = build_for("small_cnn", 4, info)
    save_artifact(Paths(tmp_path).teacher("robust"), model.state_dict(),
                  {"role": "robust", "arch": "small_cnn", "num_classes": info.num_classes})
    return tmp_path


def test_trains_on_real_data_and_says_it_is_data_ful(root):
    side = distill.train_student(tiny(), "rslad_real", 0, root)
    path = Paths(root).student("rslad_real", 0)
    assert path.is_file() and read_json(path.with_suffix(".json"))["reading"] == side["reading"]
    reading = side["reading"]
    assert "REAL training data" in reading["pseudo_data"] and "not data-free" in reading["pseudo_data"]
    assert reading["generator"] == "none" and reading["generator_optimiser"] == "none"
    assert reading["student_loss"].startswith("RSLAD")
    assert "KL(σ_τ(T_rob(x)) ‖ σ(S(x_adv)))" in reading["adversarial_examples"]  # RSLAD's inner problem, not TRADES'
    assert side["teachers_used"] == ["robust"] and side["student_steps"] == 4
    assert side["final"]["iteration"] == 2 and side["final"]["s_loss"] >= 0
    assert not (Paths(root).checkpoints / "distill_rslad_real-seed0.pt").exists()
    assert "data-ful" in METHOD_LABELS["rslad_real"]
    row = {"model": "rslad_real-seed0", "kind": "student", "method": "rslad_real", "seed": 0, "Clean": 50.0}
    assert table_rows({"rows": [row]})[0].label == METHOD_LABELS["rslad_real"]


def test_batches_are_a_seeded_walk_over_the_training_split(root):
    cfg = tiny(augment=False, batch_size=500)
    ctx = distill.Context(cfg, distill.get_method("rslad_real"), 0, root, torch.device("cpu"))
    method = distill.get_method("rslad_real")(ctx)
    train = datasets.load(cfg.data).train
    seen = [method.next_indices() for _ in range(len(train) // 500 + 1)]
    first_epoch = torch.cat(seen)[: len(train)]
    assert sorted(first_epoch.tolist()) == list(range(len(train)))  # every image once per epoch
    ctx2 = distill.Context(cfg, distill.get_method("rslad_real"), 0, root, torch.device("cpu"))
    again = distill.get_method("rslad_real")(ctx2)
    x = again.student_batch()
    expected = torch.stack([train[i][0] for i in first_epoch[:500].tolist()])
    assert torch.equal(x, expected)  # same seed, same batches; real images, untouched without augment


def test_interrupted_run_resumes_to_the_same_student(root, monkeypatch):
    cfg = tiny()
    distill.train_student(cfg, "rslad_real", 0, root)
    reference = load_tensors(Paths(root).student("rslad_real", 0))
    cls = distill.get_method("rslad_real")
    original = cls.student_step

    def crash_in_iteration_1(self, it):
        if it == 1:
            raise KeyboardInterrupt
        return original(self, it)

    Paths(root).student("rslad_real", 0).unlink()
    monkeypatch.setattr(cls, "student_step", crash_in_iteration_1)
    with pytest.raises(KeyboardInterrupt):
        distill.train_student(cfg, "rslad_real", 0, root)
    assert (Paths(root).checkpoints / "distill_rslad_real-seed0.pt").is_file()
    monkeypatch.setattr(cls, "student_step", original)
    resumed = distill.train_student(cfg, "rslad_real", 0, root)
    state = load_tensors(Paths(root).student("rslad_real", 0))
    assert resumed["final"]["iteration"] == 2
    assert all(torch.equal(reference[k], state[k]) for k in reference)
