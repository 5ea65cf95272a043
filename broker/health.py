"""
Continuous health tests for entropy sources, and the per-source state machine
that decides which bytes may be credited.

The tests are NIST SP 800-90B's Repetition Count Test (RCT, §4.4.1) and
Adaptive Proportion Test (APT, §4.4.2), a test for periodic output, plus the
optional FIPS 140-2 (2001) block tests the way rngd runs them. Everything here
is pure: no I/O, no clock; the caller passes ``now``. The cut-off formulas are
in `broker.health_cutoffs`, the periodic-output test in
`broker.health_repeats` and the FIPS tests in `broker.fips`; the arithmetic
behind every default is below and in those modules.

Theory of operation
-------------------
Each source has one `SourceHealth`. Every byte the source yields goes through
`SourceHealth.feed`, which runs these tests over the byte stream:

* the RCT on 64-bit words (8-byte samples, aligned to the start of the stream),
* the APT on bytes with a window of 512,
* the repeat test (`RepeatTest`, on unless ``repeats = false``): every 512
  bytes a group of four short sub-probes, two of them searched for in the
  64 KiB before it; two sub-probes repeating at one distance fail, so a
  counter or a replayed block fails at any period up to 64 KiB, even when each
  copy carries a sequence number,
* optionally the FIPS 140-2 tests on 2,500-byte blocks (`Fips140Tester`).

The tests are continuous: their state (the current run, the current window,
the current FIPS block) carries across `feed` calls and across failures, so
the outcome depends only on the byte stream, never on how it was split into
calls. A test *fails* at the sample where its count first reaches a cut-off;
a run or window that keeps going past the cut-off is the same failure, not a
new one. Each test has two cut-offs: the intermittent one (alpha = 2^alpha_log2)
and a permanent one (alpha = 2^permanent_alpha_log2, jitterentropy's 2^-60).

States (`HealthState`) and who moves them::

    STARTUP ──1,024 fresh samples──▶ HEALTHY
       │                                │
       └──failure──▶ QUARANTINED ◀──failure, or a failed FIPS block──┘
                      │    ▲
                      │    └─failure (start-up restarts)
                      └──1,024 fresh samples (and a passing FIPS block
                         after a failed one)──▶ HEALTHY
    any state ──permanent cut-off, or `permanent_failures` failures
                within `failure_window` seconds──▶ FAILED (terminal)
    any state but FAILED ──reset()──▶ STARTUP

Invariants: a byte is creditable only if it was tested while HEALTHY, and
every byte tested while HEALTHY is credited unless its `feed` call saw a
failure: a source that is not credited never shows HEALTHY. A `feed` call in
which any test failed (including a single failed FIPS block) credits nothing.
A failed FIPS block quarantines the source until a later block passes, but
it is not a failure of the source: it does not count towards
`permanent_failures` nor in ``quarantines`` (rngd's leaky count decides when
failed blocks are a fault). FAILED is never left, not even by `reset` (a
reopened device does not clear a permanent fault; restart the broker to
clear it).

A start-up test (initial, after a failure, or after `reset`) is 1,024 fresh
samples (bytes): samples after the last failing one. A run that stays stuck
past the RCT cut-off, or an APT window whose value keeps recurring past the
cut-off, is one failure but every sample of it is failing (`FailingSpan`),
so stuck output after the failure point never counts towards re-admission.
Because 1,024 ≥ 2*512 - 1 a start-up test always contains a full APT window,
and because probe groups start every 512 bytes and are at most 512 long, a
whole repeat-test group.

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
    ``apt_alpha_log2 = -40``: at 2^-30 a fleet of byte-sampled sources
    would raise false alarms weekly.
  - permanent alpha = 2^-60 → C = 25: 2.4e-18 per window, never in practice.

* Repeat test: a group of four 29-byte sub-probes every 512 bytes, two
  searched for in the 64 KiB before it; a failure needs two sub-probes to
  match at one distance: at most 5·2^(16 - 2·8·29) = 5·2^-448 per group at
  H = 8, never in practice; `broker.health_repeats` has the table for lower
  credits (at most 2^apt_alpha_log2 per group).
* FIPS 140-2 (optional): a healthy source's failed blocks are forgiven by a
  leaky count; `broker.fips` gives the false-quarantine rates behind the
  default ``fips_max_failures = 40``.

Permanent failure: 3 failures within an hour (defaults). With the rates above a
healthy source essentially never has two, so three in an hour is a fault.
"""

from collections import deque
from dataclasses import dataclass
from enum import Enum

from broker.fips import (
    FIPS_BLOCK_BYTES,
    FIPS_FORGIVE_EVERY,
    Fips140Tester,
    FipsBlockResult,
    fips_block_failures,
)
from broker.health_config import AlphaLog2, HealthConfig
from broker.health_cutoffs import APT_WINDOW, APT_WINDOW_BINARY, apt_cutoff, rct_cutoff
from broker.health_repeats import RepeatTest, probe_length
from broker.health_tests import (
    AdaptiveProportionTest,
    CutoffReached,
    FailingSpan,
    RepetitionCountTest,
)

# The tests and the cut-off arithmetic live in their own modules; they are
# re-exported because callers know them as part of the health API.
__all__ = [
    "APT_WINDOW",
    "APT_WINDOW_BINARY",
    "FIPS_BLOCK_BYTES",
    "FIPS_FORGIVE_EVERY",
    "MIN_TEST_CREDIT",
    "RCT_SAMPLE_BYTES",
    "STARTUP_SAMPLES",
    "AdaptiveProportionTest",
    "AlphaLog2",
    "CutoffReached",
    "FailingSpan",
    "Fips140Tester",
    "FipsBlockResult",
    "HealthConfig",
    "HealthCounters",
    "HealthEvent",
    "HealthState",
    "HealthVerdict",
    "RepeatTest",
    "RepetitionCountTest",
    "SourceHealth",
    "apt_cutoff",
    "fips_block_failures",
    "probe_length",
    "rct_cutoff",
]

STARTUP_SAMPLES = 1024
"""Samples (bytes) a start-up test must pass before anything is credited."""
RCT_SAMPLE_BYTES = 8
"""The RCT in `SourceHealth` runs on 64-bit words."""
MIN_TEST_CREDIT = 0.125
"""Bits per byte assumed by the tests for a source credited less (e.g. 0)."""


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
    hold: bool = False
    """Entering or leaving a FIPS hold: expected now and then of a healthy
    source (about one block in 1,270), so worth a note, not an alarm."""


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
    repeat_failures: int
    """Repeat-test probes found earlier in the stream."""
    fips_blocks: int
    fips_failures: int
    """Failed FIPS blocks (each quarantines until a block passes, but is not
    a source failure by itself)."""
    startups_passed: int
    quarantines: int
    """Quarantines for a source failure (not the holds after a failed FIPS
    block): the ones that count towards `HealthConfig.permanent_failures`."""


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
        self.repeats = (
            RepeatTest(probe_length(h, config.apt_alpha_log2))
            if config.repeats
            else None
        )
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
        self._stale_until = 0
        self._counted = False
        self._samples = 0
        self._rct_failures = 0
        self._apt_failures = 0
        self._repeat_failures = 0
        self._fips_blocks = 0
        self._fips_failures = 0
        self._startups = 0
        self._quarantines = 0
        self._quarantined_since = 0.0

    @property
    def holding(self) -> bool:
        """
        Quarantined by a failed FIPS block alone (a hold), not by a failure.
        """
        return self.state is HealthState.QUARANTINED and not self._counted

    @property
    def counters(self) -> HealthCounters:
        """
        A snapshot of the totals.
        """
        return HealthCounters(
            samples_tested=self._samples,
            rct_failures=self._rct_failures,
            apt_failures=self._apt_failures,
            repeat_failures=self._repeat_failures,
            fips_blocks=self._fips_blocks,
            fips_failures=self._fips_failures,
            startups_passed=self._startups,
            quarantines=self._quarantines,
        )

    def reset(self, now: float) -> HealthEvent | None:
        """
        Start over after the device was reopened: a fresh start-up test.

        Failures already counted towards `HealthConfig.permanent_failures`
        stay counted, and FAILED stays FAILED. The repeat test keeps its
        window: a reopened device that replays what it sent before is caught.

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
        found: list[CutoffReached | FipsBlockResult | FailingSpan] = []
        found += self.rct.feed(data)
        found += self.rct.failing
        found += self.apt.feed(data)
        found += self.apt.failing
        if self.repeats is not None:
            found += self.repeats.feed(data)
        if self.fips is not None:
            found += self.fips.feed(data)
        found.sort(key=_order)
        self._events = []
        self._credit = 0
        self._tainted = False
        self._stale_until = 0
        pos = 0
        for item in found:
            if isinstance(item, FailingSpan):
                # A span opens at its first failing sample; its crossing (same
                # position, sorted first) has already quarantined the source,
                # or did so in an earlier call.
                if item.start > pos:
                    self._advance(pos, item.start, now, before_failure=True)
                    pos = item.start
                self._startup_left = STARTUP_SAMPLES
                self._stale_until = max(self._stale_until, item.end)
                continue
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
        Account for bytes ``pos:end`` with no new failure among them.
        """
        if self.state is HealthState.HEALTHY:
            self._credit += end - pos
            return
        # Samples of a failing span are no start-up samples.
        pos = max(pos, self._stale_until)
        if end <= pos:
            return
        left = self._startup_left
        span = end - pos
        # A failure in the sample that ends at `end` belongs to the start-up
        # test if that sample is one of its last bytes.
        if left < span or (left == span and not before_failure):
            if self._fips_suspect:
                # Complete, but held until a FIPS block passes (`_on_fips`).
                self._startup_left = 0
                return
            self._pass_startup(now, pos + left)
            self._credit += span - left
        else:
            self._startup_left = left - span

    def _pass_startup(self, now: float, end: int) -> None:
        self._startups += 1
        self._startup_left = 0
        self._move(
            HealthState.HEALTHY,
            f"start-up test passed ({STARTUP_SAMPLES} samples)",
            now,
            self._position + end,
        )

    def _on_fips(self, result: FipsBlockResult, now: float) -> None:
        self._fips_blocks += 1
        if not result.failed:
            if self._fips_suspect:
                self._fips_suspect = False
                if self.state is not HealthState.HEALTHY and self._startup_left == 0:
                    self._pass_startup(now, result.end)
            return
        self._fips_suspect = True
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
        else:
            self._fail(
                f"FIPS 140-2 block failed ({', '.join(result.failed)}): "
                "nothing is credited until a block passes",
                now,
                result.end,
                permanent=False,
                counted=False,
            )

    def _on_failure(self, failure: CutoffReached, now: float) -> None:
        if failure.test == "repeat":
            self._repeat_failures += 1
            self._fail(failure.detail, now, failure.end, permanent=False)
            return
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

    def _fail(
        self,
        reason: str,
        now: float,
        end: int,
        *,
        permanent: bool,
        counted: bool = True,
    ) -> None:
        """
        Quarantine (or fail) the source at byte ``end`` of the fed data.

        ``counted=False`` is a hold, not a source failure: it quarantines but
        counts neither towards `HealthConfig.permanent_failures` nor in
        ``quarantines``.
        """
        self._tainted = True
        at = self._position + end
        quarantined = self.state is HealthState.QUARANTINED
        # Only the first failure of a quarantine counts towards permanent
        # failure: a stuck source trips the APT again in every window, which
        # is one incident, not many.
        new_incident = counted and not (quarantined and self._counted)
        if not permanent and new_incident:
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
        if not quarantined:
            self._quarantined_since = now
            self._counted = False
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
        # A failure while quarantined restarts the start-up test and is
        # reported as an event, but `reason` keeps saying why the source was
        # quarantined: a stuck source trips the APT in every window, and the
        # status would otherwise trade the first cause for the latest echo. A
        # source failure does replace the reason of a FIPS hold, though.
        keep = self.reason if quarantined and not new_incident else reason
        if new_incident:
            self._quarantines += 1
            self._counted = True
        self._move(HealthState.QUARANTINED, reason, now, at)
        self.reason = keep

    def _move(
        self, to: HealthState, reason: str, now: float, position: int
    ) -> HealthEvent:
        # `_counted` is False for the whole of a quarantine that is only a hold.
        hold = not self._counted and (
            to is HealthState.QUARANTINED
            or (self.state is HealthState.QUARANTINED and to is HealthState.HEALTHY)
        )
        event = HealthEvent(self.state, to, reason, now, position, hold)
        self.state = to
        self.reason = reason
        self._events.append(event)
        return event


def _order(item: CutoffReached | FipsBlockResult | FailingSpan) -> tuple[int, int]:
    """
    Stream order: each result at its last byte, each failing span at its first,
    after the crossing that opens it.
    """
    if isinstance(item, FailingSpan):
        return (item.start, 1)
    return (item.end, 0)
