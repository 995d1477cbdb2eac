"""What AutoAttack's last two attacks add: for every standard-version AutoAttack record in a flag store, the
points FAB-T and Square change after APGD-CE + APGD-T, and their share of AutoAttack's time. This is the
evidence behind the default's ``eval.autoattack.version: standard-apgd`` (the sweeps' tables keep ``standard``).

    python -m bench.aa_attacks [artifacts/eval_flags]

Reads the per-chunk resume records ``<model>.aa.json`` / ``<model>.aa.<start>.json`` that
``derd.evaluation.autoattack`` writes (cumulative robust accuracy and runtime after each attack).
"""
from __future__ import annotations

import json
import re
import sys
from collections import defaultdict
from pathlib import Path

CHEAP, COSTLY = ("apgd-ce", "apgd-t"), ("fab-t", "square")
CHUNK = re.compile(r"^(?P<model>.+)\.aa(\.\d+)?\.json$")


def standard_records(flags: Path) -> dict[str, dict[str, float]]:
    """Per model: examples, robust count after APGD-T and after Square, seconds of the two attack pairs."""
    totals: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for path in sorted(flags.glob("*.aa*.json")):
        match = CHUNK.match(path.name)
        state = json.loads(path.read_text())
        if not match or not set(CHEAP + COSTLY) <= set(state.get("done", [])):
            continue
        n, after, seconds = len(state["robust"]), state["accuracy_after"], state["runtime_s"]
        row = totals[match["model"]]
        row["n"] += n
        row["after_apgd"] += round(after["apgd-t"] * n)
        row["after_all"] += round(after["square"] * n)
        row["s_apgd"] += sum(seconds[a] for a in CHEAP)
        row["s_costly"] += sum(seconds[a] for a in COSTLY)
    return dict(totals)


def render(records: dict[str, dict[str, float]]) -> str:
    lines = ["| model | examples | robust after APGD-CE+T | after FAB-T+Square | points changed | FAB-T+Square time share |",
             "|---|---|---|---|---|---|"]
    for model, r in records.items():
        share = r["s_costly"] / max(r["s_apgd"] + r["s_costly"], 1e-9)
        lines.append(f"| {model} | {r['n']:.0f} | {r['after_apgd']:.0f} | {r['after_all']:.0f} | "
                     f"{r['after_apgd'] - r['after_all']:.0f} | {share:.0%} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    flags = Path(args[0] if args else "artifacts/eval_flags")
    if not flags.is_dir():
        raise SystemExit(f"bench.aa_attacks: no flag store at {flags} (run an evaluation with "
                         "eval.autoattack.version: standard first)")
    records = standard_records(flags)
    if not records:
        raise SystemExit(f"bench.aa_attacks: no standard-version AutoAttack record in {flags}")
    print(render(records))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
