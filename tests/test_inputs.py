"""The inputs stage: fingerprints follow the bytes of the dataset and of user checkpoints, not where they live."""
from __future__ import annotations

import shutil

import pytest
import torch
from test_data import _write_fashion

from derd import config, inputs
from derd.artifacts import CheckpointError


def _cfg(root, checkpoint=None) -> config.Config:
    return config.parse({"data": {"name": "fashion_mnist", "root": str(root)},
                         "teachers": {"natural": {"checkpoint": checkpoint}}})


def test_moving_the_data_changes_nothing_and_changing_a_byte_does(tmp_path):
    _write_fashion(tmp_path / "a", n_train=40, n_test=10)
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    first = inputs.fingerprint(_cfg(tmp_path / "a"))
    assert first == inputs.fingerprint(_cfg(tmp_path / "b")), "data.root names a place, not the data"
    assert len(first["dataset"]["files"]) == 4 and first["checkpoints"] == {"natural": None, "robust": None}
    target = next((tmp_path / "b").glob("t10k-labels*"))
    target.write_bytes(target.read_bytes()[:-1] + b"\x07")
    assert inputs.fingerprint(_cfg(tmp_path / "b"))["dataset"] != first["dataset"]


def test_a_user_checkpoint_is_fingerprinted_by_content(tmp_path):
    _write_fashion(tmp_path / "data", n_train=40, n_test=10)
    ckpt = tmp_path / "natural.pt"
    torch.save({"w": torch.zeros(3)}, ckpt)
    before = inputs.fingerprint(_cfg(tmp_path / "data", str(ckpt)))["checkpoints"]["natural"]
    torch.save({"w": torch.ones(3)}, ckpt)
    assert inputs.fingerprint(_cfg(tmp_path / "data", str(ckpt)))["checkpoints"]["natural"] != before
    with pytest.raises(CheckpointError, match="teachers.natural.checkpoint"):
        inputs.fingerprint(_cfg(tmp_path / "data", str(tmp_path / "absent.pt")))
