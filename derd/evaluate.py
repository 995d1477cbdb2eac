"""The evaluation stage: Clean / FGSM / PGD_S / PGD_T / CW / AA / Ave for every model (METHOD.md,
"Evaluation"), sanity checks, ε-curves.

Models: the teachers as the supplementary's ``Nature`` and ``SAT`` rows, the optional ``SAT student``
(the student architecture adversarially trained on the real training split, cached under
``artifacts/reference/``) and every ``artifacts/students/*.pt``. Outputs:

- ``metrics/eval.json``: ``rows`` (one per model) with the paper's column names in **percent**,
  ``Ave`` = mean of all six columns including Clean, ``runtime_s`` per column, ``sanity`` flags,
  ``suspect`` and the AutoAttack package/version that ran; plus the settings used.
- ``artifacts/eval_flags/<model>-<key>.json`` (in the project, also for DVC experiment copies):
  per-example flags keyed by weights, examples, attack code and AutoAttack version (resume, exact
  shard merging, reuse across experiments); ``<model>-<key>.aa.json``: AutoAttack's per-attack state.
- ``metrics/eval_table.md``: the table in the paper's layout; ``plots/eps_curve.{csv,png}``.
"""
from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from . import data as datasets
from .attacks import CW, FGSM, PGD, Attack, robust_flags
from .attacks.autoattack import AutoAttack, backend, fingerprint
from .config import Config, Eval, RobustTeacher
from .eps_curve import eps_curve, write_curves
from .eval_store import FlagStore
from .io import CheckpointError, load_into, read_json, save_artifact, sidecar_path, write_json, write_text
from .resume import code_hash
from .runtime import Paths, log, resolve_device, seed_everything
from .sanity import CHECKS, run_checks
from .teachers import build_for, load_teacher, train_teacher

COLUMNS = ("Clean", "FGSM", "PGD_S", "PGD_T", "CW", "AA")
AVE = "Ave"


@dataclass
class Evaluated:
    """One model to evaluate and what the table says about it."""

    name: str  # row name: Nature, SAT, SAT student or the student file's stem
    kind: str  # teacher | reference | student
    model: nn.Module
    meta: dict = field(default_factory=dict)  # method, seed, arch, width, source file


def white_box(ev: Eval, model: nn.Module, seed: int) -> dict[str, Attack | None]:
    """The table's white-box columns as attacks (Clean: none)."""
    return {
        "Clean": None,
        "FGSM": FGSM(model, ev.eps),
        "PGD_S": PGD(model, ev.eps, ev.pgd_s.steps, ev.pgd_s.step_size, seed=seed),
        "PGD_T": PGD(model, ev.eps, ev.pgd_t.steps, ev.pgd_t.step_size, seed=seed),
        "CW": CW(model, ev.eps, ev.cw.steps, ev.cw.step_size, kappa=ev.cw.kappa, seed=seed),
    }


def _settings(ev: Eval, column: str, seed: int, n: int) -> dict:
    params = {"FGSM": {}, "PGD_S": ev.pgd_s.model_dump(), "PGD_T": ev.pgd_t.model_dump(), "CW": ev.cw.model_dump()}
    return {"eps": ev.eps, "seed": seed, "n": n, **params.get(column, {})}


# ---------------------------------------------------------------- the models
def sat_student(cfg: Config, root: Path, splits: datasets.Splits, device: torch.device) -> nn.Module:
    """The student architecture adversarially trained on the real data, trained once and cached."""
    robust, student = cfg.teachers.robust, cfg.stage2.student
    spec = RobustTeacher(arch=student.arch, width=student.width, method=robust.method, trades_beta=robust.trades_beta,
                         train=robust.train, attack=robust.attack)
    blob = json.dumps({"seed": cfg.seed, "data": cfg.data.model_dump(), "spec": spec.model_dump(),
                       "code": code_hash()}, sort_keys=True)
    key = hashlib.sha256(blob.encode()).hexdigest()[:12]
    path = Paths(root).root / "artifacts" / "reference" / "sat_student.pt"
    model = build_for(student.arch, student.width, splits.info).to(device)
    if path.exists() and sidecar_path(path).exists() and read_json(sidecar_path(path)).get("spec_key") == key:
        return load_into(model, path).eval()
    seed_everything(cfg.seed + 2)
    history = train_teacher(model, splits.train, spec, cfg, device, "SAT student")
    save_artifact(path, model.state_dict(), {"role": "sat_student", "arch": student.arch, "width": student.width,
                                             "spec_key": key, "history": history})
    return model.eval()


def _student(path: Path, info: datasets.DatasetInfo, device: torch.device) -> Evaluated:
    side = sidecar_path(path)
    if not side.exists():
        raise CheckpointError(f"{path}: no sidecar {side.name}; students are written by `derd distill`")
    meta = read_json(side)
    missing = [k for k in ("arch", "width") if k not in meta]
    if missing:
        raise CheckpointError(f"{side}: sidecar lacks {missing}; rerun `derd distill`")
    model = load_into(build_for(meta["arch"], meta["width"], info), path).to(device).eval()
    keep = {k: meta[k] for k in ("method", "seed", "arch", "width") if k in meta}
    return Evaluated(path.stem, "student", model, {**keep, "file": str(path)})


def models_to_evaluate(cfg: Config, root: Path, splits: datasets.Splits, device: torch.device) -> list[Evaluated]:
    out = [Evaluated(name, "teacher", load_teacher(cfg, role, root, device),
                     {"arch": getattr(cfg.teachers, role).arch, "file": str(Paths(root).teacher(role))})
           for name, role in (("Nature", "natural"), ("SAT", "robust"))]
    if cfg.eval.sat_student:
        out.append(Evaluated("SAT student", "reference", sat_student(cfg, root, splits, device),
                             {"arch": cfg.stage2.student.arch}))
    return out + [_student(p, splits.info, device) for p in recorded_students(cfg, root)]


def recorded_students(cfg: Config, root: Path) -> list[Path]:
    """Exactly the students of stage2.methods × stage2.seeds (leftover files of other runs are ignored)."""
    paths = Paths(root)
    wanted = [paths.students / f"{unit}.pt" for unit in cfg.student_units()]
    missing = [str(p) for p in wanted if not p.is_file()]
    if missing:
        raise CheckpointError(f"{', '.join(missing)}: student(s) of stage2.methods × stage2.seeds not found; "
                              "run `derd distill` (or `dvc repro`) first")
    return wanted


# ---------------------------------------------------------------- one model
EVAL_CODE = ("attacks", "sanity.py", "eps_curve.py", "eval_store.py")  # the code that computes stored flags


def flags_key(model: nn.Module, x: torch.Tensor, y: torch.Tensor, ev: Eval) -> str:
    """What stored flags are valid for: weights, examples, the attack code and the AutoAttack package."""
    _, package, version = backend(ev.autoattack.package)
    return f"{fingerprint(model, x, y)}:{code_hash(*EVAL_CODE)}:{package}=={version}"


def evaluate_model(item: Evaluated, x: torch.Tensor, y: torch.Tensor, cfg: Config, flags_dir: Path,
                   num_classes: int) -> tuple[dict, list[dict]]:
    """The table row of one model and its ε-curve; every attack's flags are cached in ``flags_dir``."""
    ev, seed, model = cfg.eval, cfg.seed, item.model
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", item.name)
    key = flags_key(model, x, y, ev)
    store = FlagStore(flags_dir / f"{slug}-{hashlib.sha256(key.encode()).hexdigest()[:10]}.json", key,
                      list(range(len(x))))
    flags, seconds = {}, {}
    for column, attack in white_box(ev, model, seed).items():
        flags[column], seconds[column], _ = store.run(column, _settings(ev, column, seed, len(x)),
                                                      lambda: robust_flags(model, attack, x, y, ev.batch_size))
        log.info("evaluate[%s] %s %.2f%% (%.1fs)", item.name, column, 100 * flags[column].float().mean(), seconds[column])
    aa_cfg = ev.autoattack
    n_aa = min(aa_cfg.n_examples or len(x), len(x))

    def autoattack() -> tuple[torch.Tensor, dict]:
        runner = AutoAttack(model, ev.eps, aa_cfg.version, aa_cfg.attacks, seed, aa_cfg.batch_size,
                            store.path.with_suffix(".aa.json"), aa_cfg.package)
        r = runner.run(x[:n_aa], y[:n_aa])
        return r.robust, {"package": r.package, "package_version": r.package_version, "version": r.version,
                          "attacks": r.attacks, "warnings": r.warnings, "accuracy_after": r.accuracy_after,
                          "runtime_s": r.runtime_s}

    aa_settings = {**aa_cfg.model_dump(), "eps": ev.eps, "seed": seed, "n": n_aa}
    flags["AA"], seconds["AA"], aa = store.run("AA", aa_settings, autoattack)
    log.info("evaluate[%s] AA %.2f%% (%.1fs) on %d examples", item.name, 100 * flags["AA"].float().mean(), seconds["AA"], n_aa)

    curve = eps_curve(model, x, y, ev, seed, store, {0.0: flags["Clean"], 1.0: flags["PGD_S"]})
    row = {"model": item.name, "kind": item.kind, **item.meta, "n": len(x), "n_aa": n_aa}
    row |= {c: round(100 * flags[c].float().mean().item(), 2) for c in COLUMNS}
    row[AVE] = round(sum(row[c] for c in COLUMNS) / len(COLUMNS), 2)
    row["runtime_s"] = {c: round(seconds[c], 2) for c in COLUMNS}
    row["autoattack"] = aa
    row["eps_curve"] = [{**p, "accuracy": round(100 * p["accuracy"], 2)} for p in curve]
    row["runtime_s"]["eps_curve"] = round(store.seconds("curve:"), 2)
    if ev.sanity.enabled:
        passed, details = run_checks(model, x, y, flags, [p["accuracy"] for p in curve], ev, num_classes, seed,
                                     store, aa.get("warnings", []), aa_cfg.package)
        row["runtime_s"]["sanity"] = round(store.seconds("sanity:"), 2)
        row["sanity"], row["sanity_details"] = passed, details
        row["suspect"] = not all(passed.values())
        if row["suspect"]:
            failed = [c for c, ok in passed.items() if not ok]
            log.warning("evaluate[%s]: SUSPECT, failed sanity checks %s: %s", item.name, failed,
                        {c: details[c] for c in failed})
    else:
        row["sanity"], row["suspect"] = {}, False
    return row, curve


# ---------------------------------------------------------------- table and stage
def markdown_table(rows: list[dict], ev: Eval, aa_note: str) -> str:
    """The paper's layout (percent), one line per model, with the sanity outcome beside the numbers."""
    head = "| Model | " + " | ".join([*COLUMNS, AVE]) + " | Sanity |"
    lines = [head, "|" + "---|" * (len(COLUMNS) + 3)]
    for r in rows:
        failed = [c for c in CHECKS if r["sanity"].get(c) is False]
        verdict = ("**suspect**: " + ", ".join(failed)) if failed else ("pass" if r["sanity"] else "not run")
        cells = " | ".join(f"{r[c]:.2f}" for c in (*COLUMNS, AVE))
        lines.append(f"| {r['model']} | {cells} | {verdict} |")
    note = (f"\nL∞ ε = {ev.eps:.6g} on {rows[0]['n'] if rows else 0} {ev.split} examples; {aa_note}. "
            "Ave = mean of all six columns including Clean.\n")
    return "\n".join(lines) + "\n" + note


def run(cfg: Config, root: Path = Path("."),
        evaluate_one: Callable[..., tuple[dict, list[dict]]] = evaluate_model) -> dict:
    """The evaluate stage (see the module docstring); each model by ``evaluate_one`` (e.g. a pipeline
    task wrapping :func:`evaluate_model`)."""
    ev, paths = cfg.eval, Paths(root)
    device = resolve_device(cfg.device)
    splits = datasets.load(cfg.data)
    x, y = datasets.first_n(getattr(splits, ev.split), ev.n_examples)
    _, package, package_version = backend(ev.autoattack.package)
    rows, curves = [], {}
    for item in models_to_evaluate(cfg, root, splits, device):
        row, curve = evaluate_one(item, x, y, cfg, paths.eval_flags, splits.info.num_classes)
        rows.append(row)
        curves[item.name] = curve
    n_aa = min(ev.autoattack.n_examples or len(x), len(x))
    attacks = "standard" if ev.autoattack.version == "standard" else "custom: " + ", ".join(ev.autoattack.attacks)
    aa_note = f"AA = {package} {package_version} ({attacks}) on the first {n_aa} examples"
    result = {
        "units": "percent", "columns": [*COLUMNS, AVE], "eps": ev.eps, "split": ev.split, "n_examples": len(x),
        "dataset": splits.info.name, "settings": ev.model_dump(), "seed": cfg.seed,
        "autoattack": {"package": package, "version": package_version, "aa_version": ev.autoattack.version,
                       "n_examples": n_aa},
        "sanity_checks": list(CHECKS), "rows": rows,
        "table": {r["model"]: {c: r[c] for c in (*COLUMNS, AVE)} for r in rows},  # flat, for `dvc metrics show`
    }
    write_json(paths.metrics / "eval.json", result)
    write_text(paths.metrics / "eval_table.md", markdown_table(rows, ev, aa_note))
    write_curves(curves, paths.plots)
    return result
