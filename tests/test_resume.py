"""Resume state: keyed by params, inputs and code; stale, corrupt or older-format files are discarded."""
from __future__ import annotations

import logging

import torch

from derd import resume
from derd.resume import ResumeState, make_key


def test_key_changes_with_params_inputs_code_and_format(monkeypatch):
    base = make_key({"lr": 0.1}, ["teacher:abc"])
    assert base == make_key({"lr": 0.1}, ["teacher:abc"])
    assert base != make_key({"lr": 0.2}, ["teacher:abc"])
    assert base != make_key({"lr": 0.1}, ["teacher:abd"])
    assert base != make_key({"lr": 0.1}, ["teacher:abc"], code="other")
    monkeypatch.setattr(resume, "FORMAT", resume.FORMAT + 1)
    assert base != make_key({"lr": 0.1}, ["teacher:abc"])


def test_code_hash_covers_the_library_source(tmp_path, monkeypatch):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a.py").write_text("x = 1\n")
    monkeypatch.setattr(resume, "PACKAGE", tmp_path)
    resume.code_hash.cache_clear()
    before = resume.code_hash("sub")
    (tmp_path / "sub" / "a.py").write_text("x = 2\n")
    resume.code_hash.cache_clear()
    assert resume.code_hash("sub") != before
    resume.code_hash.cache_clear()


def test_stale_corrupt_and_foreign_states_are_discarded_with_a_warning(tmp_path, caplog):
    path = tmp_path / "state.pt"
    ResumeState(path, "old").save(step=3, w=torch.ones(2))
    assert ResumeState(path, "old").load()["step"] == 3
    with caplog.at_level(logging.WARNING, logger="derd"):
        assert ResumeState(path, "new").load() is None
    assert not path.exists() and "other params, inputs, code or format" in caplog.text
    path.write_bytes(b"\x00truncated")
    with caplog.at_level(logging.WARNING, logger="derd"):
        assert ResumeState(path, "new").load() is None
    assert not path.exists() and "unreadable resume state" in caplog.text
    torch.save({"step": 1}, path)  # an older format without a key
    assert ResumeState(path, "new").load() is None
    state = ResumeState(path, "new")
    state.save(step=1)
    state.clear()
    assert not path.exists()
