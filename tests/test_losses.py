"""Stage-I loss terms (METHOD.md "Stage-I"): golden values, hand-computed values, L_BN and its hooks."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch
from stage1_helpers import tiny_teacher
from test_distill import micro_config, root  # noqa: F401  (the fixture: tiny teachers, Stage-I artifacts)

from derd import config, distill
from derd.losses import (
    BNStatistics,
    StageOneLoss,
    WeightedSum,
    activation_loss,
    bn_distance,
    information_entropy_loss,
    kd_kl,
    l1_discrepancy,
    one_hot_loss,
)

GOLDEN = Path(__file__).parent / "golden" / "stage1_losses.json"
LAMBDAS = {"oh": 0.05, "ie": 5.0, "bn": 1e-5, "a": 0.01}


def _softmax(row):
    e = [math.exp(v) for v in row]
    return [v / sum(e) for v in e]


def _batch() -> torch.Tensor:
    return torch.rand(6, 1, 8, 8, generator=torch.Generator().manual_seed(1))


def _bn_layers(model):
    return [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]


def _hook_count(model) -> int:
    return sum(len(m._forward_hooks) for m in _bn_layers(model))


# ------------------------------------------------------------------ hand-computed, 3 classes
def test_one_hot_and_entropy_by_hand():
    rows = [[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]]
    p1, p2 = _softmax(rows[0]), _softmax(rows[1])
    expected_oh = (-math.log(p1[0]) - math.log(p2[1])) / 2  # = 0.395495
    mean_p = [(a + b) / 2 for a, b in zip(p1, p2)]
    expected_ie = sum(p * math.log(p) for p in mean_p)  # = -1.006199
    logits = torch.tensor(rows, dtype=torch.float64)
    assert one_hot_loss(logits).item() == pytest.approx(expected_oh, abs=1e-10)
    assert one_hot_loss(logits).item() == pytest.approx(0.3954947, abs=1e-6)
    assert information_entropy_loss(logits).item() == pytest.approx(expected_ie, abs=1e-10)
    assert information_entropy_loss(logits).item() == pytest.approx(-1.0061993, abs=1e-6)
    assert information_entropy_loss(logits, "10").item() == pytest.approx(expected_ie / math.log(10), abs=1e-10)


def test_entropy_is_minimal_for_balanced_batches_and_rejects_unknown_bases():
    balanced = torch.eye(3) * 50  # each class predicted once, confidently
    assert information_entropy_loss(balanced).item() == pytest.approx(-math.log(3), abs=1e-6)
    assert information_entropy_loss(torch.zeros(4, 3) + torch.tensor([9.0, 0, 0])).item() > -0.01
    with pytest.raises(ValueError, match="ie_log_base"):
        information_entropy_loss(balanced, "2")


def test_activation_loss_by_hand():
    assert activation_loss(torch.tensor([[1.0, -2.0], [3.0, 0.0]])).item() == pytest.approx(-1.5)


def test_kd_terms():
    t, s = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    pt = _softmax([1.0, 0.0])
    ps = _softmax([0.0, 1.0])
    assert kd_kl(t, s).item() == pytest.approx(sum(a * math.log(a / b) for a, b in zip(pt, ps)), abs=1e-6)
    assert kd_kl(t, t).item() == pytest.approx(0.0, abs=1e-7)
    assert l1_discrepancy(t, s).item() == pytest.approx(1.0)


def test_kd_kl_carries_hintons_tau_squared_and_its_reduction():
    t, s = torch.tensor([[2.0, 0.0, -1.0], [0.5, 1.5, 0.0]]), torch.tensor([[0.0, 1.0, 0.0], [1.0, -1.0, 2.0]])
    tau = 3.0
    rows = [sum(a * math.log(a / b) for a, b in zip(_softmax([v / tau for v in tr]), _softmax([v / tau for v in sr])))
            for tr, sr in zip(t.tolist(), s.tolist())]
    batchmean = tau**2 * sum(rows) / 2  # τ²·KL, summed over classes, averaged over the batch
    assert kd_kl(t, s, tau).item() == pytest.approx(batchmean, rel=1e-6)
    assert kd_kl(t, s, tau, "mean").item() == pytest.approx(batchmean / 3, rel=1e-6)  # mean = batchmean / K
    assert kd_kl(t, s, 1.0).item() == pytest.approx(kd_kl(t, s).item())
    with pytest.raises(ValueError, match="stage2.kd_reduction: must be one of"):
        kd_kl(t, s, tau, "sum")


# ------------------------------------------------------------------ golden values, seeded tiny teacher
def _terms() -> dict[str, float]:
    teacher = tiny_teacher()
    with StageOneLoss(teacher, LAMBDAS) as loss_fn:
        return loss_fn(_batch()).as_floats()


def test_stage_one_terms_match_golden_values():
    terms = _terms()
    if os.environ.get("DERD_REGEN_GOLDEN"):
        GOLDEN.write_text(json.dumps(terms, indent=2, sort_keys=True) + "\n")
        pytest.skip(f"regenerated {GOLDEN}")
    golden = json.loads(GOLDEN.read_text())
    assert set(terms) == set(golden)
    for key, value in golden.items():
        assert terms[key] == pytest.approx(value, rel=1e-5, abs=1e-7), key


def test_l_bn_matches_an_independent_layer_by_layer_computation():
    teacher = tiny_teacher()
    x = _batch()
    expected = 0.0
    h = teacher.normalize(x)
    for block in teacher.net.body[:3]:
        conv, bn, relu = block
        c = conv(h)
        mean = c.mean(dim=(0, 2, 3))
        var = ((c - mean.view(1, -1, 1, 1)) ** 2).mean(dim=(0, 2, 3))  # biased
        expected += ((mean - bn.running_mean) ** 2).sum().sqrt() + ((var - bn.running_var) ** 2).sum().sqrt()
        h = relu(bn(c))
    with StageOneLoss(teacher, LAMBDAS) as loss_fn:
        assert loss_fn(x).raw["bn"].item() == pytest.approx(expected.item(), rel=1e-5)


def test_weighted_sum_of_named_terms_and_config_weights():
    cfg = config.parse({"stage1": {"lambda_oh": 0.5, "lambda_ie": 20, "lambda_bn": 1e-5, "lambda_a": 0.1}})
    teacher = tiny_teacher()
    x = _batch().requires_grad_(True)
    with StageOneLoss.from_config(teacher, cfg.stage1) as loss_fn:
        result = loss_fn(x)
    assert loss_fn.lambdas == {"oh": 0.5, "ie": 20, "bn": 1e-5, "a": 0.1}
    for k in StageOneLoss.TERMS:
        assert result.weighted[k].item() == pytest.approx(loss_fn.lambdas[k] * result.raw[k].item(), rel=1e-6)
    assert result.total.item() == pytest.approx(sum(v.item() for v in result.weighted.values()), rel=1e-6)
    result.total.backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert result.logits.shape == (6, 3)


# ------------------------------------------------------------------ L_BN: zero at the running statistics
def _calibrate_running_stats(model, x):
    """Set every BN layer's running statistics to the biased batch statistics of its input on ``x``
    (layer by layer in forward order: in eval mode each layer changes the inputs of the next)."""
    for bn in _bn_layers(model):
        seen = {}

        def grab(_module, inputs, _output):
            seen["x"] = inputs[0].detach()

        handle = bn.register_forward_hook(grab)
        with torch.no_grad():
            model(x)
        handle.remove()
        bn.running_mean.copy_(seen["x"].mean(dim=(0, 2, 3)))
        bn.running_var.copy_(seen["x"].var(dim=(0, 2, 3), unbiased=False))


def test_l_bn_is_zero_at_the_running_statistics_and_positive_otherwise():
    teacher, x = tiny_teacher(), _batch()
    _calibrate_running_stats(teacher, x)
    with StageOneLoss(teacher, LAMBDAS) as loss_fn:
        assert loss_fn(x).raw["bn"].item() == pytest.approx(0.0, abs=1e-5)
        assert loss_fn(x * 0.5 + 0.25).raw["bn"].item() > 0.1


def test_bn_distance_is_the_sum_of_unsquared_norms():
    bn = torch.nn.BatchNorm2d(3).eval()
    x = torch.randn(5, 3, 4, 4)
    bn.running_mean.copy_(x.mean(dim=(0, 2, 3)) + torch.tensor([3.0, 0.0, 4.0]))  # ‖δμ‖ = 5
    bn.running_var.copy_(x.var(dim=(0, 2, 3), unbiased=False) + torch.tensor([0.0, 1.0, 0.0]))  # ‖δσ²‖ = 1
    assert bn_distance(x, bn).item() == pytest.approx(6.0, rel=1e-5)


# ------------------------------------------------------------------ hooks
def test_hooks_are_removed_on_close_and_on_error():
    teacher = tiny_teacher()
    assert _hook_count(teacher) == 0
    with StageOneLoss(teacher, LAMBDAS) as loss_fn:
        assert loss_fn.bn.n_hooks == len(_bn_layers(teacher)) == 3
        assert _hook_count(teacher) == 3
    assert _hook_count(teacher) == 0
    with pytest.raises(ZeroDivisionError), StageOneLoss(teacher, LAMBDAS):
        1 / 0
    assert _hook_count(teacher) == 0


def test_hooks_record_only_inside_the_loss():
    teacher = tiny_teacher()
    stats = BNStatistics(teacher)
    teacher(_batch())  # e.g. Stage-II's KD targets through the same teacher
    assert stats.distances == []
    with stats.recording():
        teacher(_batch())
    assert len(stats.distances) == 3
    teacher(_batch())
    assert len(stats.distances) == 3
    stats.close()
    assert _hook_count(teacher) == 0


def test_bad_inputs_are_refused_clearly():
    teacher = tiny_teacher()
    with pytest.raises(KeyError, match="unknown Stage-I terms"):
        StageOneLoss(teacher, {"bn": 1.0, "tv": 1.0})
    with pytest.raises(ValueError, match="ie_log_base"):
        StageOneLoss(teacher, LAMBDAS, log_base="2")
    assert _hook_count(teacher) == 0
    with StageOneLoss(teacher, LAMBDAS) as loss_fn:
        teacher.train()
        with pytest.raises(RuntimeError, match="eval mode"):
            loss_fn(_batch())
    no_bn = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 3))
    with pytest.raises(ValueError, match="BatchNorm"):
        StageOneLoss(no_bn, LAMBDAS)


# ------------------------------------------------------------------ weighted sums of named terms
def test_a_zero_weight_term_is_not_computed_nor_logged():
    called = []

    def term(name, value):
        return lambda: called.append(name) or torch.tensor(value)

    objective = WeightedSum({"a": 2.0, "b": 0.0, "c": -0.5}, "test")
    result = objective({"a": term("a", 3.0), "b": term("b", 1.0), "c": term("c", 4.0)})
    assert called == ["a", "c"] and result.total.item() == 4.0
    assert set(result.logs("g_", total="loss")) == {"g_loss", "g_a", "g_w_a", "g_c", "g_w_c"}
    assert objective.describe({"a": "A", "c": "C"}) == "2·A − 0.5·C"
    with pytest.raises(ValueError, match="stage1.lambda_x: every term weight is 0"):
        WeightedSum({"a": 0.0}, "stage1.lambda_x")


def test_without_lambda_bn_the_teacher_gets_no_hooks_and_needs_no_batchnorm():
    teacher = tiny_teacher()
    lambdas = {"oh": 1.0, "ie": 5.0, "bn": 0.0, "a": 0.1}
    with StageOneLoss(teacher, lambdas) as loss_fn:
        assert _hook_count(teacher) == 0
        assert set(loss_fn(_batch()).as_floats()) == {"total", "oh", "ie", "a", "w_oh", "w_ie", "w_a"}
        assert loss_fn.describe() == "L_oh + 5·L_ie + 0.1·L_a"

    class NoBN(torch.nn.Module):
        def forward(self, x, return_features=False):
            features = x.flatten(1)[:, :4]
            return (features @ torch.ones(4, 3), features) if return_features else features @ torch.ones(4, 3)

    with StageOneLoss(NoBN().eval(), lambdas) as loss_fn:
        assert torch.isfinite(loss_fn(_batch()).total)


# ------------------------------------------------------------------ objectives = the former hand-written formulas
def _former_forward(model, x, **kw):
    """``model(x, **kw)`` and the L_BN of that forward, recorded by plain hooks."""
    distances = []
    handles = [m.register_forward_hook(lambda m, i, o: distances.append(bn_distance(i[0], m))) for m in _bn_layers(model)]
    out = model(x, **kw)
    for h in handles:
        h.remove()
    return out, torch.stack(distances).sum()


def _former_stage_one(teacher, lambdas, x):
    """L_G^I as written before the terms were data: every term computed, Σ of the four weighted terms."""
    (logits, features), bn = _former_forward(teacher, x, return_features=True)
    raw = {"oh": one_hot_loss(logits), "ie": information_entropy_loss(logits), "bn": bn, "a": activation_loss(features)}
    return torch.stack([lambdas.get(k, 0.0) * v for k, v in raw.items()]).sum(), logits, bn


@pytest.mark.parametrize("lambdas", [LAMBDAS, {"oh": 1.0, "a": 0.1, "ie": 5.0, "bn": 0.0}], ids=["stage1", "dafl"])
def test_stage_one_objective_equals_the_former_formula_bitwise(lambdas):
    teacher = tiny_teacher()
    x = _batch().requires_grad_(True)
    former = _former_stage_one(teacher, lambdas, x)[0]
    (g_former,) = torch.autograd.grad(former, x)
    with StageOneLoss(teacher, lambdas) as loss_fn:
        result = loss_fn(x)
    (g_new,) = torch.autograd.grad(result.total, x)
    assert torch.equal(result.total, former) and torch.equal(g_new, g_former)


def _former_derd_generator_loss(method, x):
    """DERD's generator objective as written before the terms were data (``if s2.lambda_*:`` branches)."""
    from derd.distill.derd import discrepancy

    s2 = method.ctx.s2
    stage_one, natural, bn_nat = _former_stage_one(method.natural, method.stage_one.lambdas, x)
    robust, bn_rob = (natural, 0.0) if method.natural is method.robust else _former_forward(method.robust, x)
    opponent = robust if method.opponent_role == "robust" else natural
    loss = stage_one - s2.lambda_d * discrepancy(s2.discrepancy, method.ctx.student(x), opponent)
    if s2.lambda_g_rob_oh:
        loss = loss + s2.lambda_g_rob_oh * one_hot_loss(robust)
    if s2.lambda_g_bn:
        loss = loss + s2.lambda_g_bn * (bn_nat + bn_rob)
    return loss


@pytest.mark.parametrize("method,stage2", [
    ("derd", {}), ("derd", {"lambda_g_rob_oh": 0.5, "lambda_g_bn": 0.01, "discrepancy": "kl"}),
    ("derd", {"generator_opponent": "robust", "lambda_d": 0.003}), ("derd_no_tnat", {"lambda_g_bn": 0.1}),
])
def test_derd_generator_objective_equals_the_former_formula_bitwise(method, stage2, root):  # noqa: F811
    cfg = micro_config(methods=[method], **stage2)
    cls = distill.get_method(method)
    ctx = distill.Context(cfg, cls, 0, root, torch.device("cpu"))
    derd = cls(ctx)
    ctx.student.eval()  # the student's BN statistics stay put between the two evaluations
    x = ctx.generate().detach().requires_grad_(True)
    former = _former_derd_generator_loss(derd, x)
    (g_former,) = torch.autograd.grad(former, x)
    result, _ = derd.generator_objective(x)
    (g_new,) = torch.autograd.grad(result.total, x)
    assert torch.equal(result.total, former) and torch.equal(g_new, g_former)
    for hook in derd.hooks():
        hook.close()
