"""
Hostile neighbour: what one EGD client sees while another abuses the broker.

A victim (4 connections, ``02 20`` at depth 1: send, read all 32 bytes, repeat)
is measured alone, next to a flooding neighbour (one connection pipelining
``00``, one pipelining ``02 00``, both reading and discarding replies as fast as
they come) and next to 20 neighbours that send ``02 FF`` and never read. The
neighbours connect from other loopback addresses, so the broker sees other
clients. The load comes from ``egdload.c``, compiled here with ``cc -O2`` (the
benchmark is skipped without a compiler), so the client is not what limits the
figures; its CPU time is reported next to the server's.

Each scenario runs against the real daemon and against the bare baseline
(``bare_egd.py``: its own process, uvloop, one `asyncio.Protocol`, with only
the per-turn bound any server needs to survive these neighbours), alternating,
`REPEATS` times; medians are compared. A victim request unanswered after
`TIMEOUT_MS` counts as a timeout with that age as its latency, and the victim
reconnects (as ekeyd-egd-linux does): a frozen server yields a figure. During
the flood, ``/healthz`` on the daemon's HTTP sink is probed too.
"""

import contextlib
import hashlib
import http.client
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.integration.daemon import REPO

from .common import REPEATS, bench_daemon, ratio

SOURCE = Path(__file__).with_name("egdload.c")
CFLAGS = ("-O2", "-Wall", "-Wextra")

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


def build() -> tuple[Path | None, str]:
    """
    Compile ``egdload.c`` into a cache directory keyed by its source.

    Returns:
        The executable, or None and why it could not be built.
    """
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        return None, "no C compiler (cc or gcc) on PATH to build egdload.c"
    text = SOURCE.read_bytes()
    digest = hashlib.sha256(text + " ".join(CFLAGS).encode()).hexdigest()[:16]
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    for directory in (cache / "ebroker-bench", Path(tempfile.gettempdir())):
        exe = directory / f"egdload-{digest}"
        if exe.exists():
            return exe, ""
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError:
            continue
        partial = directory / f".egdload-{digest}.{os.getpid()}"
        result = subprocess.run(
            [cc, *CFLAGS, "-o", str(partial), str(SOURCE)],
            capture_output=True,
            text=True,
            check=False,
        )
        if result.returncode != 0:
            partial.unlink(missing_ok=True)
            return None, f"{cc} failed on egdload.c: {result.stderr.strip()}"
        partial.replace(exe)
        return exe, ""
    return None, "no writable cache or temp directory for the egdload binary"


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
        # utime + stime of every thread, fields 14 and 15 of /proc/PID/stat;
        # the command name before them may hold spaces, so split after ")".
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@contextlib.contextmanager
def _bare() -> Iterator[Server]:
    process = subprocess.Popen(
        [sys.executable, "-m", "tests.bench.bare_egd"],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        port = int(process.stdout.readline())
        yield Server("bare", port, process.pid)
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@contextlib.contextmanager
def _ebroker() -> Iterator[Server]:
    with bench_daemon() as daemon:
        _host, port = daemon.egd_tcp
        web = daemon.http_url.removeprefix("http://").rsplit(":", 1)
        yield Server("ebroker", port, daemon.process.pid, healthz=(web[0], int(web[1])))


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
