"""Every command in the README is exercised: each maps to the test (or CI step) that runs it, and every
`derd` command line parses with the real CLI parser."""
from __future__ import annotations

import os
import re
import shlex
import subprocess
from pathlib import Path

import pytest

from pipelines import cli

ROOT = Path(__file__).resolve().parent.parent

# command prefix -> (file that runs it, text in that file showing it does)
EXERCISED = {
    "$(command -v sudo) apt-get install -y dataset-fashion-mnist": ("tests/test_readme.py", "def test_the_apt_step"),
    "python3 -m venv .venv": (".ci/run", "python3 -m venv"),
    ". .venv/bin/activate": (".ci/run", '. "$venv/bin/activate"'),
    "pip install -e .": (".ci/run", "pip install -q -e"),
    "pip install -e '.[test]'": (".ci/run", "pip install -q -e '.[test]'"),
    "python -m pytest -n 2 --dist loadgroup": (".ci/run", "python -m pytest -n 2 --dist loadgroup"),
    "derd repro": ("tests/test_prefect_server.py", 'cli.main(["repro"'),
    "derd preset": ("bench/synthetic.py", '["preset", preset'),  # run by tests/test_presets.py
    "derd sweep": ("tests/test_sweep.py", 'main(["sweep"'),
    "derd table": ("tests/test_sweep.py", 'main(["table"'),
    "derd ui": ("tests/test_ui.py", "ui.mlflow(cfg"),
    "derd ui --prefect": ("tests/test_ui.py", '"ui", "--prefect"'),
    "derd exps": ("tests/test_exps.py", 'main(["exps"'),
    "dvc exp run --temp": ("tests/test_pipeline.py", '"exp", "run", "--temp"'),
    "dvc metrics show": ("tests/test_pipeline.py", '"metrics", "show"'),
    "dvc plots show": ("tests/test_pipeline.py", '"plots", "show"'),
}


def readme_commands(text: str) -> list[str]:
    """The shell commands of the README's bash blocks, split at ``&&`` and ``;``, comments dropped."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.DOTALL):
        for line in block.splitlines():
            line = line.split(" #")[0].strip()
            if line and not line.startswith("#"):
                commands += [part.strip() for part in re.split(r"&&|;", line) if part.strip()]
    return commands


README = (ROOT / "README.md").read_text()
COMMANDS = readme_commands(README)
MAX_LINES = 150  # a user's page: measurements and internals live in docs/ and bench/


def test_the_readme_has_the_two_commands():
    assert "derd repro" in COMMANDS and "python -m pytest -n 2 --dist loadgroup" in COMMANDS


def test_no_mapping_outlives_its_readme_command():
    stale = [p for p in EXERCISED if not any(c.startswith(p) for c in COMMANDS)]
    assert not stale, f"EXERCISED lists commands the README no longer has: {stale}"


@pytest.mark.parametrize("command", COMMANDS)
def test_every_readme_command_is_exercised(command):
    prefix = next((p for p in sorted(EXERCISED, key=len, reverse=True) if command.startswith(p)), None)
    assert prefix, f"README command {command!r} is run by no test: add one and list it in EXERCISED"
    where, evidence = EXERCISED[prefix]
    assert evidence in (ROOT / where).read_text(), f"{where} no longer runs {prefix!r}"
    if command.startswith("derd "):
        cli._parser().parse_args(shlex.split(command)[1:])  # SystemExit on a stale flag or subcommand


def test_the_readme_stays_a_short_users_page():
    assert len(README.splitlines()) <= MAX_LINES, f"README.md has {len(README.splitlines())} lines (at most {MAX_LINES})"


@pytest.mark.parametrize("sudo", [False, True])
def test_the_apt_step_of_command_1_runs_with_or_without_sudo(sudo, tmp_path):
    """A root container has no sudo: apt-get runs as it is; where sudo exists, through it. Stand-ins for both
    record their arguments; nothing else is on PATH."""
    (apt,) = [c for c in COMMANDS if "apt-get install" in c]
    assert COMMANDS.index(apt) == 0, "the apt step is the first command of command 1"
    bin_dir, log = tmp_path / "bin", tmp_path / "calls"
    bin_dir.mkdir()
    stubs = {"apt-get": f'echo "apt-get $*" >> {log}'}
    if sudo:
        stubs["sudo"] = f'echo "sudo $1" >> {log}; "$@"'
    for name, body in stubs.items():
        (bin_dir / name).write_text(f"#!/bin/sh\n{body}\n")
        (bin_dir / name).chmod(0o755)
    done = subprocess.run(["/bin/bash", "-c", apt], env={"PATH": str(bin_dir), "HOME": os.environ.get("HOME", "/")},
                          capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    calls = log.read_text().splitlines()
    want = ["apt-get install -y dataset-fashion-mnist"]
    assert calls == (["sudo apt-get", *want] if sudo else want)
