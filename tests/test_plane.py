"""The clean-vs-AA plane (derd/report/plots.py): its points from a sweep's table (``derd table``, the figure
beside the table and linked in its block) and from the run's own evaluation (the HTML report)."""
from __future__ import annotations

import base64
import math
import re
import statistics

import pytest
import yaml
from test_sweep import WORKSPACE, exp, write_sweep

from derd import config
from derd.artifacts import write_json
from derd.report import plots, tables
from derd.runtime import Paths
from pipelines import sweep
from pipelines.cli import main

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def evaluation(students: dict[str, list[tuple[float, float]]], teachers=((95.0, 0.0), (80.0, 60.0))) -> dict:
    """An evaluation record with Clean and AA per model: ``students`` maps a method to its (Clean, AA) per seed."""
    rows = [{"model": name, "kind": "teacher", "Clean": clean, "AA": aa, "sanity": {"eps1": True}}
            for name, (clean, aa) in zip(("Nature", "SAT"), teachers)]
    for method, pairs in students.items():
        rows += [{"model": f"{method}-seed{seed}", "kind": "student", "method": method, "seed": seed, "Clean": clean,
                  "AA": aa, "sanity": {"eps1": True}} for seed, (clean, aa) in enumerate(pairs)]
    return {"dataset": "fashion_mnist", "split": "test", "eps": 0.15, "n_examples": 100, "rows": rows,
            "autoattack": {"package": "pyautoattack", "version": "0.2.0", "aa_version": "standard", "n_examples": 100}}


def point(label, kind, clean, aa, seeds=1):
    """The expected point of per-seed value lists."""
    std = [statistics.stdev(v) if len(v) > 1 else 0.0 for v in (clean, aa)]
    return plots.PlanePoint(label, kind, statistics.mean(clean), statistics.mean(aa), *std, seeds)


SWEEP = """\
title: Plane demo
rows:
  DERD: {stage2.methods: [derd]}
  "w/o T_nat": {stage2.methods: [derd_no_tnat]}
  ceiling: {stage2.methods: [rslad_real]}
  missing: {stage2.methods: [derd], stage2.aggregation: sum}
"""
EVALS = {"r1": evaluation({"derd": [(80.0, 40.0), (82.0, 43.0), (84.0, 46.0)]}),
         "r2": evaluation({"derd_no_tnat": [(70.0, 30.0), (74.0, 32.0)]}),
         "r3": evaluation({"rslad_real": [(90.0, 70.0)]})}
FOUND = {"plane-derd": exp("plane-derd", rev="r1"), "plane-w-o-t-nat": exp("plane-w-o-t-nat", rev="r2"),
         "plane-ceiling": exp("plane-ceiling", rev="r3")}


def test_plane_points_are_the_means_and_sample_stds_over_seeds():
    rows = [("A", "student", {"Clean": [80.0, 82.0, 84.0], "AA": [40.0, 43.0, 46.0], "FGSM": [1.0]}),
            ("B", "teacher", {"Clean": [95.0], "AA": [1.0]}),
            ("no AA", "student", {"Clean": [50.0]})]  # not evaluated under AA: not on the plane
    a, b = plots.plane_points(rows)
    assert (a.label, a.kind, a.seeds) == ("A", "student", 3)
    assert (a.clean, a.aa) == (82.0, 43.0)
    assert a.clean_std == pytest.approx(2.0) and a.aa_std == pytest.approx(3.0)  # sample std (n - 1)
    assert b == plots.PlanePoint("B", "teacher", 95.0, 1.0, 0.0, 0.0, 1)


@pytest.mark.parametrize("kind,method,expected", [
    ("teacher", None, "teacher"), ("reference", None, "reference"), ("student", "derd", "student"),
    ("student", "derd_no_tnat", "no_tnat"), ("student", "rslad_real", "ceiling"), ("student", "dfad", "student")])
def test_plane_kinds(kind, method, expected):
    assert plots.plane_kind(kind, method) == expected


def test_the_sweep_plane_has_a_point_per_row_with_teachers_w_o_tnat_and_the_ceiling_apart(tmp_path):
    s = sweep.load(write_sweep(tmp_path, SWEEP, name="plane.yaml"), tmp_path)
    points = sweep.plane_points(sweep.collect(s, FOUND, EVALS.get, WORKSPACE))
    assert points == [
        point("Nature", "teacher", [95.0], [0.0]),
        point("SAT", "teacher", [80.0], [60.0]),
        point("DERD", "student", [80.0, 82.0, 84.0], [40.0, 43.0, 46.0], 3),
        point("w/o T_nat", "no_tnat", [70.0, 74.0], [30.0, 32.0], 2),
        point("ceiling (data-ful)", "ceiling", [90.0], [70.0]),
    ]  # the teachers once (every row evaluated the same ones); "missing" did not run
    assert points[3].clean_std == pytest.approx(2 * math.sqrt(2)) and points[3].aa_std == pytest.approx(math.sqrt(2))
    assert plots.plane_png(points, "demo").startswith(PNG_MAGIC)


def test_derd_table_writes_the_plane_beside_the_table_and_links_it(tmp_path, monkeypatch):
    write_sweep(tmp_path, SWEEP, name="plane.yaml")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(WORKSPACE))
    show = [{"rev": "b" * 40, "experiments": [{"name": name, "executor": {"state": "success"},
                                                "revs": [{"rev": e.rev, "error": None, "data": {}}]}
                                               for name, e in FOUND.items()]}]
    monkeypatch.setattr(sweep, "show", lambda root, rev=None, commits=1: show)
    monkeypatch.setattr(sweep, "_read_full", lambda root: EVALS.get)
    monkeypatch.chdir(tmp_path)
    assert main(["table", "plane.yaml"]) == 0
    figure = tmp_path / "docs" / "figures" / "plane_plane.png"
    assert figure.read_bytes().startswith(PNG_MAGIC)
    block = (tmp_path / "docs" / "RESULTS.md").read_text()
    table_end = block.rindex("| missing |")
    assert re.search(r"\n\n!\[Clean vs AA[^\]]*\]\(figures/plane_plane\.png\)\n<!-- /table:plane -->", block)
    assert block.index("](figures/plane_plane.png)") > table_end  # under the table, inside the block
    without_aa = {rev: {**e, "rows": [{k: v for k, v in r.items() if k != "AA"} for r in e["rows"]]}
                  for rev, e in EVALS.items()}
    monkeypatch.setattr(sweep, "_read_full", lambda root: without_aa.get)
    figure.unlink()
    assert main(["table", "plane.yaml"]) == 0  # nothing to draw: no figure, no link
    assert not figure.exists() and "plane_plane.png" not in (tmp_path / "docs" / "RESULTS.md").read_text()


def test_the_report_embeds_the_plane_of_the_run_s_models(tmp_path, monkeypatch):
    record = evaluation({"derd": [(70.0, 30.0), (74.0, 34.0)], "derd_no_tnat": [(60.0, 20.0)]})
    record["rows"].append({"model": "SAT student", "kind": "reference", "Clean": 85.0, "AA": 50.0})
    write_json(Paths(tmp_path).root / tables.EVALUATION, record)
    drawn = []
    draw = plots.plane_png
    monkeypatch.setattr(plots, "plane_png", lambda points, title: drawn.append(points) or draw(points, title))
    tables.run(config.parse({"stage2": {"methods": ["derd", "derd_no_tnat"], "seeds": [0, 1]}}), tmp_path)
    assert drawn == [[point("Nature", "teacher", [95.0], [0.0]), point("SAT", "teacher", [80.0], [60.0]),
                      point("SAT student", "reference", [85.0], [50.0]),
                      point("w/o T_nat", "no_tnat", [60.0], [20.0]),
                      point("DERD", "student", [70.0, 74.0], [30.0, 34.0], 2)]]
    page = (tmp_path / "reports" / "report.html").read_text()
    embedded = re.search(r'<img alt="Clean vs AA[^"]*" src="data:image/png;base64,([^"]+)"', page)
    assert embedded and base64.b64decode(embedded.group(1)).startswith(PNG_MAGIC)
