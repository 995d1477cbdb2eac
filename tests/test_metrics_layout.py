"""The DVC metrics of a real (micro) run: every metrics file dvc.yaml declares holds numbers only (descriptions,
settings and readings live in the stages' sidecars and artifacts/evaluation.json), few enough columns for
`dvc metrics show`; `derd table` renders from this layout, and from experiments that predate it."""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import yaml
from pipeline_profile import write_params

from derd import config, distill, teachers
from derd.artifacts import read_json
from derd.evaluation import evaluate
from derd.report.tables import EVALUATION
from derd.stage1 import warmup
from pipelines import sweep

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow  # a micro run of four stages (~20 s)
OTHER_COLUMNS = 16  # metrics besides the evaluation table's: the teachers' accuracies, Stage-I/II finals


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """Teachers, Stage-I (a generator and the empty default pool), two students and the evaluation, as the
    stages write them (no Prefect, no MLflow)."""
    root = tmp_path_factory.mktemp("metrics")
    cfg = config.load(write_params(root / "params.yaml", {"tracking.enabled": False, "stage2.methods": ["derd", "dafl"],
                                                          "stage1.inversion.pool_size": 0}))
    teachers.run(cfg, root)
    warmup.run(cfg, root)
    distill.run(cfg, root)
    evaluate.run(cfg, root)
    return root


def declared_metrics(root: Path) -> list[Path]:
    """The files of every ``metrics:`` entry of dvc.yaml (a foreach/matrix template's ``${...}``: each instance)."""
    files = []
    for stage in yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"].values():
        for entry in (stage.get("do") or stage).get("metrics", []):
            pattern = re.sub(r"\$\{[^}]+\}", "*", entry if isinstance(entry, str) else next(iter(entry)))
            found = sorted(root.glob(pattern))
            assert found, f"dvc.yaml declares the metric {entry!r}, which the run did not write"
            files += found
    return files


def leaves(value: object, prefix: str = "") -> dict[str, object]:
    if isinstance(value, dict):
        return {k: v for key, item in value.items() for k, v in leaves(item, f"{prefix}{key}.").items()}
    return {prefix.rstrip("."): value}


def test_every_declared_metrics_file_holds_numbers_only(run):
    files = declared_metrics(run)
    written = {p for p in (run / "metrics").rglob("*.json") if "eval_shards" not in p.parts}
    assert written == set(files), "every metrics file the stages write is declared in dvc.yaml"
    for path in files:
        for key, value in leaves(read_json(path)).items():
            assert isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value), \
                f"{path.relative_to(run)}: {key} = {value!r} is no number (descriptions belong in a sidecar)"
    assert read_json(run / "metrics" / "warmup" / "inversion_pool.json") == {}, "an empty pool has no finals"


def test_dvc_metrics_show_stays_narrow(run):
    """`dvc metrics show` gives each distinct key of the metrics files a column: each evaluated model's seven
    numbers and a few more (before: ~230, most of them strings, settings and readings)."""
    columns = {key for path in declared_metrics(run) for key in leaves(read_json(path))}
    models = read_json(run / "metrics" / "eval.json")["table"]
    assert {f"table.{m}.{c}" for m in models for c in evaluate.COLUMNS + (evaluate.AVE,)} <= columns
    assert len(columns) <= 7 * len(models) + OTHER_COLUMNS, sorted(columns)
    assert {"natural.clean_acc", "robust.pgd_acc", "L_rob", "diversity"} <= columns


def test_the_details_are_in_the_sidecars(run):
    record = read_json(run / EVALUATION)
    assert record["table"] == read_json(run / "metrics" / "eval.json")["table"]
    assert {r["model"] for r in record["rows"]} == set(record["table"]) and record["settings"]["eps"] == 0.2
    student = read_json(run / "artifacts" / "students" / "derd-seed0.json")
    assert student["reading"]["aggregation"] and student["final"]["L_rob"] == \
        read_json(run / "metrics" / "distill" / "derd-seed0.json")["L_rob"]
    assert read_json(run / "artifacts" / "teachers" / "robust.json")["metrics"]["split"] == "val"


def test_derd_table_renders_from_this_layout_and_from_older_experiments(run, tmp_path, monkeypatch):
    import dvc.api

    record = read_json(run / EVALUATION)
    before = {**record, "table": record["table"]}  # an experiment from before: metrics/eval.json was the record
    files = {("new", EVALUATION): run / EVALUATION, ("new", "metrics/eval.json"): run / "metrics" / "eval.json"}

    def fake_read(path, repo=None, rev=None):
        if rev == "old" and path == "metrics/eval.json":
            return json.dumps(before)
        if (rev, path) not in files:
            raise FileNotFoundError(path)
        return files[rev, path].read_text()

    monkeypatch.setattr(dvc.api, "read", fake_read)
    read = sweep._read_full(run)
    assert read("new") == record and read("old") == before and read("none") is None

    (tmp_path / "demo.yaml").write_text("rows: {both: {stage2.methods: [derd, dafl]}}")
    demo = sweep.load(tmp_path / "demo.yaml", tmp_path)
    for rev in ("new", "old"):
        found = {"demo-both": sweep.Experiment("demo-both", "success", rev, "b" * 40,
                                               read_json(run / "metrics" / "eval.json"))}
        text = sweep.render(demo, sweep.collect(demo, found, read, {}), "demo.yaml")
        derd = record["table"]["derd-seed0"]
        assert f"| both: DERD | {derd['Clean']:.2f} | {derd['FGSM']:.2f} |" in text, text
        assert "sanity unknown" not in text and "ε = 0.2" in text
