"""SGA strategies on hand-made gradient pairs (METHOD.md, Stage-II 4)."""
from __future__ import annotations

import math

import pytest
import torch
from test_distill import micro_config, root  # noqa: F401  (the fixture: tiny teachers and Stage-I artifacts)

from derd import config, distill
from derd.distill import aggregation
from derd.losses import kd_kl
from derd.models import build_model


def pair(a, b):
    """Two gradient lists over two 'parameters' (a 2x2 matrix and a vector)."""
    a, b = torch.tensor(a, dtype=torch.float32), torch.tensor(b, dtype=torch.float32)
    return [a[:4].view(2, 2), a[4:]], [b[:4].view(2, 2), b[4:]]


AGREE = pair([1.0, -2.0, 0.5, 0.0, 3.0, -1.0], [2.0, -0.5, 0.25, 0.0, 1.0, -4.0])
CONFLICT = pair([1.0, -2.0, 0.5, 1.0, 3.0, -1.0], [-2.0, 0.5, 0.25, -1.0, -1.0, 1.0])


def flat(gs):
    return aggregation.flatten(gs)


@pytest.mark.parametrize("strategy", ["sum", "graddrop", "sga", "agree", "gradrefine"])
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


# ---------------------------------------------------------------- what the sign mask is on average
@pytest.mark.parametrize("strategy", ["graddrop", "sga"])
def test_the_sign_mask_is_the_weighted_sum_in_expectation(strategy):
    """Per coordinate the mask keeps the positive mass A with P = A/(A+B), else the negative mass −B:
    E = P·A − (1−P)·B = A − B = Σg. Monte-Carlo over n draws: the mean is within 5 standard errors
    √(P(1−P))·(A+B)/√n of the weighted sum (a mask with P = ½, or with the parts swapped, is not)."""
    n = 4000
    a, b = flat(CONFLICT[0]), flat(CONFLICT[1])
    weights = torch.tensor([0.7, 1.3]) if strategy == "sga" else torch.ones(2)
    draws = aggregation.AGGREGATIONS[strategy](a.repeat(n), b.repeat(n), weights, torch.Generator().manual_seed(0))
    mean = draws.view(n, -1).double().mean(0)
    stacked = torch.stack([weights[0] * a, weights[1] * b]).double()
    pos, neg = stacked.clamp_min(0).sum(0), -stacked.clamp_max(0).sum(0)
    expected = pos - neg
    conflict = (pos > 0) & (neg > 0)
    assert torch.allclose(mean[~conflict], expected[~conflict])  # one sign only: nothing is dropped
    p = pos / (pos + neg)
    stderr = (p * (1 - p)).sqrt() * (pos + neg) / math.sqrt(n)
    assert ((mean - expected).abs()[conflict] / stderr[conflict]).max() < 5
    assert (expected[conflict].abs() > 10 * stderr[conflict]).sum() >= 3  # P = ½ (mean Σg/2) or swapped (0) fail


# ---------------------------------------------------------------- agree
def test_agree_keeps_the_components_of_the_sum_s_sign():
    a, b = flat(CONFLICT[0]), flat(CONFLICT[1])  # [1, -2, .5, 1, 3, -1] and [-2, .5, .25, -1, -1, 1]
    out = aggregation.aggregate_agree(a, b)
    assert out.tolist() == [-2.0, -2.0, 0.75, 0.0, 3.0, 0.0]  # conflicts: the majority component; ties: 0
    assert torch.equal(aggregation.aggregate_agree(flat(AGREE[0]), flat(AGREE[1])), flat(AGREE[0]) + flat(AGREE[1]))


def test_agree_is_not_the_sum_in_expectation_on_conflicts():
    """Deterministic (its expectation is itself): on a conflict it moves by the majority component alone,
    further than the sum (which ``graddrop`` is, on average) by the dropped minority component."""
    a, b = flat(CONFLICT[0]), flat(CONFLICT[1])
    runs = [aggregation.GradientAggregator("agree", 0.5, seed=s)(*CONFLICT, losses=(1.0, 1.0))[0] for s in (0, 1)]
    assert all(torch.equal(x, y) for x, y in zip(*runs))
    out, total = flat(runs[0]), a + b
    conflict = (a * b < 0) & (total != 0)
    minority = torch.where(a.sign() == total.sign(), b, a)
    assert conflict.sum() == 3
    assert torch.equal((out - total)[conflict], -minority[conflict])
    assert ((out.abs() > total.abs()) == conflict).all()


# ---------------------------------------------------------------- gradrefine
VOTES = torch.tensor([  # four gradients (rows) over five coordinates
    [1.0, 1.0, -1.0, 0.0, -1.0],
    [2.0, -1.0, -2.0, 0.0, -1.0],
    [3.0, 2.0, -3.0, 0.0, -1.0],
    [-1.0, -2.0, -4.0, 5.0, 5.0],
])  # Σ sign: 2, 0, -4, 1, -2


@pytest.mark.parametrize("threshold,expected", [
    (0.5, [6.0, 0.0, -10.0, 0.0, -3.0]),  # |s| ≥ 2: the winning sign's entries; the tie and the lone 5 drop
    (0.0, [6.0, 0.0, -10.0, 5.0, -3.0]),  # everything moves; the tie (s = 0) by its plain sum (1 - 1 + 2 - 2)
    (0.75, [0.0, 0.0, -10.0, 0.0, 0.0]),  # |s| ≥ 3
    (1.0, [0.0, 0.0, -10.0, 0.0, 0.0]),  # unanimous only
])
def test_gradrefine_vote_and_threshold(threshold, expected):
    assert aggregation.sign_vote(VOTES, threshold).tolist() == expected


def test_gradrefine_of_two_experts_drops_conflicts_and_reads_every_chunk():
    a, b = flat(CONFLICT[0]), flat(CONFLICT[1])
    out = aggregation.aggregate_gradrefine(a, b)
    assert out.tolist() == [0.0, 0.0, 0.75, 0.0, 0.0, 0.0]  # two votes: a conflict is a tie
    assert torch.equal(aggregation.aggregate_gradrefine(a, b, threshold=0.0), a + b)
    rows = aggregation.aggregate_gradrefine(VOTES[:2], VOTES[2:], threshold=0.5)  # two chunk shares per expert
    assert torch.equal(rows, aggregation.sign_vote(VOTES, 0.5))
    agg = aggregation.GradientAggregator("gradrefine", 0.5, threshold=0.75, chunks=2)
    shares = [[v[:3], v[3:]] for v in VOTES]  # each vote a gradient of two "parameters"
    out, stats = agg(shares[:2], shares[2:], losses=(1.0, 1.0))
    assert torch.cat(out).tolist() == [0.0, 0.0, -10.0, 0.0, 0.0]
    assert stats["conflict_frac"] == pytest.approx(1 / 5)  # of the experts' sums (3, 0, -3, 0, -2), (2, 0, -7, 5, 4)


def test_only_a_vote_reads_the_chunks():
    assert aggregation.GradientAggregator("sga", 0.5, chunks=4).chunks == 1
    assert aggregation.GradientAggregator("gradrefine", 0.5, chunks=4).chunks == 4


def test_chunk_losses_split_the_gradient_into_the_chunks_shares():
    """Share c = ∇θ of chunk c's loss terms (through the whole batch's forward, BatchNorm included),
    scaled by |c|/B: the shares add up to ∇θ loss. An fp16-style scale leaves them unchanged."""
    torch.manual_seed(0)
    model = build_model("small_cnn", 1, 10, (0.5,), (0.25,), image_size=8, width=4).train()
    params = list(model.parameters())
    x, teacher = torch.rand(10, 1, 8, 8), torch.randn(10, 10)
    out = model(x)
    loss = kd_kl(teacher, out)
    full = torch.autograd.grad(loss, params, retain_graph=True)
    for scale in (None, lambda t: t * 1024.0):
        pieces = aggregation.chunk_losses(loss, (out,), 3, scale)
        shares = [torch.autograd.grad(p, params, retain_graph=True) for p in pieces]
        for c, rows in enumerate(torch.arange(10).tensor_split(3)):
            own = torch.autograd.grad(kd_kl(teacher[rows], out[rows]) * len(rows) / 10, params, retain_graph=True)
            assert all(torch.allclose(s, o, atol=1e-6) for s, o in zip(shares[c], own))
        assert all(torch.allclose(sum(parts), f, atol=1e-6) for parts, f in zip(zip(*shares), full))


def test_expert_grads_returns_the_chunk_shares_for_a_vote():
    model = torch.nn.Linear(3, 2)
    x = torch.randn(6, 3)
    out = model(x)
    loss = out.pow(2).mean()

    def grad(loss, retain_graph=False):
        return list(torch.autograd.grad(loss, list(model.parameters()), retain_graph=retain_graph))

    vote = aggregation.GradientAggregator("gradrefine", 0.5, chunks=3)
    shares = vote.expert_grads(grad, loss, (out,), retain_graph=True)  # the graph outlives the last share
    assert len(shares) == 3 and [s.shape for s in shares[0]] == [(2, 3), (2,)]
    whole = aggregation.GradientAggregator("sum", 0.5, chunks=3).expert_grads(grad, loss, (out,))
    assert torch.allclose(aggregation.flatten(whole), sum(aggregation.flatten(s) for s in shares), atol=1e-6)


def test_gradrefine_keys_are_checked():
    with pytest.raises(config.ConfigError, match=r"stage2.gradrefine.chunks: must be ≤ stage2.batch_size"):
        config.parse({"stage2": {"batch_size": 4, "aggregation": "gradrefine", "gradrefine": {"chunks": 5}}})
    config.parse({"stage2": {"batch_size": 1, "aggregation": "sga"}})  # only a vote reads the chunks
    with pytest.raises(config.ConfigError, match=r"stage2.gradrefine.threshold"):
        config.parse({"stage2": {"gradrefine": {"threshold": 1.5}}})


@pytest.mark.parametrize("stage2", [{"aggregation": "gradrefine", "gradrefine": {"chunks": 2}, "lambda_rob_clean": 0.5},
                                    {"aggregation": "agree"}])
def test_derd_runs_end_to_end_with_the_agreement_readings(root, stage2, monkeypatch):  # noqa: F811
    votes = []
    vote = aggregation.sign_vote
    monkeypatch.setattr(aggregation, "sign_vote", lambda v, t: votes.append(len(v)) or vote(v, t))
    side = distill.train_student(micro_config(iterations=2, k_student=1, **stage2), "derd", 0, root)
    assert side["reading"]["aggregation"] == stage2["aggregation"]
    assert votes == ([4, 4] if stage2["aggregation"] == "gradrefine" else [])  # 2 experts x 2 chunks, each step
    assert math.isfinite(side["final"]["L_rob"])
