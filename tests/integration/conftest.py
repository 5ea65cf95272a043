"""
Fixtures that run the real broker daemon.
"""

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.daemon import Daemon, default_config, start_daemon


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Daemon]:
    """
    A broker on ephemeral loopback ports fed by getrandom.
    """
    running = start_daemon(tmp_path, default_config(tmp_path / "state"))
    try:
        yield running
    finally:
        if running.process.poll() is None:
            running.process.kill()
            running.process.wait()
