"""bench.bench_pipeline: reading DVC's output into per-stage wall / in-stage / fixed seconds, and the
shares and before/after ratio it reports (a stand-in for `dvc repro`, no pipeline is run); bench.timing's
interleaving order."""
from __future__ import annotations

import sys

import pytest

from bench import bench_pipeline

FAKE_DVC = """
import json, pathlib, sys, time
runs = pathlib.Path("artifacts/runs"); runs.mkdir(parents=True, exist_ok=True)
print("derd repro: Prefect server at http://127.0.0.1:1/api (UI ...) started in 2.5 s; it stops when the run ends")
print("Running stage 'inputs':"); print("> python -m pipelines.cli inputs", flush=True); time.sleep(0.2)
print("Running stage 'teachers':"); print("> python -m pipelines.cli teachers", flush=True); time.sleep(0.4)
(runs / "teachers.json").write_text(json.dumps({"seconds": 0.1}))
print("Stage 'warmup@natural' didn't change, skipping")
print("Stage 'inversion' is cached - skipping run, checking out outputs")
print("Running stage 'distill@derd-0':"); print("> python -m pipelines.cli distill --only derd-seed0", flush=True)
time.sleep(0.3)
(runs / "distill-derd-seed0.json").write_text(json.dumps({"seconds": 0.05}))
sys.exit(int(sys.argv[1]))
"""


def test_stage_lines_become_wall_in_stage_and_fixed_seconds(tmp_path):
    run = bench_pipeline.run_logged([sys.executable, "-c", FAKE_DVC, "0"], tmp_path, {})
    names = [st["stage"] for st in run["stages"]]
    assert names == ["inputs", "teachers", "distill@derd-0"]
    inputs, teachers, distill = run["stages"]
    assert inputs["in_stage_s"] is None and inputs["fixed_s"] == inputs["wall_s"] >= 0.15  # its sleep, less the read delay
    assert teachers["in_stage_s"] == 0.1 and teachers["wall_s"] >= 0.35
    assert teachers["fixed_s"] == pytest.approx(teachers["wall_s"] - 0.1)
    assert distill["in_stage_s"] == 0.05 and distill["wall_s"] >= 0.25  # the last stage ends with the process
    assert run["skipped"] == ["warmup@natural", "inversion"]
    assert run["server_start_s"] == 2.5
    assert sum(st["wall_s"] for st in run["stages"]) + run["before_first_stage_s"] == pytest.approx(run["total_s"])


def test_a_failed_run_stops_with_its_output(tmp_path):
    with pytest.raises(SystemExit, match="failed \\(3\\)(.|\n)*Running stage 'distill@derd-0'"):
        bench_pipeline.run_logged([sys.executable, "-c", FAKE_DVC, "3"], tmp_path, {})


def stage(name, wall, inner):
    return {"stage": name, "wall_s": wall, "in_stage_s": inner, "fixed_s": wall - (inner or 0.0)}


def test_the_report_states_the_share_the_budget_multiple_and_the_before_after_ratio():
    P = {"setup": {"commit": "abc1234", "date": "today", "machine": {"loadavg_at_start": [1.0, 1.0, 1.0]}},
         "reference_workload": {"seconds": 50.0, "matmuls": 1000},
         "full": {"total_s": 1000.0, "before_first_stage_s": 10.0, "server_start_s": 8.0, "skipped": [],
                  "stages": [stage("inputs", 2.0, None), stage("teachers", 400.0, 390.0),
                             stage("distill@derd-0", 588.0, 578.0)]},
         "overhead": {"reps": 3, "median_s": {"temporary": 15.0, "shared": 5.0}},
         "sweep": {"set": "stage2.methods=[derd,dfad]", "total_s": 100.0, "skipped": ["teachers", "warmup@natural"],
                   "stages": [stage("evaluate", 60.0, 55.0), stage("report", 40.0, 35.0)]}}
    text = "\n".join(bench_pipeline.render(P))
    assert bench_pipeline.fixed_total(P["full"]) == pytest.approx(32.0)  # 10 + 2 + 10 + 10
    assert "**1000 s** = 20.0× the budget unit" in text and "goal ≤ 40×: met" in text
    assert "= **3.2%** of the run; goal ≤ 10%: met" in text
    # before: 32 - 8 (no shared server) + 2 Prefect stages x (15 - 5) = 44 s
    assert "fixed cost 44 s before vs 32 s after (**×1.38**)" in text
    assert "**100 s = 10% of the full run**" in text and "Teachers and Stage-I: 0 s (not run)." in text
    P["overhead"]["median_s"]["shared + warm"] = 3.0  # the run had the warm process: the before is one without
    warm = "\n".join(bench_pipeline.render(P))
    # 3 stage commands x (5 - 3) s = 6 s: before 38 s of 1006 s
    assert "shared server + warm process **3.0 s** (×1.67 over the shared server alone" in warm
    assert "fixed cost 38 s before vs 32 s after (**×1.19**), 3.8% vs 3.2% of the run" in warm
    del P["overhead"]["median_s"]["shared + warm"]
    P["imports"] = {"python": 0.1, "torch": 2.0}
    assert "python 0.1 s, torch 2.0 s. The Prefect stages' fixed cost: median 10.0 s." in "\n".join(bench_pipeline.render(P))
    P["reference_workload_after"] = {"seconds": 30.0, "matmuls": 1000}  # the unit brackets the run: their mean
    assert "**1000 s** = 25.0× the budget unit (40.0 s, the mean of 50.0 s just before it and 30.0 s just after it" \
        in "\n".join(bench_pipeline.render(P))
    P["setup"]["params"] = "micro.yaml"  # another profile: the default's goals are not judged
    assert "goal ≤" not in "\n".join(bench_pipeline.render(P))


def test_a_sweep_that_reran_a_teacher_says_so():
    P = {"reference_workload": {"seconds": 50.0, "matmuls": 1000},
         "full": {"total_s": 100.0, "before_first_stage_s": 1.0, "server_start_s": None, "skipped": [],
                  "stages": [stage("teachers", 99.0, 98.0)]},
         "sweep": {"set": "teachers.natural.width=8", "total_s": 50.0, "skipped": [],
                   "stages": [stage("teachers", 50.0, 49.0)]}}
    assert "Teachers and Stage-I: RAN (teachers)." in "\n".join(bench_pipeline.render(P))


def test_only_a_committed_params_file_can_be_benchmarked(tmp_path):
    assert bench_pipeline.committed_params(str(bench_pipeline.PROJECT / "presets" / "digits.yaml")) == \
        "presets/digits.yaml"
    loose = tmp_path / "micro.yaml"
    loose.write_text("data: {}\n")
    with pytest.raises(SystemExit, match=r"micro\.yaml: not a file committed"):
        bench_pipeline.committed_params(str(loose))
    inside = bench_pipeline.PROJECT / "bench" / f"uncommitted-{tmp_path.name}.yaml"  # in the project, not in HEAD
    inside.write_text("data: {}\n")
    try:
        with pytest.raises(SystemExit, match="not a file committed"):
            bench_pipeline.committed_params(str(inside))
    finally:
        inside.unlink()


def test_the_rerun_edit_changes_one_param_as_dvc_reads_it(tmp_path):
    """DVC parses params.yaml as YAML 1.2: the bench's edit must leave every other value as DVC sees it (a YAML
    1.1 round trip turned ``amp: off`` into ``false`` and reran the teachers on a Stage-II change)."""
    from ruamel.yaml import YAML

    text = (bench_pipeline.PROJECT / "params.yaml").read_text().replace('amp: "off"', "amp: off")  # the bare form too
    (tmp_path / "params.yaml").write_text(text)
    bench_pipeline.set_param(tmp_path, "stage2.lambda_rob=0.5")
    dvc_reads = YAML(typ="safe", pure=True).load
    before, after = dvc_reads(text), dvc_reads((tmp_path / "params.yaml").read_text())
    assert after["stage2"].pop("lambda_rob") == 0.5 != before["stage2"].pop("lambda_rob")
    assert after == before and after["runtime"]["amp"] == "off"
    assert "# L-inf radius" in (tmp_path / "params.yaml").read_text(), "the comments stay"


def test_interleaved_timing_reverses_its_order_every_other_round():
    from bench.timing import interleaved

    calls: list[str] = []
    result = interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, reps=4, warmup=1)
    assert calls == ["a", "b"] + ["a", "b", "b", "a", "a", "b", "b", "a"]
    assert {k: r["reps"] for k, r in result.items()} == {"a": 4, "b": 4}


def test_the_paired_ratio_is_the_median_of_each_rounds_ratio():
    from bench.timing import paired_ratio

    # a and b cost the same; a slow spell (x2) begins between a and b of round 3 and lasts: the medians'
    # ratio reads b as twice a's time, each round but the third reads them equal
    t = {"a": {"times_s": [1.0, 1.0, 1.0, 2.0, 2.0]}, "b": {"times_s": [1.0, 1.0, 2.0, 2.0, 2.0]}}
    assert t["b"]["times_s"][2] / t["a"]["times_s"][2] == 2.0
    assert paired_ratio(t, "b", "a") == 1.0 and paired_ratio(t, "a", "b") == 1.0
