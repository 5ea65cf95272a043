"""
What feeds `broker.history`: readings of the `BrokerView`, turned into points
and events.

`Rates` turns the broker's counters (pool bytes in and out, credited bits per
source, bytes served and throttled requests per customer) into per-second
rates between two samples; a counter that went down (a customer removed and
added back by a reload, a source replaced) gives no rate for that sample
rather than a negative one. `Watcher` compares successive observations and
reports what changed as events: source states (with the reason and the time
the source changed), the tier feeding the pool, the endpoint of an upstream
source, the broker's phase. Both read no clock: the caller passes ``now``.
"""

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from broker.history import NAN, CustomerPoint, Event, Sample, SourcePoint
from broker.status import BrokerView, SourceStatus


def _number(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return NAN
    return float(value)


@dataclass(frozen=True, slots=True)
class Counters:
    """
    Monotonic counters read at one instant, by what they count.
    """

    at: float
    """Monotonic seconds of the reading."""
    values: Mapping[str, float]


def read_counters(
    broker: BrokerView, sources: list[SourceStatus], at: float
) -> Counters:
    """
    The counters rates are computed from.
    """
    stats = broker.pool.stats()
    values: dict[str, float] = {
        "pool/in": float(stats.bytes_in),
        "pool/out": float(stats.bytes_out),
    }
    for source in sources:
        values[f"source/{source.name}/credit"] = float(source.credited_bits)
    customers = broker.accounts.snapshot().get("customers", {})
    for name, customer in customers.items():
        values[f"customer/{name}/bytes"] = _number(customer.get("bytes_served"))
        values[f"customer/{name}/throttled"] = _number(
            customer.get("throttled_requests")
        )
    return Counters(at, values)


class Rates:
    """
    Per-second rates between the previous reading and this one.
    """

    def __init__(self) -> None:
        self._previous: Counters | None = None

    def update(self, counters: Counters) -> dict[str, float]:
        """
        Rates of every counter of ``counters``; NaN for a counter new since the
        previous reading or one that went down.
        """
        previous, self._previous = self._previous, counters
        if previous is None or counters.at <= previous.at:
            return {name: NAN for name in counters.values}
        elapsed = counters.at - previous.at
        rates = {}
        for name, value in counters.values.items():
            before = previous.values.get(name, NAN)
            delta = value - before
            rates[name] = delta / elapsed if delta >= 0 else NAN
        return rates


def build_sample(
    broker: BrokerView, sources: list[SourceStatus], rates: Mapping[str, float]
) -> Sample:
    """
    One sample of the broker from its view and the counters' rates.
    """
    points = {}
    for source in sources:
        details = source.details
        points[source.name] = SourcePoint(
            tier=source.priority,
            kind=source.kind,
            rate_bytes_per_s=float(source.rate),
            credit_bits_per_s=rates.get(f"source/{source.name}/credit", NAN),
            state=source.state,
            temperature_c=_number(details.get("temperature_c")),
            voltage_v=_number(details.get("voltage_v")),
        )
    customers = {}
    for name, value in rates.items():
        group, _, rest = name.partition("/")
        if group != "customer" or not rest.endswith("/bytes"):
            continue
        customer = rest.removesuffix("/bytes")
        customers[customer] = CustomerPoint(
            bytes_per_s=value,
            throttled_per_s=rates.get(f"customer/{customer}/throttled", NAN),
        )
    return Sample(
        level_bytes=float(broker.pool.level),
        in_bytes_per_s=rates.get("pool/in", NAN),
        out_bytes_per_s=rates.get("pool/out", NAN),
        connections=float(sum(sink.connections for sink in broker.sinks_status())),
        sources=points,
        customers=customers,
    )


@dataclass(frozen=True, slots=True)
class Observation:
    """
    What events are made of: the broker's phase, its feeding tier, and each
    source's state and upstream endpoint.
    """

    phase: str
    active_tier: int | None
    degraded: bool
    sources: Mapping[str, SourceStatus]


def observe(broker: BrokerView, sources: list[SourceStatus]) -> Observation:
    tiers = broker.tiers()
    return Observation(
        phase=str(broker.phase()),
        active_tier=tiers.active_tier,
        degraded=tiers.degraded,
        sources={source.name: source for source in sources},
    )


def _tier(tier: int | None) -> str:
    return "none" if tier is None else f"tier {tier}"


class Watcher:
    """
    Events between successive observations. The first observation only sets
    the baseline: a source seen for the first time makes no event.
    """

    def __init__(self) -> None:
        self._previous: Observation | None = None
        self._at = -math.inf

    def update(self, now: float, current: Observation) -> list[Event]:
        """
        The events since the previous observation, oldest first.

        Args:
            now: wall-clock time of ``current``.
            current: the broker as it is now.
        """
        previous, self._previous = self._previous, current
        since, self._at = self._at, now
        if previous is None:
            return []
        events = []
        if current.phase != previous.phase:
            events.append(
                Event(now, "phase", "broker", previous.phase, current.phase, "")
            )
        if current.active_tier != previous.active_tier:
            if current.active_tier is None:
                reason = "no healthy source"
            elif current.degraded:
                reason = "only a fallback tier feeds the pool"
            elif previous.active_tier is None or current.active_tier < (
                previous.active_tier
            ):
                reason = "a preferred tier is healthy again"
            else:
                reason = ""
            events.append(
                Event(
                    now,
                    "tier_change",
                    "broker",
                    _tier(previous.active_tier),
                    _tier(current.active_tier),
                    reason,
                )
            )
        for name, source in current.sources.items():
            before = previous.sources.get(name)
            if before is None:
                continue
            if source.state != before.state:
                # The source knows when it changed; trust it within the interval.
                when = source.since if since <= source.since <= now else now
                events.append(
                    Event(
                        when,
                        "source_state",
                        name,
                        before.state,
                        source.state,
                        source.reason,
                    )
                )
            events.extend(_endpoint_moves(now, name, before, source))
        events.sort(key=lambda event: event.time)
        return events


def _endpoint_moves(
    now: float, name: str, before: SourceStatus, after: SourceStatus
) -> list[Event]:
    moves_before = before.details.get("failovers")
    moves_after = after.details.get("failovers")
    if not isinstance(moves_before, int) or not isinstance(moves_after, int):
        return []
    if moves_after <= moves_before:
        return []
    return [
        Event(
            now,
            "failover",
            name,
            str(before.details.get("endpoint") or "none"),
            str(after.details.get("endpoint") or "none"),
            str(after.details.get("last_error") or ""),
        )
    ]
