"""Resume state: keyed by params, inputs and code; stale, corrupt or older-format files are discarded; random
streams (the GPU's too) survive an interruption; an interrupted student redoes only the iterations after its
last checkpoint and ends bitwise equal to an uninterrupted one; Stage-II's random streams are independent.

Work counted after a resume, per stage: students here; the Stage-I generator and pool in test_warmup.py
(test_warmup_resumes_to_the_same_generator, test_inversion_pool_resumes_batch_by_batch); teachers in
test_interrupts.py.
"""
from __future__ import annotations

import logging

import pytest
import torch
from test_distill import micro_config, root  # noqa: F401 (root: the tiny teachers/generators fixture)

from derd import distill, resume
from derd.artifacts import load_tensors
from derd.curves import read_rows
from derd.distill import aggregation, loop
from derd.resume import ResumeState, make_key, restore_rng, rng_state
from derd.runtime import Paths

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


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


@pytest.fixture
def fake_gpu(monkeypatch):
    """torch.cuda's random-stream functions on a machine without CUDA: the GPU's state is a tensor here."""
    gpu = {"state": torch.arange(16, dtype=torch.uint8)}
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device="cuda": gpu["state"].clone())
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device="cuda": gpu.update(state=state.clone()))
    return gpu


def test_a_cuda_run_saves_and_restores_the_gpu_stream(fake_gpu, caplog):
    state = rng_state(CUDA)
    assert torch.equal(state["cuda_rng"], torch.arange(16, dtype=torch.uint8))
    assert "cuda_rng" not in rng_state(CPU), "a CPU run has no GPU stream to save"
    expected = torch.rand(4)
    fake_gpu["state"] = torch.zeros(16, dtype=torch.uint8)  # both streams move on after the checkpoint
    with caplog.at_level(logging.WARNING, logger="derd"):
        restore_rng(state, CUDA)
    assert torch.equal(fake_gpu["state"], torch.arange(16, dtype=torch.uint8)) and torch.equal(torch.rand(4), expected)
    assert "CUDA random stream" not in caplog.text


def test_a_state_moved_between_cpu_and_gpu_resumes_with_a_warning(fake_gpu, caplog):
    gpu_state, cpu_state = rng_state(CUDA), rng_state(CPU)
    expected = torch.rand(4)
    with caplog.at_level(logging.WARNING, logger="derd"):
        restore_rng(gpu_state, CPU)  # written on a GPU, resumed on a machine without one
    assert "written on a GPU, resumed on cpu" in caplog.text and torch.equal(torch.rand(4), expected)
    caplog.clear()
    fake_gpu["state"] = torch.zeros(16, dtype=torch.uint8)
    with caplog.at_level(logging.WARNING, logger="derd"):
        restore_rng(cpu_state, CUDA)
    assert "written on the CPU, resumed on cuda" in caplog.text
    assert torch.equal(fake_gpu["state"], torch.zeros(16, dtype=torch.uint8)), "no GPU state to put back"


def test_the_stage2_checkpoint_carries_the_gpu_stream_of_a_cuda_run(root, fake_gpu):  # noqa: F811
    cls = distill.get_method("derd")
    ctx = distill.Context(micro_config(), cls, 0, root, CPU)
    method = cls(ctx)
    ctx.device = CUDA  # only the random streams look at the device here
    state = loop._checkpoint_state(ctx, method, 1, 0.0)
    assert torch.equal(state["cuda_rng"], torch.arange(16, dtype=torch.uint8))
    fake_gpu["state"] = torch.zeros(16, dtype=torch.uint8)
    loop._restore(ctx, method, state)
    assert torch.equal(fake_gpu["state"], torch.arange(16, dtype=torch.uint8))


# ---------------------------------------------------------------- Stage-II random streams
def _draws(root, monkeypatch, more_latents: int = 0, more_mask: int = 0) -> tuple[list, list]:  # noqa: F811
    """Three DERD iterations; each iteration ends with extra draws from the latent or the mask stream. Returns
    the mask stream's state at each mask and the latents drawn."""
    cls = distill.get_method("derd")
    ctx = distill.Context(micro_config(k_student=1), cls, 0, root, CPU)
    method = cls(ctx)
    masks, latents = [], []
    real_mask, real_z = aggregation.sign_consistency_mask, ctx.sample_z
    ctx.sample_z = lambda n: latents.append(real_z(n)) or latents[-1]
    with monkeypatch.context() as patch:
        patch.setattr(aggregation, "sign_consistency_mask",
                      lambda grads, gen: masks.append(gen.get_state()) or real_mask(grads, gen))
        for it in range(3):
            method.generator_step(it)
            method.student_step(it)
            real_z(more_latents)
            torch.rand(more_mask, generator=method.aggregator.generator)
    return masks, latents


def test_more_latents_never_shift_the_sga_mask_and_more_mask_draws_never_shift_the_latents(root, monkeypatch):  # noqa: F811
    masks, latents = _draws(root, monkeypatch)
    assert len(masks) == 3 and len(latents) == 6
    more_latents = _draws(root, monkeypatch, more_latents=50)
    assert all(torch.equal(a, b) for a, b in zip(masks, more_latents[0], strict=True)), "latents moved the mask"
    more_mask = _draws(root, monkeypatch, more_mask=50)
    assert all(torch.equal(a, b) for a, b in zip(latents, more_mask[1], strict=True)), "mask draws moved the latents"


def test_the_latent_mask_and_global_streams_start_from_their_own_seeds(root):  # noqa: F811
    """One seed for all three would make, e.g., the first latents equal KL-PGD's first start noise."""
    cls = distill.get_method("derd")
    ctx = distill.Context(micro_config(), cls, 3, root, CPU)
    method = cls(ctx)
    first = {"global": torch.randn(256, generator=torch.Generator().manual_seed(3)),  # what seed_everything(3) starts
             "latents": torch.randn(256, generator=ctx.rng),
             "mask": torch.randn(256, generator=method.aggregator.generator)}
    names = sorted(first)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert (first[a] - first[b]).abs().max() > 0.5, f"the {a} and {b} streams draw the same numbers"


# ---------------------------------------------------------------- Stage-II work redone after an interruption
def _curves(where, method: str) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "seconds"}
            for r in read_rows(Paths(where).plots / "distill" / f"{method}-seed0.csv")]


@pytest.mark.parametrize("method", distill.registered_methods())
def test_an_interrupted_student_redoes_only_the_lost_iterations_and_ends_bitwise_equal(root, method, monkeypatch):  # noqa: F811
    """M = 5 iterations, a checkpoint every 2, a crash inside iteration 3: the resume starts at N = 2 and runs
    exactly iterations 2, 3, 4 (each one generator step and k_student student steps)."""
    cfg = micro_config(methods=[method], iterations=5, checkpoint_every=2, k_student=2)
    paths = Paths(root)
    reference = distill.train_student(cfg, method, 0, root)
    expected, curves = load_tensors(paths.student(method, 0)), _curves(root, method)
    paths.student(method, 0).unlink()
    cls = distill.get_method(method)
    steps = {"generator": cls.generator_step, "student": cls.student_step}
    ran: dict[str, list[int]] = {"generator": [], "student": []}

    def count(kind: str, crash_at: int | None = None):
        def step(self, it):
            if it == crash_at:
                raise KeyboardInterrupt
            ran[kind].append(it)
            return steps[kind](self, it)
        return step

    monkeypatch.setattr(cls, "student_step", count("student", crash_at=3))
    with pytest.raises(KeyboardInterrupt):
        distill.train_student(cfg, method, 0, root)
    assert (paths.checkpoints / f"distill_{method}-seed0.pt").is_file() and not paths.student(method, 0).exists()
    ran = {"generator": [], "student": []}
    monkeypatch.setattr(cls, "generator_step", count("generator"))
    monkeypatch.setattr(cls, "student_step", count("student"))
    resumed = distill.train_student(cfg, method, 0, root)
    assert ran == {"generator": [2, 3, 4], "student": [2, 2, 3, 3, 4, 4]}, "the resume redid other iterations"
    state = load_tensors(paths.student(method, 0))
    assert state.keys() == expected.keys() and all(torch.equal(state[k], expected[k]) for k in state), \
        "the resumed student differs from an uninterrupted one"
    assert _curves(root, method) == curves
    assert {k: v for k, v in resumed["final"].items() if k != "seconds"} == \
        {k: v for k, v in reference["final"].items() if k != "seconds"}
