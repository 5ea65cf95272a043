"""
10,000 quiet guests: what each connection costs in memory, and the latency of
small periodic reads.

``egdload qemu`` opens `CONNS` connections from `ADDRESSES` loopback addresses
(a fresh range each repetition, so no port is still in TIME_WAIT), at most
256 connects under way at once; "connect s" is how long all of them took. RSS
(``VmRSS``) is read before, once the server holds every connection (its open
descriptors say so) and is quiet again (under 0.1 core), and after the reads
with every connection still open. Then each connection sends ``02 40`` (64
bytes) once per second at its own random phase, as QEMU's rng-egd does for a
guest's virtio-rng, for `SECONDS` (10 reads per connection; the fewest any
connection completed is reported). KiB per connection = (RSS idle or loaded -
RSS before) / connections. Waiting for quiet keeps the burst of 10,000
simultaneous connects out of the latency figures.
Both servers are fresh processes each repetition, so "before" is a clean start:
``bare_egd.py`` (its own process, uvloop, one `asyncio.Protocol`) and ``ebroker
serve`` with the default-shaped config, getrandom, and the EGD sink's
``max_connections`` and ``max_connections_per_client`` raised to admit the
load (`EGD_LIMITS`). Both raise their own open-file limit; the hard limit must
allow `CONNS` plus the daemon's other sinks, or the scenario is skipped.
"""

import json
import resource
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

from . import loadclient
from .baselines import Server, bare_egd
from .common import REPEATS, Report, comparison, poll, ratio, spread
from .daemons import ebroker
from .processes import (
    Child,
    cpu_seconds,
    machine_busy_seconds,
    open_fds,
    rss_kib,
    wait_quiet,
)

CONNS = 10_000
ADDRESSES = 16
PERIOD_MS = 1000
SIZE = 64
SECONDS = 10.0
"""Seconds of periodic reads (10 per connection at one a second)."""
CONNECT_TIMEOUT = 120.0
ACCEPT_TIMEOUT = 120.0
"""Seconds the server may take to accept what the kernel already queued."""
FD_SLACK = 8
EGD_LIMITS = f"""
    max_connections = {CONNS + 2000}
    max_connections_per_client = {CONNS // ADDRESSES + 500}
    """
FDS_NEEDED = CONNS + 2000 + 2 * 1024 + 256
"""What the daemon asks for with `EGD_LIMITS`: every sink's cap plus 256."""


def _server(name: str) -> AbstractContextManager[Server]:
    return ebroker(egd=EGD_LIMITS) if name == "ebroker" else bare_egd()


def _measure(
    exe: Path, server: Server, repeat: int, seconds: float
) -> dict[str, float]:
    server.settle()
    fds, before = open_fds(server.pid), rss_kib(server.pid)
    args = ["-c", str(CONNS), "-b", f"127.1.{repeat}.1", "-u", str(ADDRESSES)]
    args += ["-n", str(SIZE), "-i", str(PERIOD_MS), "-s", f"{seconds:g}", "-r"]
    command = loadclient.command(exe, "qemu", server.port, *args)
    with Child(command, CONNECT_TIMEOUT + seconds + 120, stdin=True) as child:
        connected = int(loadclient.expect(child, "connected").split()[1])
        # Within FD_SLACK: "before" may have counted a descriptor that was
        # closing, such as the status request's connection just made.
        held = fds + connected - FD_SLACK
        if not poll(lambda: open_fds(server.pid) >= held, ACCEPT_TIMEOUT, 0.05):
            child.fail(f"{server.name} never held the {connected} connections")
        # Accepting 10,000 connections at once is not what is measured: the
        # reads start once the server has finished with them.
        server.settle()
        quiet = wait_quiet(server.pid)
        idle = rss_kib(server.pid)
        cpu, wall = cpu_seconds(server.pid), time.monotonic()
        busy = machine_busy_seconds()
        child.send_line("go")
        result: dict[str, Any] = json.loads(loadclient.expect(child, "{"))
        cpu, wall = cpu_seconds(server.pid) - cpu, time.monotonic() - wall
        busy = machine_busy_seconds() - busy
        loaded = rss_kib(server.pid)
        child.close_stdin()
        child.finish()
    return {
        "connected": connected,
        "quiet_before_reads": float(quiet),
        "connect_s": result["connect_s"],
        "p50_us": result["p50_us"],
        "p99_us": result["p99_us"],
        "p999_us": result["p999_us"],
        "max_us": result["max_us"],
        "requests": result["requests"],
        "fewest_per_conn": result["fewest_per_conn"],
        "errors": result["errors"] + result["connect_failed"],
        "overruns": result["overruns"],
        "unfinished": result["unfinished"],
        "rss_before_kib": before,
        "rss_idle_kib": idle,
        "rss_loaded_kib": loaded,
        "kib_per_conn_idle": (idle - before) / max(1, connected),
        "kib_per_conn_loaded": (loaded - before) / max(1, connected),
        "server_cores": cpu / wall,
        "client_cores": result["cpu_s"] / result["wall"],
        "other_cores": (busy - cpu - result["cpu_s"]) / wall,
    }


def _repeats() -> Iterator[tuple[int, str]]:
    for repeat in range(REPEATS):
        names = ["bare", "ebroker"]
        yield from (
            (repeat, name) for name in (names if repeat % 2 == 0 else names[::-1])
        )


def run(seconds: float) -> Report:
    exe, why = loadclient.build()
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if exe is None:
        return Report([f"skipped: {why}"], {"skipped": why})
    if hard != resource.RLIM_INFINITY and hard < FDS_NEEDED:
        why = f"RLIMIT_NOFILE hard limit {hard} < {FDS_NEEDED} (ulimit -Hn)"
        return Report([f"skipped: {why}"], {"skipped": why})
    duration = max(SECONDS, seconds)
    runs: dict[str, list[dict[str, float]]] = {"bare": [], "ebroker": []}
    for repeat, name in _repeats():
        with _server(name) as server:
            runs[name].append(_measure(exe, server, repeat, duration))
    compared = comparison(
        runs["bare"],
        runs["ebroker"],
        (
            "p50_us",
            "p99_us",
            "rss_idle_kib",
            "kib_per_conn_idle",
            "kib_per_conn_loaded",
        ),
    )
    lines = [
        f"{CONNS:,} connections from {ADDRESSES} addresses, each 02 40 every "
        f"{PERIOD_MS} ms at a random phase for {duration:g} s; fresh servers "
        f"each run, median of {REPEATS}. RSS in MiB; per-connection in KiB. "
        "Cores over the reads; other = the machine's busy time less server and "
        "client.",
        "",
        "| server | connect s | p50 µs | p99 µs | p99.9 µs | max µs "
        "| p99 runs (µs) | fewest reads/conn | errors | overruns | RSS before "
        "| RSS idle | RSS loaded | KiB/conn idle | KiB/conn loaded | p99 vs bare "
        "| KiB/conn vs bare | server cores | client cores | other cores |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for side in ("bare", "ebroker"):
        m = compared[side]["median"]
        every = compared[side]["runs"]
        vs = "| 1.00 | 1.00 "
        if side == "ebroker":
            bare = compared["bare"]["median"]
            vs = f"| {ratio(m['p99_us'], bare['p99_us'])} "
            vs += f"| {ratio(m['kib_per_conn_loaded'], bare['kib_per_conn_loaded'])} "
        lines.append(
            f"| {side} | {m['connect_s']:.2f} | {m['p50_us']:,.0f} "
            f"| {m['p99_us']:,.0f} "
            f"| {m['p999_us']:,.0f} | {m['max_us']:,.0f} "
            f"| {spread((r['p99_us'] for r in every), 1, 0)} "
            f"| {min(r['fewest_per_conn'] for r in every):.0f} "
            f"| {sum(r['errors'] for r in every):.0f} "
            f"| {sum(r['overruns'] for r in every):.0f} "
            f"| {m['rss_before_kib'] / 1024:.1f} | {m['rss_idle_kib'] / 1024:.1f} "
            f"| {m['rss_loaded_kib'] / 1024:.1f} | {m['kib_per_conn_idle']:.2f} "
            f"| {m['kib_per_conn_loaded']:.2f} {vs}"
            f"| {m['server_cores']:.2f} | {m['client_cores']:.2f} "
            f"| {m['other_cores']:.2f} |"
        )
    return Report(
        lines,
        {
            "conns": CONNS,
            "addresses": ADDRESSES,
            "period_ms": PERIOD_MS,
            "size": SIZE,
            "seconds": duration,
            **compared,
        },
    )
