"""The Prefect flows, in-process, under the session's test harness (micro profile)."""
from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest
from pipeline_profile import write_params

from derd import config
from derd.artifacts import read_json
from derd.report.tables import EVALUATION
from pipelines import flows, tracking
from pipelines.stages import STAGES

pytestmark = [pytest.mark.prefect, pytest.mark.xdist_group("prefect")]


@pytest.fixture(scope="module")
def pipeline_run(prefect_api, tmp_path_factory) -> Path:
    """One `derd pipeline` flow (every stage flow as a subflow) on the micro profile."""
    root = tmp_path_factory.mktemp("flows")
    write_params(root / "params.yaml")
    flows.pipeline_flow(params=str(root / "params.yaml"), root=str(root))
    return root


def _flow_runs() -> list:
    from prefect.client.orchestration import get_client

    async def read():
        async with get_client() as client:
            runs = await client.read_flow_runs()
            names = {f.id: f.name for f in await client.read_flows()}
            return [(names[r.flow_id], r.state.type.value, r.parent_task_run_id) for r in runs]

    return asyncio.run(read())


def test_pipeline_flow_runs_every_stage_flow_and_records_each_run(pipeline_run):
    runs = _flow_runs()
    assert ("pipeline", "COMPLETED", None) in runs
    subflows = {name for name, state, parent in runs if state == "COMPLETED" and parent is not None}
    assert {s.name for s in STAGES} <= subflows, "every stage flow runs as a subflow of the pipeline"
    cfg = config.load(pipeline_run / "params.yaml")
    units = {"warmup": cfg.stage1_units(), "distill": cfg.student_units()}
    for stage in STAGES:
        for unit in units.get(stage.name, [None]):
            record = read_json(stage.record(pipeline_run, unit))
            assert record["stage"] == stage.name and record.get("unit") == unit and len(record["mlflow_run_id"]) == 32
    assert (pipeline_run / "reports" / "report.html").is_file()
    student = read_json(pipeline_run / "artifacts" / "students" / "derd-seed0.json")
    assert student["mlflow_run_id"] == read_json(STAGES[2].record(pipeline_run, "derd-seed0"))["mlflow_run_id"]


def test_a_stage_flow_alone_logs_a_new_child_under_the_same_parent(pipeline_run):
    before = read_json(STAGES[-1].record(pipeline_run))
    flows.report_flow(params=str(pipeline_run / "params.yaml"), root=str(pipeline_run))
    after = read_json(STAGES[-1].record(pipeline_run))
    assert after["mlflow_run_id"] != before["mlflow_run_id"]
    assert after["mlflow_parent_run_id"] == before["mlflow_parent_run_id"]


def test_tracking_failure_is_reported_and_keeps_the_outputs(pipeline_run, tmp_path, monkeypatch, caplog):
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("a file where the store's folder should be")
    params = write_params(tmp_path / "params.yaml", {"tracking.uri": f"sqlite:///{blocker}/mlflow.db"})
    monkeypatch.setattr(flows, "track", flows.track.with_options(retries=0))
    (pipeline_run / "reports" / "report.html").unlink()
    with caplog.at_level(logging.ERROR, logger="derd"):
        flows.report_flow(params=str(params), root=str(pipeline_run))
    assert (pipeline_run / "reports" / "report.html").is_file(), "the stage's output must survive"
    record = read_json(STAGES[-1].record(pipeline_run))
    assert record["mlflow_run_id"] is None and str(blocker) in record["tracking_error"]
    assert any("MLflow could not record stage 'report'" in r.message for r in caplog.records)


def test_runs_are_browsable_in_the_mlflow_runs_table(pipeline_run):
    """Experiment kind, the saved view's columns, the parent's description and headline metrics, the
    dataset inputs, and the deep link in the report: what a user sees in MLflow 3.17's runs table."""
    import html
    import json

    from mlflow.tracking import MlflowClient

    cfg = config.load(pipeline_run / "params.yaml")
    client = MlflowClient(tracking.tracking_uri(cfg, pipeline_run))
    experiment = client.get_experiment_by_name(tracking.experiment_name(cfg))
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    view = json.loads(experiment.tags[f"mlflow.sharedViewState.{tracking.VIEW_KEY}"])
    assert {"attributes.`Dataset`", "metrics.`derd.AA`", "metrics.`derd.Ave`", "metrics.`dafl.AA`"} <= set(view["selectedColumns"])
    (parent,) = client.search_runs([experiment.experiment_id], "tags.`derd.kind` = 'parent'")
    note = parent.data.tags["mlflow.note.content"]
    assert "digits 8×8" in note and f"Methods: {', '.join(cfg.stage2.methods)}. Seeds: 0." in note
    table = read_json(pipeline_run / EVALUATION)["rows"]
    derd_row = next(r for r in table if r["model"] == "derd-seed0")
    assert parent.data.metrics["derd.AA"] == pytest.approx(derd_row["AA"])
    assert parent.data.metrics["derd.Ave"] == pytest.approx(derd_row["Ave"])
    for run, split in [(parent, "test"), *((client.search_runs([experiment.experiment_id], f"tags.`derd.stage` = '{s}'")[0],
                                          split) for s, split in (("teachers", "train"), ("evaluate", "test")))]:
        (given,) = run.inputs.dataset_inputs
        assert given.dataset.name == "digits" and len(given.dataset.digest) == 16
        assert {t.key: t.value for t in given.tags}["mlflow.data.context"] == split
    link = tracking.runs_url(experiment.experiment_id)
    flows.report_flow(params=str(pipeline_run / "params.yaml"), root=str(pipeline_run))  # another test breaks the store
    assert link.endswith(f"/#/experiments/{experiment.experiment_id}/runs?workflowType=machine_learning"
                         f"&viewStateShareKey={tracking.VIEW_KEY}")
    assert link in (pipeline_run / "reports" / "report.md").read_text()
    assert f'href="{html.escape(link)}"' in (pipeline_run / "reports" / "report.html").read_text()


def test_headline_is_the_mean_over_seeds_of_each_method():
    final = {"derd-seed0/AA": 30.0, "derd-seed1/AA": 40.0, "derd-seed0/FGSM": 50.0, "Nature/AA": 0.0,
             "dafl-seed0/Ave": 12.5}
    assert tracking.headline(final) == {"derd.AA": 35.0, "dafl.Ave": 12.5}


def test_only_io_tasks_retry():
    """Training and attacks never retry (a retry would hide a bug); data fetching and logging do."""
    assert flows.fetch_data.retries > 0 and flows.track.retries > 0
    for training in (flows.prepare_teacher, flows.warmup, flows.train_student, flows.evaluate_model, flows.report):
        assert not training.retries


def test_project_root_resolves_dvc_experiment_copies(tmp_path):
    for copy in (".dvc/tmp/exps/standalone/tmpab12", ".dvc/tmp/exps/tmpcd34"):
        assert tracking.project_root(tmp_path / copy) == tmp_path.resolve()
    assert tracking.project_root(tmp_path) == tmp_path.resolve()
    cfg = config.parse({"tracking": {"uri": "sqlite:///store/runs.db"}})
    uri = tracking.tracking_uri(cfg, tmp_path / ".dvc/tmp/exps/tmpcd34")
    assert uri == f"sqlite:///{tmp_path.resolve()}/store/runs.db"


def test_row_metrics_use_the_step_column_and_name_text_columns():
    rows = [{"artifact": "generator_natural", "step": "3", "total": "1.5", "oh": "nan"},
            {"iteration": "7", "L_rob": "0.25"}]
    assert tracking.row_metrics(rows[:1], "warmup/") == [("warmup/generator_natural/total", 1.5, 3)]
    assert tracking.row_metrics(rows[1:]) == [("L_rob", 0.25, 7)]


def test_cli_reports_a_missing_input_and_logs_a_failed_run(prefect_api, tmp_path, capsys):
    from mlflow.tracking import MlflowClient

    from pipelines import cli

    params = write_params(tmp_path / "params.yaml")
    assert cli.main(["report", "--params", str(params), "--root", str(tmp_path)]) == 2
    assert f"{EVALUATION}: not found; run `derd evaluate`" in capsys.readouterr().err
    cfg = config.load(params)
    client = MlflowClient(tracking.tracking_uri(cfg, tmp_path))
    experiment = client.get_experiment_by_name(tracking.experiment_name(cfg))
    (failed,) = client.search_runs([experiment.experiment_id], "tags.`derd.stage` = 'report'")
    assert failed.info.status == "FAILED" and EVALUATION in failed.data.tags["derd.error"]
