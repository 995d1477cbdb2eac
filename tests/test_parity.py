"""The pipeline's numbers on the parity profile against the committed golden ones (tests/golden/parity.json).

After an intended change of a method's math this fails: regenerate with ``python tests/parity.py golden``,
read the golden file's diff (only the numbers the change should move may move) and commit it with the change.
On the golden file's machine the rerun must match exactly; elsewhere within parity.TOLERANCE["other machine"].
"""
from __future__ import annotations

import copy
import json

import parity
import pytest

GOLDEN = json.loads(parity.GOLDEN.read_text())


@pytest.mark.slow
@pytest.mark.prefect
@pytest.mark.xdist_group("prefect")
def test_the_pipeline_reproduces_the_golden_numbers(prefect_api, tmp_path):
    parity.run(tmp_path, parity.NUMBER_STAGES)
    kind, tol = parity.tolerance(GOLDEN)
    problems = parity.differences(GOLDEN, parity.numbers(tmp_path), tol)
    assert not problems, (f"{len(problems)} numbers differ from {parity.GOLDEN.name} ({kind}: {tol}). An intended "
                          "change: `python tests/parity.py golden`, then commit the new file.\n  "
                          + "\n  ".join(problems[:40]))


def test_differences_name_every_number_outside_the_tolerance():
    tol = parity.TOLERANCE["other machine"]
    rerun = copy.deepcopy(GOLDEN)
    model, unit = min(rerun["table"]), min(rerun["finals"])
    loss = min(rerun["finals"][unit])
    assert parity.differences(GOLDEN, rerun, parity.TOLERANCE["same machine"]) == []
    value = rerun["finals"][unit][loss]
    rerun["finals"][unit][loss] = value + 0.5 * tol["rel"] * abs(value)
    rerun["table"][model]["Clean"] += tol["table_points"]
    assert parity.differences(GOLDEN, rerun, tol) == [], "within the tolerance"
    assert len(parity.differences(GOLDEN, rerun, parity.TOLERANCE["same machine"])) == 2
    rerun["finals"][unit][loss] = value * (1 + 2 * tol["rel"]) + 2 * tol["abs"]
    rerun["table"][model]["Clean"] += 1
    gone = rerun["finals"].pop(max(rerun["finals"]))
    problems = parity.differences(GOLDEN, rerun, tol)
    assert len(problems) == 2 + len(gone), "one line per number"
    assert any(p.startswith(f"table[{model}][Clean]: golden") for p in problems)
    assert any(p.startswith(f"finals[{unit}][{loss}]: golden {value}") for p in problems)
    assert any("only in the golden file" in p for p in problems)
    assert "profile" in parity.differences(GOLDEN, {**rerun, "profile": {}}, tol)[0]


def test_the_tolerance_is_exact_only_on_the_golden_files_machine():
    assert parity.tolerance({"machine": parity.machine()}) == ("same machine", parity.TOLERANCE["same machine"])
    assert parity.tolerance({"machine": "torch 0.1, AVX2, another CPU"})[0] == "other machine"
