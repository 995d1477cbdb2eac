"""Behaviour parity between two checkouts: run the whole pipeline (every method) on the micro profile with
the code of the current directory, then compare two such runs tensor by tensor.

    (cd OLD_CHECKOUT && python /path/to/tests/parity.py run /tmp/old)
    (cd NEW_CHECKOUT && python tests/parity.py run /tmp/new)
    python tests/parity.py compare /tmp/old /tmp/new     # exit 1 unless every artifact and the table match

Needs PREFECT_API_URL (a running `prefect server start`). Used to check that refactors change nothing.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

METHODS = ["derd", "derd_inv", "derd_no_tnat", "dafl", "dfad", "zskt", "cmi", "dfard", "rslad_real"]


def run(root: Path) -> None:
    sys.path[:0] = [str(Path.cwd()), str(Path.cwd() / "tests")]  # the code of the checkout we stand in
    from pipeline_profile import write_params

    from pipelines import flows

    root.mkdir(parents=True, exist_ok=True)
    write_params(root / "params.yaml", {"stage2.methods": METHODS, "tracking.enabled": False,
                                        "stage1.generators": ["natural", "robust"], "stage1.inversion.pool_size": 32})
    flows.pipeline_flow(params=str(root / "params.yaml"), root=str(root))


def compare(a: Path, b: Path) -> list[str]:
    import torch

    problems = []
    if json.loads((a / "metrics/eval.json").read_text())["table"] != json.loads((b / "metrics/eval.json").read_text())["table"]:
        problems.append("metrics/eval.json: tables differ")
    for f in sorted((a / "artifacts").glob("*/*.pt")):
        other = b / f.relative_to(a)
        x, y = (torch.load(p, weights_only=True) for p in (f, other)) if other.is_file() else (None, None)
        tensors = x is not None and x.keys() == y.keys() and all(
            torch.equal(x[k], y[k]) if torch.is_tensor(x[k]) else True for k in x)
        print(f"{f.relative_to(a)}: {'bitwise-equal' if tensors else 'DIFFERENT'}")
        if not tensors:
            problems.append(str(f.relative_to(a)))
    return problems


if __name__ == "__main__":
    if sys.argv[1:2] == ["run"] and len(sys.argv) == 3:
        run(Path(sys.argv[2]))
    elif sys.argv[1:2] == ["compare"] and len(sys.argv) == 4:
        sys.exit(1 if compare(Path(sys.argv[2]), Path(sys.argv[3])) else 0)
    else:
        sys.exit(__doc__)
