"""Stage-I warm-up, DERD_inv's pool, generator health (METHOD.md "Stage-I", "Variants")."""
from __future__ import annotations

import shutil

import pytest
import torch
from stage1_helpers import tiny_config

from derd import data, teachers
from derd.artifacts import CheckpointError, file_hash, read_json, sidecar_path
from derd.config import ConfigError, parse
from derd.losses import StageOneLoss
from derd.models import build_generator
from derd.runtime import Paths, seed_everything
from derd.stage1 import warmup
from derd.stage1.health import batch_health, batch_statistics, generator_health

# Micro warm-up (tiny_config, 60 steps), measured over seeds 0-4 (teacher and generator seeded together):
# L_G^I drop 7.8 / 11.4 / 10.7 / 11.3 / 10.9, class-balance gain 0.27 / 0.98 / 0.91 / 0.95 / 0.92.
MARGINS = {"loss_drop": 5.0, "balance_gain": 0.15}


@pytest.fixture(scope="session")
def teacher_root(tmp_path_factory):
    """Tiny natural and robust teachers on 8×8 digits (a few seconds)."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("stage1-teachers")
    teachers.run(tiny_config(), root)
    return root


def _copy_teachers(src, dst):
    shutil.copytree(Paths(src).teachers, Paths(dst).teachers)
    return dst


@pytest.fixture(scope="session")
def stage1_run(teacher_root, tmp_path_factory):
    root = _copy_teachers(teacher_root, tmp_path_factory.mktemp("stage1-run"))
    cfg = tiny_config()
    return cfg, root, warmup.run(cfg, root)


def test_run_writes_every_artifact(stage1_run):
    cfg, root, metrics = stage1_run
    paths = Paths(root)
    for role in ("natural", "robust"):
        meta = read_json(sidecar_path(paths.generator(role)))
        assert meta["teacher_role"] == role
        assert meta["teacher_sha256"] == file_hash(paths.teacher(role))
        assert meta["arch"] == "dafl" and meta["nz"] == cfg.stage1.generator.nz and meta["shape"] == [1, 8, 8]
        assert meta["params_hash"] == warmup.params_hash(cfg, f"generator_{role}")
        assert set(meta["final_terms"]) == {"total", "oh", "ie", "bn", "a", "w_oh", "w_ie", "w_bn", "w_a"}
        assert sum(meta["health"]["class_histogram"]) == cfg.stage1.health_samples
    assert read_json(sidecar_path(paths.inversion_pool))["teacher_role"] == "natural"
    for unit in ("generator_natural", "generator_robust", "inversion_pool"):
        assert read_json(paths.metrics / "warmup" / f"{unit}.json") == warmup.finals(read_json(sidecar_path(
            paths.inversion_pool if unit == "inversion_pool" else paths.generator(unit.removeprefix("generator_")))))
        assert (paths.plots / "warmup" / f"{unit}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(paths.checkpoints.glob("stage1_*")), "finished units leave no resume state behind"


def test_csv_logs_every_raw_and_weighted_term_per_step(stage1_run):
    cfg, root, _ = stage1_run
    artifacts = []
    for unit in cfg.stage1_units():
        lines = (Paths(root).plots / "warmup" / f"{unit}.csv").read_text().splitlines()
        header = lines[0].split(",")
        assert {"artifact", "teacher_role", "step", "lr", "total", "oh", "w_oh", "ie", "w_ie", "bn", "w_bn", "a", "w_a"} <= set(header)
        artifacts += [line.split(",")[header.index("artifact")] for line in lines[1:]]
    inv = cfg.stage1.inversion
    assert artifacts.count("generator_natural") == artifacts.count("generator_robust") == cfg.stage1.iterations
    assert artifacts.count("inversion_pool") == inv.steps * -(-inv.pool_size // inv.batch_size)


def test_load_generator_is_in_eval_mode_and_checked_against_the_config(stage1_run):
    cfg, root, _ = stage1_run
    g = warmup.load_generator(cfg, root, "robust")
    assert not g.training
    x = g(torch.randn(5, cfg.stage1.generator.nz))
    assert x.shape == (5, 1, 8, 8) and x.min() >= 0 and x.max() <= 1
    other = tiny_config(generator={"arch": "dafl", "nz": 7})
    with pytest.raises(CheckpointError, match="rerun `derd warmup`"):
        warmup.load_generator(other, root)
    with pytest.raises(CheckpointError, match="no Stage-I generator"):
        warmup.load_generator(cfg, root / "elsewhere")


def test_inversion_pool_has_the_configured_size_range_and_lowers_its_loss(stage1_run):
    cfg, root, metrics = stage1_run
    pool = warmup.load_inversion_pool(root)
    assert pool.shape == (cfg.stage1.inversion.pool_size, 1, 8, 8)
    assert pool.min() >= 0 and pool.max() <= 1
    terms = metrics["inversion_pool"]
    assert terms["final_terms"]["total"] < terms["initial_terms"]["total"] - 1.0


def untrained_and_trained(cfg, root) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The generator as the warm-up initialises it (same seed; training mode, as at step 0: its
    untrained running statistics would make eval-mode samples near-identical) and as saved after it."""
    seed_everything(cfg.seed)
    g = cfg.stage1.generator
    untrained = build_generator(g.arch, g.nz, data.info(cfg.data).shape, g.width).train()
    return untrained, warmup.load_generator(cfg, root)


def test_micro_warmup_lowers_the_loss_and_balances_classes(stage1_run):
    """Against the same generator before training; margins from MARGINS (measured over seeds)."""
    cfg, root, _ = stage1_run
    teacher = teachers.load_teacher(cfg, "natural", root)
    before, after = (warmup.sample(g, 256, 123) for g in untrained_and_trained(cfg, root))
    with StageOneLoss.from_config(teacher, cfg.stage1) as loss_fn, torch.no_grad():
        drop = loss_fn(before).total.item() - loss_fn(after).total.item()
    gain = generator_health(teacher, after, 10, 0.6)["balance"] - generator_health(teacher, before, 10, 0.6)["balance"]
    assert drop > MARGINS["loss_drop"]
    assert gain > MARGINS["balance_gain"]


def test_collapse_detection_fires_on_a_one_image_generator(teacher_root):
    cfg = tiny_config()
    teacher = teachers.load_teacher(cfg, "natural", teacher_root)

    class OneImage(torch.nn.Module):
        nz = 4

        def __init__(self):
            super().__init__()
            self.image = torch.nn.Parameter(torch.rand(1, 1, 8, 8))

        def forward(self, z):
            return self.image.expand(len(z), -1, -1, -1)

    images = warmup.sample(OneImage(), 64, 0)
    health = generator_health(teacher, images, 10, collapse_threshold=0.6)
    assert health["collapsed"] and health["classes_seen"] == 1 and health["diversity"] == 0
    assert any("class collapse" in w for w in health["warnings"])
    assert any("sample collapse" in w for w in health["warnings"])
    real, _ = data.first_n(data.load(cfg.data).test, 200)
    healthy = generator_health(teacher, real, 10, collapse_threshold=0.6)
    assert not healthy["collapsed"] and healthy["balance"] > 0.9 and healthy["diversity"] > 0.1


def test_batch_health_sees_a_collapsed_batch_and_the_experts_agreement():
    same = torch.full((8, 1, 4, 4), 0.5)
    one_class = torch.zeros(8, 10)
    one_class[:, 3] = 5.0
    collapsed = batch_health(same, one_class, one_class)
    assert collapsed["balance"] == 0 and collapsed["top_class_share"] == 1
    assert collapsed["diversity"] == 0 and collapsed["agree_nat_rob"] == 1
    images = torch.stack([torch.full((1, 4, 4), v) for v in (0.0, 1.0)])
    logits = torch.eye(10)[:2]
    healthy = batch_health(images, logits, logits.flip(0))
    assert healthy["balance"] == pytest.approx(0.30103, abs=1e-4)  # two classes of ten: ln 2 / ln 10
    assert healthy["diversity"] == 1 and healthy["agree_nat_rob"] == 0
    assert "agree_nat_rob" not in batch_health(images, logits)


def _bn_buffers(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}


def test_batch_statistics_samples_ignore_running_statistics_and_restore_the_generator():
    torch.manual_seed(0)
    g = build_generator("dafl", 4, (1, 8, 8)).eval()
    saved = _bn_buffers(g)
    with batch_statistics(g):
        first = warmup.sample(g, 40, 0, 16)
        for name, b in g.named_buffers():  # other running statistics: batch-statistics samples do not see them
            if "running" in name:
                b.mul_(3).add_(1)
        assert torch.equal(warmup.sample(g, 40, 0, 16), first)
    assert not g.training, "the mode is put back"
    assert all(torch.equal(v, saved[k]) for k, v in _bn_buffers(g).items()), "the running statistics are put back"
    assert not torch.allclose(warmup.sample(g, 40, 0, 16), first), "eval mode would have measured other samples"
    with batch_statistics(g.train()):
        pass
    assert g.training


def test_generator_health_measures_the_samples_stage2_draws(teacher_root, tmp_path, monkeypatch):
    """Stage-II samples its generator in train mode: the warm-up's health (and its final terms) must see those
    samples, and measuring them must not move the running statistics the artifact saves."""
    cfg = tiny_config(iterations=3, generators=["natural"], inversion={"pool_size": 0})
    root = _copy_teachers(teacher_root, tmp_path)
    real_sample, seen = warmup.sample, {}

    def recording_sample(generator, *args):
        seen.update(training=generator.training, buffers=_bn_buffers(generator))
        return real_sample(generator, *args)

    monkeypatch.setattr(warmup, "sample", recording_sample)
    warmup.train_generator(cfg, root, "natural", torch.device("cpu"), [])
    assert seen["training"], "health samples drawn with BatchNorm's running statistics (eval mode)"
    saved = torch.load(Paths(root).generator("natural"), weights_only=True)
    assert all(torch.equal(saved[k], v) for k, v in seen["buffers"].items()), "health sampling moved BN statistics"


def test_warmup_resumes_to_the_same_generator(teacher_root, tmp_path, monkeypatch):
    cfg = tiny_config(iterations=25, checkpoint_every=5, generators=["natural"],
                      inversion={"pool_size": 0})
    full = _copy_teachers(teacher_root, tmp_path / "full")
    warmup.train_generator(cfg, full, "natural", torch.device("cpu"), [])
    broken = _copy_teachers(teacher_root, tmp_path / "broken")
    real_check = warmup.check_finite

    def fail_at_step_12(value, what, step=None):
        if step == 12:
            raise FloatingPointError("simulated crash")
        real_check(value, what, step)

    monkeypatch.setattr(warmup, "check_finite", fail_at_step_12)
    with pytest.raises(FloatingPointError):
        warmup.train_generator(cfg, broken, "natural", torch.device("cpu"), [])
    monkeypatch.setattr(warmup, "check_finite", real_check)
    steps_run = []
    real_lr_at = warmup.lr_at
    monkeypatch.setattr(warmup, "lr_at", lambda step, *a: steps_run.append(step) or real_lr_at(step, *a))
    rows: list[dict] = []
    warmup.train_generator(cfg, broken, "natural", torch.device("cpu"), rows)
    assert steps_run == list(range(10, 25))  # resumed from the step-10 checkpoint
    assert [r["step"] for r in rows] == list(range(25))
    a = torch.load(Paths(full).generator("natural"), weights_only=True)
    b = torch.load(Paths(broken).generator("natural"), weights_only=True)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)
    steps_run.clear()
    other = tiny_config(iterations=25, checkpoint_every=5, generators=["natural"], inversion={"pool_size": 0}, lr=0.02)
    warmup.train_generator(other, broken, "natural", torch.device("cpu"), [])
    assert steps_run == list(range(25))  # a checkpoint of other params is not resumed

    # a resume state written by other code (an edited derd/losses.py, say) is discarded, not resumed
    monkeypatch.setattr(warmup, "check_finite", fail_at_step_12)
    with pytest.raises(FloatingPointError):
        warmup.train_generator(cfg, broken, "natural", torch.device("cpu"), [])
    monkeypatch.setattr(warmup, "check_finite", real_check)
    monkeypatch.setattr("derd.resume.code_hash", lambda *parts: "edited-code")
    steps_run.clear()
    warmup.train_generator(cfg, broken, "natural", torch.device("cpu"), [])
    assert steps_run == list(range(25))


def test_a_state_written_on_another_device_is_discarded_not_loaded(teacher_root, tmp_path, caplog):
    """A GPU's random stream (a Philox state) cannot continue on the CPU: its resume state starts over."""
    cfg = tiny_config(iterations=6, generators=["natural"], inversion={"pool_size": 0})
    root = _copy_teachers(teacher_root, tmp_path)
    teacher_hash = file_hash(Paths(root).teacher("natural"))
    gpu = warmup.resume_state(cfg, root, "generator_natural", teacher_hash, torch.device("cuda"))
    gpu.save(step=3, generator={}, optimizer={}, z_rng=torch.zeros(16, dtype=torch.uint8), rows=[])
    rows: list[dict] = []
    with caplog.at_level("WARNING", logger="derd"):
        warmup.train_generator(cfg, root, "natural", torch.device("cpu"), rows)
    assert "discarding resume state" in caplog.text and [r["step"] for r in rows] == list(range(6))


def test_nan_stops_the_warmup_loudly(teacher_root, tmp_path, monkeypatch):
    cfg = tiny_config(iterations=3, generators=["natural"], inversion={"pool_size": 0})
    root = _copy_teachers(teacher_root, tmp_path)

    def nan_generator(*args, **kwargs):
        g = build_generator(*args, **kwargs)
        with torch.no_grad():
            g.head[0].weight[0, 0] = float("nan")
        return g

    monkeypatch.setattr(warmup, "build_generator", nan_generator)
    with pytest.raises(FloatingPointError, match="generator_natural L_G\\^I became non-finite at step 0"):
        warmup.run(cfg, root)
    assert not Paths(root).generator("natural").exists()


def test_no_natural_teacher_variant_needs_the_robust_generator():
    with pytest.raises(ConfigError, match="stage1.generators"):
        parse({"stage1": {"generators": ["natural"]}, "stage2": {"methods": ["derd_no_tnat"]}})
    with pytest.raises(ConfigError, match="stage1.inversion.pool_size"):
        parse({"stage1": {"inversion": {"pool_size": 0}}, "stage2": {"methods": ["derd_inv"]}})


def test_inversion_pool_resumes_batch_by_batch(teacher_root, tmp_path, monkeypatch):
    cfg = tiny_config(generators=["natural"], checkpoint_every=1,
                      inversion={"pool_size": 30, "batch_size": 10, "steps": 4, "lr": 0.1})
    full = _copy_teachers(teacher_root, tmp_path / "full")
    warmup.build_inversion_pool(cfg, full, torch.device("cpu"), [])
    broken = _copy_teachers(teacher_root, tmp_path / "broken")
    real_optimise, calls = warmup.optimise_batch, []

    def crash_on_third_batch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise FloatingPointError("simulated crash")
        return real_optimise(*args, **kwargs)

    monkeypatch.setattr(warmup, "optimise_batch", crash_on_third_batch)
    with pytest.raises(FloatingPointError):
        warmup.build_inversion_pool(cfg, broken, torch.device("cpu"), [])
    calls.clear()
    monkeypatch.setattr(warmup, "optimise_batch", lambda *a, **k: calls.append(1) or real_optimise(*a, **k))
    warmup.build_inversion_pool(cfg, broken, torch.device("cpu"), [])
    assert len(calls) == 1  # only the missing third batch is optimised again
    torch.testing.assert_close(warmup.load_inversion_pool(full), warmup.load_inversion_pool(broken), rtol=0, atol=1e-6)


# The supplementary's Stage-I weights per dataset (λoh, λie, λBN, λa) and the generator each preset uses.
PRESETS = {
    "cifar10": ((0.05, 5, 1e-5, 0.01), "dafl", 32),
    "cifar100": ((0.5, 20, 1e-5, 0.1), "dafl", 32),
    "imagenet100": ((0.05, 20, 1e-5, 0.1), "dcgan", 224),
}


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_carry_the_supplementary_stage1_weights(name):
    from pathlib import Path

    from derd.config import load

    cfg = load(Path(__file__).resolve().parent.parent / "presets" / f"{name}.yaml")
    lambdas, arch, size = PRESETS[name]
    s1 = cfg.stage1
    assert (s1.lambda_oh, s1.lambda_ie, s1.lambda_bn, s1.lambda_a) == lambdas
    assert s1.generator.arch == arch and cfg.data.image_size == size
    assert build_generator(arch, 4, (3, size, size), s1.generator.width)(torch.randn(1, 4)).shape[-1] == size
