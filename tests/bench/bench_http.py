"""
HTTP throughput and latency: the daemon's tenant sink against a bare aiohttp
application.

Load comes from wrk (``wrk.py``): 16 keep-alive connections, 2 threads,
``--latency``. The floor is ``bare_http.py`` (its own process, uvloop, one
aiohttp handler answering ``os.urandom(N)`` at the same URL); the daemon is
``ebroker serve`` with the default-shaped config and a getrandom source
(``daemons.py``), its tenant-plane sink under test. Scenarios: ``bytes=32``,
``bytes=4096`` (``wait=0``: the daemon answers 503 when its pool cannot cover
a request at once, counted as non-2xx) and ``bytes=4096&wait=5`` (a request
waits for the pool instead).

Each scenario runs `REPEATS` times on each side, alternating which goes first.
A daemon run starts once its pool has refilled until its sources pause, and
every run follows `WARMUP` seconds of the same load, unmeasured, so it measures
the sustained rate. Entropy MB/s
counts the bodies of 200 answers only; wrk's transfer rate (headers and every
body) is in ``--json``. Client cores are wrk's CPU seconds (wait4) over its
wall time.
"""

from typing import Any

from . import wrk
from .baselines import Server, bare_http
from .common import REPEATS, Report, comparison, ratio, spread
from .daemons import ebroker
from .processes import cpu_seconds, machine_busy_seconds

SCENARIOS = ("bytes=32", "bytes=4096", "bytes=4096&wait=5")
WARMUP = 1.0
"""Seconds of unmeasured load before each run, so a run measures the sustained
rate rather than the pool's initial contents."""


def _size(query: str) -> int:
    return int(query.split("&")[0].removeprefix("bytes="))


def _measure(exe: str, server: Server, query: str, seconds: float) -> dict[str, float]:
    server.settle()
    url = f"{server.http_url}/v1/entropy?{query}"
    wrk.run(exe, url, WARMUP)
    cpu, busy = cpu_seconds(server.pid), machine_busy_seconds()
    result = wrk.run(exe, url, seconds)
    cpu, busy = cpu_seconds(server.pid) - cpu, machine_busy_seconds() - busy
    result["server_cores"] = cpu / result["wall"]
    result["other_cores"] = (busy - cpu - result["cpu"]) / result["wall"]
    result["mb_s"] = result["ok"] * _size(query) / result["seconds"] / 1e6
    return result


def _rows(query: str, compared: dict[str, Any]) -> list[str]:
    lines = []
    for side in ("bare", "ebroker"):
        runs = compared[side]["runs"]
        m = compared[side]["median"]
        ratios = "| 1.00 | 1.00 | 1.00 "
        if side == "ebroker":
            bare = compared["bare"]["median"]
            ratios = f"| {ratio(m['req_s'], bare['req_s'])} "
            ratios += f"| {ratio(m['mb_s'], bare['mb_s'])} "
            ratios += f"| {ratio(m['p99_ms'], bare['p99_ms'])} "
        lines.append(
            f"| {query} | {side} | {m['req_s']:,.0f} "
            f"| {spread((r['req_s'] for r in runs), 1, 0)} | {m['mb_s']:.2f} "
            f"| {sum(r['non_2xx'] for r in runs):,.0f} "
            f"| {sum(r['socket_errors'] for r in runs):,.0f} "
            f"| {m['p50_ms']:.2f} | {m['p99_ms']:.2f} {ratios}"
            f"| {m['server_cores']:.2f} | {m['client_cores']:.2f} "
            f"| {m['other_cores']:.2f} |"
        )
    return lines


def run(seconds: float) -> Report:
    exe = wrk.find()
    if exe is None:
        why = "wrk is not installed (Debian: apt-get install -y wrk)"
        return Report([f"skipped: {why}"], {"skipped": why})
    runs: dict[tuple[str, str], list[dict[str, float]]] = {}
    with bare_http() as bare, ebroker() as ours:
        for repeat in range(REPEATS):
            for query in SCENARIOS:
                pair: tuple[Server, Server] = (bare, ours)
                for server in pair if repeat % 2 == 0 else pair[::-1]:
                    runs.setdefault((query, server.name), []).append(
                        _measure(exe, server, query, seconds)
                    )
    lines = [
        f"Load: wrk -t{wrk.THREADS} -c{wrk.CONNECTIONS} --latency, keep-alive, "
        f"{WARMUP:g} s warm-up then {max(1, round(seconds))} s per run, median "
        f"of {REPEATS}, alternating sides. Non-2xx and socket errors are summed "
        "over the runs. Other cores = the whole machine's busy time less "
        "server and wrk.",
        "",
        "| GET /v1/entropy? | server | req/s | runs (req/s) | entropy MB/s "
        "| non-2xx | socket errors | p50 ms | p99 ms | req/s vs bare "
        "| MB/s vs bare | p99 vs bare | server cores | wrk cores | other cores |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    scenarios = []
    for query in SCENARIOS:
        compared = comparison(
            runs[query, "bare"],
            runs[query, "ebroker"],
            ("req_s", "mb_s", "p50_ms", "p99_ms"),
        )
        lines += _rows(query, compared)
        scenarios.append({"query": query, **compared})
    return Report(
        lines,
        {
            "threads": wrk.THREADS,
            "connections": wrk.CONNECTIONS,
            "scenarios": scenarios,
        },
    )
