"""Every command in the README is exercised: each maps to the test (or CI step) that runs it, and every
`derd` command line parses with the real CLI parser."""
from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from pipelines import cli

ROOT = Path(__file__).resolve().parent.parent

# command prefix -> (file that runs it, text in that file showing it does)
EXERCISED = {
    "sudo apt-get install -y dataset-fashion-mnist": ("derd/data.py", "apt-get install -y dataset-fashion-mnist"),
    "python3 -m venv .venv": (".ci/run", "python3 -m venv"),
    ". .venv/bin/activate": (".ci/run", '. "$venv/bin/activate"'),
    "pip install -e .": (".ci/run", "pip install -q -e"),
    "pip install -e '.[test]'": (".ci/run", "pip install -q -e '.[test]'"),
    "python -m pytest -n 2 --dist loadgroup": (".ci/run", "python -m pytest -n 2 --dist loadgroup"),
    "derd repro": ("tests/test_prefect_server.py", 'cli.main(["repro"'),
    "derd preset": ("tests/test_presets.py", '["preset", preset'),
    "derd sweep": ("tests/test_sweep.py", 'main(["sweep"'),
    "derd table": ("tests/test_sweep.py", 'main(["table"'),
    "derd ui": ("tests/test_flows.py", "tracking.ui(cfg"),
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


COMMANDS = readme_commands((ROOT / "README.md").read_text())


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
