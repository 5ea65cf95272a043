"""
FIPS 140-2 (2001) block tests on a byte stream, run the way rngd runs them.

Each 2,500-byte block gets the monobit, poker, runs and long-run tests, plus
the continuous test on 32-bit words; `Fips140Tester` keeps rngd's leaky count
of failed blocks and says when it trips.

False alarms on a healthy source
--------------------------------
About 1 in 1,270 good blocks fails (7.9e-4); a block is 2,500 bytes, so a
4 KiB/s source sees a false failed block every ~13 min. A single failed block
never quarantines; a leaky count does (rngd's rule: +1 per failed block, -1
per 1,000 good blocks). With 7.9e-4 failures per block against 1e-3 forgiven,
the count drifts down only slowly, and the chance of it reaching T falls by
about x0.63 per step of T. Markov-chain estimate of false quarantines per
year (one year = 3.156e7 s):

==== ============ ============
T     4 KiB/s      1 MiB/s
==== ============ ============
25    0.065        17
30    6.8e-3       1.7
40    7.4e-5       0.019
==== ============ ============

hence the default ``fips_max_failures = 40`` (rngd disables at 25). A source
failing every block still trips after 40 blocks (100 KB), and credits nothing
meanwhile because `broker.health.SourceHealth` stops credit at the first
failed block.
"""

import operator
from dataclasses import dataclass

FIPS_BLOCK_BYTES = 2500
FIPS_FORGIVE_EVERY = 1000
"""Good FIPS blocks that forgive one failed block (rngd's ``RNG_OK_CREDIT``)."""

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
