"""
The bare HTTP server: the floor the daemon's tenant HTTP sink is compared to.

Its own process, uvloop, a bare aiohttp application with one handler:
``GET /v1/entropy?bytes=N`` answers ``os.urandom(N)`` as
``application/octet-stream``, the URL and the raw answer of ebroker's tenant
sink (``sinks/http/entropy.py``). ``bytes`` must be 1..65536 as there;
``wait`` is accepted and ignored, since the kernel never runs short. No pool,
accounts, limits, middlewares or access log: what is left is aiohttp and the
transport. It raises its soft open-file limit and listens with the daemon's
default backlog, as ``bare_egd`` does.

Run ``python -m tests.bench.bare_http``: it prints its port on the first line of
stdout and serves 127.0.0.1 until SIGTERM or SIGINT.
"""

import asyncio
import os
import signal
import sys

import uvloop
from aiohttp import web

from tests.bench.bare_egd import BACKLOG, raise_open_files

MAX_BYTES = 65536


async def entropy(request: web.Request) -> web.Response:
    """
    ``GET /v1/entropy?bytes=N[&wait=SECONDS]``: N bytes from the kernel.
    """
    try:
        count = int(request.query["bytes"])
    except (KeyError, ValueError):
        return web.Response(status=400, text="bytes: an integer 1..65536\n")
    if not 1 <= count <= MAX_BYTES:
        return web.Response(status=400, text="bytes: an integer 1..65536\n")
    return web.Response(body=os.urandom(count), content_type="application/octet-stream")


async def _serve() -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    app = web.Application()
    app.router.add_get("/v1/entropy", entropy)
    runner = web.AppRunner(app, handle_signals=False, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, backlog=BACKLOG)
    await site.start()
    print(runner.addresses[0][1], flush=True)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


def main() -> int:
    raise_open_files()
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(_serve())
    return 0


if __name__ == "__main__":
    sys.exit(main())
