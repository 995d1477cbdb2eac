"""Mixed precision (``runtime.amp``) on the CPU: attacks stay sound under autocast, and the training stages run
and record it (teachers and Stage-I under bf16, Stage-II under fp16 with its loss scaler)."""
from __future__ import annotations

import json

import pytest
import torch

from derd import config, distill, teachers
from derd.attacks import PGD, robust_flags
from derd.runtime import Paths
from derd.stage1 import warmup
from tests.eval_models import EPS, eval_batch, tiny_model
from tests.pipeline_profile import write_params

pytestmark = pytest.mark.slow


def _pgd_accuracy(model, x, y, dtype: torch.dtype | None) -> tuple[float, torch.Tensor]:
    attack = PGD(model, EPS, steps=10, step_size=EPS / 4, seed=0)
    with torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
        x_adv = attack(x, y)
    return robust_flags(model, None, x_adv, y).float().mean().item(), x_adv  # scored in fp32


def test_pgd_under_bf16_autocast_gives_the_fp32_robust_accuracy():
    model = tiny_model("robust")
    x, y = eval_batch(300)
    clean = robust_flags(model, None, x, y).float().mean().item()
    fp32, _ = _pgd_accuracy(model, x, y, None)
    bf16, x_adv = _pgd_accuracy(model, x, y, torch.bfloat16)
    assert clean - fp32 > 0.05  # the attack bites (else the comparison says nothing)
    assert abs(bf16 - fp32) <= 0.03, f"PGD robust accuracy fp32 {fp32:.3f} vs bf16 autocast {bf16:.3f}"
    assert (x_adv - x).abs().max() <= EPS + 1e-6


def test_attacks_leave_fp16_autocast_for_fp32():
    model = tiny_model("robust")
    x, y = eval_batch(64)
    _, fp32 = _pgd_accuracy(model, x, y, None)
    _, fp16 = _pgd_accuracy(model, x, y, torch.float16)
    assert torch.equal(fp32, fp16)  # an fp16 input gradient can underflow to 0; the attack ran in fp32


@pytest.fixture(scope="module")
def bf16_upstream(tmp_path_factory):
    root = tmp_path_factory.mktemp("amp")
    changes = {"stage2.methods": ["derd"], "stage2.iterations": 3, "tracking.enabled": False, "runtime.amp": "bf16"}
    cfg = config.load(write_params(root / "params.yaml", changes))
    teachers.run(cfg, root)
    warmup.run_unit(cfg, root, "generator_natural")
    return root, changes


def test_training_stages_run_under_amp_and_record_it(bf16_upstream):
    root, changes = bf16_upstream
    paths = Paths(root)
    for sidecar in (paths.teachers / "robust.json", paths.stage1 / "generator_natural.json"):
        meta = json.loads(sidecar.read_text())
        assert meta["runtime"]["amp"] == "bf16" and meta["runtime"]["world_size"] == 1
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in json.loads((paths.teachers / "robust.json")
                                                                          .read_text())["history"])
    cfg = config.load(write_params(root / "params.yaml", {**changes, "runtime.amp": "fp16"}))
    side = distill.train_student(cfg, "derd", 0, root)
    assert side["runtime"] == {"nproc": 1, "amp": "fp16", "channels_last": False, "cudnn_benchmark": False,
                               "compile": False, "sync_bn": False, "world_size": 1}
    assert all(torch.isfinite(torch.tensor(v)) for v in side["final"].values())
    state = torch.load(paths.student("derd", 0), weights_only=True)
    assert all(v.dtype != torch.float16 for v in state.values())  # weights stay fp32 (autocast casts per op)


def test_fp16_loss_scale_skips_an_overflowing_step_and_halves():
    from derd.runtime import LossScale

    scale = LossScale(config.parse({"runtime": {"amp": "fp16"}}), scale=2.0**16, growth_interval=2)
    w = torch.ones(3, requires_grad=True)
    big = (w * 1e35).sum()  # ×2^16 overflows fp32
    (g,) = scale.unscale(list(torch.autograd.grad(scale(big), [w])))
    assert scale.overflow and torch.equal(g, torch.zeros(3))
    assert not scale.step_taken() and scale.scale == 2.0**15
    (g,) = scale.unscale(list(torch.autograd.grad(scale((w * 3).sum()), [w])))
    assert torch.equal(g, torch.full((3,), 3.0)) and scale.step_taken()
    scale.unscale(list(torch.autograd.grad(scale(w.sum()), [w])))
    assert scale.step_taken() and scale.scale == 2.0**16  # two finite steps in a row: the scale grows back
    off = LossScale(config.parse({}))
    assert off(big) is big and off.step_taken()
