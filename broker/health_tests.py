"""
The SP 800-90B Repetition Count Test and Adaptive Proportion Test as
incremental, continuous tests over a byte stream.

A test's state (the current run, the current window) carries across `feed`
calls, so its outcome depends only on the byte stream, never on how it was
split into calls. A test reports a `CutoffReached` at the sample where its
count first reaches a cut-off; a run or window that keeps going past it is
the same failure, not a new one. Each test may have a second, permanent
cut-off, reported separately when reached. What a failure means for the
source is `broker.health.SourceHealth`'s business.

The samples of such a continuing run or window are still failing samples,
though: a source stuck on one value keeps failing until its output changes.
After each `feed`, ``failing`` lists the spans of failing samples in that
data (`FailingSpan`), so that a start-up test can begin only after the last
of them.
"""

import operator
from dataclasses import dataclass
from typing import Literal

from broker.health_cutoffs import APT_WINDOW

_FORMATS: dict[int, Literal["B", "H", "I", "Q"]] = {1: "B", 2: "H", 4: "I", 8: "Q"}
_MASKS_KEPT = 4
"""Lane masks kept by length: a source's reads come in a few sizes."""
_MASKS_BYTES = 1 << 17
"""Longest data whose lane masks are kept (each mask is as long as the data)."""


@dataclass(frozen=True, slots=True)
class CutoffReached:
    """
    One test reaching a cut-off.
    """

    test: str
    """``"rct"``, ``"apt"`` or ``"repeat"``."""
    end: int
    """Bytes of the fed data up to and including the failing sample."""
    count: int
    """The run length or window count that reached the cut-off."""
    permanent: bool
    """True when the permanent cut-off was reached."""
    detail: str


@dataclass(frozen=True, slots=True)
class FailingSpan:
    """
    Consecutive failing samples of one test within the data of one `feed`.

    A sample is failing when its run (RCT) or its window's count of the
    window's first value (APT) is at or above the cut-off. Samples of other
    values may lie between an APT span's failing samples.
    """

    test: str
    start: int
    """Bytes of the fed data up to and including the first failing sample."""
    end: int
    """Bytes of the fed data up to and including the last failing sample."""


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
        self._masks: dict[int, tuple[int, int]] = {}
        self.reset()

    def reset(self) -> None:
        """
        Forget the stream: the next sample starts a new run.
        """
        self.samples = 0
        self.run = 0
        """Length of the current run (0 before the first sample)."""
        self.failing: list[FailingSpan] = []
        """Runs at or past the cut-off in the data of the last `feed`."""
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
        self.failing = []
        if fresh == 0:
            self._pending = buf[start:]
            return []
        if self._all_differ(buf, usable):
            # No sample equals the one before it: no run continues or grows.
            self.run = 1
            self.samples += fresh
            self._last = buf[usable - size : usable]
            self._pending = buf[usable:]
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

    def _all_differ(self, buf: bytes, usable: int) -> bool:
        """
        Whether no sample of ``buf[:usable]`` equals the one before it.

        The samples are the lanes of one integer: XOR with itself shifted by
        a sample gives each lane the XOR of two neighbours, which is zero
        exactly where they are equal. A lane v is nonzero iff the top bit of
        ``(v & low) + low | v`` is set (low = all lane bits but the top one;
        the sum never carries into the next lane). A few big-integer passes
        in C instead of a comparison per sample.
        """
        pairs = usable // self.sample_bytes - 1
        if pairs < 1:
            return True
        value = int.from_bytes(memoryview(buf)[:usable], "little")
        # The top lane holds the last sample itself; the masks leave it out.
        lanes = value ^ (value >> (8 * self.sample_bytes))
        low, high = self._lane_masks(pairs)
        return (((lanes & low) + low) | lanes) & high == high

    def _lane_masks(self, pairs: int) -> tuple[int, int]:
        """
        For ``pairs`` lanes of one sample each: every lane's bits but its top
        one, and every lane's top bit (kept for the last few lengths seen).
        """
        masks = self._masks.get(pairs)
        if masks is None:
            size = self.sample_bytes
            high = int.from_bytes((b"\x00" * (size - 1) + b"\x80") * pairs, "little")
            low = (high >> (8 * size - 1)) * ((1 << (8 * size - 1)) - 1)
            masks = (low, high)
            if pairs * size <= _MASKS_BYTES:
                if len(self._masks) >= _MASKS_KEPT:
                    self._masks.clear()
                self._masks[pairs] = masks
        return masks

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
            # ext[j] stands for a sample whose run is j - i + 2 long, so the
            # samples from ext[i + cutoff - 2] to the run's end are failing.
            first = max(i + self.cutoff - 2, prefix)
            if first < run_end:
                self.failing.append(
                    FailingSpan(
                        "rct",
                        (first - prefix + 1) * self.sample_bytes - pending,
                        (run_end - prefix) * self.sample_bytes - pending,
                    )
                )
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
        self.failing: list[FailingSpan] = []
        """Failing samples in each window of the data of the last `feed`."""
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
        self.failing = []
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
        if after > before:
            # The window's count passed the cut-off before this data, or
            # crosses it here: its value is failing from the crossing on.
            skip = max(self.cutoff - before, 1)
            at = start - 1
            for _ in range(skip):
                at = data.find(value, at + 1, end)
            self.failing.append(
                FailingSpan("apt", at + 1, data.rfind(value, start, end) + 1)
            )
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
