"""
EGD and HTTP throughput of the real daemon against trivial servers in the same run.

Baselines are the thinnest possible servers of the same protocol, written here,
that answer from os.urandom with no pool, accounting or conditioning: the ratio
is what our pool, health tests and protocol handling cost on top of the
transport. Loopback throughput on a shared 2-core machine is noisy, so each
side is measured `REPEATS` times, alternating, and the medians are compared.
"""

import asyncio
import os
import statistics
import time
from collections.abc import Callable

import aiohttp
from aiohttp import web

from .common import REPEATS, bench_daemon, ratio, spread

_CLIENTS = 4
_REQUEST = b"\x02\xff" * 16  # 16 pipelined blocking reads of 255 bytes
_REPLY = 255 * 16


async def _egd_clients(host: str, port: int, seconds: float) -> float:
    async def client() -> int:
        reader, writer = await asyncio.open_connection(host, port)
        received = 0
        deadline = time.perf_counter() + seconds
        try:
            while time.perf_counter() < deadline:
                writer.write(_REQUEST)
                received += len(await reader.readexactly(_REPLY))
        finally:
            writer.close()
        return received

    start = time.perf_counter()
    totals = await asyncio.gather(*(client() for _ in range(_CLIENTS)))
    return sum(totals) / (time.perf_counter() - start)


async def _baseline_egd(seconds: float) -> float:
    async def handle(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        try:
            while True:
                command = await reader.readexactly(2)
                writer.write(os.urandom(command[1]))
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        return await _egd_clients("127.0.0.1", port, seconds)
    finally:
        server.close()


async def _http_clients(url: str, seconds: float) -> float:
    async def client(session: aiohttp.ClientSession) -> int:
        received = 0
        deadline = time.perf_counter() + seconds
        while time.perf_counter() < deadline:
            async with session.get(url, params={"bytes": "4096", "wait": "5"}) as resp:
                received += len(await resp.read())
        return received

    start = time.perf_counter()
    async with aiohttp.ClientSession() as session:
        totals = await asyncio.gather(*(client(session) for _ in range(_CLIENTS)))
    return sum(totals) / (time.perf_counter() - start)


async def _baseline_http(seconds: float) -> float:
    async def entropy(request: web.Request) -> web.Response:
        return web.Response(body=os.urandom(int(request.query["bytes"])))

    app = web.Application()
    app.router.add_get("/v1/entropy", entropy)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        return await _http_clients(f"http://127.0.0.1:{port}/v1/entropy", seconds)
    finally:
        await runner.cleanup()


def _interleaved(
    baseline: Callable[[], float], measured: Callable[[], float]
) -> tuple[list[float], list[float]]:
    """
    Alternate baseline and daemon runs, REPEATS of each, so drift hits both.
    """
    base: list[float] = []
    ours: list[float] = []
    for _ in range(REPEATS):
        base.append(baseline())
        ours.append(measured())
    return base, ours


def _table(name: str, base: list[float], ours: list[float], unit: str) -> list[str]:
    b, m = statistics.median(base), statistics.median(ours)
    return [
        f"| measurement ({_CLIENTS} clients, median of {REPEATS}) | MB/s "
        "| runs (MB/s) | ratio |",
        "|---|---|---|---|",
        f"| baseline: trivial {name} server on os.urandom ({unit}) | "
        f"{b / 1e6:.2f} | {spread(base)} | 1.00 |",
        f"| ebroker daemon, getrandom source, health tests on ({unit}) | "
        f"{m / 1e6:.2f} | {spread(ours)} | {ratio(m, b)} |",
    ]


def run_egd(seconds: float) -> list[str]:
    with bench_daemon() as daemon:
        host, port = daemon.egd_tcp
        base, ours = _interleaved(
            lambda: asyncio.run(_baseline_egd(seconds)),
            lambda: asyncio.run(_egd_clients(host, port, seconds)),
        )
    return _table("EGD", base, ours, "16 x 02 FF pipelined")


def run_http(seconds: float) -> list[str]:
    with bench_daemon() as daemon:
        url = daemon.http_url + "/v1/entropy"
        base, ours = _interleaved(
            lambda: asyncio.run(_baseline_http(seconds)),
            lambda: asyncio.run(_http_clients(url, seconds)),
        )
    return _table("HTTP", base, ours, "GET 4096 bytes")
