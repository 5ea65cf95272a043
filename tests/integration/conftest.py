"""
Fixtures that run the real broker daemon.
"""

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.daemon import Daemon, default_config, start_daemon
from tests.redis_server import RedisServer


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


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """
    A real redis-server on a free loopback port, killed at teardown.
    """
    server = RedisServer(tmp_path)
    server.start()
    yield server
    server.kill()
