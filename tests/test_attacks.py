"""Attacks: each one works, stays in the eps-ball and [0,1], is reproducible and restores the model's
mode; the CW margin has its hand-computed value; our PGD agrees with AutoAttack's APGD-CE; the
AutoAttack adapter resumes an interrupted evaluation to the same numbers."""
from __future__ import annotations

import copy

import pytest
import torch
from eval_models import EPS, eval_batch, tiny_model

from derd.attacks import CW, FGSM, KLPGD, PGD, margin_loss, robust_flags
from derd.attacks.base import eval_mode
from derd.evaluation.autoattack import AutoAttack, AutoAttackError, backend

ATTACKS = {
    "FGSM": lambda m: FGSM(m, EPS),
    "PGD": lambda m: PGD(m, EPS, steps=10, step_size=EPS / 4, seed=0),
    "PGD-restarts": lambda m: PGD(m, EPS, steps=5, step_size=EPS / 4, restarts=3, seed=0),
    "CW": lambda m: CW(m, EPS, steps=10, step_size=EPS / 4, seed=0),
    "KLPGD": lambda m: KLPGD(m, EPS, steps=5, seed=0),
}


@pytest.fixture(scope="module")
def natural():
    return tiny_model("natural")


@pytest.fixture(scope="module")
def robust():
    return tiny_model("robust")


@pytest.fixture(scope="module")
def batch():
    return eval_batch(48)


@pytest.mark.parametrize("name", ATTACKS)
def test_attack_lowers_accuracy_and_stays_in_ball(name, natural, batch):
    x, y = batch
    attack = ATTACKS[name](natural)
    x_adv = attack(x, y)
    assert x_adv.shape == x.shape
    assert (x_adv - x).abs().max() <= EPS + 1e-6
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    clean = robust_flags(natural, None, x, y).float().mean()
    adv = robust_flags(natural, None, x_adv, y).float().mean()
    assert clean > 0.8 and adv < clean - 0.3, (clean, adv)


@pytest.mark.parametrize("name", ATTACKS)
def test_same_seed_same_result(name, natural, batch):
    x, y = batch
    assert torch.equal(ATTACKS[name](natural)(x, y), ATTACKS[name](natural)(x, y))


def test_restarts_attack_only_survivors_yet_match_attacking_everyone(robust, batch):
    """Restarts skip the examples already fooled; each example still gets the random start it would get
    if every restart attacked the whole batch, so the result is the all-examples algorithm's."""
    x, y = batch
    pgd = PGD(robust, EPS, steps=3, step_size=EPS / 4, restarts=4, seed=0)
    gen = torch.Generator().manual_seed(0)
    starts = [pgd.ascend(x, y, gen) for _ in range(4)]  # every restart on every example
    expected, fooled = starts[0].clone(), torch.zeros(len(x), dtype=torch.bool)
    for candidate in starts:
        now = robust(candidate).argmax(1) != y
        expected[now & ~fooled] = candidate[now & ~fooled]
        fooled |= now
    forwarded: list[int] = []
    hook = robust.register_forward_hook(lambda module, inputs, output: forwarded.append(len(inputs[0])))
    try:
        got = pgd(x, y)
    finally:
        hook.remove()
    assert 0 < fooled.float().mean() < 1, "the check needs fooled and surviving examples"
    assert sum(forwarded) < 4 * (3 + 1) * len(x), "restarts attacked examples already fooled"
    assert torch.allclose(got, expected, atol=1e-6)
    assert torch.equal(robust(got).argmax(1) != y, fooled)


def test_different_seed_different_start(natural, batch):
    x, y = batch
    a = PGD(natural, EPS, steps=1, step_size=EPS / 4, seed=0)(x, y)
    b = PGD(natural, EPS, steps=1, step_size=EPS / 4, seed=1)(x, y)
    assert not torch.equal(a, b)


@pytest.mark.parametrize("name", ATTACKS)
def test_mode_restored(name, batch):
    model = tiny_model("natural")
    x, y = batch
    model.train()
    model.net.fc.eval()  # a mixed state must come back exactly, submodule by submodule
    before = [m.training for m in model.modules()]
    running = model.net.body[0][1].running_mean.clone()
    seen = []
    hook = model.register_forward_hook(lambda m, i, o: seen.append(m.training))
    ATTACKS[name](model)(x, y)
    hook.remove()
    assert seen and not any(seen), "attacks must run the model in eval mode"
    assert [m.training for m in model.modules()] == before
    assert torch.equal(running, model.net.body[0][1].running_mean), "BatchNorm statistics changed"


def _kl_by_hand(p: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Σ_b Σ_k p_bk (log p_bk − log σ(logits)_bk): KL-PGD's objective."""
    return (p * (p.log() - torch.log_softmax(logits, 1))).sum()


def test_klpgd_with_target_probabilities_ascends_kl_to_them(natural, batch):
    """RSLAD's inner problem: a fixed target p per example (e.g. a teacher's soft labels); without one the
    target is the model's own clean prediction (TRADES), and passing that prediction changes nothing."""
    x, _ = batch
    with torch.no_grad():
        own_p = torch.softmax(natural(x), 1)
    p = torch.softmax(3 * torch.randn(len(x), own_p.shape[1], generator=torch.Generator().manual_seed(0)), 1)
    towards_p = KLPGD(natural, EPS, steps=5, seed=0)(x, target=p)
    self_target = KLPGD(natural, EPS, steps=5, seed=0)(x)
    assert torch.equal(KLPGD(natural, EPS, steps=5, seed=0)(x, target=own_p), self_target)
    with torch.no_grad():
        start = _kl_by_hand(p, natural(x))
        reached, other = _kl_by_hand(p, natural(towards_p)), _kl_by_hand(p, natural(self_target))
    assert reached > start and reached > other
    assert (towards_p - x).abs().max() <= EPS + 1e-6 and not torch.equal(towards_p, self_target)
    with pytest.raises(ValueError, match="target has 3 rows for"):
        KLPGD(natural, EPS, steps=1)(x, target=p[:3])
    with pytest.raises(ValueError, match="probability distributions"):
        KLPGD(natural, EPS, steps=1)(x, target=torch.log(p))  # logits or log-probabilities, not probabilities


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a second device: on CPU alone it would pass vacuously")
def test_attack_moves_cpu_inputs_to_the_model_device(natural, batch):
    x, y = batch
    model = copy.deepcopy(natural).cuda()
    out = PGD(model, EPS, steps=2, seed=0)(x, y)  # x, y on the CPU
    assert out.device.type == "cuda"


def test_margin_loss_hand_computed():
    logits = torch.tensor([[1.0, 4.0, 2.0], [1.0, 4.0, 2.0], [100.0, 0.0, -3.0]])
    y = torch.tensor([0, 1, 0])
    # row 0: best other 4 - true 1 = 3; row 1: 2 - 4 = -2; row 2: 0 - 100 = -100 (no lower clamp: still a gradient)
    assert torch.allclose(margin_loss(logits, y, kappa=50.0), torch.tensor([3.0, -2.0, -100.0]))
    # confidence kappa caps the ascent once the wrong class leads by kappa
    assert torch.allclose(margin_loss(logits, y, kappa=2.0), torch.tensor([2.0, -2.0, -100.0]))
    grad_logits = logits.clone().requires_grad_(True)
    margin_loss(grad_logits, y, kappa=50.0)[2].backward()
    assert grad_logits.grad[2].tolist() == [-1.0, 1.0, 0.0]


def test_eps_zero_is_identity(natural, batch):
    x, y = batch
    assert torch.equal(PGD(natural, 0.0, steps=3, seed=0)(x, y), x)


def test_negative_eps_rejected(natural):
    with pytest.raises(ValueError, match="eps"):
        PGD(natural, -0.1)


# ---------------------------------------------------------------- AutoAttack
def test_pgd20_close_to_apgd_ce_and_aa_is_worst_case(robust):
    x, y = eval_batch(128)
    pgd = robust_flags(robust, PGD(robust, EPS, steps=20, step_size=EPS / 4, seed=0), x, y).float().mean().item()
    aa = AutoAttack(robust, EPS, version="custom", attacks=["apgd-ce", "apgd-t"], seed=0).run(x, y)
    apgd_ce = aa.accuracy_after["apgd-ce"]  # the cascade's first stage is APGD-CE alone on every clean-correct point
    assert abs(pgd - apgd_ce) <= 0.06, (pgd, apgd_ce)
    singles = {name: robust_flags(robust, make(robust), x, y).float().mean().item()
               for name, make in ATTACKS.items() if name != "KLPGD"}
    singles["PGD-20"] = pgd
    assert 0.1 < aa.accuracy, "the fixture should keep some robust accuracy, else this test proves nothing"
    assert all(aa.accuracy <= acc for acc in singles.values()), (aa.accuracy, singles)
    assert aa.package in ("pyautoattack", "autoattack") and aa.package_version


def test_standard_apgd_is_the_standard_versions_first_two_attacks(robust):
    """The default's AA: the standard version's APGD-CE (1 restart) and APGD-T (9 targets), not the official
    custom version's defaults (APGD-CE with 5 restarts, ~4x the cost), and the same flags as the official
    standard object cut to those two attacks."""
    x, y = eval_batch(24)
    ours = AutoAttack(robust, EPS, version="standard-apgd", seed=0, package="pyautoattack")
    official = ours._official()
    assert ours.attacks == ["apgd-ce", "apgd-t"]
    assert (official.apgd.n_restarts, official.apgd_targeted.n_target_classes) == (1, 9)
    custom = AutoAttack(robust, EPS, version="custom", attacks=["apgd-ce"], seed=0)._official()
    assert custom.apgd.n_restarts == 5
    official.attacks_to_run = ["apgd-ce", "apgd-t"]
    official.verbose = False
    with eval_mode(robust):
        _, y_official = official.run_standard_evaluation(x, y, batch_size=256)
    assert torch.equal(ours.run(x, y).robust, y_official == y)


class Interrupt(Exception):
    pass


class Tripwire(torch.nn.Module):
    """Wraps a model; once armed, its next forward raises (an interruption in mid-attack)."""

    def __init__(self, model):
        super().__init__()
        self.model, self.armed = model, False

    def forward(self, x):
        if self.armed:
            raise Interrupt
        return self.model(x)


def test_autoattack_resumes_to_the_same_numbers(robust, tmp_path):
    x, y = eval_batch(24)
    attacks = ["apgd-ce", "apgd-t"]
    full = AutoAttack(robust, EPS, version="custom", attacks=attacks, seed=0).run(x, y)

    wrapped = Tripwire(robust)
    state = tmp_path / "aa.json"
    runner = AutoAttack(wrapped, EPS, version="custom", attacks=attacks, seed=0, state_path=state)
    with pytest.raises(Interrupt):
        runner.run(x, y, on_attack_done=lambda name: setattr(wrapped, "armed", True))
    assert state.exists()
    wrapped.armed = False
    done = []
    resumed = runner.run(x, y, on_attack_done=done.append)
    assert done == ["apgd-t"], "apgd-ce finished before the interruption and must not rerun"
    assert torch.equal(resumed.robust, full.robust)
    assert resumed.accuracy_after == pytest.approx(full.accuracy_after)


def test_autoattack_state_of_another_model_is_not_reused(robust, natural, tmp_path):
    x, y = eval_batch(16)
    state = tmp_path / "aa.json"
    AutoAttack(natural, EPS, version="custom", attacks=["apgd-ce"], seed=0, state_path=state).run(x, y)
    done = []
    AutoAttack(robust, EPS, version="custom", attacks=["apgd-ce"], seed=0, state_path=state).run(x, y, done.append)
    assert done == ["apgd-ce"]


def test_autoattack_bad_settings(robust):
    with pytest.raises(AutoAttackError, match="attacks"):
        AutoAttack(robust, EPS, version="custom", attacks=["pgd-99"])
    with pytest.raises(AutoAttackError, match="version"):
        AutoAttack(robust, EPS, version="plus")
    with pytest.raises(AutoAttackError, match="not_a_package"):
        backend("not_a_package")


def test_upstream_autoattack_package_is_driven_with_its_own_signature(robust, monkeypatch):
    """The upstream package (``autoattack``) takes ``attacks_to_run=``/``bs=``/``return_labels=``; a shim
    with that signature over pyautoattack must give the same flags through the adapter."""
    import sys
    import types

    import pyautoattack
    from pyautoattack import checks

    class Upstream:
        def __init__(self, model, norm="Linf", eps=0.3, seed=None, verbose=True, attacks_to_run=(),
                     version="standard", device="cuda"):
            kw = {"attacks": list(attacks_to_run)} if version == "custom" else {}
            self._aa = pyautoattack.AutoAttack(model, eps=eps, norm=norm, seed=seed, version=version, device=device, **kw)
            self.square = self._aa.square

        def __setattr__(self, name, value):
            if name == "attacks_to_run":
                self._aa.attacks_to_run = value
            object.__setattr__(self, name, value)

        def run_standard_evaluation(self, x, y, bs=250, return_labels=False):
            x_adv, y_adv = self._aa.run_standard_evaluation(x, y, batch_size=bs)
            return (x_adv, y_adv) if return_labels else x_adv

    module = types.ModuleType("autoattack")
    module.AutoAttack, module.checks, module.__version__ = Upstream, checks, "upstream-shim"
    monkeypatch.setitem(sys.modules, "autoattack", module)
    monkeypatch.setitem(sys.modules, "autoattack.checks", checks)
    x, y = eval_batch(16)
    up = AutoAttack(robust, EPS, version="custom", attacks=["apgd-ce"], seed=0, package="auto").run(x, y)
    ours = AutoAttack(robust, EPS, version="custom", attacks=["apgd-ce"], seed=0, package="pyautoattack").run(x, y)
    assert up.package == "autoattack" and ours.package == "pyautoattack"
    assert torch.equal(up.robust, ours.robust)
