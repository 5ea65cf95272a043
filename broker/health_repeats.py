"""
A continuous test for periodic output: a source that repeats what it emitted
up to 64 KiB earlier, at any period and any alignment, even when each copy
carries a changing sequence number or counter.

SP 800-90B's RCT and APT only see runs and skewed value counts. A counter, a
replayed buffer or a driver returning the same block over and over passes both
at full credit, because every byte value is as frequent as in random data.
This test catches those.

How it works
------------
Every `PROBE_EVERY` bytes of the stream (stream offsets 0, 512, 1024, ...) a
*probe group* starts: four *sub-probes* of L bytes at offsets 0, L+3, 2(L+3)
and 3(L+3) within the group (``GROUP_SUB_PROBES``; at the default credit
L = 29, so offsets 0, 32, 64 and 96 and a group of 125 bytes). The first two
are *anchors*. When the group is complete, each anchor is searched for in the
`DEFAULT_WINDOW` bytes before it (`bytes.find`, one C pass over the window);
its first occurrence there gives a distance d. The group fails when at least
two of its four sub-probes, the anchor included, equal the bytes d earlier:
the stream repeats itself at distance d. Comparing the other sub-probes is a
slice comparison, not a search, so a group costs two searches.

What is caught: a stream that repeats itself at some distance P ≤ W except
for *changed fields* of at most 4 bytes with at least 60 unchanged bytes
between them (a sequence number in every 64-byte USB packet, 128-byte frame
or 512-byte record; one changing byte every 100 bytes) fails at the first
group lying wholly in the repeating part, whatever P and the fields'
alignment. A field of at most 4 bytes cannot touch both anchors (3 bytes lie
between them), and fields 60 unchanged bytes apart cannot touch both either
(the anchors cover 61 bytes); the same spacing leaves a second clean
sub-probe among the other three. Shortest clean run committed to: **60
unchanged bytes between changed fields of at most 4 bytes** at the default
credit (where L ≤ 29). Periods shorter than L are found overlapping the
anchor. Nothing is hashed, so no alignment, lcm or hash collision enters
into it.

When L is too long for four sub-probes to fit in 512 bytes (credit below
about 0.45 bit/byte), the group is one probe of L bytes and fails on any
match, as a plain repeat search; it then needs the copy to be unchanged over
those L bytes.

Groups sit at fixed stream offsets and the window is the stream itself, so
the outcome depends only on the byte stream, never on how it was split into
`feed` calls. Each failing group is one `CutoffReached` at its last byte; a
source that keeps repeating fails at every group. Groups start every 512
bytes and are at most 512 bytes long, so every 1,024 consecutive bytes hold a
whole group: a start-up test (1,024 samples) never passes on output that
still repeats within the window.

Cost: the last W + 512 bytes of the stream are kept (66 KiB per source at the
default window). Searching them for every anchor would read the window twice
per 512 bytes fed, 256 bytes read per byte tested; instead an index proves,
for a whole `feed` at once, that no anchor can occur earlier, and only when it
cannot prove that are the anchors searched for as described above.

The index
---------
The 8-byte words at stream offsets that are multiples of 16 (the *grid*) are
kept in a set, from the start of the window on. An earlier occurrence of an
anchor at offset p (L ≥ 23 bytes long) contains a whole grid word, the first
one at or after p, at some shift j < 16 into the anchor. So if the anchor's 8
bytes at shift j are no grid word, for each of the 16 shifts, the anchor
occurs nowhere before it. One shift needs care: the one at which the anchor's
own bytes hold a grid word (j0). An earlier occurrence at that shift repeats
that grid word, 16·k bytes earlier, so it shows as a duplicate when the word
goes into the set; any duplicate sends the anchors of the same `feed` to the
search. A key found in the set, even a stale word from before the window or
one after the anchor, sends them to the search too, so the index can only
ever make a search unnecessary, never change an outcome: the results are
those of the search, byte for byte.

On random data none of this happens (a false hit needs a 64-bit match), so
512 bytes cost 32 set insertions and 30 set lookups, in C, instead of two
64 KiB scans: about five times the throughput. On data that repeats (a stuck
or replaying source) the search runs as before. The set is rebuilt from the
window once it holds three windows' worth of words (some 12,000 at the
default window, under a MiB). Probes shorter than 23 bytes (never at the
default settings) always search.

False alarms
------------
On output with H bits of min-entropy per byte, L given bytes equal the L
bytes d earlier with probability at most 2^(-L·H), overlapping or not (each
byte has H bits given all before it). Four sub-probes: a failure needs an
anchor and one other sub-probe to match at the same d: 5 such pairs, W = 2^16
distances, 2L bytes per pair, so a group raises a false alarm with
probability at most ``5 · 2^(16 - 2·L·H)``. One probe: ``2^(16 - L·H)``.
`probe_length` picks L as the smallest length with ``16 - L·H ≤ alpha_log2``
(the APT's alpha, 2^-40 by default), so each sub-probe alone already meets
the APT's rate, but never below 29 bytes (shorter needles make `bytes.find`
slower) nor above 512. Groups per year (one year = 3.156e7 s): 2.5e8 at
4 KiB/s, 6.5e10 at 1 MiB/s.

==================== ===== ============= ================ ================
credit (bits/byte)    L     per group     per year 4 KiB/s per year 1 MiB/s
==================== ===== ============= ================ ================
8 (the default)       29    5 · 2^-448    < 1e-120         < 1e-120
1                     56    5 · 2^-96     1.6e-20          4.1e-18
0.125 (the floor)     448   2^-40         2.3e-4           0.059
==================== ===== ============= ================ ================

At the default credit a false alarm is as likely as guessing a 440-bit key;
only a source credited near zero comes close to the APT's own rate.
"""

import math

from broker.health_tests import CutoffReached

DEFAULT_WINDOW = 1 << 16
"""Bytes searched behind each anchor: the longest period caught (64 KiB)."""
PROBE_EVERY = 512
"""Stream bytes between the starts of two probe groups."""
MIN_PROBE_BYTES = 29
"""Shortest sub-probe: two fit, 3 bytes apart, in 61 unchanged bytes."""
MAX_PROBE_BYTES = 512
GROUP_SUB_PROBES = 4
"""Sub-probes in a group when they fit in `PROBE_EVERY` bytes."""
GROUP_ANCHORS = 2
"""Sub-probes searched for; the others are compared at the distance found."""
GROUP_MATCHES = 2
"""Sub-probes, the anchor included, that must repeat at one distance."""
FIELD_GAP = 3
"""Bytes between two sub-probes: a changed field of 4 bytes spoils only one."""
_GRID = 16
"""Stream offsets of the indexed words are multiples of this."""
_WORD = 8
"""Bytes of an indexed word (a native unsigned 64-bit integer)."""


def probe_length(h: float, alpha_log2: float, window: int = DEFAULT_WINDOW) -> int:
    """
    The (sub-)probe length L: one probe alone has at most ``2^alpha_log2``
    false alarms.

    Args:
        h: min-entropy per byte, in bits (> 0).
        alpha_log2: log2 of the false-alarm probability of one probe (< 0).
        window: W, the bytes searched behind each probe.

    Returns:
        ``ceil((log2(W) - alpha_log2) / h)``, kept within 29..512 bytes.

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


def group_layout(probe_bytes: int) -> tuple[tuple[int, ...], int, int]:
    """
    Where a group's sub-probes sit.

    Args:
        probe_bytes: L, the sub-probe length.

    Returns:
        The sub-probes' offsets within the group, how many of them (the
        first ones) are anchors, and how many must repeat at one distance:
        four sub-probes, two anchors, two matches when they fit in
        `PROBE_EVERY` bytes, else one probe that fails on any match.
    """
    stride = probe_bytes + FIELD_GAP
    if (GROUP_SUB_PROBES - 1) * stride + probe_bytes <= PROBE_EVERY:
        offsets = tuple(i * stride for i in range(GROUP_SUB_PROBES))
        return offsets, GROUP_ANCHORS, GROUP_MATCHES
    return (0,), 1, 1


class RepeatTest:
    """
    Fails when a probe group of the stream repeats within the window before it.

    Args:
        probe_bytes: L, the sub-probe length (see `probe_length`).
        window: W, bytes searched behind each anchor; periods up to W are
            caught.
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
        self.offsets, self.anchors, self.matches = group_layout(probe_bytes)
        self.group_bytes = self.offsets[-1] + probe_bytes
        """Bytes from the start of a group to the end of its last sub-probe."""
        self.samples = 0
        """Bytes fed so far (the stream offset of the next byte)."""
        self._history = bytearray()
        self._base = 0
        """Stream offset of ``_history[0]``."""
        self._next_group = 0
        # The index (see the module docstring): grid words from the window on,
        # up to ``_grid_end``; anchors before ``_dirty_until`` are searched.
        self._indexed = probe_bytes >= _GRID - 1 + _WORD
        self._grid: set[int] = set()
        self._grid_end = 0
        self._dirty_until = 0
        # Rebuilt from what is left in the window once it holds three
        # windows' worth: rarely enough to cost little, often enough to stay
        # small.
        self._grid_limit = 3 * (window + PROBE_EVERY) // _GRID + 64
        # For each anchor: (residue, word index) of its 8 bytes at every shift
        # but its own grid word's, within a stretch starting at a group.
        self._keys = [
            (
                (anchor + shift) % _WORD,
                slice((anchor + shift) // _WORD, None, PROBE_EVERY // _WORD),
            )
            for anchor in self.offsets[: self.anchors]
            for shift in range(_GRID)
            if (anchor + shift) % _GRID
        ]

    @property
    def held_bytes(self) -> int:
        """
        Bytes of the stream kept for the window (less than W + 512).
        """
        return len(self._history)

    def _repeat_distance(self, at: int) -> int | None:
        """
        The distance at which the group starting at ``_history[at]`` repeats.
        """
        history = self._history
        size = self.probe_bytes
        for anchor in self.offsets[: self.anchors]:
            start = at + anchor
            # The range stops one byte short of the anchor's end, so it can
            # only match an earlier position, possibly overlapping itself.
            found = history.find(
                history[start : start + size],
                max(start - self.window, 0),
                start + size - 1,
            )
            if found == -1:
                continue
            distance = start - found
            same = 0
            for offset in self.offsets:
                mine = at + offset
                earlier = mine - distance
                if earlier >= 0 and (
                    history[earlier : earlier + size] == history[mine : mine + size]
                ):
                    same += 1
            if same >= self.matches:
                return distance
        return None

    def feed(self, data: bytes) -> list[CutoffReached]:
        """
        Test every probe group completed by ``data``.

        Returns:
            One failure per repeated group, in stream order.
        """
        start = self.samples
        self._history += data
        stream_end = start + len(data)
        span = self.group_bytes
        out: list[CutoffReached] = []
        group = self._next_group
        if group + span <= stream_end:
            last = group + (stream_end - span - group) // PROBE_EVERY * PROBE_EVERY
            if not (self._indexed and self._none_repeat(group, last, stream_end)):
                out = self._search(group, last, start)
            group = last + PROBE_EVERY
        self._next_group = group
        # Anchors look back W bytes and the other sub-probes are compared at
        # most W bytes back, so nothing before the next group's start - W is
        # needed again.
        drop = group - self.window - self._base
        if drop > 0:
            del self._history[:drop]
            self._base += drop
        if len(self._grid) > self._grid_limit:
            self._rebuild()
        self.samples = stream_end
        return out

    def _search(self, first: int, last: int, start: int) -> list[CutoffReached]:
        """
        Search for the anchors of the groups from ``first`` to ``last``.
        """
        span = self.group_bytes
        out: list[CutoffReached] = []
        for group in range(first, last + 1, PROBE_EVERY):
            distance = self._repeat_distance(group - self._base)
            if distance is not None:
                out.append(
                    CutoffReached(
                        "repeat",
                        group + span - start,
                        distance,
                        False,
                        f"repeat: {span} bytes at offset {group} already "
                        f"seen {distance} bytes earlier",
                    )
                )
        return out

    def _none_repeat(self, first: int, last: int, stream_end: int) -> bool:
        """
        Whether the index proves that no anchor of the groups from ``first``
        to ``last`` occurs earlier in the stream.
        """
        self._index(stream_end)
        if first < self._dirty_until:
            return False
        base = self._base
        # From the first group to the end of the last anchor's last shift.
        end = last + self.offsets[self.anchors - 1] + _GRID - 1 + _WORD
        isdisjoint = self._grid.isdisjoint
        with memoryview(self._history) as history:
            stretch = history[first - base : end - base]
            size = len(stretch)
            # The 8-byte words starting at each residue mod 8.
            words = [
                stretch[residue : residue + (size - residue) // _WORD * _WORD].cast("Q")
                for residue in range(_WORD)
            ]
            clear = all(
                isdisjoint(words[residue][step]) for residue, step in self._keys
            )
            del words, stretch
        return clear

    def _index(self, stream_end: int) -> None:
        """
        Put the grid words that end by ``stream_end`` into the set.
        """
        base = self._base
        position = max(self._grid_end, -(-base // _GRID) * _GRID)
        last = (stream_end - _WORD) // _GRID * _GRID
        if last < position:
            return
        count = (last - position) // _GRID + 1
        grid = self._grid
        before = len(grid)
        with memoryview(self._history) as history:
            piece = history[position - base : last + _WORD - base]
            grid.update(piece.cast("Q")[::2])
            del piece
        if len(grid) - before != count:
            # A word repeats at a multiple of 16 bytes: search.
            self._dirty_until = last + _GRID
        self._grid_end = last + _GRID

    def _rebuild(self) -> None:
        """
        Start the set afresh from the grid words still in the window.
        """
        base = self._base
        position = -(-base // _GRID) * _GRID
        end = self._grid_end - _GRID + _WORD
        if end <= position:
            self._grid = set()
            return
        with memoryview(self._history) as history:
            piece = history[position - base : end - base]
            self._grid = set(piece.cast("Q")[::2])
            del piece
