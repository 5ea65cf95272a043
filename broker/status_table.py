"""
``ebroker status`` for people and for monitoring: a verdict and a table.

`verdict` reads a ``/v1/status`` document and answers as a Nagios/Icinga
plugin does: a state, an exit code and a one-line summary.

====  ========  ======================================================
code  state     when
====  ========  ======================================================
0     OK        health ``ok`` and serving, every source healthy or an
                optional device simply absent
1     WARNING   health ``degraded`` (a fallback tier feeds the pool, the
                budget store is unreachable, a configured source cannot
                run); starting, draining or closing; any source
                quarantined, stalled or failed while another serves; a
                customer at or past `QUOTA_WARNING` of its quota
2     CRITICAL  health ``unhealthy`` (no healthy source and the pool
                below its low watermark): the broker is not serving
3     UNKNOWN   no broker answered, or not with a status document (the
                command line decides this one; see ``broker.cli``)
====  ========  ======================================================

`render` draws the same facts as the status page as aligned plain-text tables:
health and phase, the pool, each source, the sinks, the budget store and the
customers. Colour (ANSI) only when the caller says so: the command line asks
for it on a terminal without ``NO_COLOR``.
"""

import enum
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

QUOTA_WARNING = 0.9
"""Share of a customer's quota used at which the verdict becomes WARNING."""

_TROUBLED = ("quarantined", "stalled", "failed")


class Verdict(enum.IntEnum):
    """
    Monitoring-plugin states, valued as their exit codes.
    """

    OK = 0
    WARNING = 1
    CRITICAL = 2
    UNKNOWN = 3


@dataclass(frozen=True, slots=True)
class Assessment:
    """
    The verdict on one status document, and why.
    """

    verdict: Verdict
    summary: str
    problems: tuple[str, ...]

    def plugin_line(self, perfdata: str = "") -> str:
        """
        The first line a monitoring plugin prints:
        ``EBROKER WARNING - summary; problem | perfdata``.
        """
        text = "; ".join((self.summary, *self.problems))
        line = f"EBROKER {self.verdict.name} - {text}"
        return f"{line} | {perfdata}" if perfdata else line


def _sources(document: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    return [s for s in document.get("sources") or [] if isinstance(s, Mapping)]


def _customers(document: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
    customers = (document.get("accounts") or {}).get("customers") or {}
    return {str(k): v for k, v in customers.items() if isinstance(v, Mapping)}


def verdict(document: Mapping[str, Any]) -> Assessment:
    """
    Judge a ``/v1/status`` document.

    Raises:
        ValueError: the document lacks the health or phase a broker reports.
    """
    health = document.get("health")
    if not isinstance(health, Mapping) or "status" not in health:
        raise ValueError("status document has no health")
    word = str(health["status"])
    phase = str(document.get("phase", "?"))
    sources = _sources(document)
    healthy = sum(1 for s in sources if s.get("state") == "healthy")
    summary = f"{phase}, health {word}, {healthy} of {len(sources)} sources healthy"
    problems: list[str] = [str(reason) for reason in health.get("reasons") or []]
    if word == "unhealthy":
        return Assessment(Verdict.CRITICAL, summary, tuple(problems))
    level = Verdict.OK if word == "ok" else Verdict.WARNING
    if phase != "serving":
        level = Verdict.WARNING
    for source in sources:
        if source.get("state") in _TROUBLED:
            level = Verdict.WARNING
            problems.append(
                f"source {source.get('name')} {source.get('state')}: "
                f"{source.get('reason')}"
            )
    for name, customer in _customers(document).items():
        quota = customer.get("quota")
        if isinstance(quota, Mapping) and quota.get("limit"):
            share = float(quota.get("used", 0)) / float(quota["limit"])
            if share >= QUOTA_WARNING:
                level = Verdict.WARNING
                problems.append(f"customer {name} used {share:.0%} of its quota")
    return Assessment(level, summary, tuple(dict.fromkeys(problems)))


def perfdata(document: Mapping[str, Any]) -> str:
    """
    Plugin performance data: pool level, per-source rates, bytes served.
    """
    pool = document.get("pool") or {}
    fields = [
        f"pool_bytes={pool.get('level', 0)}B;;;0;{pool.get('capacity', '')}",
        f"served_bytes={pool.get('bytes_out', 0)}c",
    ]
    for source in _sources(document):
        name = str(source.get("name", "?")).replace("'", "_")
        fields.append(f"'rate_{name}'={float(source.get('rate') or 0):.0f}")
    return " ".join(fields)


# ---- rendering ----------------------------------------------------------------------

_COLOURS = {"green": "32", "yellow": "33", "red": "31", "bold": "1", "dim": "2"}
_STATE_COLOURS = {
    "ok": "green",
    "healthy": "green",
    "serving": "green",
    "degraded": "yellow",
    "starting": "yellow",
    "draining": "yellow",
    "closing": "yellow",
    "shutting_down": "yellow",
    "stalled": "yellow",
    "quarantined": "red",
    "failed": "red",
    "unhealthy": "red",
    "stopped": "dim",
}
_VERDICT_COLOURS = {
    Verdict.OK: "green",
    Verdict.WARNING: "yellow",
    Verdict.CRITICAL: "red",
    Verdict.UNKNOWN: "red",
}


class _Painter:
    def __init__(self, colour: bool) -> None:
        self.colour = colour

    def __call__(self, text: str, name: str | None) -> str:
        if not self.colour or name is None:
            return text
        return f"\x1b[{_COLOURS[name]}m{text}\x1b[0m"

    def state(self, text: str) -> str:
        return self(text, _STATE_COLOURS.get(text.split(" ", 1)[0]))


def size(count: float) -> str:
    """
    A byte count for people: ``512 B``, ``28.8 KiB``, ``1.0 MiB``.
    """
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")  # pragma: no cover - the loop returns


def rate(per_second: float | None) -> str:
    """
    A byte rate for people, or ``-`` when unknown.
    """
    return "-" if per_second is None else f"{size(per_second)}/s"


def duration(seconds: float) -> str:
    """
    ``3d4h``, ``2h5m``, ``4m10s`` or ``12s``.
    """
    whole = int(seconds)
    days, rest = divmod(whole, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d{hours}h"
    if hours:
        return f"{hours}h{minutes}m"
    return f"{minutes}m{secs}s" if minutes else f"{secs}s"


def table(
    headers: Sequence[str],
    rows: Sequence[Sequence[str]],
    paint: Sequence[Any] | None = None,
) -> list[str]:
    """
    Aligned columns, two spaces apart, indented by two; ``paint`` holds, per
    column, a function applied to each cell after padding (so colour codes
    never upset the alignment), or None.
    """
    widths = [
        max(len(str(line[i])) for line in (headers, *rows)) for i in range(len(headers))
    ]
    out = []
    for index, line in enumerate((headers, *rows)):
        cells = []
        for column, cell in enumerate(line):
            last = column == len(line) - 1
            text = str(cell) if last else str(cell).ljust(widths[column])
            painter = paint[column] if paint and index else None
            if painter is not None:
                padding = text[len(str(cell)) :]
                text = painter(str(cell)) + padding
            cells.append(text)
        out.append(("  " + "  ".join(cells)).rstrip())
    return out


def render(
    document: Mapping[str, Any],
    assessment: Assessment,
    *,
    colour: bool = False,
    out_rate: float | None = None,
    now: float | None = None,
) -> str:
    """
    The status document as text: the plugin line, then one block per part.

    Args:
        out_rate: bytes per second served, when the caller measured it
            between two documents (``--watch``); None shows ``-``.
        now: the time to print (default: the document's own).
    """
    paint = _Painter(colour)
    lines = [paint(assessment.plugin_line(), _VERDICT_COLOURS[assessment.verdict])]
    uptime = float(document.get("uptime") or 0)
    config = document.get("config") or {}
    stamp = now if now is not None else float(document.get("time") or time.time())
    lines.append(
        f"instance {document.get('instance', '?')}  version "
        f"{document.get('version', '?')}  up {duration(uptime)}  config "
        f"{config.get('path') or '-'}  at "
        f"{time.strftime('%H:%M:%S', time.localtime(stamp))}"
    )
    health = document.get("health") or {}
    lines += ["", paint("HEALTH", "bold")]
    lines.append(
        f"  {paint.state(str(health.get('status', '?')))}  phase "
        f"{paint.state(str(document.get('phase', '?')))}"
        f"  {'serving' if health.get('serving') else 'not serving'}"
    )
    lines += [f"  - {reason}" for reason in health.get("reasons") or []]
    lines += _pool_lines(document, paint, out_rate)
    lines += _source_lines(document, paint)
    lines += _sink_lines(document)
    lines += _account_lines(document, paint)
    return "\n".join(lines)


def _pool_lines(
    document: Mapping[str, Any], paint: _Painter, out_rate: float | None
) -> list[str]:
    pool = document.get("pool") or {}
    tiers = document.get("tiers") or {}
    level, capacity = int(pool.get("level") or 0), int(pool.get("capacity") or 0)
    share = f" ({level / capacity:.0%})" if capacity else ""
    in_rate = sum(
        float(s.get("rate") or 0) for s in _sources(document) if s.get("feeding")
    )
    active = tiers.get("active_tier")
    return [
        "",
        paint("POOL", "bold"),
        f"  {size(level)} of {size(capacity)}{share}  in {rate(in_rate)}  "
        f"out {rate(out_rate)}  served {size(int(pool.get('bytes_out') or 0))}  "
        f"waiters {pool.get('waiters', 0)}",
        f"  active tier {'-' if active is None else active}  best tier "
        f"{tiers.get('best_tier', '-')}  failovers {tiers.get('failovers', 0)}",
    ]


def _source_lines(document: Mapping[str, Any], paint: _Painter) -> list[str]:
    sources = _sources(document)
    keys = any(s.get("kind") == "entropykey" for s in sources)
    headers = ["", "NAME", "KIND", "TIER", "STATE", "RATE"]
    if keys:
        headers += ["TEMP", "VOLTS"]
    headers.append("REASON")
    rows = []
    for source in sources:
        row = [
            "*" if source.get("feeding") else "",
            str(source.get("name", "?")),
            str(source.get("kind", "?")),
            str(source.get("priority", "?")),
            str(source.get("state", "?")),
            rate(float(source.get("rate") or 0)),
        ]
        if keys:
            details = source.get("details") or {}
            temperature = details.get("temperature_c")
            voltage = details.get("voltage_v")
            row += [
                "-" if temperature is None else f"{temperature:.1f} C",
                "-" if voltage is None else f"{voltage:.3f} V",
            ]
        row.append(str(source.get("reason", "")))
        rows.append(row)
    painters: list[Any] = [None] * len(headers)
    painters[4] = paint.state
    lines = ["", paint("SOURCES", "bold") + "  (* feeds the pool)"]
    return lines + (table(headers, rows, painters) if rows else ["  none"])


def _sink_lines(document: Mapping[str, Any]) -> list[str]:
    rows = [
        [
            str(sink.get("name", "?")),
            str(sink.get("kind", "?")),
            str(sink.get("connections", 0)),
            str(sink.get("connections_total", 0)),
            str(sink.get("requests", 0)),
            size(int(sink.get("bytes_out") or 0)),
            " ".join(sink.get("addresses") or []),
        ]
        for sink in document.get("sinks") or []
        if isinstance(sink, Mapping)
    ]
    headers = ["NAME", "KIND", "CONNS", "TOTAL", "REQUESTS", "SERVED", "ADDRESSES"]
    return ["", "SINKS", *(table(headers, rows) if rows else ["  none"])]


def _account_lines(document: Mapping[str, Any], paint: _Painter) -> list[str]:
    backend = (document.get("accounts") or {}).get("backend") or {}
    healthy = backend.get("healthy")
    word = "healthy" if healthy else ("unreachable" if healthy is False else "?")
    lines = [
        "",
        paint("ACCOUNTS", "bold")
        + f"  backend {backend.get('kind', '?')} "
        + paint(word, "green" if healthy else "red"),
    ]
    rows = []
    for name, customer in _customers(document).items():
        quota = customer.get("quota")
        if isinstance(quota, Mapping) and quota.get("limit"):
            used, limit = int(quota.get("used") or 0), int(quota["limit"])
            quota_text = (
                f"{size(used)} of {size(limit)}/{quota.get('period', '?')} "
                f"({used / limit:.0%})"
            )
        else:
            quota_text = "-"
        rows.append(
            [
                name + (" (denied)" if customer.get("deny") else ""),
                size(int(customer.get("bytes_served") or 0)),
                quota_text,
                f"{customer.get('throttled_requests', 0)} req, "
                f"{float(customer.get('throttled_seconds') or 0):.1f} s",
                str(customer.get("denied", 0)),
                str(customer.get("client_count", 0)),
            ]
        )
    headers = ["CUSTOMER", "SERVED", "QUOTA", "THROTTLED", "DENIED", "CLIENTS"]
    return lines + (table(headers, rows) if rows else ["  no customers"])
