"""FERD: each loss term against its formula written out here, the sign each step pushes it, the synthesis rounds
(best batch into the bank, risk-guided class probabilities, generator reset) and a tiny end-to-end run."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from test_distill import micro_config, root  # noqa: F401 (root: the tiny teachers/generators fixture)

from derd import distill
from derd.artifacts import load_tensors, read_json, save_tensors
from derd.attacks.base import eval_mode
from derd.config import ConfigError
from derd.distill import ferd
from derd.losses import Terms
from derd.runtime import Paths

CPU = torch.device("cpu")
S = torch.tensor([[2.0, -1.0, 0.5, 0.0, 1.5], [0.3, 0.2, -2.0, 1.0, 0.0], [-1.0, 3.0, 0.0, 0.5, -0.5]])
T = torch.tensor([[1.0, 0.0, 0.0, -1.0, 2.0], [0.0, 1.0, -1.0, 2.0, 0.5], [0.5, 2.0, -0.5, 0.0, 0.0]])


def pairwise_dkl(s, t, w, alpha):
    """FERD's dkl_loss written with the B×K×K difference matrices (its code's form)."""
    delta_s, delta_t = s[:, :, None] - s[:, None, :], t[:, :, None] - t[:, None, :]
    p = w[:, :, None] * w[:, None, :]
    wmse = 0.25 * ((delta_t - delta_s) ** 2 * p).sum() / p.sum()
    kl = (F.softmax(t, 1) * (F.log_softmax(t, 1) - F.log_softmax(s, 1))).sum(1).mean()
    return alpha * wmse + kl


@pytest.mark.parametrize("alpha", [1.0, 0.5])
def test_dkl_is_the_weighted_pairwise_mse_plus_kl(alpha):
    w = F.softmax(T / 100.0, 1)
    assert torch.allclose(ferd.dkl_loss(S, T, w, alpha), pairwise_dkl(S, T, w, alpha), atol=1e-6)
    uneven = torch.tensor([[0.7, 0.1, 0.1, 0.05, 0.05], [0.2] * 5, [0.0, 0.5, 0.5, 0.0, 0.0]])
    assert torch.allclose(ferd.dkl_loss(S, T, uneven, alpha), pairwise_dkl(S, T, uneven, alpha), atol=1e-6)
    assert ferd.dkl_loss(S, T, w, alpha) > ferd.dkl_loss(S, T, None) > 0  # both parts are ≥ 0
    assert torch.allclose(ferd.dkl_loss(T, T, w, alpha), torch.tensor(0.0), atol=1e-6)  # zero at S = T
    # a logit shift common to all classes changes neither part
    assert torch.allclose(ferd.dkl_loss(S + 3.0, T, w, alpha), ferd.dkl_loss(S, T, w, alpha), atol=1e-5)


def test_one_hot_class_weights_zero_the_mse_as_in_the_code():
    """The code's student passes one-hot labels as the class prior: only the diagonal (Δ = 0) is weighted."""
    one_hot = F.one_hot(torch.tensor([0, 3, 1]), 5).float()
    kl = (F.softmax(T, 1) * (F.log_softmax(T, 1) - F.log_softmax(S, 1))).sum(1).mean()
    assert torch.allclose(pairwise_dkl(S, T, one_hot, 1.0), kl)
    assert torch.allclose(ferd.dkl_loss(S, T, one_hot, 1.0), kl, atol=1e-6)


def test_dkl_passes_no_gradient_to_the_teacher_through_its_kl():
    s, t = S.clone().requires_grad_(True), T.clone().requires_grad_(True)
    grad_s, grad_t = torch.autograd.grad(ferd.dkl_loss(s, t, None), (s, t), allow_unused=True)
    assert grad_t is None and grad_s.abs().sum() > 0
    (grad_t,) = torch.autograd.grad(ferd.dkl_loss(s, t, F.softmax(t / 100.0, 1)), t)  # the weighted MSE reaches it
    assert grad_t.abs().sum() > 0


def test_uniform_kl_is_kl_from_the_uniform_distribution():
    reference = (torch.full_like(S, 0.2) * (math.log(0.2) - F.log_softmax(S, 1))).sum(1).mean()
    assert torch.allclose(ferd.uniform_kl(S), reference)
    assert ferd.uniform_kl(S) > 0 and torch.allclose(ferd.uniform_kl(torch.full((2, 5), 3.0)), torch.tensor(0.0))


def test_gaussian_kl_is_the_bottlenecks_variance_pull():
    p, q = torch.tensor([[1.0, 0.5], [2.0, 0.1]]), torch.tensor([[2.0, 0.5], [0.5, 0.3]])
    reference = (0.5 * (p / q + torch.log(q / p) - 1)).mean()
    assert torch.allclose(ferd.gaussian_kl(p, q), reference)
    assert ferd.gaussian_kl(p, p) == 0 and ferd.gaussian_kl(p, q) > 0


def _head():
    torch.manual_seed(0)
    return torch.nn.Linear(4, 3)


def test_bottleneck_noise_follows_the_codes_optimisation_step_by_step():
    head, f, var, y = _head(), torch.rand(6, 4), torch.rand(6, 4) * 0.6, torch.tensor([0, 1, 2, 0, 1, 2])
    torch.manual_seed(1)
    noise = ferd.bottleneck_noise(f, var, head, y, steps=7, lr=0.1, beta=0.3)
    torch.manual_seed(1)  # the same noise, optimised with backward() and Adam as FERD's code does
    rho = torch.zeros_like(f, requires_grad=True)
    opt = torch.optim.Adam([rho], lr=0.1)
    for _ in range(7):
        sigma = F.softplus(rho)
        eps = torch.randn_like(f)
        kl = (0.5 * (var / (sigma**2 + 1e-10) + torch.log((sigma**2 + 1e-10) / (var + 1e-10)) - 1)).mean()
        loss = F.cross_entropy(head(f + sigma * eps), y) + 0.3 * kl
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert torch.allclose(noise, F.softplus(rho.detach()) ** 2) and not noise.requires_grad


def test_a_channel_is_robust_where_its_noise_variance_exceeds_the_largest_spatial_variance():
    noise, var = torch.tensor([[0.1, 0.5], [0.3, 0.7]]), torch.tensor([[0.2, 0.2], [0.4, 0.01]])
    assert torch.equal(ferd.non_robust_channels(noise, var), torch.tensor([[1.0, 0.0], [1.0, 0.0]]))
    assert torch.equal(ferd.non_robust_channels(noise, var * 2), torch.ones(2, 2))


def test_class_risk_and_sampling_probabilities():
    logits = torch.tensor([[3.0, 1.0, 0.0], [2.0, 0.0, 0.0], [0.0, 1.0, 4.0], [0.0, 0.5, 0.0]])
    labels = torch.tensor([0, 0, 1, 1])  # class 0: margins 2 and 2; class 1: margins −3 and 0.5; class 2: none
    sums, counts = ferd.margin_sums(logits, labels, 3)
    assert torch.allclose(sums, torch.tensor([-4.0, 2.5, 0.0])) and torch.equal(counts, torch.tensor([2.0, 2.0, 0.0]))
    probs = ferd.class_probabilities(sums, counts, 0.05, 0.2)
    risk = torch.tensor([-2.0, 1.25, 0.0])  # mean −margin; a class without examples counts 0
    scaled = 0.05 + 0.15 * (risk - risk.min()) / (risk.max() - risk.min())
    assert torch.allclose(probs, scaled / scaled.sum(), atol=1e-6)
    assert probs[1] > probs[2] > probs[0] and torch.isclose(probs.sum(), torch.tensor(1.0))
    assert torch.allclose(ferd.class_probabilities(sums, counts, 0.1, 0.1), torch.full((3,), 1 / 3))


def test_utae_objective_subtracts_the_uniform_kl():
    p = F.softmax(T, 1)
    kl = (p * (torch.log(p) - F.log_softmax(S, 1))).sum(1)
    kl_u = (0.2 * (math.log(0.2) - F.log_softmax(S, 1))).sum(1)
    assert torch.allclose(ferd.utae_loss(10.0)(S, p), kl - 10.0 * kl_u, atol=1e-5)
    assert torch.allclose(ferd.utae_loss(0.0)(S, p), kl, atol=1e-6)


# ---------------------------------------------------------------- the method on the micro profile
def ferd_config(stage2=None, **ferd_opts):
    opts = {"round_iterations": 2, "risk_steps": 2, **ferd_opts}
    return micro_config(methods=["ferd"], iterations=4, augment=False, ferd=opts, **(stage2 or {}))


def make(root, stage2=None, **ferd_opts):  # noqa: F811
    cfg = ferd_config(stage2, **ferd_opts)
    ctx = distill.Context(cfg, distill.get_method("ferd"), 0, root, CPU)
    return ctx, distill.get_method("ferd")(ctx)


TERMS = ("bn", "adv", "oh", "uni")


@pytest.mark.parametrize("term", TERMS)
def test_one_generator_step_moves_each_term_its_way(root, term):  # noqa: F811
    """Alone in the objective, each term falls after one step (the discrepancy rises: it has weight −λadv)."""
    ctx, method = make(root, **{f"lambda_{t}": float(t == term) for t in TERMS})
    method.start_round(0)
    y = method.labels

    def value():
        torch.manual_seed(3)  # the same bottleneck noise each time
        return method.generator_objective(ctx.generator(method.z), y)

    before = value()
    assert before.weighted[term] == (-1 if term == "adv" else 1) * before.raw[term] and before.raw[term] > 0
    ctx.update_generator(before.total, 0)
    after = value()
    assert after.total < before.total
    assert (after.raw[term] > before.raw[term]) if term == "adv" else (after.raw[term] < before.raw[term])


def test_generator_terms_are_computed_on_the_teacher_and_the_student_in_eval_mode(root):  # noqa: F811
    ctx, method = make(root)
    method.start_round(0)
    x, y = ctx.generator(method.z), method.labels
    ctx.student.train()
    torch.manual_seed(3)
    terms = method.generator_objective(x, y)
    assert ctx.student.training, "the student's mode is restored"
    with torch.no_grad(), eval_mode(ctx.student):
        t = method.teacher(x)
        s = ctx.student(x)
    assert torch.allclose(terms.raw["oh"], F.cross_entropy(t, y))
    assert torch.allclose(terms.raw["adv"], pairwise_dkl(s, t, F.softmax(t / 100.0, 1), 1.0), atol=1e-5)
    assert set(terms.raw) == set(TERMS) and torch.allclose(
        terms.total, 5 * terms.raw["bn"] - terms.raw["adv"] + terms.raw["oh"] + 5 * terms.raw["uni"])


def test_one_student_step_lowers_the_student_loss_on_fixed_inputs(root, monkeypatch):  # noqa: F811
    ctx, method = make(root)
    x = torch.rand(8, *ctx.info.shape)
    x_adv = (x + 0.05 * torch.randn_like(x)).clamp(0, 1)
    monkeypatch.setattr(method, "adversarial", lambda x, p: x_adv)
    before, logs = method.student_loss(x)
    with torch.no_grad():
        t = method.teacher(x)
        s, s_adv = ctx.student(x), ctx.student(x_adv)
    clean, robust = (pairwise_dkl(s, t, torch.ones_like(t), 0.0) for s in (s, s_adv))  # α = 0: the KL alone
    assert torch.allclose(logs["s_clean"], clean) and torch.allclose(logs["s_rob"], robust)
    assert torch.allclose(before, 5 / 6 * clean + 1 / 6 * robust)
    ctx.update_student(before, 0)
    after, _ = method.student_loss(x)
    assert after < before


def test_the_students_kl_follows_kd_reduction(root):  # noqa: F811
    x = torch.rand(8, 1, 8, 8)
    (_, plain), (_, mean) = make(root), make(root, stage2={"kd_reduction": "mean"})
    torch.manual_seed(0)
    a = plain.student_loss(x)[1]["s_clean"]
    torch.manual_seed(0)
    assert torch.allclose(mean.student_loss(x)[1]["s_clean"], a / 10)


def test_a_round_banks_its_lowest_objective_batch_and_reweights_the_classes(root, monkeypatch, tmp_path):  # noqa: F811
    ctx, method = make(root)
    objective, offsets = method.generator_objective, iter([-100.0, 0.0])  # the round's first batch is its best

    def shifted(x, y):
        terms = objective(x, y)
        return Terms(terms.total + next(offsets), terms.raw, terms.weighted)

    monkeypatch.setattr(method, "generator_objective", shifted)
    first = float(method.generator_step(0)["g_loss"])
    best = method.best.clone()
    save_tensors(tmp_path / "ferd.pt", method.state_dict())  # mid-round state survives a resume
    _, again = make(root)
    again.load_state_dict(load_tensors(tmp_path / "ferd.pt"))
    assert torch.equal(again.best, best) and again.best_loss == method.best_loss
    assert torch.equal(again.labels, method.labels) and torch.equal(again.class_probs, method.class_probs)
    assert len(ctx.bank) == 0 and torch.allclose(method.class_probs, torch.full((10,), 0.1))
    second = float(method.generator_step(1)["g_loss"])  # the round's end
    assert method.best_loss == first < second
    assert len(ctx.bank) == 8 and torch.equal(ctx.bank.images, best)
    probs = method.class_probs
    assert not torch.allclose(probs, torch.full((10,), 0.1)) and torch.isclose(probs.sum(), torch.tensor(1.0))
    assert probs.max() / probs.min() <= 0.2 / 0.05 + 1e-4
    weights = {k: v.clone() for k, v in ctx.generator.state_dict().items()}
    labels = method.labels.clone()
    method.start_round(2)
    assert any(not torch.equal(weights[k], v) for k, v in ctx.generator.state_dict().items()), "G re-initialised"
    assert not ctx.opt_g.state and method.best is None and not torch.equal(labels, method.labels)


def test_the_warm_start_restarts_every_round_from_the_stage1_generator(root):  # noqa: F811
    ctx, method = make(root, stage2={"baselines": {"generator_init": "stage1"}})
    stage1 = load_tensors(Paths(root).generator("robust"))
    assert all(torch.equal(v, stage1[k]) for k, v in ctx.generator.state_dict().items())
    method.generator_step(0)
    method.generator_step(1)
    assert any(not torch.equal(v, stage1[k]) for k, v in ctx.generator.state_dict().items())
    method.start_round(2)
    assert all(torch.equal(v, stage1[k]) for k, v in ctx.generator.state_dict().items())
    assert method.reading()["generator_init"].startswith("Stage-I generator on T_rob")


def test_ferd_trains_end_to_end_with_its_bank_and_records_its_reading(root):  # noqa: F811
    cfg = ferd_config()
    side = distill.train_student(cfg, "ferd", 0, root)
    meta = read_json(Paths(root).student("ferd", 0).with_suffix(".json"))
    assert meta["label"] == "FERD" and meta["teachers_used"] == ["robust"]
    assert side["final"]["bank"] == 16.0  # two rounds of 8 images
    reading = meta["reading"]
    assert "each round's lowest-objective batch" in reading["memory_bank"]
    assert "(no UTAE term" in reading["adversarial_examples"] and "KL only" in reading["student_loss"]
    assert reading["generator_objective"].startswith("FERD: 5·L_BN(T_rob) − DKL(S(x), T_rob(x))")


def test_utae_option_runs_its_own_attack(root):  # noqa: F811
    (ctx, utae), (_, plain) = make(root, lambda_utae=10.0), make(root)
    x = torch.rand(8, *ctx.info.shape)
    p = F.softmax(utae.teacher(x), 1)
    torch.manual_seed(0)
    x_utae = utae.adversarial(x, p)
    torch.manual_seed(0)
    x_plain = plain.adversarial(x, p)
    assert (x_utae - x).abs().max() <= ctx.s2.attack.eps + 1e-6 and not torch.equal(x_utae, x_plain)
    assert "UTAE" in utae.reading()["adversarial_examples"]


def test_bad_ferd_settings_are_named(root):  # noqa: F811
    with pytest.raises(ConfigError, match="stage2.ferd.class_min: must be ≤ stage2.ferd.class_max"):
        ferd_config(class_min=0.3, class_max=0.2)
    with pytest.raises(ValueError, match="stage2.ferd.lambda_bn/lambda_adv/lambda_oh/lambda_uni"):
        make(root, lambda_bn=0.0, lambda_adv=0.0, lambda_oh=0.0, lambda_uni=0.0)
    for uni in (5.0, 0.0):  # features that are not the last feature map's mean: only the non-robust term needs it
        ctx = distill.Context(ferd_config(lambda_uni=uni), distill.get_method("ferd"), 0, root, CPU)
        net = ctx.teachers["robust"].net
        net.features = lambda x, pooled=net.features: pooled(x) * 2
        if uni:
            with pytest.raises(ConfigError, match="stage2.ferd.lambda_uni: FERD's non-robust channels need"):
                distill.get_method("ferd")(ctx)
        else:
            distill.get_method("ferd")(ctx)


def test_an_interrupted_ferd_run_resumes_mid_round_to_the_same_student(root, monkeypatch):  # noqa: F811
    """A checkpoint inside a round (its labels, latents, best batch so far) and after one (the bank, p)."""
    cfg = micro_config(methods=["ferd"], iterations=5, checkpoint_every=2, ferd={"round_iterations": 3, "risk_steps": 2})
    paths = Paths(root)
    distill.train_student(cfg, "ferd", 0, root)
    expected = load_tensors(paths.student("ferd", 0))
    paths.student("ferd", 0).unlink()
    cls, original = distill.get_method("ferd"), distill.get_method("ferd").student_step

    def crash_at(it_crash):
        def step(self, it):
            if it == it_crash:
                raise KeyboardInterrupt
            return original(self, it)
        return step

    for crash in (2, 4):  # resumes from iteration 2 (mid-round), then from 4 (after the first round's end)
        monkeypatch.setattr(cls, "student_step", crash_at(crash))
        with pytest.raises(KeyboardInterrupt):
            distill.train_student(cfg, "ferd", 0, root)
    assert len(load_tensors(paths.checkpoints / "distill_ferd-seed0.pt")["memory_bank"]["images"]) == 8
    monkeypatch.setattr(cls, "student_step", original)
    distill.train_student(cfg, "ferd", 0, root)
    state = load_tensors(paths.student("ferd", 0))
    assert all(torch.equal(state[k], expected[k]) for k in expected), "the resumed student differs"
