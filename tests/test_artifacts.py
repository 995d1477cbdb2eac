"""Artifact I/O: atomic writes with ordinary permissions, NaN guard."""
from __future__ import annotations

import os
import stat

import pytest
import torch

from derd import artifacts


def test_artifacts_are_written_atomically_with_normal_permissions(tmp_path):
    path = artifacts.write_json(tmp_path / "x.json", {"a": 1})
    assert artifacts.read_json(path) == {"a": 1}
    assert stat.S_IMODE(os.stat(path).st_mode) & 0o044 == 0o044  # group/other can read
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]  # no temp file left behind


def test_check_finite_names_what_and_when():
    artifacts.check_finite(torch.tensor(1.0), "loss")
    with pytest.raises(FloatingPointError, match="L_rob became non-finite at step 7"):
        artifacts.check_finite(torch.tensor(float("nan")), "L_rob", 7)
    with pytest.raises(FloatingPointError, match=r"L_nat became non-finite \(\[1.0, inf\]\)"):
        artifacts.check_finite(torch.tensor([1.0, float("inf")]), "L_nat")  # one bad entry is enough
