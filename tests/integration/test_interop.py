"""
Real third-party EGD clients against the daemon.

ekeyd-egd-linux (Debian's ekeyd-egd-linux package) connects over TCP at start
and then waits for the kernel to ask for entropy; on 5.19+ kernels that never
happens after boot, so what can be checked here is the part operators depend
on: it connects, and the broker keeps its idle connection (no idle timeout)
and counts it. The byte path it would use (pipelined `02 80` requests) is
covered by the raw-socket tests.
"""

import asyncio
import subprocess

import aiohttp
import pytest

from tests.helpers import DEADLINE
from tests.integration.daemon import Daemon


async def egd_connections(daemon: Daemon) -> int:
    async with (
        aiohttp.ClientSession(daemon.operator_url) as session,
        session.get("/v1/status") as response,
    ):
        status = await response.json()
    return sum(sink["connections"] for sink in status["sinks"] if sink["kind"] == "egd")


@pytest.mark.needs_tool("ekeyd-egd-linux")
def test_ekeyd_egd_linux_connects_and_is_kept(daemon: Daemon) -> None:
    """
    ekeyd-egd-linux connects to the broker's EGD port and stays connected
    (the broker never drops an idle client); when it exits the broker forgets
    the connection.
    """
    host, port = daemon.egd_tcp
    client = subprocess.Popen(
        ["ekeyd-egd-linux", "-H", host, "-p", str(port), "-b", "4", "-S", "7",
         "-r", "1", "-t", "5"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip

    async def connections_become(count: int) -> None:
        async with asyncio.timeout(DEADLINE):
            # The count lives in the daemon; polling its status is the wait.
            while await egd_connections(daemon) != count:  # noqa: ASYNC110
                await asyncio.sleep(0.05)

    async def run() -> None:
        await connections_become(1)
        assert client.poll() is None, "ekeyd-egd-linux gave up on the broker"
        client.terminate()
        await asyncio.to_thread(client.wait, DEADLINE)
        await connections_become(0)

    try:
        asyncio.run(run())
    finally:
        if client.poll() is None:
            client.kill()
            client.wait()
