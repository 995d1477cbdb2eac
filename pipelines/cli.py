"""The ``derd`` command line: one subcommand per pipeline stage, each a thin call of its flow."""
from __future__ import annotations

import argparse
import importlib
import logging
import shutil
import sys
from pathlib import Path

STAGES = {
    "teachers": "load or train the natural and robust teachers",
    "warmup": "Stage-I: warm up the generator (or the DERD_inv pool) on the natural teacher",
    "distill": "Stage-II: robust distillation of every method in stage2.methods",
    "evaluate": "Clean/FGSM/PGD_S/PGD_T/CW/AA for students and teachers, sanity checks, eps-curves",
    "report": "reports/report.html and report.md from the metrics and plots",
    "pipeline": "the whole DAG (teachers -> warmup -> distill -> evaluate -> report) as one flow",
}
PRESETS_DIR = Path(__file__).resolve().parent.parent / "presets"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="derd", description="DERD: data-free experts-guided robustness distillation")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, text in STAGES.items():
        s = sub.add_parser(name, help=text, description=text)
        s.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
        s.add_argument("--root", default=".", help="project root holding artifacts/, metrics/, ... (default: .)")
    pre = sub.add_parser("preset", help="copy presets/NAME.yaml over params.yaml", description="switch profile")
    pre.add_argument("name", help="one of: " + ", ".join(sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))))
    pre.add_argument("--params", default="params.yaml")
    ui = sub.add_parser("ui", help="start the MLflow UI on 127.0.0.1 for this project's store")
    ui.add_argument("--port", type=int, default=5000)
    ui.add_argument("--root", default=".")
    ui.add_argument("--params", default="params.yaml")
    return p


def _preset(name: str, params: str) -> int:
    src = PRESETS_DIR / f"{name}.yaml"
    if not src.is_file():
        known = ", ".join(sorted(p.stem for p in PRESETS_DIR.glob("*.yaml")))
        print(f"derd preset: unknown preset {name!r}; available: {known}", file=sys.stderr)
        return 2
    from derd import config

    config.load(src)  # never install a preset that does not validate
    dst = Path(params)
    if dst.exists():
        shutil.copyfile(dst, dst.with_suffix(".yaml.bak"))
    shutil.copyfile(src, dst)
    print(f"{dst} <- {src.name} (previous file kept as {dst.with_suffix('.yaml.bak').name})")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    from derd.config import ConfigError
    from derd.data import DataError
    from derd.io import CheckpointError

    try:
        if args.command == "preset":
            return _preset(args.name, args.params)
        flows = importlib.import_module("pipelines.flows")
        if args.command == "ui":
            return flows.ui(Path(args.root), args.params, args.port)
        getattr(flows, f"{args.command}_flow")(params=args.params, root=args.root)
        return 0
    except (ConfigError, DataError, CheckpointError) as exc:
        print(f"derd {args.command}: {exc}", file=sys.stderr)
        return 2
    except FloatingPointError as exc:
        print(f"derd {args.command}: {exc}", file=sys.stderr)
        return 3


if __name__ == "__main__":
    sys.exit(main())
