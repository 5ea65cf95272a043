"""
Source health-test throughput (`broker.health.SourceHealth.feed`).

Random data is fed in 4 KiB chunks, with the default tests (RCT + APT + repeat
test), with the repeat test off (what it costs) and with the FIPS 140-2 block
tests on, against two baselines over the same chunks:
``bytes.count`` (one C-level pass, the floor for any byte test) and SHA-512
(what the pool spends conditioning the same bytes). Rates are per CPU second
(`time.process_time`); the CPU fraction at a given source rate is that rate
divided by the throughput.
"""

import hashlib
import os
from collections.abc import Callable

from broker.health import HealthConfig, HealthState, SourceHealth

from .common import cpu_rate, ratio

CHUNK = 4096
DATA_BYTES = 4 << 20
RATES = (("4 KiB/s", 4096), ("1 MiB/s", 1 << 20))


def _chunks() -> list[bytes]:
    data = os.urandom(DATA_BYTES)
    return [data[i : i + CHUNK] for i in range(0, DATA_BYTES, CHUNK)]


def _over(chunks: list[bytes], work: Callable[[bytes], object]) -> Callable[[], int]:
    def once() -> int:
        for chunk in chunks:
            work(chunk)
        return DATA_BYTES

    return once


def _health(
    chunks: list[bytes], seconds: float, *, fips: bool, repeats: bool = True
) -> tuple[float, float]:
    """
    Return bytes per CPU second and the fraction of fed bytes credited.
    """
    health = SourceHealth(HealthConfig(fips=fips, repeats=repeats), 8.0)
    credited = 0

    def feed(chunk: bytes) -> None:
        nonlocal credited
        credited += health.feed(chunk, 0.0).creditable

    rate = cpu_rate(seconds, _over(chunks, feed))
    # Random input must pass: a quarantine would skip work and flatter the rate.
    if health.state is not HealthState.HEALTHY or health.counters.quarantines:
        raise RuntimeError(f"health tests failed on random data: {health.reason}")
    return rate, credited / health.counters.samples_tested


def run(seconds: float) -> list[str]:
    chunks = _chunks()
    count = cpu_rate(seconds, _over(chunks, lambda c: c.count(c[0])))
    sha = cpu_rate(seconds, _over(chunks, lambda c: hashlib.sha512(c).digest()))
    default, default_credited = _health(chunks, seconds, fips=False)
    no_repeats, _ = _health(chunks, seconds, fips=False, repeats=False)
    fips, fips_credited = _health(chunks, seconds, fips=True)

    def row(name: str, rate: float) -> str:
        fractions = " | ".join(f"{r / rate:.2e}" for _, r in RATES)
        return (
            f"| {name} | {rate / 1e6:.1f} | {ratio(rate, count)} "
            f"| {ratio(rate, sha)} | {fractions} |"
        )

    heads = " | ".join(f"core fraction at {name}" for name, _ in RATES)
    return [
        f"| measurement ({CHUNK}-byte chunks of random data) | MB/s (CPU) "
        f"| ratio to bytes.count | ratio to SHA-512 | {heads} |",
        "|---|---|---|---|" + "---|" * len(RATES),
        row("baseline: bytes.count (one pass)", count),
        row("baseline: hashlib.sha512", sha),
        row("SourceHealth.feed, default (RCT + APT + repeats)", default),
        row("SourceHealth.feed, repeats=False (RCT + APT)", no_repeats),
        row("SourceHealth.feed, fips=True", fips),
        "",
        f"The repeat test leaves {default / no_repeats:.2f} of the throughput "
        "of the RCT and APT alone.",
        f"Credited: {default_credited:.2%} of bytes fed (default), "
        f"{fips_credited:.2%} (fips=True; a failed FIPS block withholds its chunk).",
    ]
