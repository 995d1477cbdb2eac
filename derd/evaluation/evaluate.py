"""The evaluation stage: Clean / FGSM / PGD_S / PGD_T / CW / AA / Ave for every model (METHOD.md,
"Evaluation"), sanity checks, ε-curves.

Examples: a fixed stratified subset of ``eval.n_examples`` of ``eval.split`` (:func:`derd.data.stratified_n`),
the same for every column, so Ave averages one set; an attacked column counts an example robust only when
the clean prediction is right too (:func:`derd.attacks.robust_flags`, AutoAttack's rule).

Models: the teachers as the supplementary's ``Nature`` and ``SAT`` rows, the optional ``SAT student``
(the student architecture adversarially trained on the real training split, cached under
``artifacts/reference/``) and every ``artifacts/students/*.pt``. Outputs:

- ``artifacts/evaluation.json`` (``derd.report.tables.EVALUATION``): ``rows`` (one per model) with the paper's column names in
  **percent**, ``Ave`` = mean of all six columns including Clean, ``runtime_s`` per column, ``sanity`` flags,
  ``suspect`` and the AutoAttack package/version that ran; plus the settings used.
- ``metrics/eval.json``: its ``table`` alone (model -> column -> percent), the DVC metric: numbers only.
- ``artifacts/eval_flags/<model>-<key>.json`` (in the project, also for DVC experiment copies):
  per-example flags keyed by weights, examples, attack code and AutoAttack version (resume, exact
  shard merging, reuse across experiments); ``<model>-<key>.aa.json``: AutoAttack's per-attack state.
- ``metrics/eval_table.md``: the table in the paper's layout; ``plots/eps_curve.{csv,png}``.

Sharding (``derd evaluate --shard i/n`` then ``--merge``; :func:`run` with ``shard=(i, n)``, :func:`merge`).
The attacks draw their random starts per batch, so an example's flag depends on the batch it ran in;
shards therefore take **whole batches**, round-robin: shard i evaluates the batches b ≡ i (mod n) of
``eval.batch_size`` consecutive examples (all white-box columns and ε-curve points), and the AutoAttack
chunks c ≡ i (mod n) of ``eval.autoattack.batch_size`` consecutive examples (AutoAttack runs its cascade per
chunk in the unsharded run too, so both modes run the same batches);
shard 0 also runs the sanity checks' attacks (on the first ``sanity.n_examples``, as unsharded). A shard
writes its flags to ``artifacts/eval_flags/<model>-<key>.shard-<i>-of-<n>.json`` and its record to
``metrics/eval_shards/shard-<i>-of-<n>.json``, never ``metrics/eval.json``. ``--merge`` needs all n
records, places every flag at its example's index in the unsharded store file and runs the ordinary stage
with that store read-only: every number computed from flags is recomputed at merge — the columns, Ave,
the ε-curve, AA's ``accuracy_after`` (from per-chunk counts) and the sanity verdicts — and equals the
unsharded run's exactly; runtimes are the shards' sums. An out-of-memory halving (:func:`halving_batches`)
changes the batches, so it is logged and shards must then be compared with care.
"""
from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from derd import data as datasets
from derd.artifacts import (
    CheckpointError,
    load_into,
    read_json,
    save_artifact,
    sidecar_path,
    write_json,
    write_text,
)
from derd.attacks import CW, FGSM, PGD, Attack, robust_flags
from derd.config import Config, Eval, RobustTeacher, json_hash
from derd.evaluation.autoattack import AutoAttack, backend, fingerprint
from derd.evaluation.eps_curve import eps_curve, write_curves
from derd.evaluation.flags import Covering, FlagStore, MissingFlags, merge_entries
from derd.evaluation.sanity import CHECKS, run_checks
from derd.report.tables import EVALUATION
from derd.resume import code_hash
from derd.runtime import Paths, log, resolve_device, seed_everything
from derd.teachers import build_for, load_teacher, train_teacher

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
# what the SAT student is trained from (dvc.yaml's evaluate params): its cache key, read whether or not it is cached
SAT_STUDENT_KEYS = ("seed", "data", "stage2.student", "teachers.robust.method", "teachers.robust.trades_beta",
                    "teachers.robust.train", "teachers.robust.attack", "runtime.amp")


def sat_student(cfg: Config, root: Path, splits: datasets.Splits, device: torch.device) -> nn.Module:
    """The student architecture adversarially trained on the real data, trained once and cached."""
    robust, student = cfg.teachers.robust, cfg.stage2.student
    spec = RobustTeacher(arch=student.arch, width=student.width, method=robust.method, trades_beta=robust.trades_beta,
                         train=robust.train, attack=robust.attack)
    key = json_hash({"params": cfg.section_hash(*SAT_STUDENT_KEYS), "code": code_hash()}, 12)
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
# the code that computes stored flags
EVAL_CODE = ("attacks", "evaluation/autoattack.py", "evaluation/sanity.py", "evaluation/eps_curve.py", "evaluation/flags.py")


def flags_key(model: nn.Module, x: torch.Tensor, y: torch.Tensor, ev: Eval) -> str:
    """What stored flags are valid for: weights, examples, the attack code and the AutoAttack package."""
    _, package, version = backend(ev.autoattack.package)
    return f"{fingerprint(model, x, y)}:{code_hash(*EVAL_CODE)}:{package}=={version}"


class ShardError(ValueError):
    """Shards that cannot be run or merged as asked (bad i/n, missing or mismatched shard records)."""


def parse_shard(text: str) -> tuple[int, int]:
    """``"i/n"`` -> (i, n) with 0 <= i < n."""
    try:
        i, n = (int(part) for part in text.split("/"))
    except ValueError:
        raise ShardError(f"--shard: expected i/n such as 0/4, got {text!r}") from None
    if n < 1 or not 0 <= i < n:
        raise ShardError(f"--shard: need 0 <= i < n, got {text!r}")
    return i, n


def shard_blocks(total: int, block: int, shard: tuple[int, int] | None) -> list[tuple[int, int]]:
    """The [start, stop) blocks of ``block`` consecutive examples of ``range(total)`` that shard (i, n)
    evaluates: blocks b ≡ i (mod n); all of them when ``shard`` is None."""
    i, n = shard or (0, 1)
    return [(b * block, min((b + 1) * block, total)) for b in range(i, -(-total // block), n)]


def _indices(blocks: Iterable[tuple[int, int]]) -> list[int]:
    return [k for start, stop in blocks for k in range(start, stop)]


def halving_batches(run: Callable[[int], object], batch_size: int, what: str) -> object:
    """``run(batch_size)``, retried with half the batch on ``torch.cuda.OutOfMemoryError`` down to 1.
    The halving is logged: the attacks draw their random starts per batch, so the flags then come from
    other batches than configured (finished attacks stay cached, only the failing one reruns)."""
    while True:
        try:
            return run(batch_size)
        except torch.cuda.OutOfMemoryError:
            if batch_size <= 1:
                raise
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            batch_size = max(1, batch_size // 2)
            log.warning("evaluate %s: CUDA out of memory, retrying with batch size %d (set eval.batch_size / "
                        "eval.autoattack.batch_size to it to keep the batches of every run the same)",
                        what, batch_size)


def _aa_chunks(model: nn.Module, x: torch.Tensor, y: torch.Tensor, chunks: list[tuple[int, int]], ev: Eval,
               seed: int, state: Path, what: str) -> tuple[torch.Tensor, dict]:
    """AutoAttack's cascade per chunk of ``x``; flags of the chunks in order and the combined record."""
    aa_cfg, flags, parts = ev.autoattack, [], []
    meta = {}
    for start, stop in chunks:
        def one(bs: int, start=start, stop=stop):
            return AutoAttack(model, ev.eps, aa_cfg.version, aa_cfg.attacks, seed, bs,
                              state.with_suffix(f".aa.{start}.json" if start else ".aa.json"),
                              aa_cfg.package).run(x[start:stop], y[start:stop])

        r = halving_batches(one, aa_cfg.batch_size, f"{what} AA[{start}:{stop}]")
        n = stop - start
        flags.append(r.robust)
        meta = {"package": r.package, "package_version": r.package_version, "version": r.version,
                "attacks": r.attacks}
        parts.append({"start": start, "n": n, "warnings": r.warnings, "runtime_s": r.runtime_s,
                      "robust_after": {k: round(v * n) for k, v in r.accuracy_after.items()}})
    return (torch.cat(flags) if flags else torch.zeros(0, dtype=torch.bool)), combine_aa([{**meta, "chunks": parts}])


def combine_aa(extras: list[dict]) -> dict:
    """One AutoAttack record from per-chunk ones (any grouping of the same chunks gives the same numbers)."""
    parts = sorted((p for e in extras for p in e.get("chunks", [])), key=lambda p: p["start"])
    meta = next(({k: e[k] for k in ("package", "package_version", "version", "attacks")} for e in extras
                 if "package" in e), {})
    total = sum(p["n"] for p in parts)
    names = list(dict.fromkeys(k for p in parts for k in p["robust_after"]))
    runtime = {k: sum(p["runtime_s"].get(k, 0.0) for p in parts) for k in names}
    return {**meta, "warnings": list(dict.fromkeys(w for p in parts for w in p["warnings"])),
            "accuracy_after": {k: sum(p["robust_after"][k] for p in parts) / total if total else 0.0 for k in names},
            "runtime_s": runtime, "chunks": parts}


def _store_file(flags_dir: Path, item: Evaluated, key: str, shard: tuple[int, int] | None = None) -> Path:
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", item.name)
    tail = f".shard-{shard[0]}-of-{shard[1]}" if shard else ""
    return flags_dir / f"{slug}-{hashlib.sha256(key.encode()).hexdigest()[:10]}{tail}.json"


def evaluate_model(item: Evaluated, x: torch.Tensor, y: torch.Tensor, cfg: Config, flags_dir: Path,
                   num_classes: int, readonly: bool = False) -> tuple[dict, list[dict]]:
    """The table row of one model and its ε-curve; every attack's flags are cached in ``flags_dir``
    (``readonly``: only read from there, as ``--merge`` does)."""
    ev, seed, model = cfg.eval, cfg.seed, item.model
    key = flags_key(model, x, y, ev)
    store = FlagStore(_store_file(flags_dir, item, key), key, list(range(len(x))), readonly=readonly)
    flags, seconds = _attack_columns(item, x, y, cfg, store, shard_blocks(len(x), ev.batch_size, None),
                                     _aa_blocks(ev, len(x), None))
    for c in COLUMNS:
        if len(flags[c]) != len(x):
            raise MissingFlags(f"{store.path}: {c} has {len(flags[c])} flags, expected {len(x)}")
    aa = {k: v for k, v in store.data["entries"]["AA"]["extra"].items() if k != "chunks"}

    curve = halving_batches(lambda bs: eps_curve(model, x, y, ev.model_copy(update={"batch_size": bs}), seed, store,
                                                 {0.0: flags["Clean"], 1.0: flags["PGD_S"]}), ev.batch_size,
                            f"[{item.name}] eps-curve")
    row = {"model": item.name, "kind": item.kind, **item.meta, "n": len(x)}
    row |= {c: round(100 * flags[c].float().mean().item(), 2) for c in COLUMNS}
    row[AVE] = round(sum(row[c] for c in COLUMNS) / len(COLUMNS), 2)
    row["runtime_s"] = {c: round(seconds[c], 2) for c in COLUMNS}
    row["autoattack"] = aa
    row["eps_curve"] = [{**p, "accuracy": round(100 * p["accuracy"], 2)} for p in curve]
    row["runtime_s"]["eps_curve"] = round(store.seconds("curve:"), 2)
    if ev.sanity.enabled:
        passed, details = _sanity(model, x, y, flags, [p["accuracy"] for p in curve], cfg, num_classes, store,
                                  aa.get("warnings", []), item.name)
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


def _aa_blocks(ev: Eval, n: int, shard: tuple[int, int] | None) -> list[tuple[int, int]]:
    return shard_blocks(n, ev.autoattack.batch_size, shard)


def _sanity(model, x, y, flags, curve, cfg: Config, num_classes: int, store, aa_warnings, name: str):
    ev = cfg.eval
    return halving_batches(lambda bs: run_checks(model, x, y, flags, curve, ev.model_copy(update={"batch_size": bs}),
                                                 num_classes, cfg.seed, store, aa_warnings, ev.autoattack.package),
                           ev.batch_size, f"[{name}] sanity")


def _attack_columns(item: Evaluated, x: torch.Tensor, y: torch.Tensor, cfg: Config, store: FlagStore,
                    blocks: list[tuple[int, int]], aa_blocks: list[tuple[int, int]]
                    ) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Every column's flags on the examples of ``blocks`` (whole batches of the full ``x``; AA: on those of
    ``aa_blocks``), with the settings of the unsharded run. Every column covers the same examples, so Ave
    averages one set."""
    ev, seed, model = cfg.eval, cfg.seed, item.model
    covered = _indices(blocks)
    xs, ys = (x, y) if covered == list(range(len(x))) else (x[covered], y[covered])
    flags, seconds = {}, {}
    for column, attack in white_box(ev, model, seed).items():
        def flag(bs: int, attack=attack) -> torch.Tensor:
            return robust_flags(model, attack, xs, ys, bs)

        flags[column], seconds[column], _ = store.run(
            column, _settings(ev, column, seed, len(x)),
            lambda column=column, flag=flag: halving_batches(flag, ev.batch_size, f"[{item.name}] {column}"))
        log.info("evaluate[%s] %s %.2f%% on %d examples (%.1fs)", item.name, column,
                 100 * flags[column].float().mean(), len(xs), seconds[column])
    aa_cfg = ev.autoattack
    aa_settings = {**aa_cfg.model_dump(), "eps": ev.eps, "seed": seed, "n": len(x)}
    if len(x) > aa_cfg.batch_size:  # the cascade runs per chunk of batch_size (one chunk: the official cascade)
        aa_settings["chunked"] = True
    flags["AA"], seconds["AA"], _ = store.run(
        "AA", aa_settings, lambda: _aa_chunks(model, x, y, aa_blocks, ev, seed, store.path, f"[{item.name}]"),
        cover=_indices(aa_blocks))
    log.info("evaluate[%s] AA %.2f%% (%.1fs) on %d examples", item.name, 100 * flags["AA"].float().mean(),
             seconds["AA"], len(flags["AA"]))
    return flags, seconds


def evaluate_shard(item: Evaluated, x: torch.Tensor, y: torch.Tensor, cfg: Config, flags_dir: Path,
                   num_classes: int, shard: tuple[int, int]) -> dict:
    """Shard (i, n) of one model's evaluation (module docstring): its flags file and what it covers."""
    ev, model = cfg.eval, item.model
    key = flags_key(model, x, y, ev)
    blocks, aa_blocks = shard_blocks(len(x), ev.batch_size, shard), _aa_blocks(ev, len(x), shard)
    store = FlagStore(_store_file(flags_dir, item, key, shard), key, _indices(blocks))
    flags, _ = _attack_columns(item, x, y, cfg, store, blocks, aa_blocks)
    idx = torch.tensor(_indices(blocks), dtype=torch.long)
    halving_batches(lambda bs: eps_curve(model, x[idx], y[idx], ev.model_copy(update={"batch_size": bs}), cfg.seed,
                                         store, {0.0: flags["Clean"], 1.0: flags["PGD_S"]}),
                    ev.batch_size, f"[{item.name}] eps-curve")
    if ev.sanity.enabled and shard[0] == 0:  # the checks' own attacks, on the first sanity.n_examples
        s = min(ev.sanity.n_examples, len(x))
        placeholder = {c: torch.ones(s, dtype=torch.bool) for c in COLUMNS}  # verdicts come at merge
        _sanity(model, x, y, placeholder, [], cfg, num_classes, Covering(store, range(len(x))), [], item.name)
    return {"model": item.name, "flags": store.path.name, "model_key": key, "n": len(x),
            "indices": len(store.data["indices"]), "aa_examples": len(flags["AA"])}


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


def _stage_inputs(cfg: Config, root: Path):
    device = resolve_device(cfg.device)
    splits = datasets.load(cfg.data)
    x, y = datasets.stratified_n(getattr(splits, cfg.eval.split), cfg.eval.n_examples)
    return splits, x, y, models_to_evaluate(cfg, root, splits, device)


def _shard_file(root: Path, i: int, n: int) -> Path:
    return Paths(root).metrics / "eval_shards" / f"shard-{i}-of-{n}.json"


def _shard_settings(cfg: Config) -> dict:
    return json.loads(json.dumps({"seed": cfg.seed, "data": cfg.data.model_dump(), "eval": cfg.eval.model_dump()},
                                 sort_keys=True, default=str))


def run(cfg: Config, root: Path = Path("."),
        evaluate_one: Callable[..., tuple[dict, list[dict]]] = evaluate_model,
        shard: tuple[int, int] | None = None) -> dict:
    """The evaluate stage (see the module docstring); each model by ``evaluate_one`` (e.g. a pipeline
    task wrapping :func:`evaluate_model`). ``shard=(i, n)``: only shard i of n (no table; its record under
    ``metrics/eval_shards/``, returned); combine the n shards with :func:`merge`."""
    ev, paths = cfg.eval, Paths(root)
    if shard is not None:
        i, n = shard
        if n < 1 or not 0 <= i < n:
            raise ShardError(f"shard: need 0 <= i < n, got {i}/{n}")
        splits, x, y, items = _stage_inputs(cfg, root)
        models = [evaluate_shard(item, x, y, cfg, paths.eval_flags, splits.info.num_classes, shard) for item in items]
        record = {"shard": i, "of": n, "settings": _shard_settings(cfg), "n_examples": len(x), "models": models,
                  "scheme": "whole batches round-robin: eval.batch_size blocks b ≡ i (mod n); AA: "
                            "eval.autoattack.batch_size chunks c ≡ i (mod n)"}
        write_json(_shard_file(root, i, n), record)
        log.info("evaluate shard %d/%d: %d models written to %s", i, n, len(models), _shard_file(root, i, n))
        return record
    splits, x, y, items = _stage_inputs(cfg, root)
    _, package, package_version = backend(ev.autoattack.package)
    rows, curves = [], {}
    for item in items:
        row, curve = evaluate_one(item, x, y, cfg, paths.eval_flags, splits.info.num_classes)
        rows.append(row)
        curves[item.name] = curve
    attacks = ev.autoattack.version if ev.autoattack.version != "custom" else "custom: " + ", ".join(ev.autoattack.attacks)
    aa_note = f"AA = {package} {package_version} ({attacks}) on the same examples"
    result = {
        "units": "percent", "columns": [*COLUMNS, AVE], "eps": ev.eps, "split": ev.split, "n_examples": len(x),
        "dataset": splits.info.name, "settings": ev.model_dump(), "seed": cfg.seed,
        "autoattack": {"package": package, "version": package_version, "aa_version": ev.autoattack.version,
                       "n_examples": len(x)},
        "sanity_checks": list(CHECKS), "rows": rows,
        "table": {r["model"]: {c: r[c] for c in (*COLUMNS, AVE)} for r in rows},
    }
    write_json(paths.root / EVALUATION, result)
    write_json(paths.metrics / "eval.json", {"table": result["table"]})  # the numbers only: `dvc metrics show`
    write_text(paths.metrics / "eval_table.md", markdown_table(rows, ev, aa_note))
    write_curves(curves, paths.plots)
    return result


def merge(cfg: Config, root: Path = Path(".")) -> dict:
    """Combine the shards recorded under ``metrics/eval_shards/`` into exactly the unsharded stage's
    outputs (module docstring); no attack runs."""
    paths = Paths(root)
    records = [read_json(p) for p in sorted((paths.metrics / "eval_shards").glob("shard-*-of-*.json"))]
    if not records:
        raise ShardError(f"{paths.metrics / 'eval_shards'}: no shard records; run `derd evaluate --shard i/n` first")
    want = _shard_settings(cfg)
    counts = {r["of"] for r in records if r["settings"] == want}
    if len(counts) != 1:
        raise ShardError(f"{paths.metrics / 'eval_shards'}: shard records for these params have shard counts "
                         f"{sorted(counts) or 'none'}; expected one n (delete stale records)")
    (n,) = counts
    by_shard = {r["shard"]: r for r in records if r["settings"] == want and r["of"] == n}
    missing = sorted(set(range(n)) - set(by_shard))
    if missing:
        raise ShardError(f"shards {missing} of {n} have no record; run `derd evaluate --shard k/{n}` for each")
    model_names = [m["model"] for m in by_shard[0]["models"]]
    for i, r in by_shard.items():
        if [m["model"] for m in r["models"]] != model_names:
            raise ShardError(f"shard {i}/{n} evaluated models {[m['model'] for m in r['models']]}, shard 0 {model_names}")
    for position, name in enumerate(model_names):
        parts = [by_shard[i]["models"][position] for i in range(n)]
        keys = {p["model_key"] for p in parts}
        if len(keys) != 1:
            raise ShardError(f"{name}: the shards evaluated different weights or examples ({len(keys)} keys)")
        stores = [FlagStore(paths.eval_flags / p["flags"], p["model_key"],
                            read_json(paths.eval_flags / p["flags"])["indices"], readonly=True) for p in parts]
        needed = {e for e in stores[0].data["entries"] if not e.startswith("sanity:")}
        for i, s in enumerate(stores):
            if not needed <= set(s.data["entries"]):
                raise ShardError(f"{s.path}: lacks {sorted(needed - set(s.data['entries']))} of shard {i}/{n}")
        try:
            entries = merge_entries(stores, lambda e, extras: combine_aa(extras) if e == "AA" else extras[0])
        except ValueError as exc:
            raise ShardError(f"{name}: {exc}") from None
        full = paths.eval_flags / re.sub(r"\.shard-\d+-of-\d+\.json$", ".json", parts[0]["flags"])
        write_json(full, {"model_key": parts[0]["model_key"], "indices": list(range(parts[0]["n"])), "entries": entries})
    log.info("evaluate --merge: %d shards of %d models merged", n, len(model_names))
    return run(cfg, root, evaluate_one=lambda *a: evaluate_model(*a, readonly=True))
