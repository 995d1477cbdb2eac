"""Shared fixtures.

Prefect: one session-scoped test harness (a temporary API server, ~20 s to start) serves every test
that runs a flow, in this process or in a subprocess (through ``PREFECT_API_URL``); tests that use it
carry the ``prefect`` marker and the ``xdist_group("prefect")`` so ``--dist loadgroup`` keeps them on
one worker. Prefect reads its settings at import, so the defaults below are set before any test
module imports it.
"""
from __future__ import annotations

import os
import tempfile

import pytest

for _key, _value in {
    "PREFECT_HOME": tempfile.mkdtemp(prefix="derd-prefect-home-"),
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DO_NOT_TRACK": "1",
    "DVC_NO_ANALYTICS": "1",
}.items():
    os.environ.setdefault(_key, _value)


@pytest.fixture(scope="session")
def prefect_api() -> str:
    """The URL of the session's Prefect test server (flows called in-process use it automatically)."""
    import prefect.settings
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield prefect.settings.PREFECT_API_URL.value()
