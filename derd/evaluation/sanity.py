"""Sanity checks that catch a weak evaluation (gradient masking, unconverged or broken attacks).

Each check is a pass/fail flag reported next to the model's numbers; one failure marks the row
``suspect``. Checks (tolerance ``eval.sanity.tolerance`` absorbs sampling noise):

- ``eps1_chance``: PGD with ε = 1 (any image is reachable) leaves at most chance accuracy.
- ``monotone``: accuracy does not increase Clean → FGSM → PGD_S, nor along the ε-curve.
- ``stronger_pgd``: PGD_S with ``strength``× the steps and restarts does not *raise* accuracy beyond
  noise (a stronger attack that does worse points to a broken or noisy attack). How far it lowers
  accuracy is recorded too (``gap``): PGD_S is the paper's fixed 20-step protocol, not a converged
  attack, which is why AA is the column to trust.
- ``square_not_stronger``: the black-box Square attack flips few examples that resisted every
  white-box attack (AA included) — the signature of masked gradients. Whether Square beats the
  fixed-step columns (FGSM, PGD_S, PGD_T, CW) alone is recorded, not failed: then those columns
  overstate robustness and AA is the number to read.
- ``aa_warnings``: AutoAttack raised no warning of its own (randomness, zero gradients, …).
"""
from __future__ import annotations

import torch
from torch import nn

from derd.attacks import PGD, robust_flags
from derd.config import Eval
from derd.evaluation.autoattack import AutoAttack
from derd.evaluation.flags import FlagStore

CHECKS = ("eps1_chance", "monotone", "stronger_pgd", "square_not_stronger", "aa_warnings")


def _acc(flags: torch.Tensor) -> float:
    return flags.float().mean().item() if len(flags) else 0.0


def run_checks(model: nn.Module, x: torch.Tensor, y: torch.Tensor, flags: dict[str, torch.Tensor],
               curve: list[float], ev: Eval, num_classes: int, seed: int, store: FlagStore,
               aa_warnings: list[str], package: str = "auto") -> tuple[dict[str, bool], dict]:
    """Run the checks for one model. ``flags`` maps column names to per-example flags over ``x`` (or
    over its first ``sanity.n_examples`` at least); ``curve`` is the ε-curve accuracy in ``ev.eps_curve`` order.
    Returns ({check: passed}, {check: the numbers behind it})."""
    tol, s = ev.sanity.tolerance, min(ev.sanity.n_examples, len(x))
    xs, ys, bs = x[:s], y[:s], ev.batch_size
    pgd = ev.pgd_s
    k = ev.sanity.strength
    details: dict[str, dict] = {}

    eps1, _, _ = store.run("sanity:PGD_eps1", {"n": s, "steps": pgd.steps, "seed": seed}, lambda: robust_flags(
        model, PGD(model, 1.0, steps=pgd.steps, step_size=2.5 / pgd.steps, seed=seed), xs, ys, bs))
    details["eps1_chance"] = {"accuracy": _acc(eps1), "chance": 1 / num_classes}

    chain = [_acc(flags[c]) for c in ("Clean", "FGSM", "PGD_S")]
    details["monotone"] = {"clean_fgsm_pgd": chain, "eps_curve": curve}

    strong, _, _ = store.run("sanity:PGD_strong", {"n": s, "eps": ev.eps, "steps": pgd.steps * k, "restarts": k,
                                                    "step_size": pgd.step_size, "seed": seed}, lambda: robust_flags(
        model, PGD(model, ev.eps, pgd.steps * k, pgd.step_size, restarts=k, seed=seed), xs, ys, bs))
    details["stronger_pgd"] = {"pgd_s": _acc(flags["PGD_S"][:s]), "strong": _acc(strong), "factor": k,
                               "gap": _acc(flags["PGD_S"][:s]) - _acc(strong)}

    def square() -> tuple[torch.Tensor, dict]:
        result = AutoAttack(model, ev.eps, version="custom", attacks=["square"], seed=seed, batch_size=bs,
                            package=package, square_queries=ev.sanity.square_queries).run(xs, ys)
        return result.robust, {"warnings": result.warnings}

    sq, _, sq_extra = store.run("sanity:Square", {"n": s, "eps": ev.eps, "queries": ev.sanity.square_queries,
                                                  "seed": seed}, square)
    white = torch.stack([f[:s] for f in flags.values()]).all(0)
    only_square = (white & ~sq).float().mean().item()
    fixed_step = min(_acc(flags[c][:s]) for c in ("FGSM", "PGD_S", "PGD_T", "CW"))
    details["square_not_stronger"] = {"square": _acc(sq), "white_box_worst_case": _acc(white),
                                      "fooled_only_by_square": only_square,
                                      "square_beats_fixed_step_attacks": _acc(sq) < fixed_step - tol}
    warnings = list(aa_warnings) + [f"sanity {w}" for w in sq_extra.get("warnings", [])]
    details["aa_warnings"] = {"warnings": warnings}

    passed = {
        "eps1_chance": details["eps1_chance"]["accuracy"] <= 1 / num_classes + tol,
        "monotone": all(b <= a + tol for a, b in zip(chain, chain[1:])) and all(
            b <= a + tol for a, b in zip(curve, curve[1:])),
        "stronger_pgd": _acc(strong) <= _acc(flags["PGD_S"][:s]) + tol,
        "square_not_stronger": only_square <= tol,
        "aa_warnings": not warnings,
    }
    return passed, details
