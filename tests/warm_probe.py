"""Preloaded by tests/test_warm.py's warm process: it replaces ``pipelines.cli.main`` with a probe that records
where it runs into ``$WARM_OUT`` and exits with ``$WARM_CODE`` (or, for ``derd report --params sleep``, waits to be
signalled), so the tests see what a forked stage command sees."""
from __future__ import annotations

import json
import os
import sys
import time

from pipelines import cli


def main(argv: list[str]) -> int:
    if "sleep" in argv:
        print("sleeping", flush=True)
        time.sleep(60)
        return 0
    print("probe ran", flush=True)
    print("probe stderr", file=sys.stderr, flush=True)
    with open(os.environ["WARM_OUT"], "w") as f:
        json.dump({"pid": os.getpid(), "ppid": os.getppid(), "cwd": os.getcwd(), "argv": argv,
                   "socket": os.environ.get("DERD_WARM_SOCKET"), "preloaded": "warm_probe" in sys.modules}, f)
    return int(os.environ.get("WARM_CODE", "0"))


cli.main = main
