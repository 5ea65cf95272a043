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

BLOCK_BYTES = 32
SECRET_BYTES = 64
RESEED_BLOCKS = 1024
"""Output blocks (of ``BLOCK_BYTES``) between two reseeds: 32 KiB of output."""

SecretSource = Callable[[int], bytes]
"""Returns that many secret bytes; `os.urandom`, or a fixed stream in tests."""

_KEY_LABEL = b"ebroker conditioner v2 key"
_CHAIN_LABEL = b"ebroker conditioner v2 chain"


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

    def absorb(self, data: bytes | memoryview) -> None:
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
        self._state = hashlib.sha512(_CHAIN_LABEL)
        self._state.update(digest[BLOCK_BYTES:])
        self.blocks += 1
        self._until_reseed -= 1
        if not self._until_reseed:
            self._mix_secret()
            self.reseeds += 1
            self._until_reseed = self._reseed_blocks
        return digest[:BLOCK_BYTES]

    def _mix_secret(self) -> None:
        material = self._secret(SECRET_BYTES)
        if len(material) != SECRET_BYTES:
            raise ValueError(
                f"secret source returned {len(material)} bytes, not {SECRET_BYTES}"
            )
        self._state.update(material)
