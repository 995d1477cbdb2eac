"""The micro profile of the pipeline tests: every stage of the real pipeline in seconds (tiny nets,
a few steps, custom AutoAttack on a few images). Numbers it produces mean nothing."""
from __future__ import annotations

import copy
from pathlib import Path

import yaml

from derd import config

MICRO: dict = {
    "seed": 0,
    "device": "cpu",
    "data": {"name": "digits", "image_size": 8},
    "teachers": {
        "natural": {"arch": "small_cnn", "width": 4, "train": {"epochs": 1, "batch_size": 256}},
        "robust": {"arch": "small_cnn", "width": 4, "method": "pgd_at", "train": {"epochs": 1, "batch_size": 256},
                   "attack": {"eps": 0.2, "steps": 1, "step_size": 0.2}},
    },
    "stage1": {"generators": ["natural", "robust"], "iterations": 3, "batch_size": 16, "health_samples": 32,
               "inversion": {"pool_size": 16, "batch_size": 16, "steps": 2}, "log_every": 1},
    # every registered method (tests/test_pipeline.py checks), so that the dependency trace covers each one's reads
    "stage2": {"methods": ["cmi", "dafl", "derd", "derd_inv", "derd_no_tnat", "dfad", "dfard", "ferd", "rslad_real",
                           "zskt"],
               "seeds": [0], "student": {"arch": "small_cnn", "width": 4},
               "iterations": 2, "k_student": 1, "batch_size": 16, "log_every": 1,
               "attack": {"eps": 0.2, "steps": 1, "step_size": 0.2},
               "baselines": {"cmi": {"bank_size": 32, "head_dim": 8}},
               "ferd": {"round_iterations": 1, "ib_steps": 1, "risk_steps": 1, "bank_size": 32}},
    "eval": {"n_examples": 16, "batch_size": 16, "pgd_s": {"steps": 1, "step_size": 0.2},
             "pgd_t": {"steps": 1, "step_size": 0.2}, "cw": {"steps": 1, "step_size": 0.2},
             "autoattack": {"version": "custom", "attacks": ["apgd-ce"]},
             "sanity": {"enabled": False},  # covered by tests/test_evaluate.py; costly per model
             "eps_curve": [0.0, 1.0], "sat_student": True},
}


def write_params(path: Path, changes: dict[str, object] | None = None) -> Path:
    """MICRO with dotted-key ``changes`` (``{"stage2.lambda_rob": 1.0}``) as a complete params file."""
    params = copy.deepcopy(MICRO)
    for key, value in (changes or {}).items():
        *parents, leaf = key.split(".")
        node = params
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    complete = config.parse(params).model_dump(mode="json")  # DVC wants every key it tracks spelled out
    path.write_text(yaml.safe_dump(complete, sort_keys=False))
    return path
