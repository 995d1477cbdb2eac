"""Sweeps (pipelines/sweep.py): -S overrides from base ∪ set ∪ row, and the results table from fake
eval.json dicts. No DVC experiment runs here (the queue itself is checked by hand, sweeps/README.md)."""
from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest
import yaml
from hydra.core.override_parser.overrides_parser import OverridesParser

from derd.report.tables import METHOD_LABELS
from pipelines import sweep
from pipelines.cli import main

ROOT = Path(__file__).resolve().parents[1]

WORKSPACE = {
    "seed": 0,
    "data": {"name": "digits", "image_size": 16, "augment": {"crop_padding": 2, "hflip": False}},
    "stage2": {"methods": ["derd", "dfad"], "seeds": [0], "lambda_nat": 0.1, "lambda_rob": 1.0, "augment": True,
               "aggregation": "sga", "attack": {"eps": 0.15, "steps": 5, "step_size": 0.0375}},
    "eval": {"split": "test", "eps": 0.15, "n_examples": 450},
}


def write_sweep(tmp_path: Path, text: str, name: str = "demo.yaml", base: dict | None = None) -> Path:
    if base is not None:
        (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    path = tmp_path / name
    path.write_text(text)
    return path


SWEEP = """\
title: Demo table
base: base.yaml
set: {eval.split: val, stage2.seeds: [0, 1, 2]}
rows:
  DERD: {stage2.methods: [derd]}
  "w/o SGA": {stage2.methods: [derd], stage2.aggregation: sum}
  both:
    stage2.methods: [derd, dfad]
    stage2: {attack: {steps: 3}}
"""


@pytest.fixture
def demo(tmp_path):
    base = {"data": {"augment": {"hflip": True}}, "stage2": {"lambda_nat": 0.1, "lambda_rob": 0.5}}
    return sweep.load(write_sweep(tmp_path, SWEEP, base=base), tmp_path)


# ---------------------------------------------------------------- overrides
def test_overrides_are_the_leaves_of_base_set_row_that_differ_from_the_workspace(demo):
    assert sweep.overrides(demo, "DERD", WORKSPACE) == [
        "data.augment.hflip=true", "stage2.lambda_rob=0.5", "eval.split=val", "stage2.seeds=[0, 1, 2]",
        "stage2.methods=[derd]"]  # lambda_nat equals the workspace: not passed
    assert "stage2.aggregation=sum" in sweep.overrides(demo, "w/o SGA", WORKSPACE)
    both = sweep.overrides(demo, "both", WORKSPACE)
    assert "stage2.attack.steps=3" in both  # nested row keys flattened
    assert not any(o.startswith(("stage2.attack.eps", "stage2.methods")) for o in both)  # the workspace's already


def test_later_layers_win_and_a_key_replaces_what_is_above_or_below_it():
    assert sweep.merge({"a.b": 1, "a.c": 2}, {"a.b": 3}) == {"a.b": 3, "a.c": 2}
    assert sweep.merge({"a.b": 1, "a.c": 2}, {"a": [5]}) == {"a": [5]}
    assert sweep.merge({"a": None}, {"a.b": 1}) == {"a.b": 1}
    assert sweep.leaves({"a": {"b": 1, "c.d": [1, {"x": 2}]}, "e": {}}) == {"a.b": 1, "a.c.d": [1, {"x": 2}], "e": {}}


def test_values_compare_by_type_so_true_is_not_1_and_1_is_1_0(tmp_path):
    s = sweep.load(write_sweep(tmp_path, "rows: {r: {a: 1, b: true, c: 1.0, d: [1, 2], e: null}}"), tmp_path)
    assert sweep.overrides(s, "r", {"a": 1.0, "b": 1, "c": 1, "d": [1, 2.0], "e": None}) == ["b=true"]


def test_a_key_the_workspace_lacks_is_added_with_plus(demo):
    ws = {k: v for k, v in WORKSPACE.items() if k != "eval"}
    assert "+eval.split=val" in sweep.overrides(demo, "DERD", ws)


@pytest.mark.parametrize("value", [
    [0, 1, 2], ["derd"], ["derd", "dfad"], [], 0.003, 1e-05, 2.5e-7, -2, 0, True, False, None, "natural", "e",
    "10", "true", "null", "a b", "x,y", "it's", "c:\\tmp\\", "back\\'slash", "${oops}", "[1]", "0.1", ["a b", 1.5],
    float("inf"),
])
def test_every_value_reads_back_unchanged_through_hydra_which_parses_dvc_s(value):
    parsed = OverridesParser.create().parse_override(f"k={sweep.hydra_value(value)}").value()
    assert parsed == value and type(parsed) is type(value)


def test_queue_command_is_one_shell_safe_line(demo):
    cmd = sweep.queue_command(demo, "w/o SGA", WORKSPACE)
    assert cmd[:6] == ["dvc", "exp", "run", "--queue", "-n", "demo-w-o-sga"]
    assert cmd[6::2] == ["-S"] * (len(cmd[6:]) // 2)
    assert "-S 'stage2.methods=[derd]'" in shlex.join(cmd)


def test_experiment_names_are_slugs_and_must_be_unique(tmp_path):
    assert sweep.slug("w/o T_nat") == "w-o-t-nat" and sweep.slug("ε = 0.15") == "eps-0-15"
    assert sweep.slug("DERD, plain reading") == "derd-plain-reading"
    with pytest.raises(sweep.SweepError, match="share the experiment name"):
        sweep.load(write_sweep(tmp_path, "rows: {'w/o SGA': {}, 'W-O sga': {}}"), tmp_path)
    with pytest.raises(sweep.SweepError, match="unknown key"):
        sweep.load(write_sweep(tmp_path, "rows: {a: {}}\nrow: {}"), tmp_path)
    with pytest.raises(sweep.SweepError, match="given twice"):
        sweep.load(write_sweep(tmp_path, "rows: {a: {}, a: {}}"), tmp_path)


def test_a_row_that_does_not_validate_stops_the_sweep_with_its_label(tmp_path):
    s = sweep.load(write_sweep(tmp_path, "rows: {bad: {stage2.lambda_nta: 1}, eps: {eval.eps: 0.2}}"), tmp_path)
    workspace = yaml.safe_load((ROOT / "params.yaml").read_text())
    with pytest.raises(sweep.SweepError, match="row 'bad'.*lambda_nta"):
        sweep.validate(s, "bad", workspace)
    with pytest.raises(sweep.SweepError, match="one ε"):  # eval.eps alone breaks the shared radius
        sweep.validate(s, "eps", workspace)


def test_the_projects_sweep_files_validate_against_params_yaml():
    workspace = yaml.safe_load((ROOT / "params.yaml").read_text())
    files = sorted((ROOT / "sweeps").glob("*.yaml"))
    assert {f.name for f in files} >= {"fashion_comparison.yaml", "digits_comparison.yaml", "fashion_eps_val.yaml"}
    for f in files:
        s = sweep.load(f, ROOT)
        for label in s.rows:
            cfg = sweep.validate(s, label, workspace)
            assert cfg.stage2.seeds and cfg.stage2.methods
    comparison = sweep.load(ROOT / "sweeps" / "fashion_comparison.yaml", ROOT)
    methods = {sweep.validate(comparison, label, workspace).stage2.methods[0] for label in comparison.rows}
    assert methods == set(METHOD_LABELS)  # every method, the data-ful ceiling included


# ---------------------------------------------------------------- the table
def fake_eval(students: dict[str, list[float]], teachers=(90.0, 70.0), eps=0.15, split="test",
              suspect: str | None = None) -> dict:
    rows = [{"model": "Nature", "kind": "teacher", "Clean": teachers[0], "PGD_S": 0.0, "sanity": {"eps1": True}},
            {"model": "SAT", "kind": "teacher", "Clean": teachers[1], "PGD_S": 40.0, "sanity": {"eps1": True}}]
    for method, cleans in students.items():
        for seed, clean in enumerate(cleans):
            model = f"{method}-seed{seed}"
            rows.append({"model": model, "kind": "student", "method": method, "seed": seed, "Clean": clean,
                         "PGD_S": clean / 2, "sanity": {"eps1": model != suspect}})
    return {"split": split, "eps": eps, "n_examples": 500, "rows": rows,
            "autoattack": {"package": "pyautoattack", "version": "0.2.0", "aa_version": "standard", "n_examples": 500},
            "table": {r["model"]: {"Clean": r["Clean"]} for r in rows}}


def exp(name, state="success", rev="r1", baseline="b" * 40, metrics=None):
    return sweep.Experiment(name, state, rev, baseline, metrics or {})


def test_table_aggregates_seeds_keeps_teachers_once_and_lists_rows_that_did_not_run(demo):
    found = {"demo-derd": exp("demo-derd", rev="r1"), "demo-w-o-sga": exp("demo-w-o-sga", state="failed"),
             "demo-both": exp("demo-both", rev="r3")}
    evals = {"r1": fake_eval({"derd": [80.0, 82.0, 84.0]}),
             "r3": fake_eval({"derd": [70.0, 72.0, 74.0], "dfad": [50.0, 52.0]}, suspect="dfad-seed1")}
    outcomes = sweep.collect(demo, found, evals.get, WORKSPACE)
    text = sweep.render(demo, outcomes, "sweeps/demo.yaml")
    lines = text.splitlines()
    assert lines[0] == "<!-- table:demo -->" and lines[-1] == "<!-- /table:demo -->" and "## Demo table" in text
    assert f"Produced by: `derd sweep sweeps/demo.yaml --run && derd table sweeps/demo.yaml` on commit `{'b' * 40}`" in text
    assert "Split: test" in text and "ε = 0.15" in text and "n = 500" in text and "pyautoattack 0.2.0 (standard)" in text
    table = [line for line in lines if line.startswith("| ")]
    assert table[0].startswith("| Row | Clean | FGSM | PGD_S | PGD_T | CW | AA | Ave | Seeds | Status |")
    assert [r.split(" | ")[0][2:] for r in table[1:]] == ["Nature", "SAT", "DERD", "w/o SGA", "both: DERD", "both: DFAD"]
    derd = table[3]
    assert "| 82.00 ± 2.00 | – | 41.00 ± 1.00 |" in derd and derd.endswith("| 3 | ok |")
    assert table[4] == "| w/o SGA | – | – | – | – | – | – | – | 0 | not run (failed) |"
    assert table[6].endswith("| 2/3 | **suspect**: dfad-seed1: eps1 |")  # a missing seed is shown, not hidden
    assert "| 90.00 |" in table[1] and table[1].endswith("| 1 | ok |")


def test_teachers_that_differ_between_rows_are_shown_per_row_and_settings_that_vary_are_named(demo):
    found = {n: exp(n, rev=n) for n in ("demo-derd", "demo-w-o-sga")}
    evals = {"demo-derd": fake_eval({"derd": [80.0, 81.0, 82.0]}, eps=0.1),
             "demo-w-o-sga": fake_eval({"derd": [70.0, 71.0, 72.0]}, teachers=(90.0, 60.0), eps=0.2)}
    text = sweep.render(demo, sweep.collect(demo, found, evals.get, WORKSPACE), "demo.yaml")
    assert "| Nature |" in text and "| SAT (DERD) |" in text and "| SAT (w/o SGA) |" in text
    assert "ε = 0.1 (DERD); 0.2 (w/o SGA)" in text
    assert "| both | – |" in text and "not run (missing)" in text


def test_metrics_from_exp_show_are_used_when_the_full_file_cannot_be_read(demo):
    data = fake_eval({"derd": [80.0, 82.0, 84.0]})
    shown = {k: v for k, v in data.items() if k != "rows"}  # `dvc exp show --json` drops lists
    found = {"demo-derd": exp("demo-derd", metrics=shown)}
    outcomes = sweep.collect(demo, found, lambda rev: None, WORKSPACE)
    assert outcomes[0].evaluation and not outcomes[0].full_rows
    text = sweep.render(demo, outcomes, "demo.yaml")
    assert "| DERD | 82.00 ± 2.00 |" in text and "sanity unknown" in text


def test_the_data_ful_row_is_marked_even_under_another_label(tmp_path):
    s = sweep.load(write_sweep(tmp_path, "rows: {ceiling: {stage2.methods: [rslad_real]}}"), tmp_path)
    found = {"demo-ceiling": exp("demo-ceiling")}
    text = sweep.render(s, sweep.collect(s, found, {"r1": fake_eval({"rslad_real": [85.0]})}.get, WORKSPACE), "x")
    assert "| ceiling (data-ful) | 85.00 |" in text


def test_experiments_are_read_from_dvc_exp_show_json():
    show = [
        {"rev": "workspace", "name": None, "experiments": None, "data": {}},
        {"rev": "c" * 40, "name": "master", "experiments": [
            {"name": "demo-derd", "executor": {"state": "success"},
             "revs": [{"rev": "e1", "name": "demo-derd", "error": None,
                       "data": {"metrics": {"metrics/eval.json": {"data": {"table": {"Nature": {"Clean": 1.0}}}}}}}]},
            {"name": "demo-x", "executor": {"state": "failed"}, "revs": [{"rev": "e2", "error": {"msg": "failed"}}]},
            {"name": "demo-y", "executor": None, "revs": [{"rev": "e3", "error": None, "data": {}}]},
        ]},
    ]
    found = sweep.experiments(show)
    assert found["demo-derd"].state == "success" and found["demo-derd"].baseline == "c" * 40
    assert found["demo-derd"].metrics["table"]["Nature"]["Clean"] == 1.0
    assert found["demo-x"].state == "failed" and found["demo-y"].state == "success"


def test_the_block_between_markers_is_replaced_and_added_when_absent():
    block = "<!-- table:demo -->\nnew\n<!-- /table:demo -->\n"
    text = "# Results\n\nintro\n\n<!-- table:demo -->\nold\n<!-- /table:demo -->\n\n<!-- table:other -->\nx\n"
    assert sweep.replace_block(text, "demo", block) == (
        "# Results\n\nintro\n\n<!-- table:demo -->\nnew\n<!-- /table:demo -->\n\n<!-- table:other -->\nx\n")
    assert sweep.replace_block("# Results\n", "demo", block) == "# Results\n\n" + block
    assert sweep.replace_block("", "demo", block) == block
    with pytest.raises(sweep.SweepError, match="closing"):
        sweep.replace_block("<!-- table:demo -->\n", "demo", block)


def test_derd_table_writes_the_block_into_the_results_file(demo, tmp_path, monkeypatch):
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(WORKSPACE))
    out = tmp_path / "docs" / "RESULTS.md"
    out.parent.mkdir()
    out.write_text("# Results\n\nkept\n")
    show = [{"rev": "b" * 40, "experiments": [{"name": "demo-derd", "executor": {"state": "success"},
                                                "revs": [{"rev": "r1", "error": None, "data": {}}]}]}]
    monkeypatch.setattr(sweep, "show", lambda root, rev=None, commits=1: show)
    monkeypatch.setattr(sweep, "_read_full", lambda root: {"r1": fake_eval({"derd": [80.0, 82.0, 84.0]})}.get)
    monkeypatch.chdir(tmp_path)
    assert main(["table", "demo.yaml"]) == 0
    text = out.read_text()
    assert text.startswith("# Results\n\nkept\n\n<!-- table:demo -->") and text.count("<!-- table:demo -->") == 1
    assert "| DERD | 82.00 ± 2.00 |" in text and "not run (missing)" in text
    assert main(["table", "demo.yaml"]) == 0 and out.read_text() == text  # idempotent


def test_derd_sweep_queues_only_what_is_not_there_and_prints_the_commands(demo, tmp_path, monkeypatch, capsys):
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(yaml.safe_load((ROOT / "params.yaml").read_text())))
    ran = []
    monkeypatch.setattr(sweep, "show", lambda root, rev=None: [
        {"rev": "b", "experiments": [{"name": "demo-derd", "executor": {"state": "success"}, "revs": [{"rev": "r"}]},
                                     {"name": "demo-both", "executor": {"state": "failed"}, "revs": [{"rev": "q"}]}]}])
    monkeypatch.setattr(sweep.subprocess, "run", lambda cmd, **kw: ran.append(cmd[1:]) or _Done())
    monkeypatch.chdir(tmp_path)
    assert main(["sweep", "demo.yaml"]) == 0
    out = capsys.readouterr().out
    assert ran[0] == ["status", "--porcelain", "--untracked-files=no"]  # git: uncommitted changes are named
    assert ran[1] == ["queue", "remove", "demo-both"]
    assert [c[:5] for c in ran[2:]] == [["exp", "run", "--queue", "-n", "demo-w-o-sga"],
                                        ["exp", "run", "--queue", "-n", "demo-both"]]
    assert "$ dvc exp run --queue -n demo-w-o-sga -S" in out and "demo-derd is success" in out


def test_derd_sweep_rows_queues_only_the_named_rows(demo, tmp_path, monkeypatch, capsys):
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(yaml.safe_load((ROOT / "params.yaml").read_text())))
    ran = []
    monkeypatch.setattr(sweep, "show", lambda root, rev=None: [{"rev": "b", "experiments": []}])
    monkeypatch.setattr(sweep.subprocess, "run", lambda cmd, **kw: ran.append(cmd[1:]) or _Done())
    monkeypatch.chdir(tmp_path)
    assert main(["sweep", "demo.yaml", "--rows", "w/o SGA"]) == 0
    assert [c[:5] for c in ran[1:]] == [["exp", "run", "--queue", "-n", "demo-w-o-sga"]]
    assert main(["sweep", "demo.yaml", "--rows", "nope"]) == 2
    assert "--rows ['nope'] not among its rows" in capsys.readouterr().err


class _Done:
    returncode, stdout, stderr = 0, "", ""


def test_cli_reports_a_bad_sweep_file_in_one_line(tmp_path, monkeypatch, capsys):
    (tmp_path / "bad.yaml").write_text("rows: [a, b]\n")
    monkeypatch.chdir(tmp_path)
    assert main(["sweep", "bad.yaml"]) == 2
    assert capsys.readouterr().err.strip() == "derd sweep: bad.yaml: rows: must map each row label to its overrides " \
                                              "(dotted keys)"
    assert json.dumps(sweep.hydra_value("x"))  # keeps json imported for readers extending these tests
