"""Behaviour parity: run the whole pipeline (every registered method) on the parity profile, then compare the
numbers with the committed golden ones (tests/test_parity.py) or two checkouts tensor by tensor.

    python tests/parity.py golden                        # regen: rewrite tests/golden/parity.json after an
                                                         # intended change of the numbers (check the diff, commit)
    (cd OLD_CHECKOUT && python /path/to/tests/parity.py run /tmp/old)
    (cd NEW_CHECKOUT && python tests/parity.py run /tmp/new)
    python tests/parity.py compare /tmp/old /tmp/new     # exit 1 unless every artifact and the table match

The golden file holds each model's table row (Clean … AA, Ave, in percent), the run's other DVC metrics
(teachers' accuracies, Stage-I final loss and health, students' final losses) and the machine that made them
(:func:`machine`: a rerun there must match exactly). Flows report to PREFECT_API_URL when it is set, else to
a temporary Prefect test server (~20 s to start). One torch thread: the core count does not change the numbers.
"""
from __future__ import annotations

import json
import math
import os
import platform
import sys
import tempfile
from contextlib import ExitStack
from pathlib import Path

GOLDEN = Path(__file__).resolve().parent / "golden" / "parity.json"
# The micro profile (tests/pipeline_profile.py: tiny nets, a few steps, 16 evaluated examples) with every
# registered method, both Stage-I generators and a pool.
PROFILE = {"tracking.enabled": False, "stage1.generators": ["natural", "robust"], "stage1.inversion.pool_size": 32}
# Allowed |golden − rerun|, by whether the rerun's machine (torch, its CPU kernels, the CPU model) is the golden
# file's. Measured on a 2-core Xeon (AVX512): three runs were exactly equal; forcing other kernels (AVX2, or scalar
# with ATEN_CPU_CAPABILITY=default DNNL_MAX_CPU_ISA=SSE41) moved finals by up to 1.6% / 3.1% relative (a robust
# loss of 0.029 by 0.0009) and one table cell by one of the 16 examples (6.25 points). Another CPU model may drift
# further than forced kernels on one: the other-machine bound keeps a margin of one more example and 10 % relative.
TOLERANCE = {"same machine": {"table_points": 0.0, "rel": 0.0, "abs": 0.0},
             "other machine": {"table_points": 2 * 100 / 16, "rel": 0.10, "abs": 1e-4}}
NUMBER_STAGES = ("teachers", "warmup", "distill", "evaluate")  # what the golden numbers come from (no report)


def run(root: Path, stages: tuple[str, ...] | None = None) -> None:
    """PROFILE (with the registered methods of the code imported) in ``root``: the pipeline flow, or only the
    stage flows named in ``stages``."""
    import torch
    from pipeline_profile import write_params
    from prefect.settings import PREFECT_API_URL

    from derd import distill
    from pipelines import flows

    root.mkdir(parents=True, exist_ok=True)
    params = str(write_params(root / "params.yaml", {**PROFILE, "stage2.methods": distill.registered_methods()}))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with ExitStack() as stack:
            if not PREFECT_API_URL.value():
                from prefect.testing.utilities import prefect_test_harness

                stack.enter_context(prefect_test_harness(server_startup_timeout=120))
            if stages is None:
                flows.pipeline_flow(params=params, root=str(root))
            for name in stages or ():
                flows.FLOWS[name](params=params, root=str(root))
    finally:
        torch.set_num_threads(threads)


def machine() -> str:
    """What the exactness of the numbers depends on: torch's version, the CPU kernels it picks, the CPU model."""
    import torch

    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.is_file() else []
    model = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), platform.processor())
    return f"torch {torch.__version__}, {torch.backends.cpu.get_cpu_capability()}, {model}"


def tolerance(golden: dict) -> tuple[str, dict[str, float]]:
    """The tolerance a rerun here gets against ``golden`` (and which one it is)."""
    kind = "same machine" if golden.get("machine") == machine() else "other machine"
    return kind, TOLERANCE[kind]


def numbers(root: Path) -> dict:
    """What the golden file holds: the profile, the evaluation table and every other DVC metric of the run (the
    teachers' accuracies, each Stage-I unit's final loss and health, each student's final losses), one group of
    numbers per file (per teacher for metrics/teachers.json)."""
    metrics = root / "metrics"
    finals = {f"teachers/{role}": values for role, values in json.loads((metrics / "teachers.json").read_text()).items()}
    for f in sorted([*metrics.glob("warmup/*.json"), *metrics.glob("distill/*.json")]):
        finals[f.relative_to(metrics).with_suffix("").as_posix()] = json.loads(f.read_text())
    return {"profile": PROFILE, "machine": machine(), "table": json.loads((metrics / "eval.json").read_text())["table"],
            "finals": finals}


def _close(a: float, b: float, tolerance: float, relative: float = 0.0) -> bool:
    return math.isclose(a, b, rel_tol=relative, abs_tol=tolerance) or (math.isnan(a) and math.isnan(b))


def differences(golden: dict, got: dict, tol: dict[str, float]) -> list[str]:
    """Each number of ``got`` outside ``tol`` of ``golden``, or missing from either, in words."""
    if golden["profile"] != got["profile"]:
        return [f"the golden numbers were made with the profile {golden['profile']}, not {got['profile']}"]
    problems = []
    for part, abs_tol, rel_tol in (("table", tol["table_points"], 0.0),
                                   ("finals", tol["abs"], tol["rel"])):
        for name in sorted(golden[part].keys() | got[part].keys()):
            want, have = golden[part].get(name, {}), got[part].get(name, {})
            for key in sorted(want.keys() | have.keys()):
                if key not in want or key not in have:
                    problems.append(f"{part}[{name}][{key}]: only in the {'rerun' if key in have else 'golden file'}")
                elif not _close(float(want[key]), float(have[key]), abs_tol, rel_tol):
                    problems.append(f"{part}[{name}][{key}]: golden {want[key]}, rerun {have[key]}")
    return problems


def write_golden() -> None:
    with tempfile.TemporaryDirectory(prefix="derd-parity-") as tmp:
        run(Path(tmp), NUMBER_STAGES)
        GOLDEN.write_text(json.dumps(numbers(Path(tmp)), indent=1, sort_keys=True) + "\n")
    print(f"wrote {GOLDEN}")


def compare(a: Path, b: Path) -> list[str]:
    import torch

    problems = []
    if json.loads((a / "metrics/eval.json").read_text())["table"] != json.loads((b / "metrics/eval.json").read_text())["table"]:
        problems.append("metrics/eval.json: tables differ")
    for f in sorted((a / "artifacts").glob("*/*.pt")):
        other = b / f.relative_to(a)
        x, y = (torch.load(p, weights_only=True) for p in (f, other)) if other.is_file() else (None, None)
        tensors = x is not None and x.keys() == y.keys() and all(
            torch.equal(x[k], y[k]) if torch.is_tensor(x[k]) else True for k in x)
        print(f"{f.relative_to(a)}: {'bitwise-equal' if tensors else 'DIFFERENT'}")
        if not tensors:
            problems.append(str(f.relative_to(a)))
    return problems


if __name__ == "__main__":
    sys.path[:0] = [str(Path.cwd()), str(Path.cwd() / "tests")]  # the code of the checkout we stand in
    for key in ("DO_NOT_TRACK", "PREFECT_SERVER_ANALYTICS_ENABLED", "DVC_NO_ANALYTICS"):  # as tests/conftest.py
        os.environ.setdefault(key, "false" if key == "PREFECT_SERVER_ANALYTICS_ENABLED" else "1")
    if sys.argv[1:] == ["golden"]:
        write_golden()
    elif sys.argv[1:2] == ["run"] and len(sys.argv) == 3:
        run(Path(sys.argv[2]))
    elif sys.argv[1:2] == ["compare"] and len(sys.argv) == 4:
        sys.exit(1 if compare(Path(sys.argv[2]), Path(sys.argv[3])) else 0)
    else:
        sys.exit(__doc__)
