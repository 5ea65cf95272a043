"""
Scarce source: how much of what the input supports reaches greedy clients,
and how evenly it is shared.

The daemon's only source is getrandom capped at 4 KiB/s (credit 8; read in
256-byte pieces so input arrives steadily rather than in one lump a second).
`CLIENTS` clients, one connection each from 127.0.3.(1+i), send blocking
``02 FF`` reads back to back. Counting starts after `WARMUP` seconds, which
drain what the pool held; at that moment and at the end the operator plane's
``/v1/status`` gives the pool's ``credited_bits_in``. The pool releases one
32-byte block per 320 credited bits (256 plus a 64-bit reserve), so
supported = credited bits / 320 x 32 bytes, and efficiency = delivered /
supported, where delivered is what the clients received in the window (a
reply's bytes count as they arrive). Jain's index over the clients' byte
counts is 1 when all got the same and 1/n when one got everything.

There is no bare baseline: a bare server has no pool to share. Each of
`REPEATS` runs uses the same daemon; medians are reported.
"""

import json
from pathlib import Path
from typing import Any

from broker.pool import BLOCK_BITS, RESERVE_BITS

from . import loadclient
from .common import REPEATS, Report, medians, spread
from .daemons import Ebroker, ebroker
from .processes import Child, cpu_seconds

CLIENTS = 100
SIZE = 255
RATE = "4 KiB/s"
WARMUP = 2.0
SECONDS = 40.0
"""Seconds counted, at least: about 1.3 KB per client at 4 KiB/s in. Blocked
readers are served a chunk (64 bytes) per turn, so a shorter window measures
the chunk's granularity (one chunk is a fifth of a client's share at 10 s),
not how evenly the broker shares."""
SOURCE = f"""
    [[sources]]
    name = "getrandom"
    kind = "getrandom"
    credit = 8
    rate = "{RATE}"
    read_size = 256
    """
BYTES_PER_BLOCK = BLOCK_BITS // 8
BITS_PER_BLOCK = BLOCK_BITS + RESERVE_BITS


def jain(values: list[float]) -> float:
    """
    Jain's fairness index: (sum x)^2 / (n sum x^2); 1 for an empty share.
    """
    squares = sum(v * v for v in values)
    return sum(values) ** 2 / (len(values) * squares) if squares else 1.0


def _pool(daemon: Ebroker) -> dict[str, Any]:
    pool: dict[str, Any] = daemon.status()["pool"]
    return pool


def _measure(exe: Path, daemon: Ebroker, seconds: float) -> dict[str, float]:
    args = ["-c", str(CLIENTS), "-b", "127.0.3.1", "-u", str(CLIENTS)]
    args += ["-n", str(SIZE), "-w", f"{WARMUP:g}", "-s", f"{seconds:g}", "-P", "-r"]
    command = loadclient.command(exe, "load", daemon.port, *args)
    with Child(command, WARMUP + seconds + 60) as child:
        loadclient.expect(child, "measuring")
        start, cpu = _pool(daemon), cpu_seconds(daemon.pid)
        result: dict[str, Any] = json.loads(loadclient.expect(child, "{"))
        end, cpu = _pool(daemon), cpu_seconds(daemon.pid) - cpu
        child.finish()
    share = [float(n) for n in result["per_conn"]]
    credited = end["credited_bits_in"] - start["credited_bits_in"]
    supported = credited / BITS_PER_BLOCK * BYTES_PER_BLOCK
    delivered = float(result["bytes"])
    return {
        "credited_bits": credited,
        "supported_bytes": supported,
        "delivered_bytes": delivered,
        "efficiency": delivered / supported if supported else 0.0,
        "jain": jain(share),
        "fewest_bytes": min(share),
        "most_bytes": max(share),
        "pool_level_start": start["level"],
        "pool_level_end": end["level"],
        "errors": result["errors"],
        "server_cores": cpu / result["wall"],
        "client_cores": result["cpu_s"] / result["wall"],
    }


def run(seconds: float) -> Report:
    exe, why = loadclient.build()
    if exe is None:
        return Report([f"skipped: {why}"], {"skipped": why})
    duration = max(SECONDS, seconds)
    with ebroker(sources=SOURCE) as daemon:
        daemon.wait(lambda s: s["sources"][0]["state"] == "healthy")
        runs = [_measure(exe, daemon, duration) for _ in range(REPEATS)]
    m = medians(runs)
    lines = [
        f"getrandom capped at {RATE}, {CLIENTS} clients reading 02 FF back to "
        f"back, {WARMUP:g} s warm-up then {duration:g} s counted, median of "
        f"{REPEATS}. Supported = credited bits / {BITS_PER_BLOCK} x "
        f"{BYTES_PER_BLOCK} B.",
        "",
        "| credited in (bits) | supported out (B) | delivered (B) | efficiency "
        "| efficiency runs | Jain's index | Jain runs | fewest / most per client (B) "
        "| pool level start / end (B) | errors | server cores | client cores |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
        f"| {m['credited_bits']:,.0f} | {m['supported_bytes']:,.0f} "
        f"| {m['delivered_bytes']:,.0f} | {m['efficiency']:.3f} "
        f"| {spread((r['efficiency'] for r in runs), 1, 3)} "
        f"| {m['jain']:.3f} | {spread((r['jain'] for r in runs), 1, 3)} "
        f"| {m['fewest_bytes']:,.0f} / {m['most_bytes']:,.0f} "
        f"| {m['pool_level_start']:,.0f} / {m['pool_level_end']:,.0f} "
        f"| {sum(r['errors'] for r in runs):.0f} | {m['server_cores']:.2f} "
        f"| {m['client_cores']:.2f} |",
    ]
    return Report(
        lines,
        {
            "rate": RATE,
            "clients": CLIENTS,
            "size": SIZE,
            "seconds": duration,
            "runs": runs,
            "median": m,
        },
    )
