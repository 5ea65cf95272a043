"""
A continuous test for periodic output: a source that repeats what it emitted
up to 64 KiB earlier, at any period and any alignment.

SP 800-90B's RCT and APT only see runs and skewed value counts. A counter, a
replayed buffer or a driver returning the same block over and over passes both
at full credit, because every byte value is as frequent as in random data.
This test catches those.

How it works
------------
At every `PROBE_EVERY`-th byte of the stream (stream offsets 0, 512, 1024, ...)
the next ``probe_bytes`` bytes are the *probe*. When the probe is complete it
is searched for in the `DEFAULT_WINDOW` bytes before it (`bytes.find`, one C
pass over the window, not a Python loop per byte). Finding it anywhere there,
overlapping the probe itself included, is a failure: the stream repeats
itself. A stream with period P ≤ W (from some point on) contains every probe
again P bytes earlier, so the first probe starting P bytes into the periodic
part fails, whatever P and whatever its alignment; periods shorter than the
probe are found overlapping it. Nothing is hashed, so no alignment, lcm or
hash collision enters into it.

Probes sit at fixed stream offsets and the window is the stream itself, so the
outcome depends only on the byte stream, never on how it was split into
`feed` calls. Each failing probe is one `CutoffReached` at its last byte; a
source that keeps repeating fails at every probe. Because probes start every
512 bytes and are at most 512 bytes long, every 1,024 consecutive bytes hold
a whole probe: a start-up test (1,024 samples) never passes on output that
still repeats within the window.

Cost: the last W + 512 bytes of the stream are kept (66 KiB per source at the
default window) and each probe scans them once.

False alarms
------------
On output with H bits of min-entropy per byte, one probe of L bytes matches a
given earlier position with probability at most 2^(-L·H), and there are
W = 2^16 earlier positions, so one probe raises a false alarm with
probability at most ``2^(16 - L·H)``. `probe_length` picks L as the smallest
length with ``16 - L·H ≤ alpha_log2`` (the APT's alpha, 2^-40 by default),
but never below 128 bytes (a longer needle makes `bytes.find` skip faster) nor
above 512. Probes per year (one year = 3.156e7 s): 2.5e8 at 4 KiB/s, 6.5e10
at 1 MiB/s.

==================== ===== ============= ================ ================
credit (bits/byte)    L     per probe     per year 4 KiB/s per year 1 MiB/s
==================== ===== ============= ================ ================
8 (the default)       128   2^-1008       < 1e-290         < 1e-290
1                     128   2^-112        5e-26            1.3e-23
0.125 (the floor)     448   2^-40         2.3e-4           0.059
==================== ===== ============= ================ ================

At the default credit a false alarm is as likely as guessing a 1,000-bit key;
only a source credited near zero comes close to the APT's own rate.
"""

import math

from broker.health_tests import CutoffReached

DEFAULT_WINDOW = 1 << 16
"""Bytes searched behind each probe: the longest period caught (64 KiB)."""
PROBE_EVERY = 512
"""Stream bytes between the starts of two probes."""
MIN_PROBE_BYTES = 128
MAX_PROBE_BYTES = 512


def probe_length(h: float, alpha_log2: float, window: int = DEFAULT_WINDOW) -> int:
    """
    The probe length L with at most ``2^alpha_log2`` false alarms per probe.

    Args:
        h: min-entropy per byte, in bits (> 0).
        alpha_log2: log2 of the false-alarm probability of one probe (< 0).
        window: W, the bytes searched behind each probe.

    Returns:
        ``ceil((log2(W) - alpha_log2) / h)``, kept within 128..512 bytes.

    Raises:
        ValueError: an argument is out of range.
    """
    if not h > 0:
        raise ValueError("entropy per byte must be positive")
    if not alpha_log2 < 0:
        raise ValueError("alpha_log2 must be negative")
    if window < 1:
        raise ValueError("the window holds at least one byte")
    needed = math.ceil((math.log2(window) - alpha_log2) / h)
    return min(max(needed, MIN_PROBE_BYTES), MAX_PROBE_BYTES)


class RepeatTest:
    """
    Fails when a probe of the stream occurs within the window before it.

    Args:
        probe_bytes: L, the probe length (see `probe_length`).
        window: W, bytes searched behind each probe; periods up to W are caught.
    """

    def __init__(
        self, probe_bytes: int = MIN_PROBE_BYTES, window: int = DEFAULT_WINDOW
    ) -> None:
        if not 1 <= probe_bytes <= MAX_PROBE_BYTES:
            raise ValueError(f"a probe is 1 to {MAX_PROBE_BYTES} bytes")
        if window < 1:
            raise ValueError("the window holds at least one byte")
        self.probe_bytes = probe_bytes
        self.window = window
        self.samples = 0
        """Bytes fed so far (the stream offset of the next byte)."""
        self._history = bytearray()
        self._base = 0
        """Stream offset of ``_history[0]``."""
        self._next_probe = 0

    @property
    def held_bytes(self) -> int:
        """
        Bytes of the stream kept for the window (less than W + 512).
        """
        return len(self._history)

    def feed(self, data: bytes) -> list[CutoffReached]:
        """
        Test every probe completed by ``data``.

        Returns:
            One failure per repeated probe, in stream order.
        """
        start = self.samples
        history = self._history
        history += data
        stream_end = start + len(data)
        size = self.probe_bytes
        out: list[CutoffReached] = []
        probe = self._next_probe
        while probe + size <= stream_end:
            at = probe - self._base
            lo = max(at - self.window, 0)
            # The range stops one byte short of the probe's end, so the
            # probe can only match an earlier position, possibly overlapping.
            found = history.find(history[at : at + size], lo, at + size - 1)
            if found != -1:
                distance = at - found
                out.append(
                    CutoffReached(
                        "repeat",
                        probe + size - start,
                        distance,
                        False,
                        f"repeat: {size} bytes at offset {probe} already "
                        f"seen {distance} bytes earlier",
                    )
                )
            probe += PROBE_EVERY
        self._next_probe = probe
        drop = probe - self.window - self._base
        if drop > 0:
            del history[:drop]
            self._base += drop
        self.samples = stream_end
        return out
