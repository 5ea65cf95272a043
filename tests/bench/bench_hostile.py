"""
Hostile neighbour: what one EGD client sees while another abuses the broker.

A victim (4 connections, ``02 20`` at depth 1: send, read all 32 bytes, repeat)
is measured alone, next to a flooding neighbour (one connection pipelining
``00``, one pipelining ``02 00``, both reading and discarding replies as fast as
they come) and next to 20 neighbours that send ``02 FF`` and never read. The
neighbours connect from other loopback addresses, so the broker sees other
clients. The load comes from ``egdload`` (`loadclient.py`), compiled with
``cc -O2`` (the benchmark is skipped without a compiler), so the client is not
what limits the figures; its CPU time is reported next to the server's.

Each scenario runs against the real daemon and against the bare baseline
(``bare_egd.py``: its own process, uvloop, one `asyncio.Protocol`, with only
the per-turn bound any server needs to survive these neighbours), alternating,
`REPEATS` times; medians are compared. A victim request unanswered after
`TIMEOUT_MS` counts as a timeout with that age as its latency, and the victim
reconnects (as ekeyd-egd-linux does): a frozen server yields a figure. During
the flood, ``/healthz`` on the daemon's HTTP sink is probed too.
"""

import contextlib
import http.client
import json
import signal
import socket
import statistics
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .baselines import bare_egd
from .common import REPEATS, ratio
from .daemons import ebroker
from .loadclient import CFLAGS, build
from .processes import cpu_seconds

VICTIM_CONNS = 4
VICTIM_SIZE = 32
TIMEOUT_MS = 1000
FLOOD_CMDS = "00,0200"
NONREADERS = 20
NONREADER_BYTES = 1 << 20
"""Requests one non-reader sends at most (2-byte ``02 FF``: 131 MB owed)."""
WARMUP = 0.5
"""Seconds a neighbour runs before the victim starts, so it is at full tilt."""
PROBES = 50
PROBE_TIMEOUT = 2.0

VICTIM_FROM = "127.0.0.1"
FLOOD_FROM = "127.0.0.2"
NONREADERS_FROM = "127.0.0.3"

SCENARIOS = ("alone", "flood", "nonreaders")
SCENARIO_TEXT = {
    "alone": "victim alone",
    "flood": "+ flood (00 and 02 00, 1 conn each)",
    "nonreaders": f"+ {NONREADERS} non-readers (02 FF)",
}


@dataclass
class Server:
    """
    A server under test: where its EGD port is and which process burns its CPU.
    """

    name: str
    port: int
    pid: int
    healthz: tuple[str, int] | None = None

    def cpu_seconds(self) -> float:
        return cpu_seconds(self.pid)


@contextlib.contextmanager
def _bare() -> Iterator[Server]:
    with bare_egd() as bare:
        yield Server("bare", bare.port, bare.pid)


@contextlib.contextmanager
def _ebroker() -> Iterator[Server]:
    with ebroker() as daemon:
        web = daemon.http_url.removeprefix("http://").rsplit(":", 1)
        yield Server("ebroker", daemon.port, daemon.pid, healthz=(web[0], int(web[1])))


def _start(exe: Path, mode: str, server: Server, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [str(exe), mode, "-p", str(server.port), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _result(process: subprocess.Popen[str], timeout: float) -> dict[str, Any]:
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        out, err = process.communicate()
    lines = out.strip().splitlines()
    if process.returncode != 0 or not lines:
        raise RuntimeError(f"egdload exited {process.returncode}: {err.strip()}")
    result: dict[str, Any] = json.loads(lines[-1])
    return result


def _probe(where: tuple[str, int]) -> float | None:
    start = time.perf_counter()
    connection = http.client.HTTPConnection(*where, timeout=PROBE_TIMEOUT)
    try:
        connection.request("GET", "/healthz")
        connection.getresponse().read()
    except OSError:
        return None
    finally:
        connection.close()
    return time.perf_counter() - start


def _probe_loop(where: tuple[str, int], seconds: float) -> list[float | None]:
    """
    `PROBES` probes spread over ``seconds``, each on a new connection.
    """
    results: list[float | None] = []
    start = time.monotonic()
    for i in range(PROBES):
        delay = start + i * seconds / PROBES - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        results.append(_probe(where))
    return results


def _settle(server: Server) -> None:
    """
    Wait (bounded) until the server answers one EGD read after the last run.
    """
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", server.port), 5) as sock:
                sock.sendall(b"\x02\x20")
                got = b""
                while len(got) < 32:
                    chunk = sock.recv(32 - len(got))
                    if not chunk:
                        break
                    got += chunk
                if len(got) == 32:
                    return
        except OSError:
            # Not answering yet (a previous neighbour's backlog): try again.
            time.sleep(0.1)


@dataclass
class Run:
    """
    One measurement: the victim's results, the neighbour's, CPU fractions.
    """

    victim: dict[str, Any]
    neighbour: dict[str, Any] | None
    server_cpu: float
    probes: list[float | None] = field(default_factory=list)

    @property
    def rate(self) -> float:
        return float(self.victim["requests"]) / float(self.victim["seconds"])


def _neighbour(
    exe: Path, server: Server, scenario: str, lasts: float
) -> subprocess.Popen[str] | None:
    common = ["-s", f"{lasts:g}", "-r"]
    if scenario == "flood":
        flood = ["-b", FLOOD_FROM, "-c", "2", "-x", FLOOD_CMDS]
        return _start(exe, "flood", server, *flood, *common)
    if scenario == "nonreaders":
        nonreaders = ["-b", NONREADERS_FROM, "-c", str(NONREADERS)]
        nonreaders += ["-m", str(NONREADER_BYTES)]
        return _start(exe, "nonreader", server, *nonreaders, *common)
    return None


def _ready(process: subprocess.Popen[str]) -> None:
    # Started with -r: the first line says every connection is open and busy.
    assert process.stdout is not None
    if process.stdout.readline().strip() != "ready":
        process.kill()
        _, err = process.communicate()
        raise RuntimeError(f"egdload neighbour did not start: {err.strip()}")


def _measure(exe: Path, server: Server, scenario: str, seconds: float) -> Run:
    _settle(server)
    # The neighbour outlives the victim's worst case; it is stopped (SIGTERM,
    # it still reports) as soon as the victim is done.
    lasts = WARMUP + seconds + 2 * TIMEOUT_MS / 1000 + 5
    neighbour: subprocess.Popen[str] | None = _neighbour(exe, server, scenario, lasts)
    neighbour_result = None
    try:
        if neighbour is not None:
            _ready(neighbour)
            time.sleep(WARMUP)
        cpu, wall = server.cpu_seconds(), time.monotonic()
        victim = _start(
            exe,
            "victim",
            server,
            *("-b", VICTIM_FROM, "-c", str(VICTIM_CONNS), "-n", str(VICTIM_SIZE)),
            *("-s", f"{seconds:g}", "-t", str(TIMEOUT_MS)),
        )
        probes: list[float | None] = []
        if server.healthz is not None and scenario != "nonreaders":
            probes = _probe_loop(server.healthz, seconds)
        victim_result = _result(victim, seconds + 2 * TIMEOUT_MS / 1000 + 30)
        cpu, wall = server.cpu_seconds() - cpu, time.monotonic() - wall
    finally:
        if neighbour is not None:
            neighbour.send_signal(signal.SIGTERM)
            neighbour_result = _result(neighbour, lasts + 30)
    return Run(victim_result, neighbour_result, cpu / wall, probes)


# ---- report ----------------------------------------------------------------


def _median(runs: list[Run], key: str) -> float:
    return statistics.median(float(run.victim[key]) for run in runs)


def _us(value: float) -> str:
    return f"{value:,.0f}"


def _rate_text(runs: list[Run]) -> str:
    return " / ".join(f"{run.rate:,.0f}" for run in runs)


def _victim_table(runs: dict[tuple[str, str], list[Run]]) -> list[str]:
    lines = [
        f"| scenario | server | victim req/s (median of {REPEATS}) | runs | p50 µs "
        "| p99 µs | max µs | timeouts | req/s vs alone | p99 vs alone "
        "| req/s vs bare | p99 vs bare |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for scenario in SCENARIOS:
        for server in ("bare", "ebroker"):
            these = runs[scenario, server]
            alone = runs["alone", server]
            bare = runs[scenario, "bare"]
            rate = statistics.median(run.rate for run in these)
            p99 = _median(these, "p99_us")
            alone_rate = statistics.median(run.rate for run in alone)
            bare_rate = statistics.median(run.rate for run in bare)
            timeouts = sum(int(run.victim["timeouts"]) for run in these)
            lines.append(
                f"| {SCENARIO_TEXT[scenario]} | {server} | {rate:,.0f} "
                f"| {_rate_text(these)} | {_us(_median(these, 'p50_us'))} "
                f"| {_us(p99)} | {_us(_median(these, 'max_us'))} | {timeouts} "
                f"| {_ratio(rate, alone_rate)} "
                f"| {_ratio(p99, _median(alone, 'p99_us'))} "
                f"| {_ratio(rate, bare_rate)} "
                f"| {_ratio(p99, _median(bare, 'p99_us'))} |"
            )
    return lines


def _ratio(measured: float, baseline: float) -> str:
    return ratio(measured, baseline) if baseline else "n/a"


def _cpu_table(runs: dict[tuple[str, str], list[Run]]) -> list[str]:
    lines = [
        "| scenario | server | server CPU (cores) | victim client CPU (cores) "
        "| neighbour client CPU (cores) | neighbour requests sent/s "
        "| neighbour bytes read/s |",
        "|---|---|---|---|---|---|---|",
    ]
    for scenario in SCENARIOS:
        for server in ("bare", "ebroker"):
            these = runs[scenario, server]
            victim_cpu = statistics.median(
                run.victim["cpu_s"] / run.victim["wall"] for run in these
            )
            server_cpu = statistics.median(run.server_cpu for run in these)
            row = f"| {SCENARIO_TEXT[scenario]} | {server} | {server_cpu:.2f} "
            row += f"| {victim_cpu:.2f} "
            neighbours = [run.neighbour for run in these if run.neighbour]
            if neighbours:
                cpu = statistics.median(n["cpu_s"] / n["wall"] for n in neighbours)
                sent = statistics.median(n["requests"] / n["wall"] for n in neighbours)
                read = statistics.median(n["bytes_in"] / n["wall"] for n in neighbours)
                row += f"| {cpu:.2f} | {sent:,.0f} | {read / 1e6:.1f} MB/s |"
            else:
                row += "| - | - | - |"
            lines.append(row)
    return lines


def _healthz_table(runs: dict[tuple[str, str], list[Run]]) -> list[str]:
    lines = [
        f"| ebroker /healthz ({PROBES} probes per run, {REPEATS} runs) "
        "| answered | p50 ms | p99 ms | p99 vs alone |",
        "|---|---|---|---|---|",
    ]
    alone_p99 = 0.0
    for scenario in ("alone", "flood"):
        probes = [p for run in runs[scenario, "ebroker"] for p in run.probes]
        # A probe that got no answer in PROBE_TIMEOUT counts as that long.
        times = sorted(PROBE_TIMEOUT if p is None else p for p in probes)
        answered = sum(p is not None for p in probes)
        p50 = times[len(times) // 2]
        p99 = times[min(len(times) - 1, round(0.99 * (len(times) - 1)))]
        if scenario == "alone":
            alone_p99 = p99
        lines.append(
            f"| {SCENARIO_TEXT[scenario]} | {answered}/{len(probes)} "
            f"| {p50 * 1e3:.2f} | {p99 * 1e3:.2f} | {_ratio(p99, alone_p99)} |"
        )
    return lines


def run(seconds: float) -> list[str]:
    exe, why = build()
    if exe is None:
        return [f"skipped: {why}"]
    runs: dict[tuple[str, str], list[Run]] = {}
    with _bare() as bare, _ebroker() as ebroker:
        for _ in range(REPEATS):
            for scenario in SCENARIOS:
                for server in (bare, ebroker):
                    run = _measure(exe, server, scenario, seconds)
                    runs.setdefault((scenario, server.name), []).append(run)
    return [
        f"Victim: {VICTIM_CONNS} connections from {VICTIM_FROM}, 02 {VICTIM_SIZE:02X} "
        f"at depth 1, {TIMEOUT_MS} ms timeout; neighbours from {FLOOD_FROM} "
        f"(flood) and {NONREADERS_FROM} (non-readers); egdload built with "
        f"cc {' '.join(CFLAGS)}.",
        "",
        *_victim_table(runs),
        "",
        *_cpu_table(runs),
        "",
        *_healthz_table(runs),
    ]
