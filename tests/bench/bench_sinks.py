"""
EGD and HTTP throughput of the real daemon against trivial servers in the same run.

Baselines are the thinnest possible servers of the same protocol, written here,
that answer from os.urandom with no pool, accounting or conditioning: the ratio
is what our pool and protocol handling cost on top of the transport.
"""

import asyncio
import os
import tempfile
import time
from pathlib import Path

import aiohttp
from aiohttp import web

from tests.integration.daemon import default_config, start_daemon

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


def _with_daemon(measure: str, seconds: float) -> float:
    with tempfile.TemporaryDirectory() as directory:
        tmp = Path(directory)
        config = default_config(tmp / "state", pool_size="1 MiB", log_level="warning")
        daemon = start_daemon(tmp, config)
        try:
            if measure == "egd":
                host, port = daemon.egd_tcp
                return asyncio.run(_egd_clients(host, port, seconds))
            return asyncio.run(_http_clients(daemon.http_url + "/v1/entropy", seconds))
        finally:
            daemon.stop()


def _table(name: str, baseline: float, measured: float, unit: str) -> list[str]:
    return [
        f"| measurement ({_CLIENTS} clients) | MB/s | ratio |",
        "|---|---|---|",
        f"| baseline: trivial {name} server on os.urandom ({unit}) | "
        f"{baseline / 1e6:.2f} | 1.00 |",
        f"| ebroker daemon, getrandom source ({unit}) | {measured / 1e6:.2f} | "
        f"{measured / baseline:.2f} |",
    ]


def run_egd(seconds: float) -> list[str]:
    baseline = asyncio.run(_baseline_egd(seconds))
    measured = _with_daemon("egd", seconds)
    return _table("EGD", baseline, measured, "16 x 02 FF pipelined")


def run_http(seconds: float) -> list[str]:
    baseline = asyncio.run(_baseline_http(seconds))
    measured = _with_daemon("http", seconds)
    return _table("HTTP", baseline, measured, "GET 4096 bytes")
