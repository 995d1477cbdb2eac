"""Typed, validated view of ``params.yaml``.

Every key of ``params.yaml`` maps onto a field below; unknown keys, wrong types and out-of-range
values raise :class:`ConfigError` with one line per problem naming the key path, e.g.
``stage2.lambda_rob: must be ≥ 0, got -1``.
"""
from __future__ import annotations

import difflib
import functools
import hashlib
import json
import re
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

# keys that say where inputs live or how a run is logged, not what is computed: never part of a params hash
WHERE_NOT_WHAT = ("data.root", "data.download", "data.num_workers", "device", "tracking")
# keys that existed once: a params file still setting one is told why it is gone (not just "unknown key")
REMOVED = {
    "eval.autoattack.n_examples": "removed: AutoAttack runs on all eval.n_examples examples, like every other "
                                  "column, so that Ave is a mean over one set of examples; delete the line (lower "
                                  "eval.n_examples to spend less on the evaluation)",
}


class ConfigError(ValueError):
    """A configuration problem, phrased for the user (key paths included)."""


_READS: set[str] | None = None  # the keys read since trace_reads() (None: not tracing)
_TRACED = False  # trace_reads() was called: name validation leaves no imported module behind
_PATHS: dict[int, str] = {}  # id of each traced section -> its dotted path


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    def __getattribute__(self, name: str) -> Any:
        value = object.__getattribute__(self, name)
        if _READS is not None and not name.startswith("_") and name in type(self).model_fields:
            path = _PATHS.get(id(self))
            if path is not None and not isinstance(value, Section):
                _READS.add(f"{path}.{name}" if path else name)
        return value

    def model_dump(self, **kwargs: Any) -> dict[str, Any]:
        out = super().model_dump(**kwargs)
        if _READS is not None and (path := _PATHS.get(id(self))) is not None:
            _READS.update(f"{path}.{k}" if path else k for k in _leaves(out))
        return out


def registered_names(kind: str) -> list[str]:
    """The names of ``kind`` in :mod:`derd.registry` (imported lazily: the registries' modules import the config)."""
    from derd.registry import names_of

    return names_of(kind, forget_imports=_TRACED)


def _registered(kind: str) -> AfterValidator:
    """Validator: a name registered for ``kind``; an unknown one lists the registered names."""
    def check(name: str) -> str:
        known = registered_names(kind)
        if name not in known:
            listed = ", ".join(map(repr, known[:-1])) + f" or {known[-1]!r}" if len(known) > 1 else repr(known[0])
            raise PydanticCustomError("literal_error", "must be a registered {kind}", {"kind": kind, "expected": listed})
        return name

    return AfterValidator(check)


DatasetName = Annotated[str, _registered("dataset")]
ArchName = Annotated[str, _registered("architecture")]
GeneratorName = Annotated[str, _registered("generator")]
MethodName = Annotated[str, _registered("method")]
AggregationName = Annotated[str, _registered("aggregation")]


class Augment(Section):
    crop_padding: int = Field(2, ge=0)  # random crop after zero padding of this many pixels
    hflip: bool = False  # random horizontal flip (off for digits: a flipped 2 is not a 2)


class Data(Section):
    name: DatasetName = "digits"
    root: str = "data"  # where cifar/imagenet100 live (ignored by digits)
    download: bool = False  # let torchvision download CIFAR into root
    image_size: int = Field(16, ge=8)  # digits are resized to this square; ImageNet crops to it
    test_fraction: float = Field(0.25, gt=0, lt=1)  # digits only: stratified held-out test split
    train_subset: int | None = Field(None, ge=10)  # stratified seeded subset of the training split before val is carved (null = all)
    val_fraction: float = Field(0.1, ge=0, lt=1)  # carved from training data, for tuning
    split_seed: int = 0
    num_workers: int = Field(0, ge=0)  # DataLoader worker processes for training batches (0: in the main process)
    augment: Augment = Augment()


class Optim(Section):
    epochs: int = Field(10, ge=1)
    batch_size: int = Field(64, ge=1)
    lr: float = Field(0.05, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(5e-4, ge=0)


class Attack(Section):
    eps: float = Field(0.2, ge=0, le=1)  # L-inf radius in [0,1] pixel units
    steps: int = Field(10, ge=1)
    step_size: float = Field(0.05, gt=0)


class NaturalTeacher(Section):
    arch: ArchName = "small_resnet"
    width: int = Field(16, ge=1)  # base width of the small offline nets (ignored by others)
    checkpoint: str | None = None  # load this instead of training
    normalize: Literal["dataset", "none"] = "dataset"  # none: the net sees raw [0,1] inputs (TRADES/RobustBench weights)
    train: Optim = Optim()


class RobustTeacher(NaturalTeacher):
    method: Literal["pgd_at", "trades"] = "pgd_at"
    trades_beta: float = Field(6.0, ge=0)
    attack: Attack = Attack()


class Teachers(Section):
    natural: NaturalTeacher = NaturalTeacher()
    robust: RobustTeacher = RobustTeacher()


class Generator(Section):
    arch: GeneratorName = "dafl"
    nz: int = Field(100, ge=1)  # latent size
    width: int | None = Field(None, ge=8)  # base channels; null = the arch's default (dafl 128, dcgan 64)


class Inversion(Section):
    pool_size: int = Field(512, ge=0)  # DERD_inv: images optimised into the pool (0 = no pool)
    batch_size: int = Field(128, ge=1)
    steps: int = Field(200, ge=1)
    lr: float = Field(0.05, gt=0)


class Stage1(Section):
    generator: Generator = Generator()
    generators: list[Literal["natural", "robust"]] = Field(["natural", "robust"], min_length=1)  # teachers warmed on
    iterations: int = Field(300, ge=1)
    batch_size: int = Field(128, ge=1)
    lr: float = Field(0.01, gt=0)  # Adam
    schedule: Literal["cosine", "constant"] = "cosine"  # learning-rate schedule over the iterations
    lambda_oh: float = Field(0.05, ge=0)
    lambda_ie: float = Field(5.0, ge=0)
    lambda_bn: float = Field(1e-5, ge=0)
    lambda_a: float = Field(0.01, ge=0)
    ie_log_base: Literal["e", "10"] = "e"  # DAFL used log10; METHOD.md uses ln
    health_samples: int = Field(1024, ge=10)
    collapse_threshold: float = Field(0.6, gt=0, le=1)  # warn when one class exceeds this share
    min_diversity: float = Field(0.02, ge=0)  # warn when the mean pairwise RMS pixel distance is below
    inversion: Inversion = Inversion()
    checkpoint_every: int = Field(100, ge=1)  # resume checkpoints (generator steps / pool batches)
    log_every: int = Field(10, ge=1)


class Student(Section):
    arch: ArchName = "small_cnn"
    width: int = Field(16, ge=1)


class DAFLOpts(Section):  # DAFL's generator objective (its CIFAR values)
    lambda_oh: float = Field(1.0, ge=0)
    lambda_a: float = Field(0.1, ge=0)
    lambda_ie: float = Field(5.0, ge=0)


class ZSKTOpts(Section):
    beta_at: float = Field(250.0, ge=0)  # attention-transfer weight (ZSKT's β)


class CMIOpts(Section):  # CMI's generator objective (its CIFAR-10 values)
    lambda_bn: float = Field(1.0, ge=0)
    lambda_oh: float = Field(0.5, ge=0)
    lambda_adv: float = Field(0.5, ge=0)
    lambda_cr: float = Field(0.8, ge=0)
    cr_temperature: float = Field(0.1, gt=0)
    bank_size: int = Field(4096, ge=1)  # memory bank of generated images (and contrastive queue)
    head_dim: int = Field(128, ge=1)


class DFARDOpts(Section):  # DFARD-style (reconstructed) generator balance and temperature
    bn_balance: float = Field(1.0, ge=0)  # BN prior weighted to this multiple of the adversarial term
    tau_lr: float = Field(0.01, ge=0)  # step of the temperature's ascent on the student loss
    tau_min: float = Field(1.0, gt=0)
    tau_max: float = Field(10.0, gt=0)


class Baselines(Section):
    student_loss: Literal["rslad", "kd"] = "rslad"  # rslad: robust KD on x_adv (+ clean); kd: clean KD only
    rslad_clean_weight: float = Field(1 / 6, ge=0, le=1)  # α of the clean term (RSLAD: 1/6)
    generator_init: Literal["scratch", "stage1"] = "scratch"  # stage1: warm-started from Stage-I's T_rob generator
    dafl: DAFLOpts = DAFLOpts()
    zskt: ZSKTOpts = ZSKTOpts()
    cmi: CMIOpts = CMIOpts()
    dfard: DFARDOpts = DFARDOpts()


class MemoryBankOpts(Section):  # replay memory for the generator-based methods (derd/distill/memory_bank.py)
    capacity: int = Field(0, ge=0)  # images kept, the oldest leave first; 0 = off (CMI and FERD keep their own banks)
    enters: Literal["generator", "student"] = "generator"  # every generator-step batch | fresh rows of student batches
    fraction: float = Field(1.0, gt=0, le=1)  # share of each student batch drawn from the bank; the rest fresh G(z)


class FERDOpts(Section):  # FERD (Li et al., ICLR 2026): its public code's values (METHOD.md "FERD")
    lambda_bn: float = Field(5.0, ge=0)  # BN prior on T_rob
    lambda_adv: float = Field(1.0, ge=0)  # DKL discrepancy between S and T_rob that the generator maximises
    lambda_oh: float = Field(1.0, ge=0)  # CE(T_rob(x), y), y drawn from the robustness-guided class probabilities
    lambda_uni: float = Field(5.0, ge=0)  # KL(U ‖ σ(T_rob's logits from its non-robust channels))
    ib_steps: int = Field(50, ge=1)  # Adam steps of the information bottleneck that finds the non-robust channels
    ib_lr: float = Field(0.1, gt=0)
    ib_beta: float = Field(0.3, ge=0)  # weight of the bottleneck's Gaussian KL beside its CE
    dkl_temperature: float = Field(100.0, gt=0)  # T2 of DKL's class weights σ(T(x)/T2) (generator; student_alpha)
    student_alpha: float = Field(0.0, ge=0)  # DKL's weighted-MSE weight in the student loss (code: 0 in effect)
    clean_weight: float = Field(5 / 6, ge=0, le=1)  # student loss: weight on clean pseudo data, 1 − it on x_adv
    lambda_utae: float = Field(0.0, ge=0)  # UTAE: PGD also minimises λ·KL(U ‖ σ(S(x_adv))) (code: off)
    round_iterations: int = Field(200, ge=1)  # generator steps per synthesis round (FERD's N_G)
    reset_generator: bool = True  # re-initialise G and its Adam state at the start of every round
    latent_lr: float = Field(0.015, ge=0)  # Adam lr of each round's trainable latents (0: fixed latents)
    adam_beta1: float = Field(0.5, ge=0, lt=1)  # β1 of the generator's Adam (the other methods: 0.9)
    class_min: float = Field(0.05, gt=0)  # class sampling: per-class risk scaled into [class_min, class_max]
    class_max: float = Field(0.2, gt=0)
    risk_steps: int = Field(20, ge=1)  # PGD steps (CE on T_rob, y) of the per-class risk at each round's end
    bank_size: int = Field(65536, ge=0)  # FERD's memory bank: images kept (each round's best batch enters); 0 = none
    bank_fraction: float = Field(1.0, gt=0, le=1)  # share of each student batch drawn from FERD's bank


class GradRefineOpts(Section):  # [R] stage2.aggregation: gradrefine (DataFreeShield's GradRefine)
    threshold: float = Field(0.5, ge=0, le=1)  # τ: a coordinate moves when |Σ sign(g_i)| ≥ τ·(number of votes)
    chunks: int = Field(2, ge=1)  # each expert's gradient split into the shares of this many sub-batches: 2m votes


class Stage2(Section):
    methods: list[MethodName] = Field(["derd"], min_length=1)
    seeds: list[int] = Field([0], min_length=1)  # one student per (method, seed)
    student: Student = Student()
    iterations: int = Field(200, ge=1)  # generator steps; each is followed by k_student steps
    k_student: int = Field(5, ge=1)
    generator_warmup: int = Field(0, ge=0)  # generator-only iterations before the first student step
    batch_size: int = Field(128, ge=1)
    lr_student: float = Field(0.1, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(5e-4, ge=0)
    lr_generator: float = Field(1e-3, gt=0)
    lambda_d: float = Field(0.003, ge=0)
    discrepancy: Literal["l1", "kl"] = "l1"
    lambda_rob: float = Field(0.5, ge=0)
    lambda_nat: float = Field(1.0, ge=0)
    lambda_sga: float = Field(5e-4, ge=0)
    aggregation: AggregationName = "sga"
    gradrefine: GradRefineOpts = GradRefineOpts()  # read by aggregation: gradrefine only
    tau: float = Field(1.0, gt=0)
    temperature: Literal["fixed", "entropy"] = "fixed"  # entropy: B-MTARD's per-expert τ (derd/distill/temperature.py)
    temperature_lr: float = Field(0.005, gt=0)  # signed step of each expert's τ per student step (entropy only)
    kd_reduction: Literal["batchmean", "mean"] = "batchmean"  # every student KD KL: Σ classes, mean batch | /K
    rob_target: Literal["adv", "clean"] = "adv"
    generator_init: Literal["stage1", "scratch"] = "stage1"  # [R] scratch = the w/o Stage-I ablation
    generator_opponent: Literal["natural", "robust"] = "natural"  # [R] expert the generator plays S against
    lambda_g_rob_oh: float = Field(0.0, ge=0)  # [R] generator also minimises L_oh under T_rob (0 = paper reading)
    lambda_g_bn: float = Field(0.0, ge=0)  # [R] BatchNorm-statistics prior on every expert G reads (0 = paper)
    lambda_g_ce: float = Field(0.0, ge=0)  # [R] class steering: G also minimises CE(T(x), y), y ~ U per sample (FERD/CMI)
    lambda_rob_clean: float = Field(0.0, ge=0)  # robust soft labels on clean samples, in the robust expert's loss
    augment: bool = True  # data.augment's crop+flip on pseudo data
    attack: Attack = Attack()
    baselines: Baselines = Baselines()
    ferd: FERDOpts = FERDOpts()
    memory_bank: MemoryBankOpts = MemoryBankOpts()
    checkpoint_every: int = Field(50, ge=1)
    monitor_every: int = Field(0, ge=0)  # 0 = no monitoring (curves only when > 0)
    monitor_split: Literal["test", "val"] = "val"  # curves watch held-out training data, never the test set
    monitor_examples: int = Field(500, ge=1)
    monitor_pgd_steps: int = Field(10, ge=1)
    log_every: int = Field(10, ge=1)


class AttackSteps(Section):
    steps: int = Field(20, ge=1)
    step_size: float = Field(2 / 255, gt=0)


class CW(AttackSteps):
    kappa: float = Field(50.0, ge=0)


AA_ATTACKS = ("apgd-ce", "apgd-dlr", "apgd-t", "fab", "fab-t", "square")


class AutoAttackCfg(Section):
    version: Literal["standard", "standard-apgd", "custom"] = "standard"  # derd.evaluation.autoattack.AutoAttack
    attacks: list[Literal[AA_ATTACKS]] = Field(["apgd-ce", "apgd-t"], min_length=1)  # used when version is custom
    batch_size: int = Field(256, ge=1)
    package: Literal["auto", "pyautoattack", "autoattack"] = "auto"  # auto: upstream autoattack if installed


class Sanity(Section):
    enabled: bool = True
    n_examples: int = Field(100, ge=1)  # subset used by the extra attacks of the checks
    tolerance: float = Field(0.03, ge=0)  # allowed accuracy noise (fraction)
    strength: int = Field(5, ge=2)  # the convergence check runs PGD_S with this many times the steps and restarts
    square_queries: int = Field(5000, ge=1)  # query budget of the black-box Square check


class Eval(Section):
    split: Literal["val", "test"] = "test"  # choices are made on val; numbers are reported on test
    eps: float = Field(0.2, ge=0, le=1)
    n_examples: int = Field(500, ge=1)
    batch_size: int = Field(256, ge=1)
    pgd_s: AttackSteps = AttackSteps()
    pgd_t: AttackSteps = AttackSteps(step_size=0.003)
    cw: CW = CW(steps=30)
    autoattack: AutoAttackCfg = AutoAttackCfg()
    sanity: Sanity = Sanity()
    eps_curve: list[float] = [0.0, 0.25, 0.5, 1.0, 2.0]  # multiples of eps
    sat_student: bool = False  # also adversarially train the student arch on real data


class Tracking(Section):
    uri: str | None = None  # default: sqlite:///<project>/mlflow.db
    experiment: str | None = None  # default: derd-<dataset>
    enabled: bool = True


class Runtime(Section):
    """How the training stages (teachers, warmup generators, distill) use the hardware (docs/SCALING.md)."""

    nproc: int = Field(1, ge=1)  # processes per training stage: > 1 runs it under torchrun (one per GPU; gloo on CPU)
    amp: Literal["off", "bf16", "fp16"] = "off"  # autocast of forward passes (fp16: with a GradScaler)
    channels_last: bool = False  # NHWC memory format for the networks (faster convolutions on tensor cores)
    cudnn_benchmark: bool = False  # let cuDNN time and pick its convolution algorithms (fixed input shapes)
    compile: bool = False  # torch.compile the Stage-II student
    sync_bn: bool = False  # SyncBatchNorm for the Stage-II student when nproc > 1 (CUDA only)

    @field_validator("amp", mode="before")
    @classmethod
    def _yaml_off(cls, value: Any) -> Any:
        return "off" if value is False else value  # YAML 1.1 reads a bare `off` as false


class Config(Section):
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    data: Data = Data()
    teachers: Teachers = Teachers()
    stage1: Stage1 = Stage1()
    stage2: Stage2 = Stage2()
    eval: Eval = Eval()
    tracking: Tracking = Tracking()
    runtime: Runtime = Runtime()

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        if re.fullmatch(r"auto|cpu|cuda(:\d+)?", value):
            return value
        raise ValueError("must be one of auto, cpu, cuda or cuda:N (N the GPU index, e.g. cuda:1)")

    @model_validator(mode="after")
    def _stage1_provides_what_stage2_needs(self) -> Config:
        methods = self.stage2.methods
        if "derd_no_tnat" in methods and "robust" not in self.stage1.generators:
            raise ValueError("stage1.generators: must include robust when stage2.methods includes derd_no_tnat")
        if "natural" not in self.stage1.generators and "derd" in methods and self.stage2.generator_init == "stage1":
            raise ValueError("stage1.generators: must include natural when stage2.methods includes derd "
                             "(with stage2.generator_init: stage1)")
        if "derd_inv" in methods and self.stage1.inversion.pool_size == 0:
            raise ValueError("stage1.inversion.pool_size: must be > 0 when stage2.methods includes derd_inv")
        return self

    @model_validator(mode="after")
    def _values_fit_together(self) -> Config:
        """Cross-key rules caught at parse time, before any teacher trains (one line per problem)."""
        problems = [*_duplicates(self), *_generator_size(self)]
        dfard = self.stage2.baselines.dfard
        if dfard.tau_min > dfard.tau_max:
            problems.append(f"stage2.baselines.dfard.tau_min: must be ≤ stage2.baselines.dfard.tau_max, got "
                            f"tau_min={dfard.tau_min} > tau_max={dfard.tau_max} (swap them)")
        ferd = self.stage2.ferd
        if ferd.class_min > ferd.class_max:
            problems.append(f"stage2.ferd.class_min: must be ≤ stage2.ferd.class_max, got class_min={ferd.class_min} "
                            f"> class_max={ferd.class_max} (swap them; equal values sample the classes uniformly)")
        if self.stage2.monitor_every and self.stage2.monitor_split == "val" and self.data.val_fraction == 0:
            problems.append("stage2.monitor_split: val is empty with data.val_fraction 0; set data.val_fraction > 0 "
                            "or monitor_split: test")
        if self.stage2.aggregation == "gradrefine" and self.stage2.gradrefine.chunks > self.stage2.batch_size:
            problems.append(f"stage2.gradrefine.chunks: must be ≤ stage2.batch_size (a chunk holds at least one "
                            f"sample), got {self.stage2.gradrefine.chunks} > {self.stage2.batch_size}")
        if problems:
            raise ValueError("\n  ".join(problems))
        return self

    def stage1_units(self) -> list[str]:
        """Stage-I's units of work (one DVC stage each): a generator per stage1.generators teacher, the pool."""
        return [f"generator_{role}" for role in self.stage1.generators] + ["inversion_pool"]

    def student_units(self) -> list[str]:
        """Stage-II's units of work (one DVC stage each): ``<method>-seed<k>``, the student's file stem."""
        return [f"{m}-seed{s}" for m in self.stage2.methods for s in self.stage2.seeds]

    def section_hash(self, *keys: str, exclude: tuple[str, ...] = ()) -> str:
        """Stable short hash of the named keys (sections or dotted paths; all when none given) without the
        dotted paths in ``exclude`` and :data:`WHERE_NOT_WHAT`. Traced as a read of every key it hashes."""
        leaves = _leaves(BaseModel.model_dump(self, mode="json"))
        chosen = {k: v for k, v in leaves.items()
                  if _under(k, keys or ("",)) and not _under(k, (*exclude, *WHERE_NOT_WHAT))}
        if _READS is not None:
            _READS.update(chosen)
        return json_hash(chosen, 12)


def json_hash(value: Any, length: int = 16) -> str:
    """The one params hash: SHA-256 of ``value`` as sorted-key JSON (non-JSON leaves as ``str``), ``length`` hex digits."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:length]


def _under(key: str, prefixes: tuple[str, ...]) -> bool:
    return any(not p or key == p or key.startswith(p + ".") for p in prefixes)


def _leaves(data: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (lists are leaves)."""
    if not isinstance(data, dict):
        return {prefix: data}
    out: dict[str, Any] = {}
    for key, value in data.items():
        out.update(_leaves(value, f"{prefix}.{key}" if prefix else key))
    return out


# ---------------------------------------------------------------- read tracing (what a stage really depends on)
def trace_reads() -> set[str]:
    """Record from now on which keys of every config loaded are read (attribute reads, dumps, hashes);
    returns the live set. The pipeline's dependency test compares them with each stage's dvc.yaml params."""
    global _READS, _TRACED
    _READS, _TRACED = set(), True
    return _READS


def _register(section: Section, path: str = "") -> None:
    _PATHS[id(section)] = path
    for name in type(section).model_fields:
        child = object.__getattribute__(section, name)
        if isinstance(child, Section):
            _register(child, f"{path}.{name}" if path else name)


@contextmanager
def untraced():
    """Reads inside (MLflow bookkeeping logs every key but computes no output) are not recorded."""
    global _READS
    saved, _READS = _READS, None
    try:
        yield
    finally:
        _READS = saved


_MESSAGES = {
    "greater_than_equal": "must be ≥ {ge}, got {input}",
    "greater_than": "must be > {gt}, got {input}",
    "less_than_equal": "must be ≤ {le}, got {input}",
    "less_than": "must be < {lt}, got {input}",
    "extra_forbidden": "unknown key (check the spelling against params.yaml)",
    "literal_error": "must be one of {expected}, got {input!r}",
    "too_short": "must list at least {min_length} item(s)",
    "missing": "is required",
    "int_parsing": "must be an integer, got {input!r}",
    "int_from_float": "must be a whole number, got {input!r}",
    "int_type": "must be an integer, got {input!r}",
    "float_parsing": "must be a number, got {input!r}",
    "float_type": "must be a number, got {input!r}",
    "bool_parsing": "must be true or false, got {input!r}",
    "bool_type": "must be true or false, got {input!r}",
    "string_type": "must be a string, got {input!r}",
    "list_type": "must be a list (YAML `[a, b]` or one `- item` per line), got {input!r}",
    "model_type": "must be a section (a mapping of keys), got {input!r}",
    "model_attributes_type": "must be a section (a mapping of keys), got {input!r}",
    "dict_type": "must be a mapping, got {input!r}",
}

# datasets whose images keep their native size whatever data.image_size says (see derd/data.py)
NATIVE_IMAGE_SIZE = {"cifar10": 32, "cifar100": 32}


def image_size(cfg: Config) -> int:
    """The side of the images the pipeline works on (what a generator must produce)."""
    return NATIVE_IMAGE_SIZE.get(cfg.data.name, cfg.data.image_size)


def _generator_sizes(arch: str, up_to: int = 1024) -> list[int] | None:
    """The image sides ``arch`` can produce (derd/models/generator.py); None = any."""
    if arch == "dafl":  # linear head to (H/4, W/4), then two x2 upsamplings
        return list(range(8, up_to + 1, 4))
    if arch == "dcgan":  # 7x7 seed, then x2 transposed convolutions (at least one)
        return [7 * 2**k for k in range(1, 8) if 7 * 2**k <= up_to]
    return None


def _generator_size(cfg: Config) -> list[str]:
    arch, size = cfg.stage1.generator.arch, image_size(cfg)
    sizes = _generator_sizes(arch)
    if sizes is None or size in sizes:
        return []
    rule = {"dafl": "a multiple of 4", "dcgan": "7·2^k, e.g. 28, 56, 112 or 224"}[arch]
    near = sorted(sizes, key=lambda s: (abs(s - size), s))[:2]
    if cfg.data.name in NATIVE_IMAGE_SIZE:
        fits = [a for a in registered_names("generator") if (_generator_sizes(a) or [size]).count(size)]
        return [(f"stage1.generator.arch: {arch} cannot produce the {size}x{size} images of data.name="
                 f"{cfg.data.name} (it needs {rule}); use {' or '.join(fits) or 'another generator'}")]
    return [(f"data.image_size: {size} cannot be produced by stage1.generator.arch={arch} (it needs {rule}); "
             f"use {' or '.join(map(str, sorted(near)))}")]


def _duplicates(cfg: Config) -> list[str]:
    out = []
    for key, values in (("stage2.seeds", cfg.stage2.seeds), ("stage2.methods", cfg.stage2.methods),
                        ("eval.autoattack.attacks", cfg.eval.autoattack.attacks)):
        twice = sorted({v for v in values if values.count(v) > 1}, key=str)
        if twice:
            out.append(f"{key}: lists {', '.join(map(str, twice))} more than once; list each once, got {values}")
    return out


# the one radius shared by the robust teacher, Stage-II's attack and the evaluation
EPS_KEYS = ("teachers.robust.attack.eps", "stage2.attack.eps", "eval.eps")


def check_pipeline(cfg: Config, source: str = "params") -> Config:
    """Rules for a params file the pipeline runs (library code may mix settings on purpose): the
    robust teacher, Stage-II and the evaluation use one ε."""
    values = {key: functools.reduce(getattr, key.split("."), cfg) for key in EPS_KEYS}
    if max(values.values()) - min(values.values()) > 1e-6:
        listed = ", ".join(f"{k}={v:g}" for k, v in values.items())
        raise ConfigError(f"invalid configuration in {source}: {listed} differ; the robust teacher, the "
                          "distillation attack and the evaluation must share one ε: set all three to the same value")
    return cfg


def _known_keys(loc: tuple) -> list[str]:
    """The field names of the section that holds ``loc`` (for did-you-mean hints)."""
    model: Any = Config
    for part in loc[:-1]:
        field = getattr(model, "model_fields", {}).get(part)
        if field is None or not isinstance(field.annotation, type) or not issubclass(field.annotation, BaseModel):
            return []
        model = field.annotation
    return list(getattr(model, "model_fields", {}))


def _describe(err: dict[str, Any]) -> str:
    path = ".".join(str(p) for p in err["loc"])
    if not path:  # cross-section rules name their key at the start of the message
        return err["msg"].removeprefix("Value error, ")
    ctx = {k: int(v) if isinstance(v, float) and v.is_integer() else v for k, v in (err.get("ctx") or {}).items()}
    template = _MESSAGES.get(err["type"])
    if template:
        text = template.format(input=err.get("input"), **ctx)
        if err["type"] == "extra_forbidden":
            close = difflib.get_close_matches(str(err["loc"][-1]), _known_keys(tuple(err["loc"])), n=1)
            text += f"; did you mean {close[0]!r}?" if close else ""
    else:
        text = f"{err['msg'].removeprefix('Value error, ')}, got {err.get('input')!r}"
    return f"{path}: {text}"


def parse(raw: Any, source: str = "params") -> Config:
    """Validate a mapping (already loaded YAML) into a :class:`Config`."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of sections, got {type(raw).__name__}")
    gone = [f"{key}: {why}" for key, why in REMOVED.items() if any(_under(k, (key,)) for k in _leaves(raw))]
    if gone:
        raise ConfigError(f"invalid configuration in {source}: " + "\n  ".join(gone))
    try:
        cfg = Config.model_validate(raw)
    except ValidationError as exc:
        lines = [line for e in exc.errors() for line in _describe(e).split("\n  ")]
        sep = "\n  " if len(lines) > 1 else " "  # one problem, one line
        raise ConfigError(f"invalid configuration in {source}:{sep}" + "\n  ".join(lines)) from None
    if _READS is not None:
        _register(cfg)
    return cfg


def load(path: str | Path = "params.yaml") -> Config:
    """Read and validate a params file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such params file (run from the project root, or pass --params)")
    try:
        raw = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not a UTF-8 text file (byte {exc.start}); is --params pointing at the "
                          "right file?") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {_yaml_problem(exc)}") from None
    cfg = parse(raw, str(path))
    with untraced():  # validation is not a dependency of what a stage computes
        return check_pipeline(cfg, str(path))


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """One line: where (line:column, 1-based) and what, e.g. ``line 2, column 3: expected ',' or ']'``."""
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    what = " ".join(str(getattr(exc, "problem", None) or exc).split())
    context = getattr(exc, "context", None)
    if context and getattr(exc, "problem", None):
        what = f"{' '.join(context.split())}: {what}"
    if "'\\t'" in what:
        what += " (YAML indents with spaces, not tabs)"
    return f"line {mark.line + 1}, column {mark.column + 1}: {what}" if mark is not None else what


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.safe_load`` that refuses a key given twice in one mapping (PyYAML keeps the last silently)."""

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, Any] = {}
        for key_node, _ in node.value:
            if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
                key = self.construct_object(key_node)
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"key {key!r} given twice (first on line {seen[key].line + 1}); keep one",
                        key_node.start_mark)
                seen[key] = key_node.start_mark
        return super().construct_mapping(node, deep=deep)
