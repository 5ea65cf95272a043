"""
Failover: how long a steady client goes without bytes when the primary source
is unplugged, and how long until the broker serves from the fallback tier.

The daemon has a simulated Entropy Key (4,000 bytes/s, as a real key) at tier 0
and getrandom at tier 1, with simulator control on the operator plane. One
client reads ``02 40`` back to back on one connection, so the pool stays empty
and every byte it gets was produced just before. After `BEFORE` seconds the key
is unplugged (``POST /v1/simulator/SERIAL/unplug``, as pulling it from the USB
bus); the client goes on for `AFTER` seconds more. The client records every
silence of 1 ms or more between two reads that delivered bytes; the longest
before the unplug is the key's own pace. Meanwhile the operator plane's
``/v1/status`` is polled for the moment tier 1 becomes active and the moment
the first byte credited by tier 1 is served (the switch). The failover gap is
the longest silence that ends after the unplug and began before the switch (it
may have begun while the key was still pacing the client); "unplug to bytes" is
the part of it after the unplug. The longest silence after the switch is the
fallback tier's own pace. The key
is then replugged and, once it feeds the pool again, the next of `REPEATS` runs
begins; medians are reported. There is no bare baseline: a bare server has no
tiers.
"""

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import loadclient
from .common import REPEATS, Report, medians, poll
from .daemons import Ebroker, ebroker
from .processes import Child

SERIAL = "KO2SYaMsVZBC9AXq"
SOURCES = f"""
    [[sources]]
    name = "ekey"
    kind = "entropykey"
    serial = "{SERIAL}"
    transport = "simulated"
    keyring = "{{state_dir}}/simulated-keyring"
    priority = 0

    [[sources]]
    name = "getrandom"
    kind = "getrandom"
    priority = 1
    """
OPERATOR = "simulator_control = true"
BEFORE = 3.0
AFTER = 3.0
GAP_US = 1000
KEY_TIMEOUT = 90.0
"""Seconds a (re)plugged key may take to pass its start-up test and feed."""
STATUS_INTERVAL = 0.005


def _key_feeding(status: dict[str, Any]) -> bool:
    key = next(s for s in status["sources"] if s["name"] == "ekey")
    return bool(key["feeding"] and status["tiers"]["active_tier"] == 0)


def _served_by_fallback(status: dict[str, Any]) -> int:
    return int(status["tiers"]["served_by_tier"].get("1", 0))


def _watch(
    daemon: Ebroker, served: int, unplugged: float, deadline: float
) -> dict[str, float]:
    """
    Poll the status from the unplug until tier 1 is active and has served
    more than ``served`` bytes.
    """
    seen: dict[str, float] = {}

    def check() -> bool:
        status = daemon.status()
        now = time.monotonic() - unplugged
        if status["tiers"]["active_tier"] == 1:
            seen.setdefault("tier1_active_ms", now * 1e3)
        if _served_by_fallback(status) > served:
            seen.setdefault("tier1_served_ms", now * 1e3)
        return len(seen) == 2

    poll(check, deadline - time.monotonic(), STATUS_INTERVAL)
    return seen


def _measure(exe: Path, daemon: Ebroker) -> dict[str, float | None]:
    daemon.wait(_key_feeding, KEY_TIMEOUT)
    args = ["-c", "1", "-n", "64", "-d", "1", "-w", "1"]
    args += ["-s", f"{BEFORE + AFTER:g}", "-g", str(GAP_US), "-r"]
    command = loadclient.command(exe, "load", daemon.port, *args)
    with Child(command, BEFORE + AFTER + 60) as child:
        loadclient.expect(child, "measuring")
        counting = time.monotonic()
        # The key's own pace is the baseline: this interval is measured, not
        # waited out in place of a condition.
        time.sleep(BEFORE)
        served = _served_by_fallback(daemon.status())
        unplugged = time.monotonic()
        daemon.post(f"/v1/simulator/{SERIAL}/unplug")
        seen = _watch(daemon, served, unplugged, unplugged + AFTER)
        result: dict[str, Any] = json.loads(loadclient.expect(child, "{"))
        child.finish()
    daemon.post(f"/v1/simulator/{SERIAL}/replug")
    switched = unplugged + seen.get("tier1_served_ms", AFTER * 1e3) / 1e3
    spans = [(end - length, end) for end, length in result["gaps"]]

    def longest(keep: Callable[[float, float], bool]) -> float:
        return (
            max((end - start for start, end in spans if keep(start, end)), default=0.0)
            * 1e3
        )

    return {
        "longest_gap_before_ms": longest(
            lambda start, end: start >= counting and end <= unplugged
        ),
        "failover_gap_ms": longest(
            lambda start, end: end > unplugged and start < switched
        ),
        "longest_gap_on_tier1_ms": longest(lambda start, end: start >= switched),
        "unplug_to_bytes_ms": max(
            (end - unplugged for start, end in spans if start < unplugged < end),
            default=0.0,
        )
        * 1e3,
        "tier1_active_ms": seen.get("tier1_active_ms"),
        "tier1_served_ms": seen.get("tier1_served_ms"),
        "bytes": result["bytes"],
        "errors": result["errors"],
        "client_cores": result["cpu_s"] / result["wall"],
    }


def _ms(value: float | None) -> str:
    return "never" if value is None else f"{value:,.0f}"


def run(seconds: float) -> Report:
    del seconds  # The phases have fixed lengths: BEFORE and AFTER.
    exe, why = loadclient.build()
    if exe is None:
        return Report([f"skipped: {why}"], {"skipped": why})
    with ebroker(sources=SOURCES, operator=OPERATOR) as daemon:
        runs = [_measure(exe, daemon) for _ in range(REPEATS)]
    m = medians(runs)

    def cell(key: str) -> str:
        return f"{_ms(m[key])} | {' / '.join(_ms(r[key]) for r in runs)}"

    lines = [
        f"Simulated Entropy Key (tier 0) unplugged after {BEFORE:g} s of one "
        f"client reading 02 40 back to back; getrandom at tier 1; median of "
        f"{REPEATS}, each run in the next column. Gaps in ms; tier 1 times in "
        "ms from the unplug.",
        "",
        "| longest gap on the key | runs | failover gap | runs "
        "| unplug to bytes | runs | longest gap on tier 1 | runs "
        "| tier 1 active | runs | first byte from tier 1 served | runs "
        "| errors | client cores |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        f"| {cell('longest_gap_before_ms')} | {cell('failover_gap_ms')} "
        f"| {cell('unplug_to_bytes_ms')} "
        f"| {cell('longest_gap_on_tier1_ms')} "
        f"| {cell('tier1_active_ms')} | {cell('tier1_served_ms')} "
        f"| {sum(r['errors'] or 0 for r in runs):.0f} | {m['client_cores']:.2f} |",
    ]
    return Report(
        lines,
        {"before_s": BEFORE, "after_s": AFTER, "runs": runs, "median": m},
    )
