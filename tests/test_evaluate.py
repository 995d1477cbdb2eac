"""Evaluation stage: sanity checks catch a gradient-masked model and pass an honest one; the stage
writes the table, flags and eps-curves; it resumes from per-example flags; bad inputs fail clearly.
Robust means right both clean and attacked; AutoAttack runs at eval.eps on every evaluated example and
its flags are the official package's."""
from __future__ import annotations

import inspect
import json
from pathlib import Path

import pytest
import torch
from eval_models import EPS, Quantised, eval_batch, splits, tiny_model
from torch import nn

from derd import config
from derd import data as datasets
from derd.artifacts import CheckpointError, save_artifact
from derd.attacks import CW, FGSM, PGD, robust_flags
from derd.evaluation import autoattack, evaluate
from derd.evaluation.autoattack import AutoAttack
from derd.evaluation.eps_curve import eps_curve
from derd.evaluation.flags import FlagStore
from derd.evaluation.sanity import CHECKS, run_checks

N = 48
AA_SLACK = 100 * 2 / N  # two examples, in percent
EVAL = {
    "eps": EPS, "n_examples": N, "batch_size": 64,
    "pgd_s": {"steps": 10, "step_size": EPS / 4}, "pgd_t": {"steps": 10, "step_size": EPS / 5},
    "cw": {"steps": 10, "step_size": EPS / 4},
    "autoattack": {"version": "custom", "attacks": ["apgd-ce", "apgd-t"]},
    "sanity": {"n_examples": N, "tolerance": 0.07, "square_queries": 300},
}


def _cfg(**eval_overrides) -> config.Config:
    return config.parse({
        "device": "cpu", "data": {"image_size": 16},
        "teachers": {"natural": {"arch": "small_cnn", "width": 8}, "robust": {"arch": "small_cnn", "width": 8}},
        "stage2": {"student": {"arch": "small_cnn", "width": 8}},
        "eval": {**EVAL, **eval_overrides},
    })


def _checks(model, tmp_path) -> tuple[dict, dict]:
    ev = _cfg().eval
    x, y = eval_batch(N)
    store = FlagStore(tmp_path / "flags.json", "key", list(range(N)))
    flags = {c: robust_flags(model, a, x, y) for c, a in evaluate.white_box(ev, model, 0).items()}
    aa = AutoAttack(model, EPS, "custom", ["apgd-ce", "apgd-t"], seed=0).run(x, y)
    flags["AA"] = aa.robust
    curve = eps_curve(model, x, y, ev, 0, store, {0.0: flags["Clean"], 1.0: flags["PGD_S"]})
    return run_checks(model, x, y, flags, [p["accuracy"] for p in curve], ev, 10, 0, store, aa.warnings)


@pytest.mark.parametrize("kind", ["natural", "robust"])
def test_honest_model_trips_no_check(kind, tmp_path):
    passed, details = _checks(tiny_model(kind), tmp_path)
    assert set(passed) == set(CHECKS)
    assert all(passed.values()), details


def test_gradient_masked_model_trips_checks(tmp_path):
    passed, details = _checks(Quantised(tiny_model("robust")), tmp_path)
    failed = [c for c, ok in passed.items() if not ok]
    assert failed, details
    # the black-box attack sees through the zero gradients; AutoAttack's own zero-gradient warning surfaces
    assert "square_not_stronger" in failed and "aa_warnings" in failed, details


def _project(tmp_path, students=("derd-seed0",)):
    save_artifact(tmp_path / "artifacts/teachers/natural.pt", tiny_model("natural").state_dict(),
                  {"arch": "small_cnn", "num_classes": 10})
    save_artifact(tmp_path / "artifacts/teachers/robust.pt", tiny_model("robust").state_dict(),
                  {"arch": "small_cnn", "num_classes": 10})
    for i, name in enumerate(students):
        save_artifact(tmp_path / f"artifacts/students/{name}.pt", tiny_model("robust").state_dict(),
                      {"arch": "small_cnn", "width": 8, "method": name.split("-")[0], "seed": i})


def test_stage_writes_table_flags_curves_and_resumes(tmp_path, monkeypatch):
    _project(tmp_path)
    cfg = _cfg(sanity={"n_examples": 16, "square_queries": 50}, autoattack={"version": "custom", "attacks": ["apgd-ce"]})
    result = evaluate.run(cfg, tmp_path)
    rows = {r["model"]: r for r in result["rows"]}
    assert list(rows) == ["Nature", "SAT", "derd-seed0"]
    assert result["units"] == "percent" and result["autoattack"]["package"] in ("pyautoattack", "autoattack")
    for r in rows.values():
        values = [r[c] for c in evaluate.COLUMNS]
        assert r["Ave"] == pytest.approx(sum(values) / 6, abs=0.01)
        assert r["Clean"] >= r["PGD_S"] and all(0 <= v <= 100 for v in values)
        assert set(r["runtime_s"]) >= set(evaluate.COLUMNS) and set(r["sanity"]) == set(CHECKS)
        assert r["n"] == N and isinstance(r["suspect"], bool)
        # AutoAttack (APGD-CE, 100 iterations x 5 restarts) is no weaker than any fixed-step column on the same
        # examples, up to AA_SLACK (points): a flipped comparison points to AA at the wrong eps or examples
        assert all(r["AA"] <= r[c] + AA_SLACK for c in ("FGSM", "PGD_S", "PGD_T", "CW")), r
    assert rows["derd-seed0"]["method"] == "derd" and rows["derd-seed0"]["seed"] == 0
    assert rows["Nature"]["PGD_S"] < rows["SAT"]["PGD_S"]
    (sat_flags,) = [p for p in (tmp_path / "artifacts/eval_flags").glob("SAT-*.json") if ".aa." not in p.name]
    flags = json.loads(sat_flags.read_text())
    assert len(flags["entries"]["PGD_S"]["flags"]) == N and len(flags["entries"]["AA"]["flags"]) == N
    assert 100 * sum(flags["entries"]["PGD_S"]["flags"]) / N == pytest.approx(rows["SAT"]["PGD_S"], abs=0.01)
    table = (tmp_path / "metrics/eval_table.md").read_text()
    assert "| Nature |" in table and "| SAT |" in table and "| derd-seed0 |" in table and "Ave" in table
    curve = (tmp_path / "plots/eps_curve.csv").read_text().splitlines()
    assert curve[0] == "model,multiple,eps,accuracy" and len(curve) == 1 + 3 * 5
    assert (tmp_path / "plots/eps_curve.png").stat().st_size > 1000

    # a rerun recomputes nothing: every attack's flags come from metrics/eval_flags
    def boom(*a, **k):
        raise AssertionError("an attack ran again")

    monkeypatch.setattr(evaluate, "robust_flags", boom)
    monkeypatch.setattr(AutoAttack, "run", boom)
    assert evaluate.run(cfg, tmp_path)["rows"] == result["rows"]


def test_interrupted_stage_resumes_to_same_rows(tmp_path, monkeypatch):
    _project(tmp_path)
    cfg = _cfg(sanity={"enabled": False}, autoattack={"version": "custom", "attacks": ["apgd-ce"]})
    reference = evaluate.run(cfg, tmp_path)["rows"]
    for f in (tmp_path / "artifacts/eval_flags").glob("SAT*"):
        f.unlink()  # SAT "never finished"
    calls = []
    real = evaluate.robust_flags

    def counting(model, attack, *a, **k):
        calls.append(type(attack).__name__)
        return real(model, attack, *a, **k)

    monkeypatch.setattr(evaluate, "robust_flags", counting)
    assert _numbers(evaluate.run(cfg, tmp_path)["rows"]) == _numbers(reference)
    assert len(calls) == 5, "only SAT's five white-box columns run again"


def _numbers(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in ("runtime_s", "autoattack")} | {"aa": r["autoattack"]["accuracy_after"]}
            for r in rows]


def test_changed_setting_reruns_only_that_attack(tmp_path):
    store = FlagStore(tmp_path / "f.json", "k", [0, 1])
    runs = []

    def attack():
        runs.append(1)
        return torch.tensor([True, False])

    store.run("PGD_S", {"steps": 20}, attack)
    store.run("FGSM", {}, attack)
    FlagStore(tmp_path / "f.json", "k", [0, 1]).run("PGD_S", {"steps": 20}, attack)
    assert len(runs) == 2
    FlagStore(tmp_path / "f.json", "k", [0, 1]).run("PGD_S", {"steps": 40}, attack)
    FlagStore(tmp_path / "f.json", "other-model", [0, 1]).run("FGSM", {}, attack)
    assert len(runs) == 4


def test_student_without_sidecar_is_a_clear_error(tmp_path):
    _project(tmp_path, students=())
    (tmp_path / "artifacts/students").mkdir(parents=True)
    torch.save(tiny_model("robust").state_dict(), tmp_path / "artifacts/students/derd-seed0.pt")
    with pytest.raises(CheckpointError, match="derd-seed0.*sidecar"):
        evaluate.run(_cfg(), tmp_path)


def test_only_the_recorded_students_are_evaluated(tmp_path):
    """Leftovers of earlier methods or seeds in artifacts/students/ are not rows of this configuration."""
    _project(tmp_path, students=("derd-seed0", "dfad-seed3"))
    cfg = _cfg(n_examples=4, sanity={"enabled": False}, autoattack={"version": "custom", "attacks": ["apgd-ce"]})
    assert [r["model"] for r in evaluate.run(cfg, tmp_path)["rows"]] == ["Nature", "SAT", "derd-seed0"]
    with pytest.raises(CheckpointError, match="derd-seed1.pt.*not found"):
        evaluate.run(config.parse({**cfg.model_dump(), "stage2": {"seeds": [0, 1]}}), tmp_path)


def test_attack_code_or_autoattack_version_change_recomputes_the_flags(tmp_path, monkeypatch):
    """Flags are keyed by the attack code and the AutoAttack package: a fixed attack is never served stale."""
    _project(tmp_path)
    cfg = _cfg(n_examples=4, sanity={"enabled": False}, autoattack={"version": "custom", "attacks": ["apgd-ce"]})
    evaluate.run(cfg, tmp_path)
    calls = []
    real = evaluate.robust_flags
    monkeypatch.setattr(evaluate, "robust_flags", lambda *a, **k: calls.append(1) or real(*a, **k))
    evaluate.run(cfg, tmp_path)
    assert calls == [], "unchanged code: every flag comes from the store"
    monkeypatch.setattr(evaluate, "code_hash", lambda *parts: "an-attack-fix")
    evaluate.run(cfg, tmp_path)
    assert len(calls) == 3 * 5, "changed attack code: every white-box column of every model runs again"
    calls.clear()
    real_backend = evaluate.backend
    monkeypatch.setattr(evaluate, "backend", lambda p: (*real_backend(p)[:2], "99.0"))
    evaluate.run(cfg, tmp_path)
    assert len(calls) == 3 * 5, "another AutoAttack version: the flags are recomputed"


def test_the_code_behind_stored_flags_is_in_the_flags_key():
    """What decides a stored flag (the attacks, the robust rule, AutoAttack's driver, the checks, the curve)
    lives in the files :data:`evaluate.EVAL_CODE` hashes into the key, so a fix there never serves old flags."""
    package = Path(evaluate.__file__).parents[1]
    keyed = [package / part for part in evaluate.EVAL_CODE]
    for thing in (robust_flags, FGSM, PGD, CW, AutoAttack, run_checks, eps_curve, FlagStore):
        source = Path(inspect.getsourcefile(thing))
        assert any(source == k or k in source.parents for k in keyed), f"{thing.__name__}: {source} is not keyed"


def test_unknown_autoattack_attack_is_a_config_error():
    with pytest.raises(config.ConfigError, match="eval.autoattack.attacks"):
        _cfg(autoattack={"version": "custom", "attacks": ["apgd-xx"]})


def test_removed_autoattack_n_examples_is_a_config_error_saying_why():
    for value in (100, None):
        with pytest.raises(config.ConfigError, match=r"eval.autoattack.n_examples: removed: .*one set of examples"):
            _cfg(autoattack={"version": "custom", "n_examples": value})


class BrightIsRight(nn.Module):
    """Class 0 for images darker than 0.6 on average, else class 1; its input gradient always points to
    brighter images (the straight-through ``t - t.detach()``), so every attack on label 1 brightens a dark
    image into a right prediction."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = x.flatten(1).mean(1, keepdim=True)
        z = torch.where(t.detach() < 0.6, 1.0, -1.0) + (t - t.detach())
        return torch.cat([z, -z], 1)


def test_an_attack_that_fixes_a_wrong_prediction_does_not_make_it_robust():
    model = BrightIsRight()
    x, y = torch.full((4, 1, 4, 4), 0.55), torch.ones(4, dtype=torch.long)  # wrong clean (0.55 < 0.6)
    assert not (model(x).argmax(1) == y).any()
    for column, attack in evaluate.white_box(_cfg().eval, model, 0).items():
        if attack is not None:  # the attack lands at 0.55 + EPS = 0.65: right
            assert (model(attack(x, y)).argmax(1) == y).all(), column
        assert not robust_flags(model, attack, x, y).any(), column
    assert not AutoAttack(model, EPS, "custom", ["apgd-ce"], package="pyautoattack").run(x, y).robust.any()


def _official(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float) -> torch.Tensor:
    """Flags of a direct run of the official AutoAttack (pyautoattack): its standard version cut to the first
    two attacks (what ``standard-apgd`` means), one call, seed 0, the whole subset in one batch."""
    official = pytest.importorskip("pyautoattack").AutoAttack(model, eps=eps, norm="Linf", seed=0, version="standard")
    official.verbose = False
    official.attacks_to_run = official.attacks_to_run[:2]
    _, y_adv = official.run_standard_evaluation(x, y, batch_size=len(x))
    return y_adv == y


def test_autoattack_flags_are_the_official_packages_at_eval_eps(tmp_path, monkeypatch):
    """The stage's AA flags equal a direct official run at eval.eps, on the stage's own examples; at 2·eps
    the official flags differ (so an eps slip could not pass), and every official object the stage builds
    is built with eval.eps."""
    n = 16
    cfg = _cfg(n_examples=n, eps_curve=[0.0, 1.0], sanity={"enabled": False},
               autoattack={"version": "standard-apgd", "package": "pyautoattack", "batch_size": n})
    model = tiny_model("robust")
    x, y = datasets.stratified_n(getattr(splits(), cfg.eval.split), cfg.eval.n_examples)
    built = []
    real_backend = autoattack.backend

    def recording(package):
        cls, name, version = real_backend(package)

        class Recorded(cls):
            def __init__(self, *args, **kw):
                built.append(kw["eps"])
                super().__init__(*args, **kw)

        return Recorded, name, version

    monkeypatch.setattr(autoattack, "backend", recording)
    row, _ = evaluate.evaluate_model(evaluate.Evaluated("SAT", "teacher", model), x, y, cfg, tmp_path, 10)
    (store,) = [p for p in tmp_path.glob("SAT-*.json") if ".aa." not in p.name]
    stage = torch.tensor(json.loads(store.read_text())["entries"]["AA"]["flags"], dtype=torch.bool)
    assert built and set(built) == {cfg.eval.eps}
    assert len(stage) == n and row["AA"] == pytest.approx(100 * stage.float().mean().item(), abs=0.01)
    assert torch.equal(stage, _official(model, x, y, cfg.eval.eps))
    assert stage.any() and not torch.equal(stage, _official(model, x, y, 2 * cfg.eval.eps))
