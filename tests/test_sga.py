"""SGA strategies on hand-made gradient pairs (METHOD.md, Stage-II 4)."""
from __future__ import annotations

import pytest
import torch

from derd.distill import aggregation


def pair(a, b):
    """Two gradient lists over two 'parameters' (a 2x2 matrix and a vector)."""
    a, b = torch.tensor(a, dtype=torch.float32), torch.tensor(b, dtype=torch.float32)
    return [a[:4].view(2, 2), a[4:]], [b[:4].view(2, 2), b[4:]]


AGREE = pair([1.0, -2.0, 0.5, 0.0, 3.0, -1.0], [2.0, -0.5, 0.25, 0.0, 1.0, -4.0])
CONFLICT = pair([1.0, -2.0, 0.5, 1.0, 3.0, -1.0], [-2.0, 0.5, 0.25, -1.0, -1.0, 1.0])


def flat(gs):
    return aggregation.flatten(gs)


@pytest.mark.parametrize("strategy", ["sum", "graddrop", "sga"])
def test_agreeing_gradients_pass_through_unchanged(strategy):
    agg = aggregation.GradientAggregator(strategy, rate=0.5, seed=3)
    out, _ = agg(*AGREE, losses=(1.0, 2.0))
    assert torch.equal(flat(out), flat(AGREE[0]) + flat(AGREE[1]))
    assert [o.shape for o in out] == [g.shape for g in AGREE[0]]


def test_pcgrad_removes_the_conflicting_component():
    a, b = flat(CONFLICT[0]), flat(CONFLICT[1])
    assert a @ b < 0
    out = aggregation.aggregate_pcgrad(a, b)
    a_pc = a - (a @ b) / (b @ b) * b
    b_pc = b - (a @ b) / (a @ a) * a
    assert torch.allclose(a_pc @ b, torch.tensor(0.0), atol=1e-5)
    assert torch.allclose(b_pc @ a, torch.tensor(0.0), atol=1e-5)
    assert torch.allclose(out, a_pc + b_pc, atol=1e-6)
    assert torch.equal(aggregation.aggregate_pcgrad(flat(AGREE[0]), flat(AGREE[1])), flat(AGREE[0]) + flat(AGREE[1]))


def test_sign_mask_keeps_one_sign_per_coordinate_with_probability_p():
    n = 20000
    g_nat, g_rob = torch.full((n,), 1.0), torch.full((n,), -3.0)
    out = aggregation.aggregate_graddrop(g_nat, g_rob, None, torch.Generator().manual_seed(0))
    assert set(out.unique().tolist()) <= {1.0, -3.0}  # each coordinate keeps exactly one expert
    p = 0.5 * (1 + (1 - 3) / (1 + 3))  # 0.25
    assert abs((out > 0).float().mean().item() - p) < 0.02


def per_parameter_mask(grads, generator):
    """The mask as first written: one stack, draw and mask per parameter, in parameter order."""
    out = []
    for parts in zip(*grads):
        stacked = torch.stack(list(parts))
        purity = 0.5 * (1 + stacked.sum(0) / stacked.abs().sum(0).clamp_min(1e-20))
        keep_positive = (torch.rand(purity.shape, generator=generator) < purity).unsqueeze(0)
        out.append((stacked * torch.where(keep_positive, stacked > 0, stacked < 0)).sum(0))
    return out


@pytest.mark.parametrize("strategy", ["sum", "mtard", "graddrop", "sga"])
def test_flattened_aggregation_equals_the_per_parameter_one_bit_for_bit(strategy):
    """Aggregating one flattened vector changes no bit: same elementwise math, same random numbers."""
    torch.manual_seed(0)
    shapes = [(16, 1, 3, 3), (16,), (16,), (32, 16, 3, 3), (32,), (10, 32), (10,)]
    agg, reference = aggregation.GradientAggregator(strategy, 0.3, seed=5), torch.Generator().manual_seed(5)
    weights = torch.ones(2)
    for step in range(3):
        g_nat, g_rob = [torch.randn(s) for s in shapes], [torch.randn(s) for s in shapes]
        losses = (1.0 + step, 2.0 - 0.5 * step)
        w = weights if strategy in aggregation.WEIGHTED else torch.ones(2)
        weighted = [[w[0] * a for a in g_nat], [w[1] * b for b in g_rob]]
        expected = (per_parameter_mask(weighted, reference) if strategy in ("graddrop", "sga")
                    else [a + b for a, b in zip(*weighted)])
        out, _ = agg(g_nat, g_rob, losses)
        assert all(torch.equal(o, e) for o, e in zip(out, expected))
        weights = agg.weights.clone()


def test_masking_is_reproducible_under_a_seed():
    big = [torch.randn(1000, generator=torch.Generator().manual_seed(1))], \
          [torch.randn(1000, generator=torch.Generator().manual_seed(2))]
    runs = [aggregation.GradientAggregator("sga", 0.1, seed=s)(*big, losses=(1.0, 1.0))[0][0] for s in (7, 7, 8)]
    assert torch.equal(runs[0], runs[1])
    assert not torch.equal(runs[0], runs[2])


def test_state_dict_resumes_the_same_stream():
    big = [torch.randn(500)], [torch.randn(500)]
    a = aggregation.GradientAggregator("sga", 0.1, seed=0)
    a(*big, losses=(1.0, 1.0))
    a(*big, losses=(1.0, 3.0))
    assert not torch.equal(a.weights, torch.ones(2))  # so a lost weight would show
    b = aggregation.GradientAggregator("sga", 0.1, seed=99)
    b.load_state_dict(a.state_dict())
    out_a, _ = a(*big, losses=(2.0, 1.0))
    out_b, _ = b(*big, losses=(2.0, 1.0))
    assert torch.equal(out_a[0], out_b[0]) and torch.equal(a.weights, b.weights)


@pytest.mark.parametrize("strategy", ["mtard", "sga"])
def test_weights_move_at_rate_lambda_sga(strategy):
    rate = 5e-4
    agg = aggregation.GradientAggregator(strategy, rate, seed=0)
    _, stats = agg(*AGREE, losses=(2.0, 4.0))  # first step fixes the initial losses: ratios equal
    assert stats["w_nat"] == stats["w_rob"] == 1.0
    assert torch.allclose(agg.weights, torch.ones(2))
    _, stats = agg(*AGREE, losses=(2.0, 2.0))  # r = (1, 0.5): the natural expert lags
    target = torch.tensor([2 * 1 / 1.5, 2 * 0.5 / 1.5])
    assert torch.allclose(agg.weights, torch.ones(2) + rate * (target - 1), atol=1e-7)
    assert agg.weights.sum().item() == pytest.approx(2.0)
    w = agg.weights.clone()
    out, stats = agg(*AGREE, losses=(2.0, 2.0))  # agreeing signs: the mask keeps every weighted entry
    assert [stats["w_nat"], stats["w_rob"]] == pytest.approx(w.tolist())
    assert torch.allclose(flat(out), w[0] * flat(AGREE[0]) + w[1] * flat(AGREE[1]))


def test_unweighted_strategies_keep_unit_weights():
    agg = aggregation.GradientAggregator("pcgrad", 0.5)
    agg(*CONFLICT, losses=(1.0, 1.0))
    agg(*CONFLICT, losses=(5.0, 1.0))
    assert torch.equal(agg.weights, torch.ones(2))


def test_mtard_weights_scale_each_expert():
    out = aggregation.aggregate_mtard(flat(CONFLICT[0]), flat(CONFLICT[1]), torch.tensor([0.5, 1.5]))
    assert torch.allclose(out, 0.5 * flat(CONFLICT[0]) + 1.5 * flat(CONFLICT[1]))


def test_logged_statistics():
    _, stats = aggregation.GradientAggregator("sum", 0.0)(*CONFLICT, losses=(1.0, 1.0))
    a, b = flat(CONFLICT[0]), flat(CONFLICT[1])
    assert stats["cos_nat_rob"] == pytest.approx(((a @ b) / (a.norm() * b.norm())).item())
    assert stats["conflict_frac"] == pytest.approx(5 / 6)  # coordinate 3 (0.5, 0.25) agrees
    assert aggregation.cosine(torch.zeros(3), torch.ones(3)) == 0.0


def test_unknown_strategy_is_named():
    with pytest.raises(KeyError, match="stage2.aggregation"):
        aggregation.GradientAggregator("mean", 0.1)
