"""
Shared test helpers.
"""

import asyncio
import time
from collections.abc import Callable


async def eventually(
    predicate: Callable[[], bool], timeout: float = 10.0, interval: float = 0.005
) -> None:
    """
    Wait until ``predicate()`` is true, failing the test after ``timeout`` s.

    This waits on a condition; it is not a sleep standing in for one.
    """
    async with asyncio.timeout(timeout):
        # Conditions here live in other objects with no event to await.
        while not predicate():  # noqa: ASYNC110
            await asyncio.sleep(interval)


def wait_until(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    """
    Blocking twin of `eventually` for tests that drive subprocesses.
    """
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met in time")
        time.sleep(0.01)
