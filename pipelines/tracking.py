"""MLflow bookkeeping of the pipeline (DESIGN.md "MLflow conventions").

One experiment per dataset; one *parent* run per full configuration (found again by its params
hash, all params flattened, the final table as metrics); one *child* run per stage execution (stage
params, result metrics, per-step curves with their step, artifacts). The child's run id is stamped
into the stage's sidecars and into its run record (``artifacts/runs/<stage>[-<unit>].json``, a DVC out), so a
stage that DVC restores from its cache still names the run that produced it; the parent of every
later stage links the upstream runs by tag (``derd.run.<stage>``).

Browsing (MLflow 3.17 opens in its GenAI view): the experiment is tagged as classic model development,
and :func:`runs_link` is the deep link to its runs table, opened on a saved view (an experiment tag)
whose columns are the dataset and each method's headline numbers (mean over seeds, logged on the
parent). Runs that read data carry it as an MLflow dataset input (name, digest, split as context;
metadata only, nothing is loaded); the parent's description names the profile, methods and seeds.

The store defaults to ``sqlite:///<project>/mlflow.db`` with artifacts in ``<project>/mlartifacts``,
where ``<project>`` is the real project even when DVC runs the stage in an experiment copy under
``<project>/.dvc/tmp/exps/``: every run lands in one store.
"""
from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Iterable, Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

from derd.artifacts import read_json, versions, write_json
from derd.config import Config, json_hash
from derd.curves import read_rows
from derd.runtime import git_commit, project_root
from pipelines.stages import BY_NAME, Stage, upstream

STORE = "mlflow.db"
ARTIFACTS = "mlartifacts"
STEP_COLUMNS = ("step", "iteration", "epoch")
_BATCH = 1000  # MLflow's limit of metrics per log_batch call
EXPERIMENT_TAGS = {"mlflow.experimentKind": "custom_model_development"}  # the runs table, not the GenAI view
VIEW_KEY = "derd-runs"  # the saved runs-table view (experiment tag mlflow.sharedViewState.<key>)
HEADLINE = ("Clean", "AA", "Ave")  # per method, mean over seeds: the parent's columns in that view
DATA_SPLITS = {"teachers": "train", "evaluate": None}  # stages that read a split (None: eval.split)


class TrackingError(RuntimeError):
    """MLflow could not record a stage (the stage's own outputs are already written)."""


def tracking_uri(cfg: Config, root: str | Path) -> str:
    """``tracking.uri``, or the project's SQLite store; relative sqlite paths resolve against the project."""
    uri = cfg.tracking.uri
    if not uri:
        return f"sqlite:///{project_root(root) / STORE}"
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_absolute():
        return f"sqlite:///{project_root(root) / uri.removeprefix('sqlite:///')}"
    return uri


def artifact_root(root: str | Path) -> Path:
    return project_root(root) / ARTIFACTS


def experiment_name(cfg: Config) -> str:
    return cfg.tracking.experiment or f"derd-{cfg.data.name}"


def config_hash(cfg: Config) -> str:
    """Identity of a full configuration (every section but ``tracking``): one parent run each."""
    return cfg.section_hash(*(k for k in Config.model_fields if k != "tracking"))


def flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``; lists stay leaves."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


def metric_name(name: str) -> str:
    """MLflow accepts letters, digits, ``_ - . / space``; anything else becomes ``_``."""
    return re.sub(r"[^\w\-./ ]", "_", name)


def numeric_leaves(data: Mapping[str, Any]) -> dict[str, float]:
    """The finite numbers (and booleans) of a nested result, by flattened name."""
    out = {}
    for key, value in flatten(data).items():
        if isinstance(value, (bool, int, float)) and math.isfinite(float(value)):
            out[metric_name(key)] = float(value)
    return out


def row_metrics(rows: Iterable[Mapping[str, Any]], prefix: str = "") -> list[tuple[str, float, int]]:
    """Per-step ``(name, value, step)`` from table rows. The step is the first of ``step``/``iteration``/
    ``epoch`` present (else the row index); text columns (e.g. ``artifact``) become part of the name."""
    out = []
    for index, row in enumerate(rows):
        step_key = next((k for k in STEP_COLUMNS if k in row), None)
        step = int(float(row[step_key])) if step_key else index
        values, labels = {}, []
        for key, raw in row.items():
            if key == step_key or raw in (None, ""):
                continue
            try:
                values[key] = float(raw)
            except (TypeError, ValueError):
                labels.append(str(raw))
        name = prefix + "".join(f"{label}/" for label in labels)
        out.extend((metric_name(name + key), v, step) for key, v in values.items() if math.isfinite(v))
    return out


def curve_metrics(stage: Stage, root: Path, unit: str | None = None) -> list[tuple[str, float, int]]:
    """Step metrics of a stage (unit): its per-step CSVs (prefixed by the file's name) and sidecar histories."""
    out = []
    for path in stage.files(root, "curves", unit):
        out.extend(row_metrics(read_rows(path), f"{path.stem}/"))
    for path in stage.files(root, "sidecars", unit):
        history = read_json(path).get("history")
        if isinstance(history, list) and history and isinstance(history[0], dict):
            out.extend(row_metrics(history, f"{path.stem}/"))
    return out


def headline(final: Mapping[str, float]) -> dict[str, float]:
    """``<method>.<column>`` (mean over seeds) from the table's ``<method>-seed<k>/<column>`` metrics."""
    groups: dict[str, list[float]] = {}
    for key, value in final.items():
        model, _, column = key.rpartition("/")
        if column in HEADLINE and "-seed" in model:
            groups.setdefault(f"{model.rsplit('-seed', 1)[0]}.{column}", []).append(value)
    return {k: sum(v) / len(v) for k, v in groups.items()}


def runs_view(cfg: Config) -> str:
    """The saved runs-table view: the dataset, run name and each method's headline columns."""
    columns = ["attributes.`Dataset`", "attributes.`Duration`"]
    columns += [f"metrics.`{m}.{c}`" for m in cfg.stage2.methods for c in HEADLINE]
    return json.dumps({"selectedColumns": columns})


def runs_url(experiment_id: str, port: int = 5000) -> str:
    """The runs table of an experiment in ``derd ui`` (not MLflow 3's GenAI overview), on the saved view."""
    return (f"http://127.0.0.1:{port}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"
            f"&viewStateShareKey={VIEW_KEY}")


def description(cfg: Config) -> str:
    """The parent run's description (MLflow's ``mlflow.note.content``)."""
    t, s2 = cfg.teachers, cfg.stage2
    size = cfg.data.image_size
    return (f"Profile: {cfg.data.name} {size}×{size}, ε = {cfg.eval.eps}, table on the {cfg.eval.split} split.\n"
            f"Methods: {', '.join(s2.methods)}. Seeds: {', '.join(map(str, s2.seeds))}.\n"
            f"Teachers: natural {t.natural.arch}, robust {t.robust.arch} ({t.robust.method}); "
            f"student {s2.student.arch}. Params hash {config_hash(cfg)}.")


def dataset_input(cfg: Config, root: Path, split: str):
    """The split as an MLflow dataset input: name, digest (the dataset's fingerprint from
    artifacts/inputs.json when present, and the split settings), the split as its context."""
    from mlflow.data.code_dataset_source import CodeDatasetSource
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.data.sources import LocalArtifactDatasetSource
    from mlflow.entities import DatasetInput, InputTag

    inputs = project_root(root) / "artifacts" / "inputs.json"
    files = read_json(inputs).get("dataset") if inputs.is_file() else None
    digest = json_hash({"files": files, "split": cfg.section_hash("data")}, 16)
    source = (CodeDatasetSource({"loader": "sklearn.datasets.load_digits"}) if cfg.data.name == "digits"
              else LocalArtifactDatasetSource(str(Path(cfg.data.root).resolve())))
    dataset = MetaDataset(source, name=cfg.data.name, digest=digest)
    return DatasetInput(dataset._to_mlflow_entity(), [InputTag("mlflow.data.context", split)])


def environment_tags(cfg: Config, root: Path) -> dict[str, str]:
    """Tags every run carries: params hash, git commit, package versions, the AutoAttack package."""
    pkgs = versions()
    for name in ("prefect", "mlflow", "dvc"):
        try:
            pkgs[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    autoattack = [f"{p} {pkgs[p]}" for p in ("autoattack", "pyautoattack") if p in pkgs]
    tags = {
        "derd.params_hash": config_hash(cfg),
        "derd.dataset": cfg.data.name,
        "derd.autoattack": ", ".join(autoattack) or "not installed",
        "derd.versions": json.dumps(pkgs, sort_keys=True),
        **{f"version.{k}": v for k, v in pkgs.items()},
    }
    commit = git_commit(root)
    if commit:
        tags["mlflow.source.git.commit"] = commit
    return tags


class Tracker:
    """A client bound to the configured store and experiment."""

    def __init__(self, cfg: Config, root: str | Path):
        from mlflow.tracking import MlflowClient

        self.cfg, self.root = cfg, Path(root)
        self.uri = tracking_uri(cfg, root)
        if self.uri.startswith("sqlite:///"):
            Path(self.uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        self.client = MlflowClient(tracking_uri=self.uri)
        self.experiment_id = self._experiment()

    def _experiment(self) -> str:
        name = experiment_name(self.cfg)
        tags = {"derd.dataset": self.cfg.data.name, **EXPERIMENT_TAGS,
                f"mlflow.sharedViewState.{VIEW_KEY}": runs_view(self.cfg)}
        found = self.client.get_experiment_by_name(name)
        if found is None:
            location = (artifact_root(self.root) / name).as_uri() if self.uri.startswith("sqlite:") else None
            from mlflow.exceptions import MlflowException

            try:
                return self.client.create_experiment(name, artifact_location=location, tags=tags)
            except MlflowException:  # created meanwhile by a parallel experiment (dvc queue start -j N)
                found = self.client.get_experiment_by_name(name)
        for key, value in tags.items():  # stores made before a tag existed, or another method list
            if found.tags.get(key) != value:
                self.client.set_experiment_tag(found.experiment_id, key, value)
        return found.experiment_id

    def parent(self, tags: Mapping[str, str]) -> str:
        """The parent run of this configuration: found by its params hash, else created with every param."""
        runs = self.client.search_runs(
            [self.experiment_id],
            f"tags.`derd.params_hash` = '{tags['derd.params_hash']}' and tags.`derd.kind` = 'parent'",
            max_results=1, order_by=["attributes.start_time ASC"],
        )
        if runs:
            return runs[0].info.run_id
        name = f"{self.cfg.data.name}-{'+'.join(self.cfg.stage2.methods)}-{tags['derd.params_hash']}"
        run = self.client.create_run(self.experiment_id, run_name=name, tags={
            **tags, "derd.kind": "parent", "mlflow.note.content": description(self.cfg)})
        params = flatten(self.cfg.model_dump(mode="json"))
        self._log(run.info.run_id, params=params)
        self.client.log_inputs(run.info.run_id, [dataset_input(self.cfg, self.root, self.cfg.eval.split)])
        return run.info.run_id

    def _log(self, run_id: str, params: Mapping[str, Any] | None = None,
             metrics: Iterable[tuple[str, float, int]] = (), tags: Mapping[str, str] | None = None) -> None:
        from mlflow.entities import Metric, Param, RunTag

        now = int(time.time() * 1000)
        ps = [Param(k, json.dumps(v) if isinstance(v, (list, dict)) else str(v)) for k, v in (params or {}).items()]
        ms = [Metric(k, v, now, step) for k, v, step in metrics]
        ts = [RunTag(k, v) for k, v in (tags or {}).items()]
        for i in range(0, len(ps), 100):  # MLflow: at most 100 params per batch
            self.client.log_batch(run_id, params=ps[i : i + 100])
        for i in range(0, len(ms), _BATCH):
            self.client.log_batch(run_id, metrics=ms[i : i + _BATCH])
        if ts:
            self.client.log_batch(run_id, tags=ts)

    def log_stage(self, stage: Stage, result: Mapping[str, Any], seconds: float,
                  final_metrics: Mapping[str, float] | None = None, unit: str | None = None) -> dict:
        """Record one finished stage (or unit of a stage) as a child run; returns its run record."""
        base = environment_tags(self.cfg, self.root)
        parent = self.parent(base)
        name = f"{stage.name}[{unit}]" if unit else stage.name
        child = self.client.create_run(self.experiment_id, run_name=name, tags={
            **base, "derd.kind": "stage", "derd.stage": stage.name, "derd.unit": unit or "",
            "mlflow.parentRunId": parent,
            "derd.stage_hash": self.cfg.section_hash(*stage.sections) if stage.sections else base["derd.params_hash"],
        }).info.run_id
        data = self.cfg.model_dump(mode="json")
        params = flatten({k: data[k] for k in stage.sections})
        final = [(metric_name(k), v, 0) for k, v in (final_metrics or {}).items()]
        metrics = [(k, v, 0) for k, v in numeric_leaves(result).items()] + final
        metrics.append(("stage_seconds", round(seconds, 3), 0))
        self._log(child, params=params, metrics=metrics + curve_metrics(stage, self.root, unit))
        if stage.name in DATA_SPLITS:
            split = DATA_SPLITS[stage.name] or self.cfg.eval.split
            self.client.log_inputs(child, [dataset_input(self.cfg, self.root, split)])
        for path in stage.files(self.root, unit=unit):
            self.client.log_artifact(child, str(path), str(path.parent.relative_to(self.root)))
        self.client.set_terminated(child, "FINISHED")
        record = {"stage": stage.name, "unit": unit, "mlflow_run_id": child, "mlflow_parent_run_id": parent,
                  "experiment": experiment_name(self.cfg), "experiment_id": self.experiment_id, "tracking_uri": self.uri,
                  "params_hash": base["derd.params_hash"], "git_commit": base.get("mlflow.source.git.commit"),
                  "seconds": round(seconds, 3)}
        links = {f"derd.run.{key}": r["mlflow_run_id"] for s in upstream(stage.name)
                 for key, r in read_records(s, self.root).items() if r.get("mlflow_run_id")}
        headline_metrics = [(k, v, 0) for k, v in headline({k: v for k, v, _ in final}).items()]
        self._log(parent, metrics=final + headline_metrics,
                  tags={**links, f"derd.run.{_record_key(stage.name, unit)}": child})
        self.client.set_terminated(parent, "FINISHED")
        return record

    def log_failure(self, stage: Stage, error: BaseException, unit: str | None = None) -> str:
        """A FAILED child run naming the error, so broken runs show in the UI too."""
        base = environment_tags(self.cfg, self.root)
        run = self.client.create_run(self.experiment_id, run_name=f"{stage.name}[{unit}]" if unit else stage.name, tags={
            **base, "derd.kind": "stage", "derd.stage": stage.name, "mlflow.parentRunId": self.parent(base),
            "derd.error": f"{type(error).__name__}: {error}"[:5000]})
        self.client.set_terminated(run.info.run_id, "FAILED")
        return run.info.run_id


def _record_key(stage: str, unit: str | None) -> str:
    return f"{stage}.{unit}" if unit else stage


def read_records(stage: Stage, root: Path) -> dict[str, dict]:
    """The run records of a stage and of each of its units, by ``stage`` / ``stage.unit``."""
    out = {}
    whole = stage.record(root)
    if whole.is_file():
        out[stage.name] = read_json(whole)
    for path in sorted(whole.parent.glob(f"{stage.name}-*.json")):
        out[_record_key(stage.name, path.stem.removeprefix(f"{stage.name}-"))] = read_json(path)
    return out


def stamp(stage_name: str, root: str | Path, record: Mapping[str, Any], unit: str | None = None) -> None:
    """Write the run record and put the MLflow run id into every sidecar the stage (unit) wrote, atomically."""
    stage, root = BY_NAME[stage_name], Path(root)
    for path in stage.files(root, "sidecars", unit):
        side = read_json(path)
        side["mlflow_run_id"] = record.get("mlflow_run_id")
        write_json(path, side)
    write_json(stage.record(root, unit), dict(record))


def log_stage(cfg: Config, root: str | Path, stage_name: str, result: Mapping[str, Any], seconds: float,
              final_metrics: Mapping[str, float] | None = None, unit: str | None = None) -> dict:
    """Log a finished stage to MLflow (or skip when ``tracking.enabled`` is false); returns the run record.

    Raises :class:`TrackingError` naming the store when MLflow fails."""
    stage = BY_NAME[stage_name]
    if not cfg.tracking.enabled:
        return {"stage": stage_name, "mlflow_run_id": None, "tracking": "disabled", "seconds": round(seconds, 3)}
    uri = tracking_uri(cfg, root)
    try:
        return Tracker(cfg, root).log_stage(stage, result, seconds, final_metrics, unit)
    except Exception as exc:  # any MLflow/SQLAlchemy/OS failure: the caller reports it and keeps the outputs
        raise TrackingError(f"MLflow could not record stage {stage_name!r} in {uri}: {_reason(exc)}; fix the "
                            "store (or set tracking.enabled: false)") from exc


def _reason(exc: BaseException) -> str:
    """The first line of an MLflow/SQLAlchemy error (theirs run over several, with SQL and links)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = lines[0] if lines else ""
    text = re.sub(r"^\([\w.]+\) ", "", text)  # SQLAlchemy's "(sqlite3.DatabaseError) " prefix
    return f"{type(exc).__name__}: {text[:300]}"


def _unwritable(path: Path) -> str | None:
    """Why ``path`` (a file or folder that may not exist yet) cannot be written, or None."""
    import os

    if path.exists():
        if path.is_file() and not os.access(path, os.W_OK):
            return f"{path} is read-only"
        folder = path if path.is_dir() else path.parent
    else:
        folder = path.parent
        while not folder.exists() and folder != folder.parent:
            folder = folder.parent
        if not folder.is_dir():
            return f"{folder} is a file, not a folder"
    if not os.access(folder, os.W_OK | os.X_OK):
        return f"no permission to write in {folder}"
    return None


def check_store(cfg: Config, root: str | Path) -> None:
    """Raise :class:`TrackingError` (one line) before a stage runs when the configured local MLflow store
    (SQLite database and its artifact folder, or a file store) cannot be written. Servers are not probed."""
    if not cfg.tracking.enabled:
        return
    uri = tracking_uri(cfg, root)
    if uri.startswith("sqlite:///"):
        targets = [Path(uri.removeprefix("sqlite:///")), artifact_root(root)]
    elif uri.startswith("file:") or "://" not in uri:
        targets = [Path(uri.removeprefix("file://").removeprefix("file:"))]
    else:
        return
    for target in targets:
        problem = _unwritable(target)
        if problem:
            raise TrackingError(f"tracking.uri: the MLflow store {uri} cannot be written ({problem}); point "
                                "tracking.uri at a writable place, or set tracking.enabled: false")


def log_failure(cfg: Config, root: str | Path, stage_name: str, error: BaseException,
                unit: str | None = None) -> str | None:
    if not cfg.tracking.enabled:
        return None
    try:
        return Tracker(cfg, root).log_failure(BY_NAME[stage_name], error, unit)
    except Exception:  # the stage's own error is the one to report
        return None


def runs_link(cfg: Config, root: str | Path, port: int = 5000) -> str | None:
    """:func:`runs_url` of this project's experiment (created if new); None when tracking is off or the
    store cannot be opened (the caller's output must not depend on it)."""
    if not cfg.tracking.enabled:
        return None
    try:
        return runs_url(Tracker(cfg, root).experiment_id, port)
    except Exception:  # a broken store is reported by the tracked stage itself
        return None
