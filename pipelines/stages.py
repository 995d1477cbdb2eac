"""What the pipeline knows about each stage: its order, its config sections and the files it writes.

The order and the files mirror ``dvc.yaml`` (``tests/test_pipeline.py`` checks they agree). Stages that
DVC runs once per item (``foreach``/``matrix``: a Stage-I artifact, a (method, seed) student) write one
*unit* each; ``{unit}`` in a pattern is that unit's name. MLflow logs these files as the unit's
artifacts, stamps the run id into its sidecars, and reads its per-step CSVs as step metrics.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Stage:
    name: str
    sections: tuple[str, ...]  # config sections logged as the child run's params
    artifacts: tuple[str, ...]  # globs (relative to root) logged as MLflow artifacts
    curves: tuple[str, ...] = ()  # globs of per-step CSVs logged as step metrics
    sidecars: tuple[str, ...] = ()  # globs of .pt sidecars that receive the MLflow run id

    def files(self, root: Path, kind: str = "artifacts", unit: str | None = None) -> list[Path]:
        patterns = [p.format(unit=unit or "*") for p in getattr(self, kind)]
        return sorted({p for pattern in patterns for p in Path(root).glob(pattern) if p.is_file()})

    def record(self, root: Path, unit: str | None = None) -> Path:
        """The run record (MLflow run id and provenance) of the stage or one of its units: a DVC out."""
        return Path(root) / "artifacts" / "runs" / (f"{self.name}-{unit}.json" if unit else f"{self.name}.json")


STAGES: tuple[Stage, ...] = (
    Stage("teachers", ("seed", "data", "teachers"),
          artifacts=("metrics/teachers.json", "artifacts/teachers/*.json"),
          sidecars=("artifacts/teachers/*.json",)),
    Stage("warmup", ("stage1",),
          artifacts=("metrics/warmup/{unit}.json", "plots/warmup/{unit}.*", "artifacts/stage1/{unit}.json"),
          curves=("plots/warmup/{unit}.csv",), sidecars=("artifacts/stage1/{unit}.json",)),
    Stage("distill", ("stage2",),
          artifacts=("metrics/distill/{unit}.json", "plots/distill/{unit}.csv", "artifacts/students/{unit}.json"),
          curves=("plots/distill/{unit}.csv",), sidecars=("artifacts/students/{unit}.json",)),
    Stage("evaluate", ("eval",),
          artifacts=("metrics/eval.json", "artifacts/evaluation.json", "metrics/eval_table.md", "plots/eps_curve.*")),
    Stage("report", (), artifacts=("reports/report.html", "reports/report.md", "reports/figures/*.png")),
)
BY_NAME = {s.name: s for s in STAGES}


def upstream(name: str) -> tuple[Stage, ...]:
    """The stages that run before ``name`` in the DAG."""
    return STAGES[: STAGES.index(BY_NAME[name])]
