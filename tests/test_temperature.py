"""Entropy-balanced per-expert temperatures (B-MTARD) and DERD's class-steering generator term."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from test_distill import micro_config, root  # noqa: F401  (the fixture)

from derd import distill
from derd.distill.temperature import TAU_MAX, TAU_MIN, EntropyBalance, mean_entropy


def test_the_sharper_expert_is_softened_and_the_softer_one_sharpened():
    sharp, soft = torch.tensor([[8.0, 0.0, 0.0]]), torch.tensor([[1.0, 0.0, 0.0]])
    b = EntropyBalance(lr=0.5)
    b.tau = {"nat": 2.0, "rob": 2.0}
    logs = b.update(nat_logits=sharp, rob_logits=soft)  # H_nat < H_rob
    assert b.tau == {"nat": 2.5, "rob": 1.5}
    assert logs["H_nat"] < logs["H_rob"]
    assert abs(logs["H_nat"] - mean_entropy(F.softmax(sharp / 2.0, 1))) < 1e-6  # entropies at the τ before the step


def test_temperatures_stay_in_b_mtards_range_and_match_entropies_over_steps():
    sharp, soft = torch.randn(64, 10) * 6, torch.randn(64, 10)
    b = EntropyBalance(lr=0.05)
    gaps = []
    for _ in range(200):
        logs = b.update(sharp, soft)
        gaps.append(abs(logs["H_nat"] - logs["H_rob"]))
        assert TAU_MIN <= b.tau["nat"] <= TAU_MAX and TAU_MIN <= b.tau["rob"] <= TAU_MAX
    assert gaps[-1] < 0.25 * gaps[0]  # the sharper expert (nat) got softer until the entropies met


def test_derd_with_entropy_temperatures_uses_and_moves_them(root):  # noqa: F811
    cfg = micro_config(temperature="entropy", temperature_lr=0.5)
    side = distill.train_student(cfg, "derd", 0, root)
    final = side["final"]
    assert {"tau_nat", "tau_rob", "H_nat", "H_rob"} <= final.keys()
    assert (final["tau_nat"], final["tau_rob"]) != (1.0, 1.0)  # 6 steps of 0.5 from 1: at least one moved up
    assert "entropy-balanced" in side["reading"]["tau"]


def test_class_steering_adds_ce_to_sampled_labels_to_the_generator_objective(root, monkeypatch):  # noqa: F811
    from derd.distill.derd import DERD
    from derd.distill.loop import Context

    ctx = Context(micro_config(lambda_g_ce=2.0), DERD, 0, root, torch.device("cpu"))
    method = DERD(ctx)
    x = ctx.generate()
    labels = torch.arange(len(x)) % ctx.info.num_classes
    monkeypatch.setattr(method, "sampled_labels", lambda n: labels[:n])
    terms, stage_one = method.generator_objective(x)
    assert torch.allclose(terms.raw["class_ce"], F.cross_entropy(stage_one.logits, labels))
    assert torch.allclose(terms.weighted["class_ce"], 2.0 * terms.raw["class_ce"])
    off = DERD(Context(micro_config(), DERD, 0, root, torch.device("cpu")))
    assert "class_ce" not in off.generator_objective(x)[0].raw  # weight 0: not computed, no labels drawn
