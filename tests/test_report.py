"""The report: the table in the paper's layout (seeds aggregated), sanity flags, embedded images."""
from __future__ import annotations

import base64
import re

import pytest

from derd import config
from derd.artifacts import write_json, write_text
from derd.report import tables
from derd.runtime import Paths

PNG = base64.b64decode(  # a 1×1 PNG
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg==")


def _row(model: str, kind: str, base: float, **extra) -> dict:
    values = {c: base - i for i, c in enumerate(("Clean", "FGSM", "PGD_S", "PGD_T", "CW", "AA"))}
    return {"model": model, "kind": kind, **values, "Ave": sum(values.values()) / 6,
            "sanity": {"eps1_chance": True, "monotone": True}, **extra}


@pytest.fixture
def root(tmp_path):
    paths = Paths(tmp_path)
    rows = [_row("Nature", "teacher", 90), _row("SAT", "teacher", 80),
            _row("derd-seed0", "student", 70, method="derd", seed=0),
            _row("derd-seed1", "student", 74, method="derd", seed=1),
            _row("dafl-seed0", "student", 50, method="dafl", seed=0,
                 sanity={"eps1_chance": False, "monotone": True}),
            _row("cmi-seed0", "student", 40, method="cmi", seed=0, sanity={})]
    write_json(tmp_path / tables.EVALUATION, {"dataset": "digits", "eps": 0.2, "n_examples": 8, "rows": rows,
                                             "autoattack": {"package": "pyautoattack", "version": "0.2.0",
                                                            "aa_version": "standard", "n_examples": 8}})
    write_json(paths.students / "derd-seed0.json", {"method": "derd", "reading": {"aggregation": "sga"}})
    for name in ("eps_curve.png", "warmup/generator_natural.png"):
        (paths.plots / name).parent.mkdir(parents=True, exist_ok=True)
        (paths.plots / name).write_bytes(PNG)
    write_text(paths.plots / "warmup" / "generator_natural.csv", "artifact,step,total\ng,0,1.0\ng,1,0.5\n")
    write_text(paths.plots / "distill" / "derd-seed0.csv", "iteration,L_rob,seconds\n1,0.3,0.1\n2,0.2,0.2\n")
    return tmp_path


def test_html_has_every_model_aggregated_and_embeds_every_image(root):
    result = tables.run(config.parse({"stage2": {"methods": ["derd", "dafl", "cmi"], "seeds": [0, 1]}}), root)
    page = (root / "reports" / "report.html").read_text()
    table = page[page.index("<tbody>"):page.index("</tbody>")]
    labels = re.findall(r"<tr[^>]*><th>([^<]+)</th>", table)
    assert labels == ["Nature", "SAT", "DAFL", "CMI", "DERD"]  # references, then the paper's method order
    derd_row = table[table.index("<th>DERD</th>"):]
    assert "72.00 ± 2.83" in derd_row and "<td>2</td>" in derd_row  # Clean over seeds 70 and 74
    assert 'class="suspect"><th>DAFL' in table and "dafl-seed0: eps1_chance" in table
    assert table[table.index("<th>CMI</th>"):].split("</tr>")[0].endswith("<td>not run</td>")
    assert table[table.index("<th>SAT</th>"):].split("</tr>")[0].endswith("<td>pass</td>")
    assert "<th>Nature</th><td>90.00</td>" in table  # one value: no ± std
    images = re.findall(r'<img alt="([^"]+)" src="data:image/png;base64,', page)
    assert len(images) == result["figures"] == 5  # the clean-vs-AA plane, ε-curves, samples, Stage-I and II curves
    assert not re.search(r'src="(?!data:)', page), "the HTML must not reference external files"
    for section in ("Reconstructed choices", "Environment", "pyautoattack 0.2.0", "stage2.aggregation",
                    "reading[derd]:\n  aggregation: sga"):
        assert section in page
    md = (root / "reports" / "report.md").read_text()
    assert "| DERD | 72.00 ± 2.83 |" in md and "](../plots/eps_curve.png)" in md


def test_table_metrics_are_per_model_and_column(root):
    metrics = tables.table_metrics(root)
    assert metrics["derd-seed1/Clean"] == 74 and metrics["Nature/AA"] == 85 and len(metrics) == 6 * 7


def test_missing_evaluation_is_a_clear_error(tmp_path):
    with pytest.raises(tables.ReportError, match=r"artifacts/evaluation.json: not found; run `derd evaluate`"):
        tables.run(config.parse({}), tmp_path)


@pytest.mark.parametrize("text, message", [("{not json", "not valid JSON"), ('{"rows": 3}', "has no 'rows' list")])
def test_unusable_evaluation_is_a_clear_error(tmp_path, text, message):
    write_text(tmp_path / tables.EVALUATION, text)
    with pytest.raises(tables.ReportError, match=rf"evaluation.json: {message}.*rerun `derd evaluate`"):
        tables.load_eval(tmp_path)


@pytest.mark.parametrize("pool_size", [0, 16])
def test_a_section_with_nothing_to_show_is_left_out(root, pool_size):
    """An empty DERD_inv pool (pool_size 0, the default) draws no samples; without teacher sidecars there is no
    teacher check to show: neither gets a heading."""
    cfg = config.parse({"stage2": {"methods": ["derd", "dafl", "cmi"], "seeds": [0, 1]},
                        "stage1": {"inversion": {"pool_size": pool_size}}})
    (Paths(root).plots / "warmup" / "inversion_pool.png").write_bytes(PNG)  # the stage writes one either way
    tables.run(cfg, root)
    page = (root / "reports" / "report.html").read_text()
    md = (root / "reports" / "report.md").read_text()
    headings = re.findall(r"<h2>([^<]+)</h2>", page)
    assert ("Generated samples (Stage-I inversion_pool)" in headings) == (pool_size > 0)
    assert "Generated samples (Stage-I generator_natural)" in headings
    assert "Teachers" not in headings and "## Teachers" not in md and "not available" not in page
    write_json(Paths(root).teachers / "robust.json", {"metrics": {"split": "val", "clean_acc": 0.7, "pgd_acc": 0.4}})
    tables.run(cfg, root)
    page = (root / "reports" / "report.html").read_text()
    teachers = page[page.index("<h2>Teachers</h2>"):].split("</pre>")[0]
    assert "robust:" in teachers and "clean_acc: 0.7" in teachers and "natural" not in teachers
