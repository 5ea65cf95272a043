"""
Answers drawn from `broker.history`: a window of points, then its JSON.

The two halves are split so that a large answer costs the event loop little:
`take` copies the window's raw series (a memory copy per series, well under a
millisecond for a day of 10-s points) and must run where the rings are
written; `encode` turns the copy into JSON and touches no shared state, so it
can run in a worker thread. The shape::

    {"now", "resolution": "10s"|"1m", "step", "start", "points",
     "pool": {"level_bytes": [...], "in_bytes_per_s", "out_bytes_per_s",
              "connections"},
     "sources": {name: {"tier", "kind", "rate_bytes_per_s",
                        "credit_bits_per_s", "state", "temperature_c",
                        "voltage_v"}},
     "customers": {id: {"bytes_per_s", "throttled_per_s"}},
     "events": [{"time", "kind", "subject", "from", "to", "reason"}],
     "memory_bytes"}

Point ``i`` of every list is at ``start + i * step``; ``null`` is no data.
"""

import json
import math
from array import array
from dataclasses import dataclass
from typing import Final

from broker.history import (
    CUSTOMER_SERIES,
    POOL_SERIES,
    SOURCE_SERIES,
    STATES,
    Event,
    History,
    Ring,
    series_name,
)

RESOLUTIONS: Final = {"10s": "fine", "1m": "coarse"}
"""Names a client asks for, and the ring each one reads."""


@dataclass(frozen=True, slots=True)
class Window:
    """
    A copy of the points and events an answer holds, safe to encode anywhere.
    """

    now: float
    resolution: str
    step: float
    start: float
    points: int
    series: dict[str, "array[float]"]
    sources: dict[str, tuple[int, str]]
    customers: tuple[str, ...]
    events: tuple[Event, ...]
    memory_bytes: int


def take(
    history: History,
    now: float,
    resolution: str = "10s",
    *,
    last: float | None = None,
    since: float | None = None,
) -> Window:
    """
    The points of one resolution: the whole ring by default, those of the last
    ``last`` seconds before ``now``, or those strictly after ``since``; and the
    events of the same span.

    Raises:
        ValueError: an unknown resolution.
    """
    if resolution not in RESOLUTIONS:
        raise ValueError(f"unknown resolution {resolution!r}")
    ring: Ring = getattr(history, RESOLUTIONS[resolution])
    step = ring.step
    oldest, head = ring.oldest(), ring.head
    if oldest is None or head is None:
        oldest, head = ring.slot(now), ring.slot(now) - 1
    begin = oldest
    after: float | None = None
    if since is not None:
        after = since
        begin = max(begin, math.floor(since / step) + 1)
    elif last is not None:
        after = now - last
        begin = max(begin, math.ceil(after / step))
    count = max(0, head - begin + 1)
    series = {name: _copy(ring, name, begin, count) for name in ring.series}
    events = tuple(
        event for event in history.events if after is None or event.time > after
    )
    return Window(
        now=now,
        resolution=resolution,
        step=step,
        start=begin * step,
        points=count,
        series=series,
        sources=dict(history.sources),
        customers=tuple(sorted(history.customers)),
        events=events,
        memory_bytes=history.memory_bytes(),
    )


def _copy(ring: Ring, name: str, begin: int, count: int) -> "array[float]":
    values = ring.series[name]
    capacity = ring.capacity
    if count <= 0:
        return array("d")
    first = begin % capacity
    end = first + count
    if end <= capacity:
        return values[first:end]
    return values[first:] + values[: end - capacity]


def _numbers(values: "array[float] | None", count: int) -> str:
    if values is None:
        return "[" + ",".join(["null"] * count) + "]"
    # json writes NaN for NaN; the name cannot occur otherwise in a list of
    # numbers, so replacing it is exact and far cheaper than a per-item test.
    return json.dumps(values.tolist()).replace("NaN", "null")


def _states(values: "array[float] | None", count: int) -> str:
    if values is None:
        return _numbers(None, count)
    return json.dumps(
        [None if code != code else STATES[int(code)] for code in values.tolist()]
    )


def encode(window: Window) -> bytes:
    """
    The JSON answer for ``window``.
    """
    count = window.points
    series = window.series
    parts = [
        '{"now":',
        json.dumps(window.now),
        ',"resolution":',
        json.dumps(window.resolution),
        ',"step":',
        json.dumps(window.step),
        ',"start":',
        json.dumps(window.start),
        ',"points":',
        str(count),
        ',"pool":{',
    ]
    parts.append(
        ",".join(
            f'"{name}":' + _numbers(series.get(series_name("pool", "", name)), count)
            for name in POOL_SERIES
        )
    )
    parts.append('},"sources":{')
    sources = []
    for source, (tier, kind) in sorted(window.sources.items()):
        fields = [f'"tier":{int(tier)}', f'"kind":{json.dumps(kind)}']
        for name in SOURCE_SERIES:
            values = series.get(series_name("source", source, name))
            text = _states(values, count) if name == "state" else None
            fields.append(
                f'"{name}":' + (text if text is not None else _numbers(values, count))
            )
        sources.append(json.dumps(source) + ":{" + ",".join(fields) + "}")
    parts.append(",".join(sources))
    parts.append('},"customers":{')
    parts.append(
        ",".join(
            json.dumps(customer)
            + ":{"
            + ",".join(
                f'"{name}":'
                + _numbers(series.get(series_name("customer", customer, name)), count)
                for name in CUSTOMER_SERIES
            )
            + "}"
            for customer in window.customers
        )
    )
    parts.append('},"events":')
    parts.append(json.dumps([event.to_json() for event in window.events]))
    parts.append(',"memory_bytes":')
    parts.append(str(window.memory_bytes))
    parts.append("}")
    return "".join(parts).encode()
