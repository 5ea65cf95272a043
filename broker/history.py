"""
The broker's recent past, in memory: what operators graph.

Two rings of fixed-size numeric series: one point every `FINE_STEP` (10 s) for
24 h (`FINE_POINTS` = 8,640 points), and one point a minute for 7 days
(`COARSE_POINTS` = 10,080 points). The minute ring is a rollup of the 10-s one,
recomputed from the six 10-s points of its minute whenever one of them is
written, so it needs no state of its own and survives a restart unchanged:

- rates, levels and connections: the mean of the points that have data;
- source state: the last state of the minute (every change is an event too);
- Entropy Key temperature: the maximum (a hot spike is what an operator looks
  for); supply voltage: the minimum (a sagging supply is).

A point is addressed by its slot, ``floor(time / step)``: point ``i`` of an
answer is at ``start + i * step``. Missing data (the broker was down, a source
was not there yet, a counter was reset) is NaN and reads as JSON ``null``.
Samples may only move forward: one for a slot older than the newest point (the
wall clock stepped back) is dropped until the clock passes that point again,
so a step back can never overwrite or reorder the past. A step back of more
than `REWIND_AFTER` (an hour) means the clock was wrong before, not now: the
rings start afresh at the new time, with a ``gap`` event saying why.

Memory is bounded and computable. Each series holds
``8 * (FINE_POINTS + COARSE_POINTS)`` = 149,760 bytes (``array('d')``, NaN for
"no data"); a series is allocated the first time it holds a number, so sources
without a thermometer cost nothing for temperature and voltage. There are at most
``4 + 5 * sources + 2 * customers`` series, sources capped at `MAX_SOURCES` and
customers at `MAX_CUSTOMERS`; e.g. 4 sources and 20 customers: 64 series,
9,584,640 bytes (9.1 MiB), plus at most `MAX_EVENTS` events (a few hundred bytes
each). The caps put the worst case at 836 series, 125,199,360 bytes (119 MiB):
sources and customers come from the config, and one past a cap is not
recorded.

This module reads no clock and does no I/O: every call takes ``now``.
"""

import math
from array import array
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Final, Protocol, runtime_checkable

FINE_STEP: Final = 10.0
FINE_POINTS: Final = 8_640
"""24 h of 10-s points."""
COARSE_FACTOR: Final = 6
"""Fine points per coarse point: a minute of 10-s points."""
COARSE_POINTS: Final = 10_080
"""7 days of 1-min points."""
MAX_EVENTS: Final = 1_000
REWIND_AFTER: Final = 3_600.0
"""Seconds the wall clock may step back before the rings start afresh."""
MAX_SOURCES: Final = 64
MAX_CUSTOMERS: Final = 256
BYTES_PER_POINT: Final = array("d").itemsize

NAN: Final = math.nan

STATES: Final = ("starting", "healthy", "quarantined", "stalled", "failed", "stopped")
"""Source states, stored as their index in this tuple."""
STATE_CODES: Final = {state: float(code) for code, state in enumerate(STATES)}

POOL_SERIES: Final = ("level_bytes", "in_bytes_per_s", "out_bytes_per_s", "connections")
SOURCE_SERIES: Final = (
    "rate_bytes_per_s",
    "credit_bits_per_s",
    "state",
    "temperature_c",
    "voltage_v",
)
CUSTOMER_SERIES: Final = ("bytes_per_s", "throttled_per_s")

EVENT_KINDS: Final = ("source_state", "tier_change", "failover", "phase", "gap")


@dataclass(frozen=True, slots=True)
class SourcePoint:
    """
    One source at one sampling instant. NaN: no figure.
    """

    tier: int
    kind: str
    rate_bytes_per_s: float
    credit_bits_per_s: float
    state: str
    temperature_c: float = NAN
    voltage_v: float = NAN


@dataclass(frozen=True, slots=True)
class CustomerPoint:
    """
    One customer at one sampling instant. NaN: no figure.
    """

    bytes_per_s: float
    throttled_per_s: float


@dataclass(frozen=True, slots=True)
class Sample:
    """
    Everything recorded at one sampling instant. NaN: no figure (e.g. the first
    sample, which has no previous counters to compute a rate from).
    """

    level_bytes: float
    in_bytes_per_s: float
    out_bytes_per_s: float
    connections: float
    sources: Mapping[str, SourcePoint] = field(default_factory=dict)
    customers: Mapping[str, CustomerPoint] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Event:
    """
    Something that happened: a source changed state, the feeding tier changed,
    an upstream source moved to another endpoint, the broker changed phase, or
    the broker was not running (``gap``).
    """

    time: float
    kind: str
    subject: str
    before: str
    after: str
    reason: str

    def to_json(self) -> dict[str, object]:
        return {
            "time": self.time,
            "kind": self.kind,
            "subject": self.subject,
            "from": self.before,
            "to": self.after,
            "reason": self.reason,
        }


def _rollup(name: str) -> str:
    if name == "state":
        return "last"
    if name == "temperature_c":
        return "max"
    if name == "voltage_v":
        return "min"
    return "mean"


def _aggregate(values: Iterable[float], how: str) -> float:
    present = [value for value in values if value == value]
    if not present:
        return NAN
    if how == "last":
        return present[-1]
    if how == "max":
        return max(present)
    if how == "min":
        return min(present)
    return sum(present) / len(present)


class Ring:
    """
    Series of one resolution: ``capacity`` points, ``step`` seconds apart, all
    ending at the same newest slot.

    Slot ``k`` (the point at ``k * step``) lives at index ``k % capacity`` of
    every series; `head` is the newest slot written, `first` the oldest slot
    that ever held a sample (so a fresh broker does not answer a day of nulls).
    """

    def __init__(self, step: float, capacity: int) -> None:
        self.step = step
        self.capacity = capacity
        self.head: int | None = None
        self.first: int | None = None
        self.series: dict[str, array[float]] = {}

    def slot(self, time: float) -> int:
        return math.floor(time / self.step)

    def clear(self) -> None:
        """
        Forget every point (the series stay allocated, all NaN).
        """
        self.head = self.first = None
        for values in self.series.values():
            _blank(values, 0, self.capacity - 1, self.capacity)

    def oldest(self) -> int | None:
        """
        The oldest slot still held, or None before the first sample.
        """
        if self.head is None or self.first is None:
            return None
        return max(self.first, self.head - self.capacity + 1)

    def advance(self, slot: int) -> bool:
        """
        Make ``slot`` the newest, blanking the slots skipped on the way.

        Returns:
            False when ``slot`` is older than the newest slot (nothing changes).
        """
        head = self.head
        if head is None:
            self.head = self.first = slot
            return True
        if slot < head:
            return False
        if slot > head:
            skipped = min(slot - head, self.capacity)
            for values in self.series.values():
                _blank(values, slot - skipped + 1, slot, self.capacity)
            self.head = slot
        return True

    def put(self, name: str, slot: int, value: float) -> None:
        """
        Write ``value`` at ``slot`` (which must be within the ring).
        """
        values = self.series.get(name)
        if values is None:
            if value != value:
                return
            values = self.series[name] = array("d", [NAN]) * self.capacity
        values[slot % self.capacity] = value

    def get(self, name: str, slot: int) -> float:
        values = self.series.get(name)
        if values is None:
            return NAN
        return values[slot % self.capacity]

    def window(self, name: str, start: int, count: int) -> list[float]:
        """
        ``count`` values from slot ``start`` on, oldest first.
        """
        values = self.series.get(name)
        if values is None or count <= 0:
            return [NAN] * max(count, 0)
        begin = start % self.capacity
        end = begin + count
        if end <= self.capacity:
            return values[begin:end].tolist()
        return values[begin:].tolist() + values[: end - self.capacity].tolist()

    def memory_bytes(self) -> int:
        return len(self.series) * self.capacity * BYTES_PER_POINT


def _blank(values: "array[float]", first: int, last: int, capacity: int) -> None:
    # Slots first..last (inclusive, at most ``capacity`` of them) become NaN.
    count = last - first + 1
    begin = first % capacity
    end = begin + count
    if end <= capacity:
        values[begin:end] = array("d", [NAN]) * count
    else:
        values[begin:] = array("d", [NAN]) * (capacity - begin)
        values[: end - capacity] = array("d", [NAN]) * (end - capacity)


def series_name(group: str, subject: str, name: str) -> str:
    """
    The key of one series: ``pool//level_bytes``, ``source/ekey-1/state``,
    ``customer/acme/bytes_per_s``.
    """
    return f"{group}/{subject}/{name}"


class History:
    """
    The two rings, what is known of each recorded source, and the events.

    Args:
        step: seconds between two fine points (`FINE_STEP`; shorter in tests).
        fine_points: capacity of the fine ring.
        coarse_points: capacity of the coarse ring, whose step is
            ``COARSE_FACTOR * step``.
    """

    def __init__(
        self,
        step: float = FINE_STEP,
        *,
        fine_points: int = FINE_POINTS,
        coarse_points: int = COARSE_POINTS,
        max_events: int = MAX_EVENTS,
    ) -> None:
        self.fine = Ring(step, fine_points)
        self.coarse = Ring(step * COARSE_FACTOR, coarse_points)
        self.sources: dict[str, tuple[int, str]] = {}
        """Tier and kind of every source that has points, by name."""
        self.customers: set[str] = set()
        self.events: deque[Event] = deque(maxlen=max_events)
        self.dropped = 0
        """Samples dropped because the clock was behind the newest point."""

    @property
    def step(self) -> float:
        return self.fine.step

    def record(self, now: float, sample: Sample) -> bool:
        """
        Store ``sample`` as the point of the slot ``now`` falls in (a second
        sample in the same slot replaces the first), and update that minute's
        rollup.

        Returns:
            False when the sample was dropped: ``now`` is before the newest
            point (the wall clock stepped back).
        """
        fine = self.fine
        slot = fine.slot(now)
        head = fine.head
        if head is not None and (head - slot) * fine.step > REWIND_AFTER:
            # The newest points were stamped by a clock far ahead of the right
            # time: they are not the past of this sample, so start afresh
            # rather than show nothing until that clock's time comes again.
            self.fine.clear()
            self.coarse.clear()
            self.add_event(
                Event(
                    now,
                    "gap",
                    "broker",
                    "",
                    "",
                    f"wall clock went back {(head - slot) * fine.step:.0f} s: "
                    "points recorded before were dropped",
                )
            )
        if not fine.advance(slot):
            self.dropped += 1
            return False
        coarse_slot = slot // COARSE_FACTOR
        if not self.coarse.advance(coarse_slot):
            # Cannot happen while both rings move together; never write behind.
            self.dropped += 1
            return False
        values = self._flatten(sample)
        # A series without a value in this sample is blank at this slot (the
        # slot may hold an older lap's value, or this slot's earlier sample).
        for name in fine.series.keys() - values.keys():
            fine.put(name, slot, NAN)
        for name, value in values.items():
            fine.put(name, slot, value)
        self._roll_up(coarse_slot)
        return True

    def _flatten(self, sample: Sample) -> dict[str, float]:
        values = {
            series_name("pool", "", "level_bytes"): sample.level_bytes,
            series_name("pool", "", "in_bytes_per_s"): sample.in_bytes_per_s,
            series_name("pool", "", "out_bytes_per_s"): sample.out_bytes_per_s,
            series_name("pool", "", "connections"): sample.connections,
        }
        for name, source in sample.sources.items():
            if name not in self.sources and len(self.sources) >= MAX_SOURCES:
                continue
            self.sources[name] = (source.tier, source.kind)
            values[series_name("source", name, "rate_bytes_per_s")] = (
                source.rate_bytes_per_s
            )
            values[series_name("source", name, "credit_bits_per_s")] = (
                source.credit_bits_per_s
            )
            values[series_name("source", name, "state")] = STATE_CODES.get(
                source.state, NAN
            )
            values[series_name("source", name, "temperature_c")] = source.temperature_c
            values[series_name("source", name, "voltage_v")] = source.voltage_v
        for name, customer in sample.customers.items():
            if name not in self.customers and len(self.customers) >= MAX_CUSTOMERS:
                continue
            self.customers.add(name)
            values[series_name("customer", name, "bytes_per_s")] = customer.bytes_per_s
            values[series_name("customer", name, "throttled_per_s")] = (
                customer.throttled_per_s
            )
        return values

    def _roll_up(self, coarse_slot: int) -> None:
        fine, coarse = self.fine, self.coarse
        begin = coarse_slot * COARSE_FACTOR
        oldest, end = fine.oldest(), fine.head
        if oldest is None or end is None:
            return
        # The minute's points still in the fine ring (all of them, normally).
        begin = max(begin, oldest)
        for name in fine.series:
            how = _rollup(name.rsplit("/", 1)[1])
            values = (fine.get(name, slot) for slot in range(begin, end + 1))
            coarse.put(name, coarse_slot, _aggregate(values, how))

    def add_event(self, event: Event) -> None:
        """
        Keep ``event``; the oldest goes once `MAX_EVENTS` are kept.
        """
        self.events.append(event)

    def memory_bytes(self) -> int:
        """
        Bytes the rings' series hold.
        """
        return self.fine.memory_bytes() + self.coarse.memory_bytes()


@runtime_checkable
class Recorded(Protocol):
    """
    A broker that keeps a `History` (a sink checks for it before answering).
    """

    @property
    def history(self) -> History: ...
