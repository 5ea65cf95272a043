"""
Shared test helpers.
"""

import asyncio
import socket
import time
from collections.abc import Callable

DEADLINE = 30.0
"""
Seconds a test waits for a condition before it fails. Long on purpose: a
condition that holds ends the wait at once, so the deadline costs nothing on a
passing run, and a loaded 2-core machine can take many seconds for what takes
milliseconds on a quiet one.
"""


async def eventually(
    predicate: Callable[[], bool], timeout: float = DEADLINE, interval: float = 0.005
) -> None:
    """
    Wait until ``predicate()`` is true, failing the test after ``timeout`` s.

    This waits on a condition; it is not a sleep standing in for one.
    """
    async with asyncio.timeout(timeout):
        # Conditions here live in other objects with no event to await.
        while not predicate():  # noqa: ASYNC110
            await asyncio.sleep(interval)


def wait_until(predicate: Callable[[], bool], timeout: float = DEADLINE) -> None:
    """
    Blocking twin of `eventually` for tests that drive subprocesses.
    """
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met in time")
        time.sleep(0.01)


_PORTS_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """
    A loopback TCP port nobody listens on right now, and one this process has
    not handed out before.

    The kernel may give the same ephemeral port to two probes in a row once
    the first is closed: a test that picks the ports of several servers
    before starting any (a Redis primary and its sentinels) would then start
    two on one port, and the second would never come up.
    """
    while True:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = int(probe.getsockname()[1])
        if port not in _PORTS_HANDED_OUT:
            _PORTS_HANDED_OUT.add(port)
            return port
