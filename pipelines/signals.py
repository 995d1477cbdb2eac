"""SIGTERM (a killed `dvc repro`, a cancelled queue, CI timeouts) and Ctrl-C ask the work to stop.

The training loops, in whichever thread they run, raise at their next step (resume state kept) and the
command unwinds. A second signal, or no exit within ``grace`` seconds, ends the process at once (artifact
writes are atomic, so nothing half-written remains): a stage whose Prefect server died with its parent
`dvc repro` would otherwise retry its state reports to that server for minutes.

Prefect swaps in its own SIGTERM handler for the length of a flow run (it raises inside the flow and then
reports the crash to the server), so every flow reinstalls this one first.
"""
from __future__ import annotations

import os
import signal
import sys
import threading


def stop_on_signals(grace: float = 8.0) -> None:
    """Make SIGTERM and SIGINT set ``derd.runtime.STOP``, with a hard exit ``grace`` seconds later (main thread
    only: elsewhere Python cannot install handlers, and the main thread's stay in place)."""
    if threading.current_thread() is not threading.main_thread():
        return
    from derd.runtime import STOP

    def handler(signum: int, frame) -> None:
        if STOP.is_set():
            os._exit(128 + signum)
        STOP.set()
        print(f"derd: {signal.Signals(signum).name} received, stopping (resume state is kept)", file=sys.stderr)
        timer = threading.Timer(grace, os._exit, (128 + signum,))
        timer.daemon = True
        timer.start()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
