"""
EGD throughput and latency: the daemon against the bare EGD server.

Load comes from ``egdload load`` (C, epoll): N connections, each writing
``depth`` blocking reads ``02 SIZE`` in one write and writing the next batch
when the last reply is in; latency is from the write to a reply's last byte.
Connection i comes from 127.0.2.(1+i), so the daemon sees one client per
connection, as it would see one per guest (and no per-client connection cap
applies). The floor is ``bare_egd.py`` (its own process, uvloop, one
`asyncio.Protocol` answering from ``os.urandom``); the daemon is ``ebroker
serve`` with the default-shaped config and a getrandom source (`daemons.py`),
once more with a customer covering 127.0.0.0/8 whose limits never bind.

Each scenario runs `REPEATS` times on each side, alternating which goes first.
Before a daemon run its pool refills until its sources pause, so every run
starts alike, and the first `WARMUP` seconds of load are not counted, so what
is measured is the sustained rate, not the pool's contents. Medians are
compared: ratio = ebroker / bare. Server and client cores are CPU seconds over
wall seconds, so a reader can see which side was saturated.
"""

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import loadclient
from .baselines import Server, bare_egd
from .common import REPEATS, Report, comparison, ratio, spread
from .daemons import ebroker
from .processes import cpu_seconds, machine_busy_seconds

CLIENTS_FROM = "127.0.2.1"
WARMUP = 1.0
"""Seconds of load before counting starts, so a run measures the sustained
rate rather than the pool's initial contents."""
CUSTOMER = """
    [[customers]]
    id = "bench"
    networks = ["127.0.0.0/8"]
    client_rate = "1 TiB/s"
    rate = "1 TiB/s"
    quota = "1000 TiB/day"
    """
"""A customer every client belongs to, with limits far above any load here:
what the accounting costs when it never refuses anything."""


@dataclass(frozen=True)
class Scenario:
    size: int
    conns: int
    depth: int
    customer: bool = False

    @property
    def key(self) -> str:
        name = f"{self.size}B-{self.conns}c-d{self.depth}"
        return name + "-customer" if self.customer else name

    @property
    def text(self) -> str:
        text = f"02 {self.size:02X} ({self.size} B), {self.conns} conns, "
        text += f"depth {self.depth}"
        return text + ", one customer" if self.customer else text


SCENARIOS = (
    Scenario(255, 16, 1),
    Scenario(255, 100, 1),
    Scenario(255, 16, 16),
    Scenario(255, 100, 16),
    Scenario(32, 16, 1),
    Scenario(32, 100, 1),
    Scenario(255, 16, 1, customer=True),
)


def _measure(
    exe: Path, server: Server, scenario: Scenario, seconds: float
) -> dict[str, float]:
    server.settle()
    cpu, busy = cpu_seconds(server.pid), machine_busy_seconds()
    args = ["-c", str(scenario.conns), "-b", CLIENTS_FROM, "-u", str(scenario.conns)]
    args += ["-n", str(scenario.size), "-d", str(scenario.depth)]
    args += ["-w", f"{WARMUP:g}", "-s", f"{seconds:g}"]
    result = loadclient.run(
        exe, "load", server.port, args, timeout=WARMUP + seconds + 60
    )
    wall = float(result["wall"])
    cpu = cpu_seconds(server.pid) - cpu
    busy = machine_busy_seconds() - busy
    return {
        "mb_s": result["bytes"] / wall / 1e6,
        "req_s": result["requests"] / wall,
        "p50_us": result["p50_us"],
        "p99_us": result["p99_us"],
        "max_us": result["max_us"],
        "errors": result["errors"],
        "client_cores": result["cpu_s"] / wall,
        "server_cores": cpu / result["client_wall"],
        "client_cpu_s": result["client_cpu"],
        "other_cores": (busy - cpu - result["client_cpu"]) / result["client_wall"],
    }


def _rows(scenario: Scenario, compared: dict[str, Any]) -> list[str]:
    lines = []
    for side in ("bare", "ebroker"):
        runs = compared[side]["runs"]
        m = compared[side]["median"]
        ratios = "| 1.00 | 1.00 "
        if side == "ebroker":
            bare = compared["bare"]["median"]
            ratios = f"| {ratio(m['mb_s'], bare['mb_s'])} "
            ratios += f"| {ratio(m['p99_us'], bare['p99_us'])} "
        lines.append(
            f"| {scenario.text} | {side} | {m['mb_s']:.2f} "
            f"| {spread((r['mb_s'] for r in runs), 1)} | {m['req_s']:,.0f} "
            f"| {m['p50_us']:,.0f} | {m['p99_us']:,.0f} "
            f"| {sum(r['errors'] for r in runs):.0f} {ratios}"
            f"| {m['server_cores']:.2f} | {m['client_cores']:.2f} "
            f"| {m['other_cores']:.2f} |"
        )
    return lines


def run(seconds: float) -> Report:
    exe, why = loadclient.build()
    if exe is None:
        return Report([f"skipped: {why}"], {"skipped": why})
    runs: dict[tuple[str, str], list[dict[str, float]]] = {}
    with bare_egd() as bare, ebroker() as plain, ebroker(extra=CUSTOMER) as billed:
        for repeat in range(REPEATS):
            for scenario in SCENARIOS:
                ours = billed if scenario.customer else plain
                pair: tuple[Server, Server] = (bare, ours)
                for server in pair if repeat % 2 == 0 else pair[::-1]:
                    runs.setdefault((scenario.key, server.name), []).append(
                        _measure(exe, server, scenario, seconds)
                    )
        served = billed.status()["accounts"]["customers"]["bench"]["bytes_served"]
    lines = [
        f"Load: egdload load, connection i from 127.0.2.(1+i), {WARMUP:g} s "
        f"warm-up then {seconds:g} s counted per run, median of {REPEATS}, "
        "alternating sides. Cores = CPU s / wall s; other = the whole "
        "machine's busy time less server and client (kernel work no process "
        "is charged for, and anything else running).",
        "",
        "| scenario | server | MB/s | runs (MB/s) | req/s | p50 µs | p99 µs "
        "| errors | MB/s vs bare | p99 vs bare | server cores | client cores "
        "| other cores |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    scenarios = []
    for scenario in SCENARIOS:
        compared = comparison(
            runs[scenario.key, "bare"],
            runs[scenario.key, "ebroker"],
            ("mb_s", "req_s", "p50_us", "p99_us"),
        )
        lines += _rows(scenario, compared)
        scenarios.append(
            {
                "key": scenario.key,
                "text": scenario.text,
                "size": scenario.size,
                "conns": scenario.conns,
                "depth": scenario.depth,
                "customer": scenario.customer,
                **compared,
            }
        )
    lines += [
        "",
        f"The customer 'bench' (127.0.0.0/8) was charged {served:,} bytes: "
        "its accounting ran on every read of the last scenario.",
    ]
    return Report(lines, {"scenarios": scenarios, "customer_bytes_served": served})
