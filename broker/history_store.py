"""
`broker.history` on disk, so a restart keeps the graphs and shows the time the
broker was down as a gap.

The file (``state_dir/history.bin``) is `MAGIC` followed by a zlib stream of
one JSON header line and then the raw series, little-endian doubles, in the
order the header lists them: fine ring first, then coarse. Raw doubles keep a
save cheap (a memory copy, then compression in a worker thread) and NaN exact;
the compression makes the mostly empty rings of a young broker small. The
file is replaced atomically (a temporary file, then a rename), so a reader
never sees half of it.

A file that is corrupt, truncated, of another version or recorded with another
step or ring size is refused with `HistoryFileError`; the broker logs it and
starts with empty rings, it never fails to start for it.
"""

import json
import os
import sys
import zlib
from array import array
from pathlib import Path
from typing import Any, Final

from broker.errors import BrokerError
from broker.history import BYTES_PER_POINT, MAX_EVENTS, Event, History, Ring

FILE_NAME: Final = "history.bin"
MAGIC: Final = b"EBHIST1\n"
MAX_FILE_BYTES: Final = 1 << 30
"""Largest decompressed file accepted: far above what the caps allow."""


class HistoryFileError(BrokerError):
    """
    A history file that cannot be loaded: corrupt, foreign or of another shape.
    """


def _ring_header(ring: Ring) -> dict[str, Any]:
    return {
        "step": ring.step,
        "capacity": ring.capacity,
        "head": ring.head,
        "first": ring.first,
        "series": list(ring.series),
    }


def _raw(values: "array[float]") -> bytes:
    if sys.byteorder == "little":
        return values.tobytes()
    swapped = array("d", values)
    swapped.byteswap()
    return swapped.tobytes()


def snapshot(history: History, saved_at: float) -> bytes:
    """
    The uncompressed file body: a copy, so the rings may change afterwards.
    """
    header = {
        "version": 1,
        "saved_at": saved_at,
        "fine": _ring_header(history.fine),
        "coarse": _ring_header(history.coarse),
        "sources": {name: list(meta) for name, meta in history.sources.items()},
        "customers": sorted(history.customers),
        "events": [event.to_json() for event in history.events],
    }
    parts = [json.dumps(header).encode() + b"\n"]
    for ring in (history.fine, history.coarse):
        parts.extend(_raw(values) for values in ring.series.values())
    return b"".join(parts)


def compress(body: bytes) -> bytes:
    """
    The file's bytes for a `snapshot` (slow for a full history: run it in a
    worker thread).
    """
    return MAGIC + zlib.compress(body, 1)


def write_atomically(path: Path, data: bytes) -> None:
    """
    Replace ``path`` with ``data`` so that a reader sees the old file or the
    new one, never a mix.

    Raises:
        OSError: the directory is not writable, the disk is full.
    """
    temporary = path.with_name(path.name + ".tmp")
    with temporary.open("wb") as file:
        file.write(data)
        file.flush()
        os.fsync(file.fileno())
    temporary.replace(path)


def decode(data: bytes, history: History) -> float:
    """
    Load the file's bytes into ``history`` (freshly built, with the step and
    ring sizes the file must match).

    Returns:
        The wall-clock time the file was saved at.

    Raises:
        HistoryFileError: the bytes are not a history of that shape.
    """
    if not data.startswith(MAGIC):
        raise HistoryFileError("not an ebroker history file")
    try:
        inflater = zlib.decompressobj()
        body = inflater.decompress(data[len(MAGIC) :], MAX_FILE_BYTES)
        if inflater.unconsumed_tail or not inflater.eof:
            raise HistoryFileError("truncated or too large")
        line, _, raw = body.partition(b"\n")
        header = json.loads(line)
        return _load(header, memoryview(raw), history)
    except HistoryFileError:
        raise
    except (
        zlib.error,
        ValueError,
        TypeError,
        KeyError,
        IndexError,
        AttributeError,
    ) as exc:
        raise HistoryFileError(f"corrupt: {exc}") from exc


def _load(header: Any, raw: memoryview, history: History) -> float:
    if not isinstance(header, dict) or header.get("version") != 1:
        raise HistoryFileError("unknown version")
    offset = 0
    for ring, name in ((history.fine, "fine"), (history.coarse, "coarse")):
        spec = header[name]
        if spec["step"] != ring.step or spec["capacity"] != ring.capacity:
            raise HistoryFileError(
                f"{name} ring of {spec['capacity']} points of {spec['step']} s, "
                f"expected {ring.capacity} of {ring.step} s"
            )
        head, first = spec["head"], spec["first"]
        if not all(value is None or type(value) is int for value in (head, first)):
            raise HistoryFileError(f"{name} ring without a valid head")
        ring.head, ring.first = head, first
        size = ring.capacity * BYTES_PER_POINT
        for series in spec["series"]:
            if not isinstance(series, str):
                raise HistoryFileError("series name is not a string")
            chunk = raw[offset : offset + size]
            if len(chunk) != size:
                raise HistoryFileError("truncated series")
            values = array("d")
            values.frombytes(chunk)
            if sys.byteorder != "little":
                values.byteswap()
            ring.series[series] = values
            offset += size
    if offset != len(raw):
        raise HistoryFileError("trailing bytes")
    for name, (tier, kind) in header["sources"].items():
        history.sources[str(name)] = (int(tier), str(kind))
    history.customers.update(str(name) for name in header["customers"])
    for event in header["events"][-MAX_EVENTS:]:
        history.add_event(
            Event(
                time=float(event["time"]),
                kind=str(event["kind"]),
                subject=str(event["subject"]),
                before=str(event["from"]),
                after=str(event["to"]),
                reason=str(event["reason"]),
            )
        )
    return float(header["saved_at"])
