"""Sharded evaluation: `--shard i/n` runs whole batches round-robin, `--merge` reproduces the unsharded
stage exactly; an out-of-memory batch is halved and logged."""
from __future__ import annotations

import json
import logging

import pytest
import torch
from eval_models import EPS, tiny_model

from derd import config
from derd.artifacts import save_artifact
from derd.attacks import FGSM
from derd.evaluation import evaluate

N = 24  # 3 white-box batches of 8 and 3 AutoAttack chunks of 8


def _cfg(**over) -> config.Config:
    ev = {"eps": EPS, "n_examples": N, "batch_size": 8, "eps_curve": [0.0, 0.5, 1.0],
          "pgd_s": {"steps": 3, "step_size": EPS / 2}, "pgd_t": {"steps": 3, "step_size": EPS / 3},
          "cw": {"steps": 3, "step_size": EPS / 2},
          "autoattack": {"version": "custom", "attacks": ["apgd-ce"], "batch_size": 8},
          "sanity": {"enabled": False}} | over
    return config.parse({"device": "cpu", "data": {"image_size": 16},
                         "teachers": {"natural": {"arch": "small_cnn", "width": 8},
                                      "robust": {"arch": "small_cnn", "width": 8}},
                         "stage2": {"student": {"arch": "small_cnn", "width": 8}}, "eval": ev})


def _project(root):
    for role in ("natural", "robust"):
        save_artifact(root / f"artifacts/teachers/{role}.pt", tiny_model(role).state_dict(),
                      {"arch": "small_cnn", "num_classes": 10})
    save_artifact(root / "artifacts/students/derd-seed0.pt", tiny_model("robust").state_dict(),
                  {"arch": "small_cnn", "width": 8, "method": "derd", "seed": 0})


def _numbers(result: dict) -> list[dict]:
    """Everything but wall-clock times."""
    rows = []
    for r in result["rows"]:
        aa = {k: v for k, v in r["autoattack"].items() if k != "runtime_s"}
        rows.append({k: v for k, v in r.items() if k not in ("runtime_s", "autoattack", "file")} | {"aa": aa})
    return rows


def test_shard_blocks_are_whole_batches_round_robin():
    assert evaluate.shard_blocks(20, 8, (0, 2)) == [(0, 8), (16, 20)]
    assert evaluate.shard_blocks(20, 8, (1, 2)) == [(8, 16)]
    assert evaluate.shard_blocks(20, 8, (3, 4)) == []
    assert evaluate.parse_shard("1/4") == (1, 4)
    for bad in ("4/4", "x", "1/0", "-1/2"):
        with pytest.raises(evaluate.ShardError):
            evaluate.parse_shard(bad)


def test_two_shards_merged_equal_the_unsharded_run(tmp_path):
    torch.set_num_threads(1)
    cfg = _cfg()
    whole, sharded = tmp_path / "whole", tmp_path / "sharded"
    _project(whole)
    _project(sharded)
    reference = evaluate.run(cfg, whole)
    assert reference["rows"][0]["autoattack"]["accuracy_after"].keys() == {"clean", "apgd-ce"}

    with pytest.raises(evaluate.ShardError, match="no shard records"):
        evaluate.merge(cfg, sharded)
    records = [evaluate.run(cfg, sharded, shard=(i, 2)) for i in range(2)]
    assert not (sharded / "metrics/eval.json").exists()
    assert [m["indices"] for m in records[0]["models"]] == [16] * 3  # batches 0 and 2
    assert [m["aa_examples"] for m in records[0]["models"]] == [16] * 3  # AA chunks [0:8] and [16:24]
    assert [m["aa_examples"] for m in records[1]["models"]] == [8] * 3  # AA chunk [8:16]
    assert sorted(p.name for p in (sharded / "metrics/eval_shards").iterdir()) == ["shard-0-of-2.json",
                                                                                  "shard-1-of-2.json"]
    merged = evaluate.merge(cfg, sharded)
    assert _numbers(merged) == _numbers(reference)
    assert {k: v for k, v in merged.items() if k != "rows"} == {k: v for k, v in reference.items() if k != "rows"}
    for f in ("metrics/eval_table.md", "plots/eps_curve.csv"):
        assert (sharded / f).read_text() == (whole / f).read_text(), f
    # the merged store is the unsharded run's: same flags, same file name
    stores = [p for p in (whole / "artifacts/eval_flags").glob("*.json") if ".aa." not in p.name]
    assert len(stores) == 3
    for ref in stores:
        mine = json.loads((sharded / "artifacts/eval_flags" / ref.name).read_text())
        theirs = json.loads(ref.read_text())
        assert {e: v["flags"] for e, v in mine["entries"].items()} == {e: v["flags"] for e, v in theirs["entries"].items()}


def test_merge_needs_every_shard(tmp_path):
    cfg = _cfg(eps_curve=[0.0, 1.0])
    _project(tmp_path)
    evaluate.run(cfg, tmp_path, shard=(2, 3))
    with pytest.raises(evaluate.ShardError, match=r"shards \[0, 1\] of 3"):
        evaluate.merge(cfg, tmp_path)


def test_out_of_memory_halves_the_batch_and_logs(tmp_path, monkeypatch, caplog):
    sizes = []

    def run(bs):
        sizes.append(bs)
        if bs > 3:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return bs

    with caplog.at_level(logging.WARNING, logger="derd"):
        assert evaluate.halving_batches(run, 16, "test") == 2
    assert sizes == [16, 8, 4, 2] and "retrying with batch size 8" in caplog.text
    with pytest.raises(torch.cuda.OutOfMemoryError):
        evaluate.halving_batches(lambda bs: run(99), 1, "test")

    # in the stage: FGSM fails once on a batch of more than 4 examples, the column still completes
    _project(tmp_path)
    real, failed = FGSM.perturb, []

    def perturb(self, x, y):
        if len(x) > 4 and not failed:
            failed.append(len(x))
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(self, x, y)

    monkeypatch.setattr(FGSM, "perturb", perturb)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="derd"):
        result = evaluate.run(_cfg(n_examples=8, eps_curve=[0.0, 1.0]), tmp_path)
    assert failed == [8] and "FGSM: CUDA out of memory, retrying with batch size 4" in caplog.text
    assert all(0 <= r["FGSM"] <= 100 for r in result["rows"])


def test_cli_evaluate_takes_shard_or_merge(capsys):
    from pipelines.cli import _parser

    args = _parser().parse_args(["evaluate", "--shard", "1/4"])
    assert (args.shard, args.merge) == ("1/4", False)
    assert _parser().parse_args(["evaluate", "--merge"]).merge
    for bad in (["evaluate", "--shard", "4/4"], ["evaluate", "--shard", "0/2", "--merge"], ["teachers", "--merge"]):
        with pytest.raises(SystemExit):
            _parser().parse_args(bad)
