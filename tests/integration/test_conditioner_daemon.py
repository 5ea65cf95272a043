"""
A raw recording from the real daemon does not reproduce what a client received.

A ``device`` source reads a FIFO the test has filled with a known amount of
random bytes, with ``record_raw`` set. A client draws every output byte over
EGD. The test then replays the recorded file through a fresh pool exactly as
the supervisor fed it (the start-up test's bytes mixed, the rest credited) and
checks that the replay accounts for the same blocks yet shares none of them
with what the client got: the daemon's conditioner key is the difference.
"""

import asyncio
import os
from pathlib import Path
from typing import Any

from broker.pool import BLOCK_BYTES, EntropyPool
from tests.integration.clients import BrokerHttp, poll_until, running_daemon
from tests.integration.daemon import Daemon, default_config

STARTUP_BYTES = 1024
BLOCKS = 256
# 40 bytes at 8 bits each back one 32-byte block (256 + 64 bits).
RAW_BYTES = STARTUP_BYTES + 40 * BLOCKS
OUTPUT_BYTES = BLOCKS * BLOCK_BYTES


async def draw_egd(daemon: Daemon, count: int) -> bytes:
    """
    Read ``count`` bytes with EGD blocking reads (at most 255 per request).
    """
    reader, writer = await asyncio.open_connection(*daemon.egd_tcp)
    try:
        received = bytearray()
        while len(received) < count:
            size = min(255, count - len(received))
            writer.write(bytes([0x02, size]))
            received += await reader.readexactly(size)
        return bytes(received)
    finally:
        writer.close()
        await writer.wait_closed()


def test_replayed_recording_does_not_reproduce_output(tmp_path: Path) -> None:
    """
    Replaying ``record_raw`` through a pool yields as many blocks as the daemon
    produced from it, and none of the bytes the client was served.
    """
    fifo = tmp_path / "rng"
    record = tmp_path / "raw.bin"
    os.mkfifo(fifo)
    # Held open read-write so the bytes stay in the pipe until the broker reads.
    fd = os.open(fifo, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    raw = os.urandom(RAW_BYTES)
    try:
        assert len(raw) == os.write(fd, raw)
        sources = f"""
            [[sources]]
            name = "fifo"
            kind = "device"
            path = "{fifo}"
            record_raw = "{record}"
            """
        with running_daemon(
            tmp_path, default_config(tmp_path / "state", sources)
        ) as daemon:
            served, status = asyncio.run(draw_all(daemon))
            assert 0 == daemon.stop()
    finally:
        os.close(fd)

    pool = status["pool"]
    assert OUTPUT_BYTES == pool["bytes_out"] == len(served)
    assert pool["bytes_out"] == sum(pool["bytes_out_by_tier"].values())
    assert raw == record.read_bytes()

    (source,) = status["sources"]
    credited = source["credited_bits"] // 8
    replay = EntropyPool(1 << 20)
    replay.mix(raw[: RAW_BYTES - credited])
    replay.add(raw[RAW_BYTES - credited :], 8)
    assert BLOCKS == replay.stats().blocks_out
    replayed = replay.read_nowait(replay.level)

    assert served != replayed
    served_blocks = {
        served[i : i + BLOCK_BYTES] for i in range(0, len(served), BLOCK_BYTES)
    }
    assert not any(
        replayed[i : i + BLOCK_BYTES] in served_blocks
        for i in range(0, len(replayed), BLOCK_BYTES)
    )


async def draw_all(daemon: Daemon) -> tuple[bytes, dict[str, Any]]:
    """
    Wait until the daemon has conditioned all of the FIFO's bytes, draw every
    output byte and return them with the status once the pool is empty.
    """
    async with BrokerHttp(daemon) as http:
        await poll_until(http.status, lambda s: BLOCKS == s["pool"]["blocks_out"])
        served = await draw_egd(daemon, OUTPUT_BYTES)
        status = await poll_until(
            http.status,
            lambda s: (
                OUTPUT_BYTES == s["pool"]["bytes_out"] and 0 == s["pool"]["level"]
            ),
        )
    return served, status
