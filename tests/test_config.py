"""Config: documented keys round-trip; bad configs fail with one clear message naming the key."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from derd import config

ROOT = Path(__file__).resolve().parent.parent
PRESETS = sorted((ROOT / "presets").glob("*.yaml"))


def _leaves(d, prefix=""):
    for k, v in d.items():
        if isinstance(v, dict):
            yield from _leaves(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}"


def undocumented_keys(text: str) -> list[str]:
    """Leaf keys with no comment on their own line or on any enclosing key's line."""
    stack: list[tuple[int, bool]] = []  # (indent, documented) of enclosing keys
    missing = []
    for line in text.splitlines():
        body = line.split("#")[0].rstrip()
        if not body.strip() or body.lstrip().startswith("-") or ":" not in body:
            continue
        indent = len(line) - len(line.lstrip())
        while stack and stack[-1][0] >= indent:
            stack.pop()
        documented = "#" in line or any(doc for _, doc in stack)
        if body.endswith(":"):
            stack.append((indent, "#" in line))
        elif not documented:
            missing.append(line.strip())
    return missing


def test_params_yaml_round_trips_and_documents_every_key():
    text = (ROOT / "params.yaml").read_text()
    raw = yaml.safe_load(text)
    cfg = config.parse(raw)
    dumped = cfg.model_dump(mode="json")
    assert set(_leaves(dumped)) == set(_leaves(raw)), "params.yaml must list every config key"
    assert config.parse(dumped) == cfg
    assert undocumented_keys(text) == []


def test_the_default_profile_is_the_fashion_preset():
    """params.yaml ships as presets/fashion.yaml (bench/profiles.md: it costs <= 1.5x digits), so
    `derd preset fashion` restores the default and the calibrated values live in one place."""
    def settings(path: Path) -> str:
        text = path.read_text()
        return text[text.index("\nseed:"):]

    assert settings(ROOT / "params.yaml") == settings(ROOT / "presets" / "fashion.yaml")


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.stem)
def test_presets_validate_and_list_every_key(preset):
    config.load(preset)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    listed, expected = set(_leaves(yaml.safe_load(preset.read_text()))), set(_leaves(params))
    if not any(k.startswith("runtime.") for k in listed):  # hardware switches: their defaults fit any preset
        expected = {k for k in expected if not k.startswith("runtime.")}
    assert listed == expected
    assert undocumented_keys(preset.read_text()) == []


BAD = [
    ({"stage2": {"lambda_rob": -1}}, "stage2.lambda_rob: must be ≥ 0, got -1"),
    ({"eval": {"eps": -0.1}}, "eval.eps: must be ≥ 0, got -0.1"),
    ({"stage2": {"attack": {"eps": -1}}}, "stage2.attack.eps: must be ≥ 0"),
    ({"stage1": {"batch_size": 0}}, "stage1.batch_size: must be ≥ 1, got 0"),
    ({"stage2": {"batch_size": 0}}, "stage2.batch_size: must be ≥ 1, got 0"),
    ({"stage1": {"lambda_bn": -1e-5}}, "stage1.lambda_bn: must be ≥ 0"),
    ({"data": {"name": "mnist"}}, "data.name: must be one of"),
    ({"teachers": {"natural": {"arch": "vgg16"}}}, "teachers.natural.arch: must be one of"),
    ({"stage2": {"student": {"arch": "lenet"}}}, "stage2.student.arch: must be one of"),
    ({"stage2": {"methods": ["derd", "adversarial_magic"]}}, "stage2.methods.1: must be one of"),
    ({"stage2": {"methods": []}}, "stage2.methods: must list at least 1"),
    ({"stage2": {"aggregation": "mean"}}, "stage2.aggregation: must be one of"),
    ({"stage2": {"lamda_rob": 1}}, "stage2.lamda_rob: unknown key"),
    ({"colour": "blue"}, "colour: unknown key"),
    ({"teachers": {"robust": {"train": {"epochs": "ten"}}}}, "teachers.robust.train.epochs:"),
    ({"eval": {"eps": 2}}, "eval.eps: must be ≤ 1, got 2"),
    ({"stage2": {"tau": 0}}, "stage2.tau: must be > 0, got 0"),
    ({"data": {"val_fraction": 1.5}}, "data.val_fraction: must be < 1"),
    ({"stage1": {"generator": {"arch": "stylegan"}}}, "stage1.generator.arch: must be one of"),
    ({"stage2": {"methods": ["derd_no_tnat"]}, "stage1": {"generators": ["natural"]}},
     "stage1.generators: must include robust when stage2.methods includes derd_no_tnat"),
    ({"device": "tpu"}, "device: must be one of"),
    ({"device": "cuda1"}, "device: must be one of auto, cpu, cuda or cuda:N"),
]


def test_device_names_a_gpu_by_index():
    assert [config.parse({"device": d}).device for d in ("auto", "cpu", "cuda", "cuda:1")] == \
        ["auto", "cpu", "cuda", "cuda:1"]


@pytest.mark.parametrize("raw,expected", BAD, ids=[b[1].split(":")[0] for b in BAD])
def test_bad_config_names_the_key(raw, expected):
    with pytest.raises(config.ConfigError) as err:
        config.parse(raw)
    assert expected in str(err.value)
    assert "Traceback" not in str(err.value)


def test_not_a_mapping_and_bad_yaml(tmp_path):
    with pytest.raises(config.ConfigError, match="must be a mapping"):
        config.parse([1, 2])
    bad = tmp_path / "p.yaml"
    bad.write_text("stage2: [unclosed\n")
    with pytest.raises(config.ConfigError, match="not valid YAML"):
        config.load(bad)
    with pytest.raises(config.ConfigError, match="no such params file"):
        config.load(tmp_path / "missing.yaml")


def test_cli_reports_bad_config_without_traceback(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text("stage2:\n  lambda_rob: -1\n")
    proc = subprocess.run(
        [sys.executable, "-m", "pipelines.cli", "teachers", "--params", str(params), "--root", str(tmp_path)],
        capture_output=True, text=True, cwd=ROOT, timeout=120,
    )
    assert proc.returncode == 2
    assert "stage2.lambda_rob: must be ≥ 0, got -1" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_section_hash_changes_only_with_its_section():
    a = config.parse({})
    b = config.parse({"stage2": {"lambda_rob": 1.0}})
    assert a.section_hash("teachers", "stage1") == b.section_hash("teachers", "stage1")
    assert a.section_hash("stage2") != b.section_hash("stage2")


def test_every_key_moves_dvcs_run_cache_key():
    """DVC's run-cache key drops every mapping key named ``size`` or ``nfiles`` at any depth (they are file
    metadata in a lock), so a parameter so named would let `dvc exp run -S it=...` restore the outputs of
    another value. Changing any params.yaml leaf must change the key DVC computes."""
    from dvc.stage.cache import _get_cache_hash

    from pipelines.sweep import leaves, nested

    params = yaml.safe_load((ROOT / "params.yaml").read_text())

    def key(p):
        return _get_cache_hash({"cmd": "derd", "params": {"params.yaml": p}, "outs": []}, key=True)

    base = key(params)
    hidden = [leaf for leaf in leaves(params) if key(nested({leaf: "changed"}, params)) == base]
    assert hidden == [], f"DVC's run-cache ignores these params.yaml keys (rename them): {hidden}"


def test_a_missing_gpu_is_named_at_run_time():
    from derd.runtime import resolve_device

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    with pytest.raises(RuntimeError, match=f"'cuda:{count}' requested but this machine has {count} CUDA"):
        resolve_device(f"cuda:{count}")
    assert resolve_device("cpu").type == "cpu"


def test_curves_monitor_val_by_default_never_an_empty_split():
    assert config.parse({}).stage2.monitor_split == "val"
    with pytest.raises(config.ConfigError, match="stage2.monitor_split: val is empty with data.val_fraction 0"):
        config.parse({"data": {"val_fraction": 0}, "stage2": {"monitor_every": 5}})
    config.parse({"data": {"val_fraction": 0}, "stage2": {"monitor_every": 5, "monitor_split": "test"}})
