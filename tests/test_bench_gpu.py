"""``python -m bench.gpu`` (the device check before a first GPU run) on the CPU at --micro scale: every section is
reported, the CUDA-only parts are skipped by name, and a check fails (and the command with it) when its numbers
are wrong."""
from __future__ import annotations

import contextlib
import io
import json
import math
import re

import pytest
import torch

from bench import gpu, stage2
from derd.distill import loop

pytestmark = [pytest.mark.slow, pytest.mark.prefect, pytest.mark.xdist_group("prefect")]
MICRO = ["--micro", "--device", "cpu", "--presets", "cifar10", "--threads", "1"]
SECTIONS = ("## Device", "## Checks", "## Skipped", "## Presets end to end", "## Numerics", "## torchrun",
            "## Matmul peaks", "## One full-batch DERD iteration", "## Projected full runs")
LINE = re.compile(r"^(PASS|FAIL|SKIP)  (\S+): (.+)$")


def _main(args: list[str]) -> tuple[int, str]:
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = gpu.main(args)
    return code, printed.getvalue()


@pytest.fixture(scope="module")
def micro_run(tmp_path_factory, prefect_api):
    """One --micro run of every section; the torchrun check's CLI uses the session's Prefect server."""
    out = tmp_path_factory.mktemp("gpu")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PREFECT_API_URL", prefect_api)
        code, printed = _main([*MICRO, "--out", str(out)])
    return code, printed, (out / "gpu.md").read_text(), json.loads((out / "gpu.json").read_text())


def test_a_cpu_micro_run_reports_every_section_and_names_what_it_skipped(micro_run):
    code, printed, md, report = micro_run
    checks = {c["name"]: c for c in report["checks"]}
    assert code == 0, printed
    lines = [m.groups() for m in map(LINE.match, printed.splitlines()) if m]
    assert [(s, n) for s, n, _ in lines] == [(c["status"], c["name"]) for c in report["checks"]]  # one line each
    assert "**CPU run: no GPU was available to this run.**" in md
    for section in SECTIONS:
        assert f"\n{section}" in md, section
    for name in ("presets/cifar10", "amp-bf16/cifar10", "amp-fp16/cifar10", "channels_last/cifar10", "torchrun/1",
                 "peak/fp32", "timing/cifar10", "projection/cifar10"):
        assert checks[name]["status"] == "PASS", (name, checks[name]["summary"])
    for name in ("tf32/cifar10", "cudnn_benchmark/cifar10", "compile/cifar10", "torchrun/2-nccl", "peak/tf32",
                 "peak/bf16", "timing-bf16/cifar10"):
        assert checks[name]["status"] == "SKIP" and checks[name]["summary"].startswith("skipped: no CUDA"), name
        assert f"- {name}: skipped: no CUDA" in md
    assert checks["torchrun/1"]["data"]["runtime"]["world_size"] == 1
    assert set(checks["presets/cifar10"]["data"]["stage_s"]) == {"inputs", "teachers", "warmup", "distill",
                                                                  "evaluate", "report"}
    timing = checks["timing/cifar10"]["data"]
    assert timing["iteration_flops"] > 0 and timing["reduced_batch"] and 0 < timing["mfu"]["fp32"] < 1
    projected = checks["projection/cifar10"]["data"]
    assert math.isfinite(projected["total_s"]) and projected["total_s"] > projected["parts"]["Stage-II"]["seconds"] > 0


def test_an_injected_bf16_error_fails_that_check_and_the_command(tmp_path, monkeypatch):
    real = gpu.one_step

    def off_by_half(cfg, device, batch, tf32_on):
        out = real(cfg, device, batch, tf32_on)
        if cfg.runtime.amp == "bf16":
            out["g_rob"] = out["g_rob"] * 1.6  # relative error 0.6 > the 0.5 bf16 gradient tolerance
        return out

    monkeypatch.setattr(gpu, "one_step", off_by_half)
    code, printed = _main([*MICRO, "--only", "numerics", "--out", str(tmp_path)])
    assert code == 1
    status = {m[2]: m[1] for m in map(LINE.match, printed.splitlines()) if m}
    assert status["amp-bf16/cifar10"] == "FAIL"
    assert status["amp-fp16/cifar10"] == status["channels_last/cifar10"] == "PASS"
    md = (tmp_path / "gpu.md").read_text()
    assert "| amp-bf16/cifar10 | **FAIL** | loss rel err" in md and "(exit status 1)" in md
    assert "\n## torchrun\n" in md and "Not run." in md  # sections left out still show, empty


def _bare_assert():
    raise AssertionError  # a bare assert's exception (pytest rewrites the asserts of test modules)


def test_a_crashing_check_fails_alone():
    run = gpu.Run()
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        run.run("boom", lambda: torch.zeros(2) @ torch.zeros(3))
        run.guarded("setup", _bare_assert)  # a crash before a section's own checks
        run.run("fine", lambda: ("ok", {}))
    assert [(c.name, c.status) for c in run.checks] == [("boom", "FAIL"), ("setup", "FAIL"), ("fine", "PASS")]
    assert printed.getvalue().startswith("FAIL  boom: RuntimeError: ")
    line = _bare_assert.__code__.co_firstlineno + 1  # no message: the summary says where it was raised
    assert run.checks[1].summary.startswith(f"AssertionError: at test_bench_gpu.py:{line}: raise AssertionError")


def test_builds_inside_one_artifacts_block_share_its_teachers():
    """numerics sharpens the block's teachers once: every stage2.build inside the block must read those, and the
    loaders come back when the block ends."""
    real = loop.load_teacher
    cfg = gpu.preset_config("cifar10", gpu.SCALES["micro"], 28, batch=2)
    with stage2.in_memory_artifacts(cfg):
        first, method = stage2.build(cfg, device=torch.device("cpu"))
        method.close()
        second, method = stage2.build(cfg)
        method.close()
    assert all(second.teachers[role] is teacher for role, teacher in first.teachers.items())
    assert loop.load_teacher is real
    third, method = stage2.build(cfg)  # a new block: new teachers
    method.close()
    assert not any(third.teachers[role] is teacher for role, teacher in first.teachers.items())
