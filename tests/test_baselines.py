"""The comparison rows' numbers: every baseline term against its reference formula computed here
independently (sign included), RSLAD's inner problem, the student's mode during synthesis, the learnable
temperature's direction, TRADES' loss, the KD reduction key in the presets, and one small step of every
registered Stage-II method lowering its own objective on fixed inputs."""
from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from test_distill import micro_config, root  # noqa: F401  (the fixture: tiny teachers, Stage-I artifacts)

from derd import config, distill
from derd.distill.robust_kd import robust_kd_loss
from derd.teachers import trades_loss

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------ independent reference formulas
def kl_rows(p_logits: torch.Tensor, q_logits: torch.Tensor, tau: float = 1.0) -> torch.Tensor:
    """Per-example Σ_k p_k (log p_k − log q_k), p = softmax(p_logits/τ), q = softmax(q_logits/τ)."""
    log_p, log_q = torch.log_softmax(p_logits / tau, 1), torch.log_softmax(q_logits / tau, 1)
    return (log_p.exp() * (log_p - log_q)).sum(1)


def bn_prior_by_hand(teacher: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Σ over the teacher's BatchNorm layers of ‖μ(in) − μ_run‖₂ + ‖σ²(in) − σ²_run‖₂ (biased variance)."""
    inputs = []
    layers = [m for m in teacher.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    handles = [m.register_forward_hook(lambda m, i, o: inputs.append((m, i[0]))) for m in layers]
    teacher(x)
    for h in handles:
        h.remove()
    total = 0.0
    for m, a in inputs:
        flat = a.transpose(0, 1).reshape(a.shape[1], -1)
        mean, var = flat.mean(1), ((flat - flat.mean(1, keepdim=True)) ** 2).mean(1)
        total = total + ((mean - m.running_mean) ** 2).sum().sqrt() + ((var - m.running_var) ** 2).sum().sqrt()
    return total


def build(root, method: str, **stage2):  # noqa: F811
    cfg = micro_config(methods=[method], **stage2)
    cls = distill.get_method(method)
    ctx = distill.Context(cfg, cls, 0, root, torch.device("cpu"))
    return ctx, cls(ctx)


def generator_loss_on(ctx, method, x: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """The generator step's loss on a fixed leaf ``x`` in place of G(z) (no update) and the step's logs."""
    captured = []
    ctx.generate = lambda n=None: x
    ctx.update_generator = lambda loss, step: captured.append(loss)
    logs = method.generator_step(0)
    return captured[0], logs


def student_like_teacher(ctx, noise: float = 0.5) -> None:
    """Copy the robust teacher into the student (same micro architecture), its classifier perturbed, so that
    they agree on some samples and not on others."""
    ctx.net.load_state_dict(ctx.teachers["robust"].state_dict())
    with torch.no_grad():
        ctx.net.net.fc.weight.add_(noise * torch.randn(ctx.net.net.fc.weight.shape, generator=torch.Generator().manual_seed(3)))


def leaf_batch(ctx, n: int = 8) -> torch.Tensor:
    return torch.rand(n, *ctx.info.shape, generator=torch.Generator().manual_seed(7)).requires_grad_(True)


# ------------------------------------------------------------------ losses on fixed tensors
@pytest.mark.parametrize("tau", [1.0, 2.5])
@pytest.mark.parametrize("reduction,scale", [("batchmean", 1.0), ("mean", 1 / 5)])
def test_robust_kd_loss_rslad_and_kd_modes_by_hand(tau, reduction, scale):
    g = torch.Generator().manual_seed(0)
    t, s, s_adv = (torch.randn(6, 5, generator=g) for _ in range(3))
    alpha = 1 / 6
    rslad = tau**2 * ((1 - alpha) * kl_rows(t, s_adv, tau).mean() + alpha * kl_rows(t, s, tau).mean()) * scale
    kd = tau**2 * kl_rows(t, s, tau).mean() * scale
    assert robust_kd_loss("rslad", alpha, t, s, s_adv, tau, reduction).item() == pytest.approx(rslad.item(), rel=1e-6)
    assert robust_kd_loss("kd", alpha, t, s, None, tau, reduction).item() == pytest.approx(kd.item(), rel=1e-6)


def test_trades_loss_is_clean_ce_plus_beta_batchmean_kl_through_both_branches():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 4))
    x, x_adv, y = torch.rand(5, 3, 2, 2), torch.rand(5, 3, 2, 2), torch.tensor([0, 1, 2, 3, 0])
    beta = 6.0
    loss = trades_loss(model, x, y, x_adv, beta)
    logits, logits_adv = model(x), model(x_adv)
    log_p = torch.log_softmax(logits, 1)
    ref = -log_p[torch.arange(5), y].mean() + beta * kl_rows(logits, logits_adv).sum() / 5
    assert loss.item() == pytest.approx(ref.item(), rel=1e-6)
    grads = torch.autograd.grad(loss, list(model.parameters()))  # TRADES does not detach σ(f(x)) in the KL
    ref_grads = torch.autograd.grad(ref, list(model.parameters()))
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(grads, ref_grads))


# ------------------------------------------------------------------ generator objectives, value and sign
def test_dfad_generator_loss_is_minus_the_mean_l1_logit_discrepancy(root):  # noqa: F811
    ctx, method = build(root, "dfad")
    x = leaf_batch(ctx)
    loss, logs = generator_loss_on(ctx, method, x)
    with torch.no_grad():
        d = (ctx.student.train()(x) - ctx.teachers["robust"](x)).abs().mean()  # DFAD's code: student in train mode
    assert loss.item() == pytest.approx(-d.item(), rel=1e-6) and logs["g_discrepancy"].item() == pytest.approx(d.item())
    assert d > 0 and loss < 0  # minimising the loss ascends D


def test_zskt_generator_loss_is_minus_the_forward_kl(root):  # noqa: F811
    ctx, method = build(root, "zskt")
    x = leaf_batch(ctx)
    loss, logs = generator_loss_on(ctx, method, x)
    with torch.no_grad():
        kl = kl_rows(ctx.teachers["robust"](x), ctx.student.train()(x)).mean()
    assert loss.item() == pytest.approx(-kl.item(), rel=1e-5) and logs["g_kl"].item() == pytest.approx(kl.item(), rel=1e-5)
    method.close()


def test_zskt_attention_term_is_the_mean_squared_difference_of_normalised_maps(root):  # noqa: F811
    ctx, method = build(root, "zskt", baselines={"student_loss": "kd"})
    x = leaf_batch(ctx).detach()
    loss, logs = method.student_loss(x)

    def attention(model):  # small_cnn: the last spatial map is the third conv block's output
        f = model.net.body[:3](model.normalize(x))
        a = f.pow(2).mean(1).flatten(1)
        return a / a.norm(dim=1, keepdim=True)

    with torch.no_grad():
        at = (attention(ctx.student.train()) - attention(ctx.teachers["robust"])).pow(2).mean()
        kd = kl_rows(ctx.teachers["robust"](x), ctx.student(x)).mean()
    assert logs["s_at"].item() == pytest.approx(at.item(), rel=1e-5)
    assert loss.item() == pytest.approx(kd.item() + 250.0 * at.item(), rel=1e-5)


def test_cmi_generator_terms_by_hand(root):  # noqa: F811
    ctx, method = build(root, "cmi")
    o = ctx.s2.baselines.cmi
    student_like_teacher(ctx)
    x = leaf_batch(ctx, 16)
    head = copy.deepcopy(method.head)
    rng = ctx.rng.get_state()
    loss, logs = generator_loss_on(ctx, method, x)
    teacher = ctx.teachers["robust"]
    with torch.no_grad():
        ctx.rng.set_state(rng)
        y = torch.randint(0, 10, (16,), generator=ctx.rng)
        t_logits, t_feat = teacher(x, return_features=True)
        bn = bn_prior_by_hand(teacher, x)
        oh = -torch.log_softmax(t_logits, 1)[torch.arange(16), y].mean()
        s_logits = ctx.student.eval()(x)  # CMI's synthesis: student in eval mode
        agree = s_logits.argmax(1) == t_logits.argmax(1)
        adv = -(kl_rows(t_logits, s_logits) * agree).sum() / 16  # mean over the whole batch
        anchor = F.normalize(head(t_feat), dim=1)
        positive = F.normalize(head(teacher(ctx.augment(x), return_features=True)[1]), dim=1)
        cr = -torch.log_softmax(anchor @ positive.T / o.cr_temperature, 1).diagonal().mean()
    assert 0 < int(agree.sum()) < 16, "the test needs agreeing and disagreeing samples"
    for key, ref in (("g_bn", bn), ("g_oh", oh), ("g_adv", adv), ("g_cr", cr)):
        assert logs[key].item() == pytest.approx(ref.item(), rel=1e-5, abs=1e-7), key
    assert adv < 0  # the generator, minimising, raises KL(T‖S) on the agreeing samples
    total = o.lambda_bn * bn + o.lambda_oh * oh + o.lambda_adv * adv + o.lambda_cr * cr
    assert loss.item() == pytest.approx(total.item(), rel=1e-5)
    method.close()


def test_dfard_generator_balances_the_bn_prior_to_the_discrepancy_with_a_detached_ratio(root):  # noqa: F811
    ctx, method = build(root, "dfard", baselines={"dfard": {"bn_balance": 0.5}})
    x = leaf_batch(ctx)
    loss, logs = generator_loss_on(ctx, method, x)
    teacher = ctx.teachers["robust"]
    d = (ctx.student.train()(x) - teacher(x)).abs().mean()
    bn = bn_prior_by_hand(teacher, x)
    weight = 0.5 * d.detach() / bn.detach()
    ref = -d + weight * bn
    assert logs["g_bn_weight"].item() == pytest.approx(weight.item(), rel=1e-5)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5) and loss.item() == pytest.approx(-0.5 * d.item(), rel=1e-5)
    (g,), (g_ref,) = torch.autograd.grad(loss, x), torch.autograd.grad(ref, x)
    assert torch.allclose(g, g_ref, rtol=1e-4, atol=1e-7)  # the ratio carries no gradient
    method.close()


@pytest.mark.parametrize("method_name,training", [("dfad", True), ("zskt", True), ("dfard", True), ("cmi", False)])
def test_student_mode_in_the_generator_step_follows_the_reference_code_and_is_restored(root, method_name, training):  # noqa: F811
    """DFAD's and ZSKT's codes keep the student in train mode while G steps (DFARD-style follows DFAD); CMI's
    ``synthesize`` puts it in eval mode, so its BatchNorm running statistics never absorb a synthesis batch."""
    ctx, method = build(root, method_name)
    seen = []
    ctx.net.register_forward_pre_hook(lambda m, a: seen.append(m.training))
    for before in (True, False):
        ctx.student.train(before)
        stats = {k: v.clone() for k, v in ctx.net.state_dict().items() if "running" in k}
        seen.clear()
        method.generator_step(0)
        assert seen and set(seen) == {training}
        assert ctx.student.training == before
        unchanged = all(torch.equal(v, ctx.net.state_dict()[k]) for k, v in stats.items())
        assert unchanged == (not training)
    method.close()


# ------------------------------------------------------------------ student side
@pytest.mark.parametrize("name", ["dfad", "zskt", "dfard", "rslad_real"])
def test_baselines_attack_towards_the_robust_teachers_soft_labels(root, name):  # noqa: F811
    """RSLAD's inner problem: x_adv maximise KL(σ_τ(T_rob(x)) ‖ σ(S(x_adv))), not the student's own clean
    prediction (TRADES): every RSLAD-loss row hands the teacher's probabilities at its τ to the attack."""
    ctx, method = build(root, name, tau=2.0)
    x = leaf_batch(ctx).detach()
    method.student_batch = lambda: x
    targets, real = [], ctx.adversarial
    ctx.adversarial = lambda x_, target_probs=None: targets.append(target_probs) or real(x_, target_probs)
    method.student_step(0)
    with torch.no_grad():
        expected = torch.softmax(ctx.teachers["robust"](x) / 2.0, 1)
    assert len(targets) == 1 and targets[0] is not None
    assert torch.allclose(targets[0], expected, atol=1e-6)
    method.close()


def test_context_adversarial_with_target_probabilities_is_klpgd_towards_them(root):  # noqa: F811
    ctx, _ = build(root, "dfad")
    x = leaf_batch(ctx).detach()
    p = torch.softmax(3 * torch.randn(8, 10, generator=torch.Generator().manual_seed(1)), 1)
    torch.manual_seed(0)
    towards_p = ctx.adversarial(x, target_probs=p)
    torch.manual_seed(0)
    own = ctx.adversarial(x)
    with torch.no_grad():
        student = ctx.student.eval()
        start, out, other = (kl_rows(p.log(), student(v)).sum() for v in (x, towards_p, own))
    assert out > start and out > other  # it ascends KL(p ‖ σ(S(·))), which the self-target attack does not
    assert (towards_p - x).abs().max() <= ctx.s2.attack.eps + 1e-6


def test_dfard_temperature_ascends_the_student_loss_and_leaves_tau_min(root):  # noqa: F811
    ctx, method = build(root, "dfard", lr_student=0.01)
    o = ctx.s2.baselines.dfard
    assert method.temperature.item() == o.tau_min == 1.0
    with torch.no_grad():  # a confident teacher (a random micro net's logits are near 0, where τ²·KL is flat in τ)
        for p in ctx.teachers["robust"].net.fc.parameters():
            p.mul_(30)
    x = leaf_batch(ctx).detach()
    method.student_batch = lambda: x
    state = copy.deepcopy(ctx.net.state_dict())
    torch.manual_seed(0)
    loss, _ = method.student_loss(x)
    (g_tau,) = torch.autograd.grad(loss, method.temperature)
    assert g_tau > 0, "with τ² the loss grows with τ at τ = 1 (Hinton's scaling)"
    ctx.net.load_state_dict(state)
    torch.manual_seed(0)
    logs = method.student_step(0)
    assert logs["tau"].item() == pytest.approx(1.0 + o.tau_lr * g_tau.item(), rel=1e-5)  # ascent, step tau_lr
    for it in range(1, 4):
        method.student_step(it)
    assert method.temperature.item() > o.tau_min
    method.close()


# ------------------------------------------------------------------ the KD reduction key
def test_every_preset_sets_kd_reduction_to_what_its_comment_says():
    for path in [REPO / "params.yaml", *sorted((REPO / "presets").glob("*.yaml"))]:
        text = path.read_text()
        match = re.search(r"^  kd_reduction: (\w+) .*\n\s+# (\w+) here: \S", text, re.MULTILINE)
        assert match, f"{path.name}: stage2.kd_reduction with a '# <value> here: <why>' line"
        assert match.group(1) == match.group(2), f"{path.name}: kd_reduction {match.group(1)}, comment says {match.group(2)}"
        assert config.parse(yaml.safe_load(text)).stage2.kd_reduction == match.group(1)


def test_kd_reduction_reaches_every_student_kd_loss(root):  # noqa: F811
    """``mean`` divides each student KD KL by K: on the same inputs a method's student loss is batchmean's / K."""
    for name in ("dfad", "zskt", "rslad_real", "derd"):
        losses = {}
        for reduction in ("batchmean", "mean"):
            ctx, method = build(root, name, kd_reduction=reduction, baselines={"student_loss": "kd"},
                                lambda_rob_clean=0.3)
            x = leaf_batch(ctx).detach()
            method.student_batch = lambda x=x: x
            torch.manual_seed(0)
            logs = method.student_step(0)
            losses[reduction] = {k: v.item() for k, v in logs.items() if k in ("s_kd", "L_nat", "L_rob")
                                 or (k == "s_loss" and name != "zskt")}
            method.close()
        assert losses["batchmean"], name
        for key, value in losses["batchmean"].items():
            assert losses["mean"][key] == pytest.approx(value / 10, rel=1e-5), (name, key)


# ------------------------------------------------------------------ one small step lowers each objective
# What a step descends, read from the logs of repeated steps on the same inputs (each step logs its loss before
# its update): every quantity returned must fall. A method not listed uses ``s_loss`` / ``g_loss``: list a method
# here when it logs its objective under other names (e.g. FERD's terms). DERD's two experts must each fall: their
# gradients agree on this batch (cos > 0, checked), so the aggregated step descends both.
def _experts(logs):
    assert logs["cos_nat_rob"] > 0, "the experts' gradients conflict on this batch: each need not fall"
    return {"L_nat": logs["L_nat"], "L_rob": logs["L_rob"]}


STUDENT_OBJECTIVE = {"derd": _experts, "derd_inv": _experts, "derd_no_tnat": _experts}
# Generator objectives as (first logs, later logs) -> value; ``g_loss`` unless listed. DFARD-style's BN weight
# is recomputed every step (its ratio is detached), so its objective is compared at the first step's weight.
GENERATOR_OBJECTIVE = {
    "dfard": lambda first, logs: -logs["g_discrepancy"] + first["g_bn_weight"] * logs["g_bn"],
}
DISCREPANCY = {"dfad": "g_discrepancy", "zskt": "g_kl", "cmi": "g_adv"}  # adversarial generators: the game term
SMALL = {"lr_student": 1e-3, "weight_decay": 0.0, "lr_generator": 1e-4,
         "baselines": {"cmi": {"bank_size": 32, "head_dim": 8}, "dfard": {"tau_lr": 0.0}}}


def replaying_attacks(ctx) -> list:
    """Make ``ctx.adversarial`` return, call by call within a step, what it returned in the first step."""
    real, made, calls = ctx.adversarial, [], [0]

    def adversarial(x, target_probs=None):
        if calls[0] == len(made):
            made.append(real(x, target_probs))
        calls[0] += 1
        return made[calls[0] - 1]

    ctx.adversarial = adversarial
    return calls


@pytest.mark.parametrize("name", distill.registered_methods())
def test_a_small_student_step_lowers_its_own_objective_on_fixed_inputs(root, name):  # noqa: F811
    ctx, method = build(root, name, **SMALL)
    x = leaf_batch(ctx).detach()
    method.student_batch = ctx.pseudo_batch = lambda: x
    calls = replaying_attacks(ctx)
    objective = STUDENT_OBJECTIVE.get(name, lambda logs: {"s_loss": logs["s_loss"]})
    values = []
    for it in range(3):
        calls[0] = 0
        logs = method.student_step(it)
        assert name in STUDENT_OBJECTIVE or "s_loss" in logs, f"{name}: add its objective to STUDENT_OBJECTIVE ({sorted(logs)})"
        values.append({k: float(v) for k, v in objective(logs).items()})
    for key in values[0]:
        path = [v[key] for v in values]
        assert path[1] < path[0] and path[2] < path[1], f"{name}: student {key} {path}"
    method.close()


@pytest.mark.parametrize("name", distill.registered_methods())
def test_a_small_generator_step_lowers_its_own_objective_on_fixed_latents(root, name):  # noqa: F811
    ctx, method = build(root, name, **SMALL)
    if ctx.generator is None:
        assert method.generator_step(0) == {}
        return
    z = torch.randn(ctx.s2.batch_size, ctx.cfg.stage1.generator.nz, generator=torch.Generator().manual_seed(5))
    ctx.sample_z = lambda n: z
    if name == "cmi":
        student_like_teacher(ctx)  # its adversarial term is masked to the samples S and T agree on
    rng, queue = ctx.rng.get_state(), getattr(method, "queue", None)  # CMI: same targets, views and negatives
    ctx.student.eval()  # the student's outputs on the same samples stay put across the steps
    logs = []
    for it in range(3):
        ctx.rng.set_state(rng)
        if queue is not None:
            method.queue = queue
        logs.append({k: float(v) for k, v in method.generator_step(it).items()})
    assert name in GENERATOR_OBJECTIVE or "g_loss" in logs[0], f"{name}: add it to GENERATOR_OBJECTIVE ({sorted(logs[0])})"
    objective = GENERATOR_OBJECTIVE.get(name, lambda first, later: later["g_loss"])
    values = [objective(logs[0], later) for later in logs]
    assert values[1] < values[0] and values[2] < values[1], f"{name}: generator objective {values}"
    if name in DISCREPANCY:
        game = [later[DISCREPANCY[name]] for later in logs]
        assert (game[2] < game[0]) if name == "cmi" else (game[2] > game[0]), f"{name}: {DISCREPANCY[name]} {game}"
    method.close()
