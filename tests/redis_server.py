"""
A throwaway redis-server for tests that need the real thing.
"""

import socket
import subprocess
from pathlib import Path

import redis

from tests import system_tools
from tests.helpers import wait_until


def free_port() -> int:
    """
    A loopback port nobody listens on right now.
    """
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


class RedisServer:
    """
    A throwaway redis-server without persistence, restartable on one port.
    """

    def __init__(self, directory: Path) -> None:
        self.port = free_port()
        self.directory = directory
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        system_tools.require(["redis-server"])
        self.process = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.directory),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        client = redis.Redis(port=self.port, socket_connect_timeout=1.0)

        def answers() -> bool:
            try:
                return bool(client.ping())
            except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError):
                # Not listening yet, or too slow to answer on a busy machine.
                return False

        try:
            wait_until(answers, timeout=60)
        finally:
            client.close()

    def kill(self) -> None:
        """
        Crash it (SIGKILL): no goodbye to connected clients, data gone.
        """
        if self.process is not None:
            self.process.kill()
            self.process.wait(timeout=10)
            self.process = None


def redis_accounts(url: str, policy: str) -> str:
    """
    An ``[accounts]`` section for brokers sharing the server at ``url``.
    """
    return f"""
        [accounts]
        backend = "redis"
        redis_url = "{url}"
        on_redis_failure = "{policy}"
        # Outages here are a killed server, refused at once; a reply slowed by
        # a busy machine must not look like one.
        redis_timeout = "10 s"
        redis_retry_interval = "0.2 s"
        persist_interval = "0.2 s"
        """
