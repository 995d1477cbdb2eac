"""The Stage-II memory bank: what enters, how student batches draw from it, its device, and its resume."""
from __future__ import annotations

import pytest
import torch
from test_distill import micro_config, root  # noqa: F401 (root: the tiny teachers/generators fixture)

from derd import distill
from derd.artifacts import load_tensors
from derd.config import ConfigError
from derd.distill.memory_bank import MemoryBank
from derd.runtime import Paths

CPU = torch.device("cpu")


def rows(*values: float) -> torch.Tensor:
    """One 1×2×2 image per value, filled with it."""
    return torch.tensor(values, dtype=torch.float32).view(-1, 1, 1, 1).expand(-1, 1, 2, 2).clone()


def held(bank: MemoryBank) -> list[float]:
    return sorted(bank.images[:, 0, 0, 0].tolist())


def test_the_oldest_images_leave_first():
    bank = MemoryBank(5, 1.0, CPU)
    bank.add(rows(0, 1, 2))
    assert held(bank) == [0, 1, 2]
    bank.add(rows(3, 4, 5, 6))
    assert held(bank) == [2, 3, 4, 5, 6]
    bank.add(rows(7))
    assert held(bank) == [3, 4, 5, 6, 7]
    bank.add(rows(*range(10, 22)))  # more than the bank holds: its last images
    assert held(bank) == [17, 18, 19, 20, 21]
    bank.add(rows(30, 31, 32))
    assert held(bank) == [20, 21, 30, 31, 32]


def test_a_student_batch_takes_its_fraction_from_the_bank_and_the_rest_fresh():
    asked = []

    def fresh(k):
        asked.append(k)
        return rows(*[-1.0] * k)

    rng = torch.Generator().manual_seed(0)
    bank = MemoryBank(16, 0.75, CPU)
    batch = bank.batch(8, fresh, rng)
    assert asked == [8] and batch[:, 0, 0, 0].tolist() == [-1.0] * 8, "an empty bank: all fresh"
    bank.add(rows(100, 101, 102, 103))
    batch = bank.batch(8, fresh, rng)
    values = batch[:, 0, 0, 0].tolist()
    assert asked == [8, 2] and values[6:] == [-1.0, -1.0]
    assert all(v in (100, 101, 102, 103) for v in values[:6])
    assert len(bank) == 4, "fresh rows enter only a bank that admits student rows"
    whole = MemoryBank(16, 1.0, CPU)
    whole.add(rows(5, 6))
    assert set(whole.batch(8, fresh, rng)[:, 0, 0, 0].tolist()) <= {5, 6} and asked == [8, 2]


def test_the_bank_lives_on_its_device_and_saves_on_the_cpu():
    bank = MemoryBank(4, 1.0, CPU)
    bank.add(rows(1, 2, 3))
    state = bank.state_dict()
    assert state["images"].device == CPU
    on_meta = MemoryBank(4, 1.0, torch.device("meta"))
    on_meta.load_state_dict(state)
    assert on_meta.images.device.type == "meta" and len(on_meta) == 3
    on_meta.add(rows(4))  # images from elsewhere move to the bank's device
    assert on_meta.images.device.type == "meta"
    again = MemoryBank(4, 1.0, CPU)
    again.load_state_dict(state)
    again.add(rows(4, 5))
    bank.add(rows(4, 5))
    assert torch.equal(again.images, bank.images) and again.next == bank.next


def context(root, method="dfad", augment=True, **bank):  # noqa: F811
    cfg = micro_config(methods=[method], augment=augment, memory_bank={"capacity": 12, **bank})
    ctx = distill.Context(cfg, distill.get_method(method), 0, root, CPU)
    return ctx, distill.get_method(method)(ctx)


def test_generator_batches_enter_and_student_batches_draw_from_the_bank(root):  # noqa: F811
    ctx, method = context(root, augment=False)
    method.generator_step(0)
    assert len(ctx.bank) == 8
    banked = {tuple(r.flatten().tolist()) for r in ctx.bank.images}
    x = ctx.pseudo_batch()
    assert len(ctx.bank) == 8, "student batches do not enter a bank of generator batches"
    assert len(x) == 8 and all(tuple(r.flatten().tolist()) in banked for r in x)
    method.generator_step(1)
    assert len(ctx.bank) == 12
    assert "last 12 images (every batch a generator step makes)" in method.reading()["memory_bank"]


def test_fresh_student_rows_enter_a_bank_that_admits_them(root):  # noqa: F811
    ctx, method = context(root, enters="student", fraction=0.5)
    method.generator_step(0)
    assert len(ctx.bank) == 0, "generator batches do not enter a bank of student rows"
    ctx.pseudo_batch()
    assert len(ctx.bank) == 8, "the first batch is all fresh"
    ctx.pseudo_batch()
    assert len(ctx.bank) == 12


def test_bad_bank_settings_are_named(root):  # noqa: F811
    with pytest.raises(ConfigError, match="stage2.memory_bank.enters: student with fraction 1"):
        context(root, enters="student")
    with pytest.raises(ConfigError, match="stage2.memory_bank.fraction: must be > 0"):
        micro_config(memory_bank={"capacity": 4, "fraction": 0})
    ctx, method = context(root, method="derd_inv")  # no generator: no bank
    assert ctx.bank is None and method.reading()["memory_bank"] == "off"
    assert context(root, capacity=0)[0].bank is None


@pytest.mark.parametrize("method", ["dfad", "derd"])
def test_an_interrupted_run_resumes_with_its_bank(root, method, monkeypatch):  # noqa: F811
    cfg = micro_config(methods=[method], iterations=4, checkpoint_every=2, memory_bank={"capacity": 12, "fraction": 0.5})
    paths = Paths(root)
    distill.train_student(cfg, method, 0, root)
    expected = load_tensors(paths.student(method, 0))
    paths.student(method, 0).unlink()
    cls = distill.get_method(method)
    original = cls.student_step

    def crash_at_iteration_3(self, it):
        if it == 3:
            raise KeyboardInterrupt
        return original(self, it)

    monkeypatch.setattr(cls, "student_step", crash_at_iteration_3)
    with pytest.raises(KeyboardInterrupt):
        distill.train_student(cfg, method, 0, root)
    saved = load_tensors(paths.checkpoints / f"distill_{method}-seed0.pt")["memory_bank"]
    assert len(saved["images"]) == 12, "the checkpoint holds the bank"
    monkeypatch.setattr(cls, "student_step", original)
    distill.train_student(cfg, method, 0, root)
    state = load_tensors(paths.student(method, 0))
    assert all(torch.equal(state[k], expected[k]) for k in expected), "the resumed student differs"
