"""Stage-II loop, DERD and the baselines on a micro configuration (random tiny teachers and generators)."""
from __future__ import annotations

import csv
import json

import pytest
import torch

from derd import config, distill
from derd import data as datasets
from derd.artifacts import (
    CheckpointError,
    load_tensors,
    read_json,
    save_artifact,
    save_tensors,
)
from derd.models import build_generator
from derd.runtime import Paths
from derd.teachers import build_for


def micro_config(**stage2):
    s2 = {
        "methods": ["derd"], "seeds": [0], "student": {"arch": "small_cnn", "width": 4},
        "iterations": 3, "k_student": 2, "batch_size": 8, "attack": {"eps": 0.1, "steps": 2, "step_size": 0.05},
        "checkpoint_every": 2, "log_every": 1,
        "baselines": {"cmi": {"bank_size": 32, "head_dim": 8}},
        **stage2,
    }
    net = {"arch": "small_cnn", "width": 4}
    return config.parse({
        "device": "cpu", "data": {"image_size": 8},
        "teachers": {"natural": net, "robust": net},
        "stage1": {"generator": {"nz": 8}, "inversion": {"pool_size": 16}},
        "stage2": s2,
    })


@pytest.fixture
def root(tmp_path):
    """Random tiny teachers, Stage-I generators and an inversion pool in the artifact layout."""
    cfg = micro_config()
    info = datasets.info(cfg.data)
    paths = Paths(tmp_path)
    torch.manual_seed(0)
    for role in ("natural", "robust"):
        model = build_for("small_cnn", 4, info)
        with torch.no_grad():  # non-trivial BN running statistics
            model.train()
            model(torch.rand(32, *info.shape))
        save_artifact(paths.teacher(role), model.state_dict(),
                      {"role": role, "arch": "small_cnn", "num_classes": info.num_classes})
        g = build_generator("dafl", 8, info.shape)
        save_artifact(paths.generator(role), g.state_dict(), {"arch": "dafl", "nz": 8, "shape": list(info.shape)})
    save_tensors(paths.inversion_pool, {"images": torch.rand(16, *info.shape)})
    return tmp_path


def snapshot(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_one_derd_iteration_updates_generator_and_student_never_a_teacher(root):
    cfg = micro_config()
    ctx = distill.Context(cfg, distill.get_method("derd"), 0, root, torch.device("cpu"))
    method = distill.get_method("derd")(ctx)
    teachers = {r: snapshot(t) for r, t in ctx.teachers.items()}
    g0, s0 = snapshot(ctx.generator), snapshot(ctx.student)
    g_logs = method.generator_step(0)
    g1 = snapshot(ctx.generator)
    assert not same(g0, g1)
    assert same(s0, snapshot(ctx.student)) or all(  # only the student's BN buffers may move in the G step
        torch.equal(s0[k], v) for k, v in snapshot(ctx.student).items() if "running" not in k and "num_batches" not in k)
    s_logs = method.student_step(0)
    s1 = snapshot(ctx.student)
    assert any(not torch.equal(s0[k], s1[k]) for k in s0 if k.endswith("weight"))
    for role, t in ctx.teachers.items():
        assert same(teachers[role], snapshot(t)), f"{role} teacher changed"
        assert not t.training
    assert {"g_loss", "g_discrepancy", "g_oh", "g_bn"} <= set(g_logs)
    assert {"L_nat", "L_rob", "cos_nat_rob", "conflict_frac", "w_nat", "w_rob"} <= set(s_logs)


def test_adversarial_pseudo_examples_stay_in_the_ball_and_restore_the_mode(root):
    cfg = micro_config(attack={"eps": 0.05, "steps": 3, "step_size": 0.04})
    ctx = distill.Context(cfg, distill.get_method("derd"), 0, root, torch.device("cpu"))
    distill.get_method("derd")(ctx)
    x = ctx.pseudo_batch()
    ctx.student.train()
    x_adv = ctx.adversarial(x)
    assert ctx.student.training
    assert (x_adv - x).abs().max() <= 0.05 + 1e-6
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    assert not torch.equal(x_adv, x)


@pytest.mark.parametrize("method", distill.registered_methods())
def test_every_registered_method_trains_a_student(root, method):
    cfg = micro_config(methods=[method])
    side = distill.train_student(cfg, method, 0, root)
    paths = Paths(root)
    assert paths.student(method, 0).is_file()
    meta = read_json(paths.student(method, 0).with_suffix(".json"))
    assert meta["method"] == method and meta["seed"] == 0 and meta["arch"] == "small_cnn"
    assert meta["params_hash"] == distill.params_hash(cfg) and meta["reading"] == side["reading"]
    assert meta["num_classes"] == 10 and meta["runtime_seconds"] >= 0
    rows = list(csv.DictReader((paths.plots / "distill" / f"{method}-seed0.csv").open()))
    assert [float(r["iteration"]) for r in rows] == [1.0, 2.0, 3.0]
    assert not (paths.checkpoints / f"distill_{method}-seed0.pt").exists()
    if method == "dfard":
        assert meta["label"] == "DFARD-style"


def test_run_writes_the_stage_summary(root):
    cfg = micro_config(methods=["derd", "dfad"], seeds=[0, 1], iterations=1, k_student=1)
    out = distill.run(cfg, root)
    assert set(out) == {"derd-seed0", "derd-seed1", "dfad-seed0", "dfad-seed1"}
    for unit, summary in out.items():
        assert read_json(Paths(root).metrics / "distill" / f"{unit}.json") == distill.finals(summary["final"])


def test_interrupted_run_resumes_to_the_same_student(root, tmp_path_factory, monkeypatch):
    cfg = micro_config(iterations=4, checkpoint_every=2)
    reference = distill.train_student(cfg, "derd", 0, root)
    ref_state = load_tensors(Paths(root).student("derd", 0))

    original = distill.get_method("derd").student_step
    calls = {"n": 0}

    def crash_at_iteration_3(self, it):
        if it == 3:
            raise KeyboardInterrupt
        calls["n"] += 1
        return original(self, it)

    monkeypatch.setattr(distill.get_method("derd"), "student_step", crash_at_iteration_3)
    Paths(root).student("derd", 0).unlink()
    with pytest.raises(KeyboardInterrupt):
        distill.train_student(cfg, "derd", 0, root)
    assert (Paths(root).checkpoints / "distill_derd-seed0.pt").is_file()
    monkeypatch.setattr(distill.get_method("derd"), "student_step", original)
    resumed = distill.train_student(cfg, "derd", 0, root)
    state = load_tensors(Paths(root).student("derd", 0))
    assert all(torch.equal(ref_state[k], state[k]) for k in ref_state)
    assert resumed["final"]["iteration"] == reference["final"]["iteration"] == 4
    assert not (Paths(root).checkpoints / "distill_derd-seed0.pt").exists(), "a finished student drops its state"

    # other code, or another teacher file, never resumes a state
    monkeypatch.setattr(distill.get_method("derd"), "student_step", crash_at_iteration_3)
    with pytest.raises(KeyboardInterrupt):
        distill.train_student(cfg, "derd", 0, root)
    monkeypatch.setattr(distill.get_method("derd"), "student_step", original)
    monkeypatch.setattr("derd.resume.code_hash", lambda *parts: "edited-code")
    calls["n"] = 0
    monkeypatch.setattr(distill.get_method("derd"), "student_step",
                        lambda self, it: calls.__setitem__("n", calls["n"] + 1) or original(self, it))
    distill.train_student(cfg, "derd", 0, root)
    assert calls["n"] == 4 * cfg.stage2.k_student, "the stale state was discarded: all iterations ran"


def test_nan_stops_the_run_loudly(root, monkeypatch):
    monkeypatch.setattr("derd.distill.derd.kd_kl", lambda *a, **k: torch.tensor(float("nan"), requires_grad=True))
    with pytest.raises(FloatingPointError, match="L_nat"):
        distill.train_student(micro_config(), "derd", 0, root)


def test_missing_stage1_artifacts_are_named(root):
    Paths(root).inversion_pool.unlink()
    with pytest.raises(CheckpointError, match="inversion_pool"):
        distill.train_student(micro_config(methods=["derd_inv"]), "derd_inv", 0, root)
    Paths(root).generator("robust").with_suffix(".json").unlink()
    with pytest.raises(CheckpointError, match="derd warmup"):
        distill.train_student(micro_config(methods=["derd_no_tnat"]), "derd_no_tnat", 0, root)


def test_unknown_method_is_named():
    with pytest.raises(KeyError, match="stage2.methods"):
        distill.get_method("derd_plus")


def test_monitor_adds_curve_columns_only(root):
    cfg = micro_config(iterations=2, monitor_every=2, monitor_split="val", monitor_examples=20, monitor_pgd_steps=1)
    side = distill.train_student(cfg, "derd", 0, root)
    rows = list(csv.DictReader((root / side["curves"]).open()))
    assert rows[0]["monitor_clean"] == "" and 0 <= float(rows[1]["monitor_clean"]) <= 1
    assert "monitor_pgd" in side["final"] and side["selection"].startswith("last iterate")


@pytest.mark.parametrize("reading", [
    {"aggregation": "pcgrad", "rob_target": "clean"},
    {"aggregation": "mtard", "lambda_rob_clean": 1.0, "discrepancy": "kl"},
    {"aggregation": "graddrop", "lambda_g_rob_oh": 1.0, "augment": False},
    {"aggregation": "sga", "generator_opponent": "robust", "lambda_g_bn": 0.5},
    {"aggregation": "sum", "generator_init": "scratch"},
])
def test_derd_readings_run_and_are_recorded(root, reading):
    side = distill.train_student(micro_config(iterations=1, k_student=1, **reading), "derd", 0, root)
    r = side["reading"]
    assert r["aggregation"] == reading["aggregation"] and r["augment"] == reading.get("augment", True)
    assert r["rob_target"] == ("T_rob(x)" if reading.get("rob_target") == "clean" else "T_rob(x_adv)")
    assert r["lambda_rob_clean"] == reading.get("lambda_rob_clean", 0.0)
    assert ("L_oh(T_rob(x))" in r["generator_objective"]) == bool(reading.get("lambda_g_rob_oh"))
    assert ("L_BN(T_nat) + L_BN(T_rob)" in r["generator_objective"]) == bool(reading.get("lambda_g_bn"))
    assert ("g_rob_bn" in side["final"]) == bool(reading.get("lambda_g_bn"))
    assert r["generator"] == ("scratch (w/o Stage-I)" if reading.get("generator_init") else "stage1:natural")
    opponent = "T_rob(x)" if reading.get("generator_opponent") == "robust" else "T_nat(x)"
    assert f"D(S(x), {opponent})" in r["generator_objective"]


@pytest.mark.parametrize("method", ["derd", "cmi", "dfard", "dafl"])
def test_teacher_hooks_are_removed_after_training(root, method, monkeypatch):
    seen = []
    original = distill.Context.__init__

    def keep(self, *a, **k):
        original(self, *a, **k)
        seen.append(self)

    monkeypatch.setattr(distill.Context, "__init__", keep)
    distill.train_student(micro_config(iterations=1, k_student=1, lambda_g_bn=0.1), method, 0, root)
    for teacher in seen[0].teachers.values():
        assert all(not m._forward_hooks for m in teacher.modules())


def test_bn_prior_adds_both_experts_bn_distances_to_the_generator_loss(root):
    def first_step(**reading):
        return distill.train_student(micro_config(iterations=1, k_student=1, **reading), "derd", 0, root)["final"]

    plain, with_bn = first_step(), first_step(lambda_g_bn=1.0)
    assert "g_rob_bn" not in plain and with_bn["g_rob_bn"] > 0
    assert with_bn["g_loss"] - plain["g_loss"] == pytest.approx(with_bn["g_bn"] + with_bn["g_rob_bn"], rel=1e-4)


@pytest.mark.parametrize("method, reading, forwards", [
    ("derd_no_tnat", {"rob_target": "clean", "lambda_g_bn": 0.1, "generator_opponent": "robust"}, 2),
    ("derd", {"rob_target": "clean", "lambda_g_bn": 0.1, "generator_opponent": "robust"}, 2),
])
def test_robust_teacher_is_forwarded_once_per_input(root, method, reading, forwards, monkeypatch):
    """One generator step + one student step: T_rob reads G(z) once and the student batch x once."""
    calls = []
    original = distill.Context.__init__

    def count(self, *a, **k):
        original(self, *a, **k)
        self.teachers["robust"].register_forward_hook(lambda *_: calls.append(1))

    monkeypatch.setattr(distill.Context, "__init__", count)
    distill.train_student(micro_config(iterations=1, k_student=1, **reading), method, 0, root)
    assert len(calls) == forwards


def test_generator_warmup_runs_generator_only_iterations_first(root, monkeypatch):
    """stage2.generator_warmup: that many generator steps before the first student step, then the usual budget."""
    from derd.distill.dfad import DFAD

    calls = []
    gen, stud = DFAD.generator_step, DFAD.student_step
    monkeypatch.setattr(DFAD, "generator_step", lambda self, it: calls.append(("g", it)) or gen(self, it))
    monkeypatch.setattr(DFAD, "student_step", lambda self, it: calls.append(("s", it)) or stud(self, it))
    side = distill.train_student(micro_config(methods=["dfad"], generator_warmup=2), "dfad", 0, root)
    assert calls[:3] == [("g", 0), ("g", 1), ("g", 2)]  # iterations 0 and 1 train the generator alone
    assert sum(kind == "s" for kind, _ in calls) == 3 * 2  # iterations x k_student student steps, as without warm-up
    assert sum(kind == "g" for kind, _ in calls) == 2 + 3
    assert side["reading"]["generator_warmup"] == 2 and side["final"]["student_steps"] == 6


def test_generator_warmup_needs_a_generator(root):
    with pytest.raises(config.ConfigError, match="stage2.generator_warmup: rslad_real"):
        distill.train_student(micro_config(methods=["rslad_real"], generator_warmup=1), "rslad_real", 0, root)


def test_a_baseline_can_start_from_the_stage1_generator_on_t_rob(root):
    """stage2.baselines.generator_init: stage1 — the larger-budget row starts G from Stage-I's T_rob artifact and
    the student's resume key hashes that file."""
    from derd.distill.dfad import DFAD
    from derd.distill.loop import Context, input_hashes
    from derd.stage1 import warmup

    cfg = micro_config(methods=["dfad"], baselines={"generator_init": "stage1", "cmi": {"bank_size": 32, "head_dim": 8}})
    ctx = Context(cfg, DFAD, 0, root, torch.device("cpu"))
    DFAD(ctx)
    cached = warmup.load_generator(cfg, root, "robust").state_dict()
    assert all(torch.equal(v, cached[k]) for k, v in ctx.generator.state_dict().items())
    generator_file = Paths(root).generator("robust").name
    assert [h.split(":")[0] for h in input_hashes(ctx, DFAD)][1:] == [generator_file]
    scratch = Context(micro_config(methods=["dfad"]), DFAD, 0, root, torch.device("cpu"))
    DFAD(scratch)
    assert not any(torch.equal(v, cached[k]) for k, v in scratch.generator.state_dict().items() if v.dim() > 1)
    assert len(input_hashes(scratch, DFAD)) == 1  # the teacher alone
