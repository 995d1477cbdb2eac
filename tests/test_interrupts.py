"""Runs survive kills: SIGTERM stops a stage within seconds with its resume state intact, and a stage
killed with SIGKILL at a random point resumes to exactly the result of an uninterrupted run.

Parity per stage, with the work a resume redoes counted: teachers (SIGKILL here, bitwise), Stage-I generator
and pool and Stage-II students (crash-and-resume tests in test_warmup.py / test_resume.py, bitwise on CPU).
Resume states are written atomically, so a SIGKILL at any instant leaves either the previous or the next
complete state.
"""
from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
import yaml
from pipeline_profile import write_params

from derd import config, data, teachers
from derd.artifacts import load_tensors
from derd.runtime import Paths

PROJECT = Path(__file__).resolve().parent.parent
TEACHER = {"natural": {"arch": "small_cnn", "width": 8, "train": {"epochs": 8, "batch_size": 64, "lr": 0.1}}}


def _teacher_cfg() -> config.Config:
    return config.parse({"device": "cpu", "data": {"image_size": 8}, "teachers": TEACHER})


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    end = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, f"the stage ended before writing {path}:\n{proc.communicate()[0][-3000:]}"
        assert time.monotonic() < end, f"{path} never appeared"
        time.sleep(0.05)


def _counting_losses(monkeypatch) -> list[int]:
    """Count the teacher's training steps (one loss per batch) from here on."""
    calls, loss = [], teachers._teacher_loss
    monkeypatch.setattr(teachers, "_teacher_loss", lambda *a: calls.append(1) or loss(*a))
    return calls


def test_teacher_killed_at_a_random_point_resumes_bitwise(tmp_path, monkeypatch):
    """…and the resume trains only the epochs after its last state: (M − N) epochs' steps, not M's."""
    cfg = _teacher_cfg()
    torch.set_num_threads(1)
    reference = tmp_path / "reference"
    steps = _counting_losses(monkeypatch)
    teachers.prepare_teacher(cfg, "natural", data.load(cfg.data), reference)
    epochs = cfg.teachers.natural.train.epochs
    per_epoch, remainder = divmod(len(steps), epochs)
    assert remainder == 0 and per_epoch > 0

    killed = tmp_path / "killed"
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    script = textwrap.dedent(f"""
        import time, torch
        from pathlib import Path
        from derd import config, data, teachers
        torch.set_num_threads(1)
        slow = teachers._teacher_loss
        teachers._teacher_loss = lambda *a: (time.sleep(0.02), slow(*a))[1]  # room to be killed mid-epoch
        cfg = config.load({str(params)!r})
        teachers.prepare_teacher(cfg, "natural", data.load(cfg.data), Path({str(killed)!r}))
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    _wait_for(Paths(killed).checkpoints / "teacher_natural.pt", proc)
    time.sleep(random.uniform(0.0, 0.6))  # anywhere in the following epoch(s)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)
    assert not Paths(killed).teacher("natural").exists(), "killed before the end: no artifact"
    done = load_tensors(Paths(killed).checkpoints / "teacher_natural.pt")["epoch"]
    steps.clear()
    teachers.prepare_teacher(cfg, "natural", data.load(cfg.data), killed)
    assert len(steps) == (epochs - done) * per_epoch, f"resumed after epoch {done} of {epochs}, but redid other work"
    a, b = load_tensors(Paths(reference).teacher("natural")), load_tensors(Paths(killed).teacher("natural"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), "resumed teacher differs"
    assert not (Paths(killed).checkpoints / "teacher_natural.pt").exists(), "a finished teacher drops its state"


@pytest.mark.slow
@pytest.mark.prefect
@pytest.mark.xdist_group("prefect")
def test_sigterm_stops_a_training_stage_within_seconds_and_keeps_its_state(tmp_path, prefect_api):
    write_params(tmp_path / "params.yaml", {"teachers.natural.train.epochs": 500})
    env = {**os.environ, "PYTHONPATH": str(PROJECT), "PREFECT_API_URL": prefect_api, "OMP_NUM_THREADS": "1",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    proc = subprocess.Popen(["derd", "teachers"], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    state = Paths(tmp_path).checkpoints / "teacher_natural.pt"
    _wait_for(state, proc)
    os.killpg(proc.pid, signal.SIGTERM)  # what a cancelled `dvc exp run` / CI timeout sends
    sent = time.monotonic()
    out, _ = proc.communicate(timeout=30)
    assert time.monotonic() - sent < 10, "the stage kept running after SIGTERM"
    assert proc.returncode == 143, out[-3000:]
    assert "rerun the same command to continue" in out and "Traceback" not in out
    assert load_tensors(state)["epoch"] >= 1, "the resume state is intact"


def test_stage_flows_answer_sigterm_with_derds_handler_not_prefects(prefect_api):
    """Prefect swaps in its own SIGTERM handler for a flow run; it reports the crash to the server before the
    process may exit, so a stage whose server died with its `dvc repro` hung. Stage flows put derd's back."""
    from prefect import flow

    from pipelines import flows

    def handler_module() -> str:
        return signal.getsignal(signal.SIGTERM).__module__

    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    try:
        assert flow(handler_module)() == "prefect.utilities.engine"
        probe = flows.stage_flow("probe")(handler_module)
        assert probe() == "pipelines.signals"
    finally:
        signal.signal(signal.SIGTERM, before[0])
        signal.signal(signal.SIGINT, before[1])
    stage_flows = [*flows.FLOWS.values(), flows.pipeline_flow]
    assert {f.fn.__code__ for f in stage_flows} == {probe.fn.__code__}, "every stage flow is a stage_flow"
