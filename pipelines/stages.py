"""What the pipeline knows about each stage: its order, its config sections and the files it writes.

The order and the files mirror ``dvc.yaml`` (``tests/test_pipeline.py`` checks they agree): MLflow
logs these files as a stage's artifacts, stamps the run id into its sidecars, and reads its per-step
CSVs as step metrics.
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

    def files(self, root: Path, kind: str = "artifacts") -> list[Path]:
        return sorted({p for pattern in getattr(self, kind) for p in Path(root).glob(pattern) if p.is_file()})

    def record(self, root: Path) -> Path:
        """The stage's run record: MLflow run id and provenance, a DVC out restored with the stage."""
        return Path(root) / "artifacts" / "runs" / f"{self.name}.json"


STAGES: tuple[Stage, ...] = (
    Stage("teachers", ("seed", "data", "teachers"),
          artifacts=("metrics/teachers.json", "artifacts/teachers/*.json"),
          sidecars=("artifacts/teachers/*.json",)),
    Stage("warmup", ("stage1",),
          artifacts=("metrics/warmup.json", "plots/warmup*", "artifacts/stage1/*.json"),
          curves=("plots/warmup.csv",), sidecars=("artifacts/stage1/*.json",)),
    Stage("distill", ("stage2",),
          artifacts=("metrics/distill.json", "plots/distill/*.csv", "artifacts/students/*.json"),
          curves=("plots/distill/*.csv",), sidecars=("artifacts/students/*.json",)),
    Stage("evaluate", ("eval",),
          artifacts=("metrics/eval.json", "metrics/eval_table.md", "plots/eps_curve.*")),
    Stage("report", (), artifacts=("reports/report.html", "reports/report.md", "reports/figures/*.png")),
)
BY_NAME = {s.name: s for s in STAGES}


def upstream(name: str) -> tuple[Stage, ...]:
    """The stages that run before ``name`` in the DAG."""
    return STAGES[: STAGES.index(BY_NAME[name])]
