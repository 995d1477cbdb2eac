"""Prefect flows: one per DVC stage, each a thin call of its library stage, and ``pipeline``, the whole DAG.

Tasks take configs and paths (evaluate's per-model task takes the model and test batch the library
hands it). Training and attacks never retry (a retry would hide a bug or a NaN); the I/O around them
does: fetching the dataset (downloads) and MLflow logging (a SQLite store shared by parallel
``dvc queue`` workers can be briefly locked). Tasks run one after the other inside a flow: training
seeds torch's global generator, so concurrent tasks would not be reproducible.
Each stage flow logs its MLflow child run (``pipelines.tracking``) after the stage's files are
written; a tracking failure is reported and leaves those files intact.
"""
from __future__ import annotations

import functools
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from derd import config
from derd import data as datasets
from derd.config import Config
from derd.runtime import Stopped, log
from pipelines import signals, tracking

# Every task: DVC decides what reruns; Prefect's own result cache stays off so it never skips work DVC asked for.
stage_task = task(cache_policy=NO_CACHE, persist_result=False)


def stage_flow(name: str) -> Callable[[Callable[..., dict]], Any]:
    """A Prefect flow whose runs answer SIGTERM / Ctrl-C with derd's handler: Prefect installs its own for a flow
    run, which reports the crash to the server before the process may exit (pipelines/signals.py)."""

    def decorate(fn: Callable[..., dict]) -> Any:
        @functools.wraps(fn)
        def run(*args: Any, **kwargs: Any) -> dict:
            signals.stop_on_signals()
            return fn(*args, **kwargs)

        return flow(name=name, log_prints=True)(run)

    return decorate


@stage_task(retries=3, retry_delay_seconds=10)
def fetch_data(cfg: Config) -> str:
    """Make sure the dataset is readable (downloading it when ``data.download``); I/O, so it retries."""
    return datasets.load(cfg.data).info.name


@stage_task
def prepare_teacher(cfg: Config, role: str, splits: datasets.Splits, root: Path) -> dict:
    from derd import teachers

    return teachers.prepare_teacher(cfg, role, splits, root)


@stage_task(task_run_name="warmup[{unit}]")
def warmup(cfg: Config, root: Path, unit: str) -> dict:
    from derd.stage1 import warmup as stage1

    return stage1.run_unit(cfg, root, unit)


@stage_task(task_run_name="train_student[{method}-seed{seed}]")
def train_student(cfg: Config, method: str, seed: int, root: Path) -> dict:
    from derd import distill

    return distill.train_student(cfg, method, seed, root)


@stage_task(task_run_name="evaluate[{item.name}]")
def evaluate_model(item, x, y, cfg: Config, flags_dir: Path, num_classes: int) -> tuple[dict, list[dict]]:
    """Every attack of the table on one model (its flags are saved per attack, so a rerun resumes)."""
    from derd.evaluation import evaluate as evaluation

    return evaluation.evaluate_model(item, x, y, cfg, flags_dir, num_classes)


@stage_task
def report(cfg: Config, root: Path) -> dict:
    from derd.report import tables as reporting

    with config.untraced():  # where the runs are browsed, not what the report computes
        runs_url = tracking.runs_link(cfg, root)
    return reporting.run(cfg, root, runs_url)


@stage_task(retries=2, retry_delay_seconds=5)
def track(cfg: Config, root: Path, stage: str, result: Mapping[str, Any], seconds: float,
          final_metrics: Mapping[str, float] | None = None, unit: str | None = None) -> dict:
    return tracking.log_stage(cfg, root, stage, result, seconds, final_metrics, unit)


def _tracked(stage: str, params: str, root: str, body: Callable[[Config, Path], dict],
             final_metrics: Callable[[Path], Mapping[str, float]] | None = None, unit: str | None = None) -> dict:
    """Load the config, run ``body``, then log the MLflow child run and stamp its id into the outputs."""
    cfg, where = config.load(params), Path(root)
    start = time.monotonic()
    try:
        result = body(cfg, where)
    except Stopped:  # a stop request (SIGTERM, Ctrl-C) is no failure, and the process has seconds to exit
        raise
    except Exception as exc:
        with config.untraced():
            tracking.log_failure(cfg, where, stage, exc, unit)
        raise
    seconds = time.monotonic() - start
    try:
        with config.untraced():  # bookkeeping: it logs every key, computes no output
            record = track(cfg, where, stage, result, seconds, final_metrics(where) if final_metrics else None, unit)
    except tracking.TrackingError as exc:
        log.error("%s. The stage's outputs are complete and kept; fix the store (or set tracking.enabled: false) "
                  "and the next run of the stage records normally.", exc)
        record = {"stage": stage, "mlflow_run_id": None, "tracking_error": str(exc), "seconds": round(seconds, 3)}
    with config.untraced():
        tracking.stamp(stage, where, record, unit)
    return result


def _units(stage: str, params: str, root: str, names: list[str],
           body: Callable[[Config, Path, str], dict]) -> dict:
    """A stage made of units (one DVC stage each): every unit is run and tracked on its own."""
    return {unit: _tracked(stage, params, root, lambda cfg, where, unit=unit: body(cfg, where, unit), unit=unit)
            for unit in names}


@stage_flow("teachers")
def teachers_flow(params: str = "params.yaml", root: str = ".") -> dict:
    """Load or train the natural and the robust teacher, one task each."""
    from derd import teachers

    def body(cfg: Config, where: Path) -> dict:
        fetch_data(cfg)
        return teachers.run(cfg, where, prepare=prepare_teacher)

    return _tracked("teachers", params, root, body)


@stage_flow("warmup")
def warmup_flow(params: str = "params.yaml", root: str = ".", only: str | None = None) -> dict:
    """Stage-I: each generator and the DERD_inv pool (``only``: that one), one task and MLflow run each."""
    return _units("warmup", params, root, [only] if only else config.load(params).stage1_units(), warmup)


@stage_flow("distill")
def distill_flow(params: str = "params.yaml", root: str = ".", only: str | None = None) -> dict:
    """Stage-II: one task and MLflow run per (method, seed) of stage2 (``only``: that ``<method>-seed<k>``)."""
    from derd import distill

    names = [only] if only else config.load(params).student_units()
    return _units("distill", params, root, names,
                  lambda cfg, where, unit: distill.run_unit(cfg, where, unit, train=train_student))


@stage_flow("evaluate")
def evaluate_flow(params: str = "params.yaml", root: str = ".", shard: str | None = None, merge: bool = False) -> dict:
    """The robustness table, sanity checks and ε-curves, one task per model; the table's numbers also go
    to the parent run. ``shard="i/n"``: only that shard's flags and record (``metrics/eval_shards/``, not
    tracked: a part of a stage); ``merge``: the n shards combined into the stage's outputs (tracked)."""
    from derd.evaluation import evaluate
    from derd.report.tables import table_metrics

    if shard is not None:
        return evaluate.run(config.load(params), Path(root), shard=evaluate.parse_shard(shard))
    if merge:
        return _tracked("evaluate", params, root, lambda cfg, where: evaluate.merge(cfg, where),
                        final_metrics=table_metrics)
    return _tracked("evaluate", params, root, lambda cfg, where: evaluate.run(cfg, where, evaluate_one=evaluate_model),
                    final_metrics=table_metrics)


@stage_flow("report")
def report_flow(params: str = "params.yaml", root: str = ".") -> dict:
    """reports/report.html and reports/report.md."""
    return _tracked("report", params, root, report)


@stage_flow("pipeline")
def pipeline_flow(params: str = "params.yaml", root: str = ".") -> dict:
    """The whole DAG as one flow (for Prefect deployments; DVC runs the stage flows one by one)."""
    return {name: run_stage(params=params, root=root) for name, run_stage in FLOWS.items()}


FLOWS = {"teachers": teachers_flow, "warmup": warmup_flow, "distill": distill_flow, "evaluate": evaluate_flow,
         "report": report_flow}
