"""
Continuous health tests for entropy sources, and the per-source state machine
that decides which bytes may be credited.

The tests are NIST SP 800-90B's Repetition Count Test (RCT, §4.4.1) and
Adaptive Proportion Test (APT, §4.4.2), plus the optional FIPS 140-2 (2001)
block tests the way rngd runs them. Everything here is pure: no I/O, no clock;
the caller passes ``now``. See ``docs/health-tests.md`` for the reference.

Theory of operation
-------------------
Each source has one `SourceHealth`. Every byte the source yields goes through
`SourceHealth.feed`, which runs three tests over the byte stream:

* the RCT on 64-bit words (8-byte samples, aligned to the start of the stream),
* the APT on bytes with a window of 512,
* optionally the FIPS 140-2 tests on 2,500-byte blocks (`Fips140Tester`).

The tests are continuous: their state (the current run, the current window,
the current FIPS block) carries across `feed` calls and across failures, so
the outcome depends only on the byte stream, never on how it was split into
calls. A test *fails* at the sample where its count first reaches a cut-off;
a run or window that keeps going past the cut-off is the same failure, not a
new one. Each test has two cut-offs: the intermittent one (alpha = 2^alpha_log2)
and a permanent one (alpha = 2^permanent_alpha_log2, jitterentropy's 2^-60).

States (`HealthState`) and who moves them::

    STARTUP ──1,024 clean samples──▶ HEALTHY
       │                                │
       └──failure──▶ QUARANTINED ◀──failure──┘
                      │    ▲
                      │    └─failure (start-up restarts)
                      └──1,024 clean samples──▶ HEALTHY
    any state ──permanent cut-off, or `permanent_failures` failures
                within `failure_window` seconds──▶ FAILED (terminal)
    any state but FAILED ──reset()──▶ STARTUP

Invariants: a byte is creditable only if it was tested while HEALTHY; a
`feed` call in which any test failed (including a single failed FIPS block)
credits nothing; after a failed FIPS block nothing is credited until a block
passes; FAILED is never left, not even by `reset` (a reopened device does not
clear a permanent fault; restart the broker to clear it). A start-up test
(initial, after a failure, or after `reset`) is the next 1,024 samples (bytes)
of the stream; because 1,024 ≥ 2*512 - 1 it always contains a full APT window.

Cut-offs from the credit
------------------------
Conditioned output (Entropy Key, hwrng, getrandom) passes statistical tests
even with zero true entropy, so these tests catch gross failures: stuck output,
repeats, zero-filled or replayed buffers. For a source crediting H bits per
byte, a 64-bit word is credited 8·H bits, so the RCT cut-off is
``C = 1 + ceil(-alpha_log2 / (8·H))``; the APT uses H bits per byte sample.
H is capped at 8 and floored at `MIN_TEST_CREDIT` (a source credited 0 is
still checked for being stuck).

False alarms on a healthy 4 KiB/s source (one year = 3.156e7 s)
---------------------------------------------------------------
Ideal random input, H = 8 (the default credit), exact binomial arithmetic:

* RCT on 64-bit words, alpha = 2^-30: C = 2, i.e. two equal consecutive words.
  P(false alarm) = 2^-64 = 5.4e-20 per word; 512 words/s = 1.6e10 words/year
  → 8.8e-10 false alarms per year (2.2e-7 at 1 MiB/s). The permanent cut-off
  is 3 equal words (2^-128 per word).
* APT on bytes, W = 512. P(false alarm) per window = P(Bin(511, 1/256) ≥ C-1);
  8 windows/s = 2.5e8 windows/year:

  - alpha = 2^-30 → C = 16: 3.2e-9 per window → 0.81 false alarms per year
    (one every 1.2 years per source; one a week in a fleet of 60 sources).
    Too many, hence a separate APT default:
  - alpha = 2^-40 → C = 19: 4.7e-12 per window → 1.2e-3 per year at 4 KiB/s
    (one in ~840 years), 0.30 per year at 1 MiB/s. This is the default
    ``apt_alpha_log2 = -40``, as the reference recommends for bytes.
  - permanent alpha = 2^-60 → C = 25: 2.4e-18 per window, never in practice.

* FIPS 140-2 (optional): about 1 in 1,270 good blocks fails (7.9e-4); a block
  is 2,500 bytes, so a 4 KiB/s source sees a false failed block every ~13 min.
  A single failed block never quarantines; a leaky count does (rngd's rule:
  +1 per failed block, -1 per 1,000 good blocks). With 7.9e-4 failures per
  block against 1e-3 forgiven, the count drifts down only slowly, and the
  chance of it reaching T falls by about x0.63 per step of T. Markov-chain
  estimate of false quarantines per year:

  ==== ============ ============
  T     4 KiB/s      1 MiB/s
  ==== ============ ============
  25    0.065        17
  30    6.8e-3       1.7
  40    7.4e-5       0.019
  ==== ============ ============

  hence the default ``fips_max_failures = 40`` (rngd disables at 25). A
  source failing every block still trips after 40 blocks (100 KB), and credits
  nothing meanwhile because credit stops at the first failed block.

Permanent failure: 3 failures within an hour (defaults). With the rates above a
healthy source essentially never has two, so three in an hour is a fault.
"""

import math
import operator
from collections import deque
from dataclasses import dataclass
from decimal import Decimal, localcontext
from enum import Enum
from functools import lru_cache
from typing import Annotated, Literal

from pydantic import Field, model_validator

from broker.configtypes import Duration, StrictModel

APT_WINDOW = 512
"""SP 800-90B APT window for non-binary samples."""
APT_WINDOW_BINARY = 1024
"""SP 800-90B APT window for binary samples."""
STARTUP_SAMPLES = 1024
"""Samples (bytes) a start-up test must pass before anything is credited."""
RCT_SAMPLE_BYTES = 8
"""The RCT in `SourceHealth` runs on 64-bit words."""
MIN_TEST_CREDIT = 0.125
"""Bits per byte assumed by the tests for a source credited less (e.g. 0)."""
FIPS_BLOCK_BYTES = 2500
FIPS_FORGIVE_EVERY = 1000
"""Good FIPS blocks that forgive one failed block (rngd's ``RNG_OK_CREDIT``)."""

# Relative slack for -log2(alpha)/H so that e.g. 30 / 0.6 counts as 50, not
# 50.000000000000007: the table is defined on the decimal values.
_CEIL_SLACK = 1e-9
_FORMATS: dict[int, Literal["B", "H", "I", "Q"]] = {1: "B", 2: "H", 4: "I", 8: "Q"}


def rct_cutoff(h: float, alpha_log2: float) -> int:
    """
    SP 800-90B RCT cut-off: ``1 + ceil(-log2(alpha) / H)``.

    Args:
        h: min-entropy per sample, in bits (> 0).
        alpha_log2: log2 of the false-positive probability per decision (< 0).

    Returns:
        The run length at which the test fails.

    Raises:
        ValueError: ``h`` or ``alpha_log2`` out of range.
    """
    if not h > 0:
        raise ValueError("entropy per sample must be positive")
    if not alpha_log2 < 0:
        raise ValueError("alpha_log2 must be negative")
    ratio = -alpha_log2 / h
    return 1 + math.ceil(ratio - ratio * _CEIL_SLACK)


@lru_cache(maxsize=64)
def apt_cutoff(h: float, alpha_log2: float, window: int = APT_WINDOW) -> int:
    """
    SP 800-90B APT cut-off: ``1 + CRITBINOM(W, 2^-H, 1 - alpha)``, capped at W.

    CRITBINOM(n, p, q) is the smallest k with Binomial(n, p).cdf(k) ≥ q; it is
    computed exactly enough (60 significant digits) to match the reference
    table in every cell.

    Args:
        h: min-entropy per sample, in bits (> 0).
        alpha_log2: log2 of the false-positive probability per window (< 0).
        window: W, 512 for non-binary samples, 1024 for binary ones.

    Returns:
        The count of the window's first value at which the test fails.

    Raises:
        ValueError: an argument is out of range.
    """
    if not h > 0:
        raise ValueError("entropy per sample must be positive")
    if not alpha_log2 < 0:
        raise ValueError("alpha_log2 must be negative")
    if window < 2:
        raise ValueError("the window must hold at least 2 samples")
    with localcontext() as ctx:
        ctx.prec = 60
        p = Decimal(2) ** Decimal(-h)
        q = 1 - p
        alpha = Decimal(2) ** Decimal(alpha_log2)
        ratio = p / q
        pmf = [q**window]
        for k in range(window):
            pmf.append(pmf[-1] * (window - k) / (k + 1) * ratio)
        # Walk down from k = W keeping tail = P(X > k) ≤ alpha; stop at the
        # smallest such k, which is CRITBINOM.
        tail = Decimal(0)
        k = window
        while k > 0 and tail + pmf[k] <= alpha:
            tail += pmf[k]
            k -= 1
    return min(1 + k, window)


@dataclass(frozen=True, slots=True)
class CutoffReached:
    """
    One test reaching a cut-off.
    """

    test: str
    """``"rct"`` or ``"apt"``."""
    end: int
    """Bytes of the fed data up to and including the failing sample."""
    count: int
    """The run length or window count that reached the cut-off."""
    permanent: bool
    """True when the permanent cut-off was reached."""
    detail: str


def _thresholds(cutoff: int, permanent: int | None) -> tuple[tuple[int, bool], ...]:
    if permanent is None:
        return ((cutoff, False),)
    return ((cutoff, False), (permanent, True))


class RepetitionCountTest:
    """
    SP 800-90B RCT over samples of 1, 2, 4 or 8 bytes, fed incrementally.

    Samples are consecutive ``sample_bytes``-byte slices of the stream; a
    partial sample at the end of one `feed` is completed by the next.
    """

    def __init__(
        self,
        cutoff: int,
        *,
        sample_bytes: int = 1,
        permanent_cutoff: int | None = None,
    ) -> None:
        if cutoff < 2:
            raise ValueError("an RCT cut-off is at least 2")
        if sample_bytes not in _FORMATS:
            raise ValueError("samples are 1, 2, 4 or 8 bytes")
        if permanent_cutoff is not None and permanent_cutoff <= cutoff:
            raise ValueError("the permanent cut-off must exceed the cut-off")
        self.cutoff = cutoff
        self.permanent_cutoff = permanent_cutoff
        self.sample_bytes = sample_bytes
        self._format = _FORMATS[sample_bytes]
        self._thresholds = _thresholds(cutoff, permanent_cutoff)
        self._longest = (permanent_cutoff or cutoff) - 1
        self.reset()

    def reset(self) -> None:
        """
        Forget the stream: the next sample starts a new run.
        """
        self.samples = 0
        self.run = 0
        """Length of the current run (0 before the first sample)."""
        self._last = b""
        self._pending = b""

    def feed(self, data: bytes) -> list[CutoffReached]:
        """
        Test the samples completed by ``data``.

        Returns:
            Every cut-off crossing in ``data``, in stream order.
        """
        size = self.sample_bytes
        last, pending = self._last, self._pending
        buf = last + pending + data
        start = len(last)
        usable = len(buf) - (len(buf) - start) % size
        fresh = (usable - start) // size
        if fresh == 0:
            self._pending = buf[start:]
            return []
        view = memoryview(buf)[:usable].cast(self._format)
        # flags[j] is 1 when new sample j equals the sample before it.
        flags = bytes(map(operator.eq, view[1:], view[:-1]))
        if not last:
            flags = b"\x00" + flags
        failures = self._crossings(flags, len(pending)) if 1 in flags else []
        if 0 in flags:
            self.run = len(flags) - len(flags.rstrip(b"\x01")) + 1
        else:
            self.run += fresh
        self.samples += fresh
        self._last = buf[usable - size : usable]
        self._pending = buf[usable:]
        return failures

    def _crossings(self, flags: bytes, pending: int) -> list[CutoffReached]:
        # The current run continues into this data as leading ones; capping
        # them keeps the prefix short while still hiding crossings that were
        # already reported.
        prefix = min(max(self.run - 1, 0), self._longest)
        ext = b"\x01" * prefix + flags
        needle = b"\x01" * (self.cutoff - 1)
        out: list[CutoffReached] = []
        i = ext.find(needle)
        while i != -1:
            run_end = ext.find(b"\x00", i)
            if run_end == -1:
                run_end = len(ext)
            for threshold, permanent in self._thresholds:
                at = i + threshold - 2
                if at < run_end and at >= prefix:
                    sample = at - prefix
                    out.append(
                        CutoffReached(
                            "rct",
                            (sample + 1) * self.sample_bytes - pending,
                            threshold,
                            permanent,
                            f"RCT: {threshold} equal consecutive "
                            f"{self.sample_bytes}-byte samples",
                        )
                    )
            i = ext.find(needle, run_end)
        return out


class AdaptiveProportionTest:
    """
    SP 800-90B APT over byte samples, fed incrementally; windows span calls.

    The window's first sample counts: the test fails when the first value of
    a window has occurred ``cutoff`` times in it.
    """

    def __init__(
        self,
        cutoff: int,
        *,
        window: int = APT_WINDOW,
        permanent_cutoff: int | None = None,
    ) -> None:
        if not 2 <= cutoff <= window:
            raise ValueError("an APT cut-off lies between 2 and the window")
        if permanent_cutoff is not None and not cutoff < permanent_cutoff <= window:
            raise ValueError("the permanent cut-off lies above the cut-off")
        self.cutoff = cutoff
        self.permanent_cutoff = permanent_cutoff
        self.window = window
        self._thresholds = _thresholds(cutoff, permanent_cutoff)
        self.reset()

    def reset(self) -> None:
        """
        Forget the stream: the next sample starts a new window.
        """
        self.samples = 0
        self._filled = 0
        self._value = 0
        self._count = 0

    def feed(self, data: bytes) -> list[CutoffReached]:
        """
        Test every byte of ``data`` as one sample.

        Returns:
            Every cut-off crossing in ``data``, in stream order.
        """
        out: list[CutoffReached] = []
        size = len(data)
        window = self.window
        cutoff = self.cutoff
        i = 0
        if self._filled and size:
            i = min(window - self._filled, size)
            before = self._count
            self._count += data.count(self._value, 0, i)
            if self._count >= cutoff:
                self._crossings(data, 0, i, before, self._count, out)
            self._filled = (self._filled + i) % window
        # Whole windows: one C-level count each, no per-byte Python.
        count_in = data.count
        while size - i >= window:
            value = data[i]
            count = count_in(value, i, i + window)
            if count >= cutoff:
                self._value = value
                self._crossings(data, i, i + window, 0, count, out)
            i += window
        if i < size:
            self._value = data[i]
            self._count = count_in(self._value, i, size)
            self._filled = size - i
            if self._count >= cutoff:
                self._crossings(data, i, size, 0, self._count, out)
        self.samples += size
        return out

    def _crossings(
        self,
        data: bytes,
        start: int,
        end: int,
        before: int,
        after: int,
        out: list[CutoffReached],
    ) -> None:
        value = self._value
        for threshold, permanent in self._thresholds:
            if before < threshold <= after:
                at = start - 1
                for _ in range(threshold - before):
                    at = data.find(value, at + 1, end)
                out.append(
                    CutoffReached(
                        "apt",
                        at + 1,
                        threshold,
                        permanent,
                        f"APT: value 0x{value:02x} seen {threshold} times in a "
                        f"{self.window}-sample window",
                    )
                )


# FIPS 140-2 (2001-10-10) thresholds; runs are (min, max) for lengths 1..5
# and for 6 or more, the same for runs of zeros and of ones.
_MONOBIT_OPEN = (9725, 10275)
_POKER_SUMSQ = (1563176, 1576928)
_RUNS = ((2315, 2685), (1114, 1386), (527, 723), (240, 384), (103, 209), (103, 209))
_LONG_RUN = 26
_BLOCK_BITS = FIPS_BLOCK_BYTES * 8
_ALL_ONES = (1 << _BLOCK_BITS) - 1
_HIGH_NIBBLE = bytes(b >> 4 for b in range(256))
_LOW_NIBBLE = bytes(b & 15 for b in range(256))


def _runs_at_least(bits: int) -> tuple[list[int], bool]:
    """
    Count runs of ones of length ≥ k for k = 1..6, and whether one is ≥ 26.
    """
    # z_k has bit i set when bits i .. i+k-1 are all ones: a run of length L
    # becomes a run of length L-k+1, and runs never merge, so counting the
    # runs of z_k (their top ends) counts the runs of length ≥ k.
    counts = []
    z = bits
    for k in range(1, 7):
        counts.append((z & ~(z >> 1)).bit_count())
        z &= bits >> k
    z2 = bits & (bits >> 1)
    z4 = z2 & (z2 >> 2)
    z8 = z4 & (z4 >> 4)
    z16 = z8 & (z8 >> 8)
    z24 = z16 & (z8 >> 16)
    z26 = z24 & (z2 >> 24)
    return counts, z26 != 0


def fips_block_failures(block: bytes) -> tuple[str, ...]:
    """
    Run the FIPS 140-2 monobit, poker, runs and long-run tests on one block.

    Bits are taken most significant first, as rngd does. The continuous test
    needs the previous block and lives in `Fips140Tester`.

    Args:
        block: exactly `FIPS_BLOCK_BYTES` bytes.

    Returns:
        The names of the failed tests (``monobit``, ``poker``, ``runs``,
        ``long_run``); empty when the block passes.

    Raises:
        ValueError: the block has the wrong size.
    """
    if len(block) != FIPS_BLOCK_BYTES:
        raise ValueError(f"a FIPS block is {FIPS_BLOCK_BYTES} bytes")
    failed: list[str] = []
    bits = int.from_bytes(block, "big")
    ones = bits.bit_count()
    if not _MONOBIT_OPEN[0] < ones < _MONOBIT_OPEN[1]:
        failed.append("monobit")
    nibbles = block.translate(_HIGH_NIBBLE) + block.translate(_LOW_NIBBLE)
    sumsq = sum(nibbles.count(n) ** 2 for n in range(16))
    if not _POKER_SUMSQ[0] <= sumsq <= _POKER_SUMSQ[1]:
        failed.append("poker")
    one_runs, long_ones = _runs_at_least(bits)
    zero_runs, long_zeros = _runs_at_least(bits ^ _ALL_ONES)
    for at_least in (one_runs, zero_runs):
        exact = [at_least[k] - at_least[k + 1] for k in range(5)] + [at_least[5]]
        if any(not lo <= n <= hi for n, (lo, hi) in zip(exact, _RUNS, strict=True)):
            failed.append("runs")
            break
    if long_ones or long_zeros:
        failed.append("long_run")
    return tuple(failed)


@dataclass(frozen=True, slots=True)
class FipsBlockResult:
    """
    The outcome of one 2,500-byte FIPS block.
    """

    end: int
    """Bytes of the fed data up to and including the block's last byte."""
    failed: tuple[str, ...]
    """Failed tests; empty when the block passed."""
    tripped: bool
    """This block's failure brought the leaky count to ``max_failures``."""


class Fips140Tester:
    """
    FIPS 140-2 block tests on a byte stream with rngd-like leaky counting.

    Each failed block adds one to `failures`; every `FIPS_FORGIVE_EVERY` good
    blocks take one away. Reaching ``max_failures`` *trips* the tester (the
    caller quarantines the source) and starts the count again from zero.
    The continuous test compares each 32-bit word with the one before it,
    across block boundaries; the first word of the stream only bootstraps it.
    """

    def __init__(
        self, max_failures: int = 40, forgive_every: int = FIPS_FORGIVE_EVERY
    ) -> None:
        if max_failures < 1 or forgive_every < 1:
            raise ValueError("max_failures and forgive_every are at least 1")
        self.max_failures = max_failures
        self.forgive_every = forgive_every
        self.blocks = 0
        self.failed_blocks = 0
        self.reset()

    def reset(self) -> None:
        """
        Forget the stream and the leaky count (block totals are kept).
        """
        self.failures = 0
        self._good = 0
        self._buffer = b""
        self._last_word: int | None = None

    def feed(self, data: bytes) -> list[FipsBlockResult]:
        """
        Test every block completed by ``data``.

        Returns:
            One result per completed block, in stream order.
        """
        out: list[FipsBlockResult] = []
        if self._buffer:
            need = FIPS_BLOCK_BYTES - len(self._buffer)
            self._buffer += data[:need]
            if len(self._buffer) < FIPS_BLOCK_BYTES:
                return out
            out.append(self._block(self._buffer, need))
            self._buffer = b""
            i = need
        else:
            i = 0
        while len(data) - i >= FIPS_BLOCK_BYTES:
            i += FIPS_BLOCK_BYTES
            out.append(self._block(data[i - FIPS_BLOCK_BYTES : i], i))
        self._buffer = data[i:]
        return out

    def _block(self, block: bytes, end: int) -> FipsBlockResult:
        failed = fips_block_failures(block)
        if self._continuous_fails(block):
            failed += ("continuous",)
        self.blocks += 1
        tripped = False
        if failed:
            self.failed_blocks += 1
            self.failures += 1
            if self.failures >= self.max_failures:
                tripped = True
                self.failures = 0
        else:
            self._good += 1
            if self._good >= self.forgive_every:
                self._good = 0
                self.failures = max(self.failures - 1, 0)
        return FipsBlockResult(end, failed, tripped)

    def _continuous_fails(self, block: bytes) -> bool:
        words = memoryview(block).cast("I")
        repeated = self._last_word == words[0] or True in map(
            operator.eq, words[1:], words[:-1]
        )
        self._last_word = words[-1]
        return repeated


class HealthState(Enum):
    """
    Where a source stands with its health tests.
    """

    STARTUP = "startup"
    HEALTHY = "healthy"
    QUARANTINED = "quarantined"
    FAILED = "failed"


@dataclass(frozen=True, slots=True)
class HealthEvent:
    """
    A state change, or a failure that restarted a quarantined source's start-up.
    """

    from_state: HealthState
    to_state: HealthState
    reason: str
    time: float
    position: int
    """Bytes fed (and tested) since the `SourceHealth` was made, at the event."""


@dataclass(frozen=True, slots=True)
class HealthVerdict:
    """
    What one `SourceHealth.feed` decided.
    """

    creditable: int
    """Bytes of the data that may be credited (0 if any test failed in it)."""
    state: HealthState
    """The state after the data."""
    events: tuple[HealthEvent, ...]


@dataclass(frozen=True, slots=True)
class HealthCounters:
    """
    Totals since the `SourceHealth` was made.
    """

    samples_tested: int
    rct_failures: int
    apt_failures: int
    fips_blocks: int
    fips_failures: int
    """Failed FIPS blocks (each is not a source failure by itself)."""
    startups_passed: int
    quarantines: int


AlphaLog2 = Annotated[float, Field(ge=-100, le=-10)]


class HealthConfig(StrictModel):
    """
    Per-source health tests (``health = {...}`` in a source entry).
    """

    enabled: bool = Field(
        default=True,
        description="run the health tests; false credits every byte untested",
    )
    alpha_log2: AlphaLog2 = Field(
        default=-30.0,
        description="log2 of the false-alarm probability of one RCT decision "
        "(intermittent failure); the RCT runs on 64-bit words",
    )
    apt_alpha_log2: AlphaLog2 = Field(
        default=-40.0,
        description="log2 of the false-alarm probability of one APT window "
        "(512 bytes); -40 keeps a 4 KiB/s source free of false alarms for "
        "centuries, -30 would give about one a year",
    )
    permanent_alpha_log2: AlphaLog2 | None = Field(
        default=None,
        description="log2 alpha of permanent cut-offs (jitterentropy uses -60): "
        "reaching one fails the source at once. Unset, a source fails only after "
        "permanent_failures failures within failure_window, so a feeder glitch "
        "costs a quarantine, not the source",
    )
    fips: bool = Field(
        default=False, description="also run the FIPS 140-2 tests on 2500-byte blocks"
    )
    fips_max_failures: int = Field(
        default=40,
        ge=1,
        le=10_000,
        description="failed FIPS blocks (less one per 1000 good blocks) that "
        "quarantine the source",
    )
    permanent_failures: int = Field(
        default=3,
        ge=1,
        description="failures within failure_window that fail the source for good",
    )
    quarantine_limit: Duration = Field(
        default=600.0,
        description="a quarantined source that is still failing its tests after "
        "this many seconds is failed for good",
    )
    failure_window: Duration = Field(
        default=3600.0,
        gt=0,
        description="seconds over which failures are counted, e.g. '1 h'",
    )

    @model_validator(mode="after")
    def _permanent_is_rarer(self) -> "HealthConfig":
        permanent = self.permanent_alpha_log2
        if permanent is not None and permanent >= min(
            self.alpha_log2, self.apt_alpha_log2
        ):
            raise ValueError(
                "permanent_alpha_log2 must be below alpha_log2 and apt_alpha_log2"
            )
        return self


class SourceHealth:
    """
    The continuous-test state machine of one source (see the module docstring).

    Args:
        config: the source's health settings.
        credit: bits of entropy the source is credited per byte (0..8).
    """

    def __init__(self, config: HealthConfig, credit: float) -> None:
        if not 0 <= credit <= 8:
            raise ValueError("credit is between 0 and 8 bits per byte")
        self.config = config
        h = min(max(credit, MIN_TEST_CREDIT), 8.0)
        word_h = h * RCT_SAMPLE_BYTES
        rct_c = rct_cutoff(word_h, config.alpha_log2)
        apt_c = apt_cutoff(h, config.apt_alpha_log2, APT_WINDOW)
        rct_p: int | None = None
        apt_p: int | None = None
        if config.permanent_alpha_log2 is not None:
            # The two levels must differ, or every failure would be permanent
            # (at H = 8 both alpha give C = 2 for 64-bit words).
            rct_p = max(rct_cutoff(word_h, config.permanent_alpha_log2), rct_c + 1)
            apt_p = min(
                max(apt_cutoff(h, config.permanent_alpha_log2), apt_c + 1),
                APT_WINDOW,
            )
            if apt_p <= apt_c:
                apt_p = None
        self.rct = RepetitionCountTest(
            rct_c, sample_bytes=RCT_SAMPLE_BYTES, permanent_cutoff=rct_p
        )
        self.apt = AdaptiveProportionTest(apt_c, permanent_cutoff=apt_p)
        self.fips = Fips140Tester(config.fips_max_failures) if config.fips else None
        self.state = HealthState.STARTUP if config.enabled else HealthState.HEALTHY
        self.reason = "start-up test" if config.enabled else "health tests disabled"
        self.failed_at: float | None = None
        self._position = 0
        self._startup_left = STARTUP_SAMPLES
        self._failure_times: deque[float] = deque()
        self._events: list[HealthEvent] = []
        self._credit = 0
        self._tainted = False
        self._fips_suspect = False
        self._samples = 0
        self._rct_failures = 0
        self._apt_failures = 0
        self._fips_blocks = 0
        self._fips_failures = 0
        self._startups = 0
        self._quarantines = 0
        self._quarantined_since = 0.0

    @property
    def counters(self) -> HealthCounters:
        """
        A snapshot of the totals.
        """
        return HealthCounters(
            samples_tested=self._samples,
            rct_failures=self._rct_failures,
            apt_failures=self._apt_failures,
            fips_blocks=self._fips_blocks,
            fips_failures=self._fips_failures,
            startups_passed=self._startups,
            quarantines=self._quarantines,
        )

    def reset(self, now: float) -> HealthEvent | None:
        """
        Start over after the device was reopened: a fresh start-up test.

        Failures already counted towards `HealthConfig.permanent_failures`
        stay counted, and FAILED stays FAILED.

        Returns:
            The transition to STARTUP, if the state changed.
        """
        if self.state is HealthState.FAILED or not self.config.enabled:
            return None
        self.rct.reset()
        self.apt.reset()
        if self.fips is not None:
            self.fips.reset()
        self._fips_suspect = False
        self._startup_left = STARTUP_SAMPLES
        if self.state is HealthState.STARTUP:
            return None
        self._events = []
        return self._move(HealthState.STARTUP, "reset", now, self._position)

    def feed(self, data: bytes, now: float) -> HealthVerdict:
        """
        Test ``data`` (the source's next bytes) and say how much to credit.

        Args:
            data: the bytes, in stream order.
            now: the current time, recorded in events.

        Returns:
            The creditable byte count, the state after the data and the events.
        """
        if not self.config.enabled:
            self._samples += len(data)
            self._position += len(data)
            return HealthVerdict(len(data), self.state, ())
        if self.state is HealthState.FAILED:
            return HealthVerdict(0, self.state, ())
        found: list[CutoffReached | FipsBlockResult] = []
        found += self.rct.feed(data)
        found += self.apt.feed(data)
        if self.fips is not None:
            found += self.fips.feed(data)
        found.sort(key=operator.attrgetter("end"))
        self._events = []
        self._credit = 0
        self._tainted = False
        pos = 0
        for item in found:
            self._advance(pos, item.end, now, before_failure=True)
            pos = item.end
            if isinstance(item, FipsBlockResult):
                self._on_fips(item, now)
            else:
                self._on_failure(item, now)
            if self.failed_at is not None:
                break
        else:
            self._advance(pos, len(data), now, before_failure=False)
            pos = len(data)
        self._samples += pos
        self._position += pos
        credit = 0 if self._tainted else self._credit
        return HealthVerdict(credit, self.state, tuple(self._events))

    def _advance(self, pos: int, end: int, now: float, *, before_failure: bool) -> None:
        """
        Account for bytes ``pos:end`` tested without a failure among them.
        """
        if self.state is HealthState.HEALTHY:
            if not self._fips_suspect:
                self._credit += end - pos
            return
        left = self._startup_left
        span = end - pos
        # A failure in the sample that ends at `end` belongs to the start-up
        # test if that sample is one of its last bytes.
        if left < span or (left == span and not before_failure):
            self._startups += 1
            self._move(
                HealthState.HEALTHY,
                f"start-up test passed ({STARTUP_SAMPLES} samples)",
                now,
                self._position + pos + left,
            )
            if not self._fips_suspect:
                self._credit += span - left
            self._startup_left = 0
        else:
            self._startup_left = left - span

    def _on_fips(self, result: FipsBlockResult, now: float) -> None:
        self._fips_blocks += 1
        self._fips_suspect = bool(result.failed)
        if not result.failed:
            return
        self._fips_failures += 1
        self._tainted = True
        if result.tripped:
            self._fail(
                f"FIPS 140-2: {self.config.fips_max_failures} failed blocks "
                f"(last: {', '.join(result.failed)})",
                now,
                result.end,
                permanent=False,
            )

    def _on_failure(self, failure: CutoffReached, now: float) -> None:
        if failure.test == "rct":
            self._rct_failures += 1
        else:
            self._apt_failures += 1
        level = "permanent" if failure.permanent else "cut-off"
        self._fail(
            f"{failure.detail} ({level} {failure.count})",
            now,
            failure.end,
            permanent=failure.permanent,
        )

    def _fail(self, reason: str, now: float, end: int, *, permanent: bool) -> None:
        self._tainted = True
        at = self._position + end
        # Only a new quarantine counts towards permanent failure: a stuck source
        # trips the APT again in every window, which is one incident, not many.
        if not permanent and self.state is not HealthState.QUARANTINED:
            times = self._failure_times
            times.append(now)
            while times and times[0] < now - self.config.failure_window:
                times.popleft()
            if len(times) >= self.config.permanent_failures:
                permanent = True
                reason = (
                    f"{len(times)} failures within "
                    f"{self.config.failure_window:g} s; last: {reason}"
                )
        if permanent:
            self.failed_at = now
            self._move(HealthState.FAILED, reason, now, at)
            return
        if self.state is not HealthState.QUARANTINED:
            self._quarantines += 1
            self._quarantined_since = now
        elif now - self._quarantined_since > self.config.quarantine_limit:
            self.failed_at = now
            self._move(
                HealthState.FAILED,
                f"still failing after {self.config.quarantine_limit:g} s in "
                f"quarantine; last: {reason}",
                now,
                at,
            )
            return
        self._startup_left = STARTUP_SAMPLES
        self._move(HealthState.QUARANTINED, reason, now, at)

    def _move(
        self, to: HealthState, reason: str, now: float, position: int
    ) -> HealthEvent:
        event = HealthEvent(self.state, to, reason, now, position)
        self.state = to
        self.reason = reason
        self._events.append(event)
        return event
