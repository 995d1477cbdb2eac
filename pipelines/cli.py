"""The ``derd`` command line: one subcommand per pipeline stage, each a thin call of its flow."""
from __future__ import annotations

import argparse
import atexit
import importlib
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from pipelines import signals

if TYPE_CHECKING:
    from collections.abc import Callable

    from derd.config import Config

STAGES = {
    "inputs": "fingerprint the dataset files and user teacher checkpoints (artifacts/inputs.json)",
    "teachers": "load or train the natural and robust teachers",
    "warmup": "Stage-I: warm up the generator (or the DERD_inv pool) on the natural teacher",
    "distill": "Stage-II: robust distillation of every method in stage2.methods",
    "evaluate": "Clean/FGSM/PGD_S/PGD_T/CW/AA for students and teachers, sanity checks, eps-curves",
    "report": "reports/report.html and report.md from the metrics and plots",
    "pipeline": "the whole DAG (teachers -> warmup -> distill -> evaluate -> report) as one flow",
}
UNITS = {  # stages that DVC runs once per unit (foreach / matrix in dvc.yaml)
    "warmup": "one Stage-I artifact: generator_natural, generator_robust or inversion_pool",
    "distill": "one student, <method>-seed<k> (e.g. derd-seed0)",
}
PRESETS_DIR = Path(__file__).resolve().parent.parent / "presets"
EPILOG = """\
usual entry points:
  derd repro [ARGS]         `dvc repro ARGS` with one Prefect server and one warm process for all its stages
                            (each stage forked with torch, Prefect and MLflow imported; DERD_WARM=0: off)
  dvc repro                 run the stages that are out of date (each is `derd <stage>`)
  dvc exp run --temp -S stage2.lambda_rob=1     one experiment, Stage-I reused from the cache
  derd ui                   browse the MLflow runs at http://127.0.0.1:5000 (--prefect: the Prefect flow runs)
  derd exps                 the DVC experiments: changed params, each method's Clean/AA/Ave

Each stage command is a Prefect flow. With no PREFECT_API_URL it starts a temporary server
(about 10-15 s per command; `derd repro` starts one for the whole run instead); with
`prefect server start` running and PREFECT_API_URL=http://127.0.0.1:4200/api set, every command
uses that server and runs also show in its UI.
Exit status: 0 ok, 2 bad params/checkpoint/data/missing input, 3 a loss became NaN/inf."""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="derd", description="DERD: data-free experts-guided robustness distillation",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG)
    p.add_argument("--debug", action="store_true",
                   help="on an error, show the full traceback (and Prefect's) instead of one line")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, text in STAGES.items():
        s = sub.add_parser(name, help=text, description=text)
        s.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
        s.add_argument("--root", default=".", help="project root holding artifacts/, metrics/, ... (default: .)")
        if name in UNITS:
            s.add_argument("--only", metavar="UNIT", help=UNITS[name])
        if name == "evaluate":
            how = s.add_mutually_exclusive_group()
            how.add_argument("--shard", metavar="I/N", type=_shard,
                             help="evaluate only shard I of N (0 <= I < N): the eval.batch_size batches b ≡ I (mod N) "
                                  "and AutoAttack chunks c ≡ I (mod N); writes metrics/eval_shards/, not metrics/eval.json")
            how.add_argument("--merge", action="store_true",
                             help="combine the N shards' per-example flags into exactly the unsharded outputs")
    rp = sub.add_parser("repro", help="dvc repro with one Prefect server and one warm process shared by every stage",
                        description="start one Prefect server and one warm process (every stage command is forked "
                                    "from it, its imports done; DERD_WARM=0 turns it off), run `dvc repro ARGS` with "
                                    "PREFECT_API_URL set to the server, stop both (also on failure or Ctrl-C); with "
                                    "PREFECT_API_URL already set, "
                                    "use that server. Exit status: dvc's.")
    rp.add_argument("dvc_args", nargs=argparse.REMAINDER, metavar="ARGS", help="passed to dvc repro")
    pre = sub.add_parser("preset", help="copy presets/NAME.yaml over params.yaml", description="switch profile")
    pre.add_argument("name", help="one of: " + ", ".join(sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))))
    pre.add_argument("--params", default="params.yaml")
    ui = sub.add_parser("ui", help="browse the runs: the MLflow UI on 127.0.0.1 for this project's store "
                                   "(--prefect: Prefect's UI on the project's flow runs)",
                        description="serve a UI on 127.0.0.1 until Ctrl-C (or SIGTERM/SIGHUP), which stops it and "
                                    "its workers")
    ui.add_argument("--prefect", action="store_true",
                    help="Prefect's UI on the flow runs recorded in the project's .prefect/ (they outlive the server "
                         "of `derd repro`)")
    ui.add_argument("--port", type=int, help="port (default: 5000 for MLflow, 4200 for Prefect)")
    ui.add_argument("--root", default=".")
    ui.add_argument("--params", default="params.yaml")
    ex = sub.add_parser("exps", help="the workspace and its DVC experiments in 120 columns: changed params, each "
                                     "method's Clean/AA/Ave",
                        description="the workspace and the DVC experiments of the last N commits: per experiment "
                                    "the params that differ from its commit and each method's Clean / AA / Ave "
                                    "(mean over seeds), fitted to the terminal's width")
    ex.add_argument("--rev", help="baseline commit (default: HEAD)")
    ex.add_argument("-n", type=int, default=1, metavar="N", help="experiments of the last N commits (default: 1)")
    sw = sub.add_parser("sweep", help="queue one DVC experiment per row of a sweep file (sweeps/README.md)",
                        description="queue (and with --run, run) one DVC experiment per row of a sweep file")
    sw.add_argument("file", help="a sweep file, e.g. sweeps/fashion_comparison.yaml")
    sw.add_argument("--run", action="store_true", help="then run the queue (dvc queue start) and wait for it")
    sw.add_argument("--jobs", type=int, default=1, help="experiments run in parallel with --run (default: 1)")
    sw.add_argument("--params", default="params.yaml")
    sw.add_argument("--rows", nargs="+", metavar="LABEL", help="queue only these rows (labels as in the file)")
    tb = sub.add_parser("table", help="render a sweep's experiments into docs/RESULTS.md",
                        description="collect a sweep's DVC experiments into a markdown table")
    tb.add_argument("file", help="the sweep file the experiments were queued from")
    tb.add_argument("--out", default="docs/RESULTS.md", help="markdown file holding the table (default: docs/RESULTS.md)")
    tb.add_argument("--rev", help="baseline commit of the experiments (default: HEAD)")
    tb.add_argument("--params", default="params.yaml")
    return p


def _shard(text: str) -> str:
    """``I/N`` with 0 <= I < N, checked before anything heavy is imported."""
    try:
        i, n = (int(part) for part in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected I/N such as 0/4, got {text!r}") from None
    if n < 1 or not 0 <= i < n:
        raise argparse.ArgumentTypeError(f"need 0 <= I < N, got {text!r}")
    return f"{i}/{n}"


def _preset(name: str, params: str) -> int:
    src = PRESETS_DIR / f"{name}.yaml"
    if not src.is_file():
        known = ", ".join(sorted(p.stem for p in PRESETS_DIR.glob("*.yaml")))
        print(f"derd preset: unknown preset {name!r}; available: {known}", file=sys.stderr)
        return 2
    from derd import config

    config.load(src)  # never install a preset that does not validate
    from derd.artifacts import write_bytes

    dst = Path(params)
    if dst.exists():
        write_bytes(dst.with_suffix(".yaml.bak"), dst.read_bytes())
    write_bytes(dst, src.read_bytes())  # atomically: an interrupted switch never leaves half a params file
    print(f"{dst} <- {src.name} (previous file kept as {dst.with_suffix('.yaml.bak').name})")
    return 0


def prefect_defaults(root: str | Path) -> dict[str, str]:
    """Defaults for Prefect (a user's own settings win): no telemetry (there may be no network), a patient
    temporary server (the default 20 s startup fails on slow machines), PREFECT_HOME in the project, and
    the library's ``derd`` log lines shipped to the Prefect UI."""
    return {
        "PREFECT_HOME": str(Path(root).resolve() / ".prefect"),
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "DO_NOT_TRACK": "1",
        "PREFECT_LOGGING_EXTRA_LOGGERS": "derd",
    }


def prefect_environment(root: str | Path) -> None:
    """:func:`prefect_defaults` into this process's environment, before Prefect is imported."""
    for key, value in prefect_defaults(root).items():
        os.environ.setdefault(key, value)


def _where(cfg: Config, root: str) -> None:
    """After a full run: where the report is and how to see the runs."""
    from derd.runtime import Paths
    from pipelines import tracking

    reports = Paths(Path(root).resolve()).reports
    uri = tracking.tracking_uri(cfg, root)
    print(f"\nReport: {reports / 'report.html'} (open it in a browser; Markdown: {reports / 'report.md'})")
    print(f"MLflow: run `derd ui`, then open {tracking.runs_link(cfg, root) or 'http://127.0.0.1:5000'} (store {uri})")


def _run_name(record: logging.LogRecord) -> bool:
    """Name Prefect's flow/task run in each log line (``[train_student[derd-seed0]-a1b]``)."""
    name = getattr(record, "task_run_name", None) or getattr(record, "flow_run_name", None)
    record.run = f" [{name}]" if name else ""
    return True


def _write_trace(path: Path, reads: set[str]) -> None:
    """The project's modules this process imported and the params keys it read, as JSON."""
    import json

    project = Path(__file__).resolve().parent.parent
    files = {Path(f).resolve() for m in list(sys.modules.values()) if (f := getattr(m, "__file__", None))}
    modules = sorted(str(f.relative_to(project)) for f in files
                     if f.is_relative_to(project) and f.relative_to(project).parts[0] in ("derd", "pipelines"))
    path.write_text(json.dumps({"code_root": str(project), "modules": modules, "params": sorted(reads)}, indent=1))


def _stopped(exc: BaseException) -> bool:
    """A stop request, however it arrived: our flag, Ctrl-C, or Prefect's own SIGTERM bridge inside a flow."""
    from derd.runtime import STOP, Stopped

    if isinstance(exc, Stopped | KeyboardInterrupt) or type(exc).__name__ == "TerminationSignal":
        STOP.set()  # work still running in another thread stops at its next step
        return True
    return False


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    # `derd repro` started a warm process (pipelines/warm.py): the stage runs there, its imports done
    # (the variable is warm.SOCKET_ENV; warm is imported only then: it is no code a stage's outputs depend on)
    if args.command in STAGES and (path := os.environ.get("DERD_WARM_SOCKET")) and not os.environ.get("DERD_TRACE_READS"):
        from pipelines import warm

        code = warm.forward(sys.argv[1:] if argv is None else argv, path)
        if code is not None:
            return code
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s%(run)s %(levelname)s %(message)s")
    for handler in logging.getLogger().handlers:
        handler.addFilter(_run_name)
    for chatty in ("httpx", "httpcore", "alembic"):  # one line per API call / migration otherwise
        logging.getLogger(chatty).setLevel(logging.WARNING)
    signals.stop_on_signals()
    if trace := os.environ.get("DERD_TRACE_READS"):  # a folder: the dependency test's record of this stage's reads
        from derd import config as _config

        unit = getattr(args, "only", None)
        name = f"{args.command}-{unit}.json" if unit else f"{args.command}.json"
        atexit.register(_write_trace, Path(trace) / name, _config.trace_reads())
    factory = logging.getLogRecordFactory()
    if not args.debug:  # errors arrive as one line below; log records (Prefect's too) drop their tracebacks
        logging.setLogRecordFactory(_without_traceback(factory))
    try:
        if args.command == "preset":
            return _preset(args.name, args.params)
        if args.command == "sweep":
            from pipelines import sweep

            return sweep.sweep_command(args.file, Path("."), args.params, args.run, args.jobs, args.rows)
        if args.command == "table":
            from pipelines import sweep

            return sweep.table_command(args.file, Path("."), args.params, args.out, args.rev)
        if args.command == "repro":
            from pipelines import prefect_server

            prefect_environment(".")  # the server's database where the stages' temporary ones keep theirs
            try:
                return prefect_server.repro(args.dvc_args)
            except prefect_server.ReproError as exc:  # several lines: the server log's end
                print(f"derd repro: {exc}", file=sys.stderr)
                return 2
        if args.command == "exps":
            from pipelines import exps

            return exps.exps_command(Path("."), args.rev, args.n)
        if args.command == "ui":
            return _ui(args)
        from derd import config

        cfg = config.load(args.params)  # a bad params file fails here, before Prefect starts
        if args.command == "inputs":  # a second's work: no Prefect, no MLflow
            from derd import inputs

            inputs.run(cfg, Path(args.root))
            return 0
        if args.command in ("teachers", "warmup", "distill"):  # runtime.nproc > 1: one process per GPU (torchrun)
            from derd import distributed
            from pipelines import torchrun

            if torchrun.should_launch(cfg, args.command, getattr(args, "only", None)):
                atexit.unregister(_write_trace)  # rank 0 of the launched command records the stage's reads
                return torchrun.launch(cfg.runtime.nproc, sys.argv[1:] if argv is None else argv)
            if distributed.start(cfg) and not distributed.is_main():  # rank 0 alone runs the flow and logs
                atexit.unregister(_write_trace)
                torchrun.follow(args.command, cfg, Path(args.root), getattr(args, "only", None))
                return 0
        from pipelines import tracking

        tracking.check_store(cfg, args.root)  # an unwritable MLflow store fails now, not after training
        def open_store() -> None:  # bookkeeping, no read of the stage (its experiment tags name stage2.methods)
            with config.untraced():
                if cfg.tracking.enabled:
                    tracking.Tracker(cfg, args.root)

        # while a starting Prefect server migrates its database, MLflow migrates a new store's (the flow opens it)
        _check_prefect_api(meanwhile=open_store)
        prefect_environment(args.root)
        flows = importlib.import_module("pipelines.flows")
        only = {"only": args.only} if getattr(args, "only", None) else {}
        if getattr(args, "shard", None) or getattr(args, "merge", False):
            only = {"shard": args.shard, "merge": args.merge}
        getattr(flows, f"{args.command}_flow")(params=args.params, root=args.root, **only)
        if args.command in ("report", "pipeline"):
            _where(cfg, args.root)
        return 0
    except BaseException as exc:  # Prefect's TerminationSignal is a BaseException
        if args.debug or isinstance(exc, SystemExit):
            raise
        code, message = explain(exc, args.command)
        print(f"derd {args.command}: {message}", file=sys.stderr)
        return code
    finally:
        logging.setLogRecordFactory(factory)


def _ui(args: argparse.Namespace) -> int:
    """``derd ui``: MLflow on the project's store, or (``--prefect``) Prefect on its flow-run history."""
    from pipelines import ui

    try:
        if args.prefect:
            prefect_environment(args.root)  # the project's .prefect/, where the stages keep their flow runs
            return ui.prefect(args.port or ui.PREFECT_PORT)
        from derd import config

        return ui.mlflow(config.load(args.params), args.root, args.port or ui.MLFLOW_PORT)
    except ui.UIError as exc:
        print(f"derd ui: {exc}", file=sys.stderr)
        return 2


class PrefectUnreachable(ConnectionError):
    """PREFECT_API_URL names a server that does not answer."""


def _check_prefect_api(timeout: float = 5.0, meanwhile: Callable[[], object] | None = None) -> None:
    """With PREFECT_API_URL set, make sure a server answers before a stage starts (Prefect itself fails
    deep inside the flow engine with a traceback). A server ``derd repro`` is still starting is waited for,
    after ``meanwhile()``."""
    url = os.environ.get("PREFECT_API_URL", "").strip()
    if not url:
        return
    from pipelines.prefect_server import WAIT_ENV, answers, await_api

    if wait := os.environ.get(WAIT_ENV):  # the server `derd repro` started may still be coming up
        if meanwhile is not None and not answers(url):
            meanwhile()
        if not await_api(url, float(wait)):
            raise PrefectUnreachable(f"PREFECT_API_URL={url}: the Prefect server `derd repro` started did not answer "
                                     f"within {wait} s (derd repro says why when the run stops)")
        return
    import urllib.error
    import urllib.request

    try:
        urllib.request.urlopen(url.rstrip("/") + "/health", timeout=timeout).close()
    except urllib.error.HTTPError:
        return  # a server answered (whatever it said); Prefect reports version problems itself
    except (OSError, ValueError) as exc:
        reason = getattr(exc, "reason", None) or exc
        raise PrefectUnreachable(
            f"PREFECT_API_URL={url}: no Prefect server answers ({reason}); start one with `prefect server start`, "
            "or unset PREFECT_API_URL so that each command starts a temporary server") from None


def _one_line(text: str, limit: int = 500) -> str:
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[: limit - 1] + "…"


def explain(exc: BaseException, command: str) -> tuple[int, str]:
    """Exit status and message for an error that reached the CLI: 2 bad input (params, data, checkpoint,
    missing file, unwritable store, unreachable server, full disk), 3 a non-finite loss, 1 anything else."""
    from derd.artifacts import CheckpointError
    from derd.config import ConfigError
    from derd.data import DataError
    from derd.report.tables import ReportError
    from pipelines.tracking import TrackingError

    if _stopped(exc):
        return 143, "stopped by a signal; the resume state is kept: rerun the same command to continue"
    if isinstance(exc, FloatingPointError):
        return 3, _one_line(exc)
    if isinstance(exc, ConfigError):
        return 2, str(exc)  # one line per problem
    if isinstance(exc, (DataError, CheckpointError, ReportError, TrackingError, PrefectUnreachable)):
        return 2, _one_line(exc)
    if isinstance(exc, OSError) and not isinstance(exc, ConnectionError):
        if exc.filename and exc.strerror and str(exc.filename) not in str(exc.strerror):
            return 2, _one_line(f"{exc.filename}: {exc.strerror}")
        return 2, _one_line(exc)
    text = str(exc)
    if "Failed to reach API" in text or type(exc).__name__ in ("ConnectError", "ConnectTimeout") \
            or isinstance(exc, ConnectionError):
        url = os.environ.get("PREFECT_API_URL") or "the Prefect API"
        return 2, _one_line(f"cannot reach {url} ({text or type(exc).__name__}); start it with `prefect server "
                            "start`, or unset PREFECT_API_URL so that each command starts a temporary server")
    if isinstance(exc, ValueError | TypeError | KeyError | RuntimeError | NotImplementedError):
        first = text.strip().splitlines()[0] if text.strip() else ""
        return 1, _one_line(f"{type(exc).__name__}: {first} (rerun as `derd --debug {command}` for the traceback)")
    return 1, _one_line(f"unexpected {type(exc).__name__}: {text} (rerun as `derd --debug {command}` for the "
                        "traceback)")


def _without_traceback(factory):
    """A log-record factory that keeps the message and drops attached tracebacks (``exc_info``, stack)."""

    def make(*args, **kwargs):
        record = factory(*args, **kwargs)
        record.exc_info, record.exc_text, record.stack_info = None, None, None
        return record

    return make


if __name__ == "__main__":
    sys.exit(main())
