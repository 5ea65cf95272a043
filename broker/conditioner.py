"""
The pool's conditioner: a SHA-512 state keyed with secret kernel material.

Theory of operation
-------------------
Source bytes are absorbed into a SHA-512 state. Emitting a block digests the
state: the first 32 bytes are output, the other 32 never leave this object and
seed the next state, so entropy absorbed beyond one block is carried forward.
When to emit is the pool's decision; this module never counts credit.

The state starts from ``SECRET_BYTES`` of secret material from the kernel
(`os.urandom`, which blocks until the kernel's generator is seeded) and takes
``SECRET_BYTES`` more after every ``RESEED_BLOCKS`` output blocks.

Why a key
---------
Without one, output is a function of the source bytes alone. ``record_raw``
writes exactly those bytes to a file, so replaying that file through a pool
reproduced what every client had been served. With the key, a raw recording
reveals nothing about output: predicting a block means knowing the secret
state, which no file, log or metric holds. A recording still reveals the raw
device bytes themselves; that is its purpose (offline assessment with ent,
rngtest or the SP 800-90B tools), and it should be protected like any other
sample of a device's output, but it no longer stands for what clients got.

The key is credited with nothing. Output is released only when backed by
credited source input (the pool's full-entropy rule: 256 output bits need 320
credited bits), so the key cannot make up for a weak source; it only keeps an
observer of the source from following the output. To SP 800-90B it is more
input to a vetted hash conditioning function, uncredited.

Many blocks in one call
-----------------------
`emit_blocks` absorbs a run of equal-sized pieces and emits a block after each,
exactly as the same sequence of `absorb` and `emit` calls would, byte for byte:
it is the same construction, only with the per-block work kept to a copy of a
pre-labelled chaining state, two updates and one digest (one SHA-512
compression for a 40-byte piece), so conditioning runs at hashing speed rather
than at the speed of Python bookkeeping.

Why reseed by block count
-------------------------
Reseeding limits what a leak of the state (a core dump, a memory read) gives
away: together with a raw recording it predicts output only until the next
reseed. Counting blocks needs no clock, so the pool keeps taking none, and it
bounds exposure by volume, the quantity that matters to clients: at most
``RESEED_BLOCKS`` blocks (32 KiB) follow from one state. At an Entropy Key's
~4 KB/s that is a reseed every ten seconds or so; an idle pool emits nothing and
has nothing to protect. Each reseed costs one 64-byte read of the kernel's
generator.
"""

import hashlib
import os
from collections.abc import Callable
from operator import itemgetter

BLOCK_BYTES = 32
SECRET_BYTES = 64
RESEED_BLOCKS = 1024
"""Output blocks (of ``BLOCK_BYTES``) between two reseeds: 32 KiB of output."""

SecretSource = Callable[[int], bytes]
"""Returns that many secret bytes; `os.urandom`, or a fixed stream in tests."""

_KEY_LABEL = b"ebroker conditioner v2 key"
_CHAIN_LABEL = b"ebroker conditioner v2 chain"
# Copied, never updated: each chained state starts from a copy of this one
# instead of hashing the label afresh.
_CHAIN_STATE = hashlib.sha512(_CHAIN_LABEL)
_OUTPUT_HALF = itemgetter(slice(0, BLOCK_BYTES))

Buffer = bytes | bytearray | memoryview


class Conditioner:
    """
    Keyed SHA-512 conditioner emitting 32-byte blocks.
    """

    def __init__(
        self, secret: SecretSource = os.urandom, reseed_blocks: int = RESEED_BLOCKS
    ) -> None:
        if reseed_blocks < 1:
            raise ValueError("reseed interval must be at least one block")
        self._secret = secret
        self._reseed_blocks = reseed_blocks
        self._until_reseed = reseed_blocks
        self._state = hashlib.sha512(_KEY_LABEL)
        self.blocks = 0
        self.reseeds = 0
        """Fresh secret material mixed in since start-up (not counting the key)."""
        self._mix_secret()

    def absorb(self, data: Buffer) -> None:
        """
        Mix ``data`` into the state.
        """
        self._state.update(data)

    def emit(self) -> bytes:
        """
        Digest the state into one output block and chain to the next state.

        Returns:
            ``BLOCK_BYTES`` bytes.
        """
        digest = self._state.digest()
        self._chain(digest[BLOCK_BYTES:], 1)
        return digest[:BLOCK_BYTES]

    def emit_blocks(
        self, data: Buffer, start: int, first: int, step: int, count: int
    ) -> bytes:
        """
        Absorb ``data[start:start + first]`` and emit a block, then ``count -
        1`` times absorb the next ``step`` bytes and emit a block: the same
        output and state as those `absorb` and `emit` calls one by one.

        Args:
            data: the input.
            start: where the first piece begins.
            first: length of the first piece (it completes the current block).
            step: length of every later piece.
            count: blocks to emit (at least 1).

        Returns:
            ``count * BLOCK_BYTES`` bytes.

        Raises:
            ValueError: ``step`` or ``count`` is less than 1.
        """
        if step < 1 or count < 1:
            raise ValueError("a run of blocks has at least one block of input")
        digests: list[bytes] = []
        append = digests.append
        copy = _CHAIN_STATE.copy
        position = start
        size = first
        while count:
            # The state at hand may hold more than a chained state (the key,
            # a reseed, uncredited input): it takes the run's first piece.
            state = self._state
            state.update(data[position : position + size])
            position += size
            digest = state.digest()
            append(digest)
            # Then plain chained states, up to the block that is due a reseed.
            run = min(count, self._until_reseed)
            carry = digest[BLOCK_BYTES:]
            end = position + (run - 1) * step
            for piece in range(position, end, step):
                state = copy()
                state.update(carry)
                state.update(data[piece : piece + step])
                digest = state.digest()
                append(digest)
                carry = digest[BLOCK_BYTES:]
            position = end
            count -= run
            size = step
            self._chain(carry, run)
        return b"".join(map(_OUTPUT_HALF, digests))

    def _chain(self, carry: bytes, blocks: int) -> None:
        """
        Start the next state from the hidden half of the last digest, after
        ``blocks`` emitted blocks, mixing in fresh secret material when a
        reseed is due.
        """
        self._state = _CHAIN_STATE.copy()
        self._state.update(carry)
        self.blocks += blocks
        self._until_reseed -= blocks
        if not self._until_reseed:
            self._mix_secret()
            self.reseeds += 1
            self._until_reseed = self._reseed_blocks

    def _mix_secret(self) -> None:
        material = self._secret(SECRET_BYTES)
        if len(material) != SECRET_BYTES:
            raise ValueError(
                f"secret source returned {len(material)} bytes, not {SECRET_BYTES}"
            )
        self._state.update(material)
