"""`derd exps`: the workspace and its DVC experiments (as `dvc exp show --json` gives them) in one line per
experiment and method that a 120-column terminal shows whole."""
from __future__ import annotations

import pytest

from pipelines import exps, sweep
from pipelines.cli import main


def params(lambda_rob: float = 0.5, methods: tuple[str, ...] = ("derd",)) -> dict:
    return {"params.yaml": {"data": {"stage2": {"lambda_rob": lambda_rob, "methods": list(methods), "seeds": [0, 1]},
                                     "eval": {"eps": 0.15}}}}


def metrics(**methods: list[float]) -> dict:
    """metrics/eval.json's table: the teachers, then each method's seeds with Clean = the value, AA = half."""
    table = {"Nature": {"Clean": 84.0, "AA": 0.0, "Ave": 14.2}, "SAT": {"Clean": 66.4, "AA": 41.4, "Ave": 49.8}}
    for method, cleans in methods.items():
        for seed, clean in enumerate(cleans):
            table[f"{method}-seed{seed}"] = {"Clean": clean, "AA": clean / 2, "Ave": 3 * clean / 4}
    return {"metrics/eval.json": {"data": {"table": table}}, "metrics/teachers.json": {"data": {"natural": {}}}}


# the shape of `dvc exp show --json` (dvc 3.67): the workspace, then each baseline commit with its experiments
SHOW = [
    {"rev": "workspace", "name": None, "experiments": None,
     "data": {"params": params(1.0), "metrics": metrics(derd=[70.0, 72.0])}},
    {"rev": "c0ffee" + "0" * 34, "name": "main", "data": {"params": params(), "metrics": metrics(derd=[60.0, 62.0])},
     "experiments": [
         {"name": "fashion_core-derd-and-dafl-with-a-long-name", "executor": None,
          "revs": [{"rev": "e1", "name": "fashion_core-derd-and-dafl-with-a-long-name", "error": None,
                    "data": {"params": params(0.25, ("derd", "dafl")),
                             "metrics": metrics(derd=[64.0, 66.0], dafl=[50.0])}}]},
         {"name": "broken", "executor": {"state": "failed"}, "revs": [{"rev": "e2", "error": {"msg": "x"}, "data": {}}]},
         {"name": "waiting", "executor": {"state": "queued"}, "revs": [{"rev": "e3", "error": None, "data": {}}]},
     ]},
]


def test_one_line_per_experiment_and_method_with_its_changed_params():
    lines = exps.render(exps.lines(SHOW), width=120).splitlines()
    assert lines[0].split()[:6] == ["Experiment", "Method", "Seeds", "Clean", "AA", "Ave"]
    workspace, main_line, exp_derd, exp_dafl, broken, waiting = lines[1:]
    assert workspace.split()[:6] == ["workspace", "derd", "2", "71.0", "35.5", "53.2"]  # means over the seeds
    assert workspace.endswith("stage2.lambda_rob=1.0")
    assert main_line.split() == ["main", "derd", "2", "61.0", "30.5", "45.8", "–"]
    assert exp_derd.split()[1:6] == ["derd", "2", "65.0", "32.5", "48.8"]
    assert exp_derd.endswith("stage2.lambda_rob=0.25, stage2.methods=[derd, dafl]")
    assert exp_dafl.split() == ["dafl", "1", "50.0", "25.0", "37.5"]  # same experiment: name and params not repeated
    assert "(failed)" in broken and "(queued)" in waiting
    assert all(len(line) <= 120 for line in lines)
    assert "Nature" not in "\n".join(lines), "the teachers stay in `dvc exp show` and `derd table`"


@pytest.mark.parametrize("width", [80, 100, 120])
def test_every_line_fits_the_terminal(width):
    lines = exps.render(exps.lines(SHOW), width=width).splitlines()
    assert max(len(line) for line in lines) <= width
    assert any(line.rstrip().endswith("…") for line in lines) == (width < 120), "long params are cut, with a mark"


def test_derd_exps_prints_the_table_of_dvc_exp_show(monkeypatch, capsys):
    asked = {}

    def show(root, rev=None, commits=1):
        asked.update(rev=rev, commits=commits)
        return SHOW

    monkeypatch.setattr(sweep, "show", show)
    monkeypatch.setenv("COLUMNS", "120")
    assert main(["exps", "--rev", "main", "-n", "3"]) == 0
    assert asked == {"rev": "main", "commits": 3}
    out = capsys.readouterr().out.splitlines()
    assert out[1].startswith("workspace") and max(map(len, out)) <= 120
