"""
Skein-256 as the Simtec Entropy Key uses it (protocol spec sections 7 and 8).

The key runs the original 2008 Skein (v1.0/v1.1 rotation constants and key
schedule parity), so no modern Skein library gives the right answers. On top of
the plain hash this module provides the key's "prepared state" procedure, with
its truncated and never-finalised personalisation block, the two finalisations
(``final`` with an output stage, ``final_pad`` without one), and the derived
operations of spec section 8: frame MACs, session keys, one-time pads, the
long-term nonce MAC and long-term keys.

Performance: one Threefish block costs a few tens of microseconds; a frame costs
four blocks (two for the MAC, two for the pad), so a key's ~125 frames per second
stay well under 10 % of a core.
"""

import struct
from typing import Final, Self

_MASK: Final = (1 << 64) - 1
_PARITY: Final = 0x5555555555555555  # v1.1; v1.3 changed it to 0x1BD11BDAA9FC1A22
_WORDS = struct.Struct("<4Q")

BLOCK_BYTES: Final = 32

TYPE_KEY: Final = 0
TYPE_CFG: Final = 4
TYPE_PERS: Final = 8
TYPE_MSG: Final = 48
TYPE_OUT: Final = 63
_FIRST: Final = 1 << 62
_FINAL: Final = 1 << 63

PERS_RS: Final = b"20090609 support@simtec.co.uk EntropyKey/v1/ReKeyingState".ljust(96)
PERS_PMS: Final = (
    b"20090609 support@simtec.co.uk EntropyKey/v1/MessageAuthenticationCodeState"
).ljust(96)
PERS_EES: Final = (
    b"20090609 support@simtec.co.uk EntropyKey/v1/EntropyEncryptionState"
).ljust(96)
PERS_LRS: Final = (
    b"20090609 support@simtec.co.uk EntropyKey/v1/LongTermReKeyingState"
).ljust(96)
PERS_LKMS: Final = (
    b"20090609 support@simtec.co.uk EntropyKey/"
    b"v1/MessageAuthenticationCodeStateForLongTermReKeying"
).ljust(96)

ZERO_KEY: Final = bytes(32)

Words = tuple[int, int, int, int]


def threefish256(key: Words, t0: int, t1: int, block: Words) -> Words:
    """
    Encrypt one block with Threefish-256 using the v1.1 constants.

    Args:
        key: the four 64-bit key words (the UBI chaining value).
        t0: low tweak word (byte position).
        t1: high tweak word (type and flags).
        block: the four 64-bit plaintext words.

    Returns:
        The four ciphertext words (no feed-forward).
    """
    m = _MASK
    k0, k1, k2, k3 = key
    k4 = _PARITY ^ k0 ^ k1 ^ k2 ^ k3
    kx = (k0, k1, k2, k3, k4, k0, k1, k2, k3)
    tx = (t0, t1, t0 ^ t1, t0, t1)
    x0, x1, x2, x3 = block
    # Nine passes of eight rounds; subkeys 2p and 2p+1 are injected inside the
    # pass, subkey 18 after the loop. The rotations are the v1.1 table.
    for p in range(9):
        s = 2 * p
        i, j = s % 5, s % 3
        x0 = (x0 + kx[i]) & m
        x1 = (x1 + kx[i + 1] + tx[j]) & m
        x2 = (x2 + kx[i + 2] + tx[j + 1]) & m
        x3 = (x3 + kx[i + 3] + s) & m
        x0 = (x0 + x1) & m
        x1 = (((x1 << 5) | (x1 >> 59)) & m) ^ x0
        x2 = (x2 + x3) & m
        x3 = (((x3 << 56) | (x3 >> 8)) & m) ^ x2
        x0 = (x0 + x3) & m
        x3 = (((x3 << 36) | (x3 >> 28)) & m) ^ x0
        x2 = (x2 + x1) & m
        x1 = (((x1 << 28) | (x1 >> 36)) & m) ^ x2
        x0 = (x0 + x1) & m
        x1 = (((x1 << 13) | (x1 >> 51)) & m) ^ x0
        x2 = (x2 + x3) & m
        x3 = (((x3 << 46) | (x3 >> 18)) & m) ^ x2
        x0 = (x0 + x3) & m
        x3 = (((x3 << 58) | (x3 >> 6)) & m) ^ x0
        x2 = (x2 + x1) & m
        x1 = (((x1 << 44) | (x1 >> 20)) & m) ^ x2
        s += 1
        i, j = s % 5, s % 3
        x0 = (x0 + kx[i]) & m
        x1 = (x1 + kx[i + 1] + tx[j]) & m
        x2 = (x2 + kx[i + 2] + tx[j + 1]) & m
        x3 = (x3 + kx[i + 3] + s) & m
        x0 = (x0 + x1) & m
        x1 = (((x1 << 26) | (x1 >> 38)) & m) ^ x0
        x2 = (x2 + x3) & m
        x3 = (((x3 << 20) | (x3 >> 44)) & m) ^ x2
        x0 = (x0 + x3) & m
        x3 = (((x3 << 53) | (x3 >> 11)) & m) ^ x0
        x2 = (x2 + x1) & m
        x1 = (((x1 << 35) | (x1 >> 29)) & m) ^ x2
        x0 = (x0 + x1) & m
        x1 = (((x1 << 11) | (x1 >> 53)) & m) ^ x0
        x2 = (x2 + x3) & m
        x3 = (((x3 << 42) | (x3 >> 22)) & m) ^ x2
        x0 = (x0 + x3) & m
        x3 = (((x3 << 59) | (x3 >> 5)) & m) ^ x0
        x2 = (x2 + x1) & m
        x1 = (((x1 << 50) | (x1 >> 14)) & m) ^ x2
    x0 = (x0 + kx[3]) & m
    x1 = (x1 + kx[4] + tx[0]) & m
    x2 = (x2 + kx[5] + tx[1]) & m
    x3 = (x3 + kx[6] + 18) & m
    return (x0, x1, x2, x3)


class Skein256:
    """
    A streaming UBI chain over Threefish-256 (one "Skein context").

    Follows the reference code's buffering rule: a full block is only compressed
    once more data arrives, so the last block of every UBI call carries FINAL.
    Copy a prepared instance with `copy` rather than preparing it again.
    """

    __slots__ = ("_buf", "_cv", "_first", "_pos", "_type")

    def __init__(self, cv: Words = (0, 0, 0, 0), block_type: int = TYPE_MSG) -> None:
        self._cv = cv
        self._buf = b""
        self._pos = 0
        self._type = block_type
        self._first = True

    @classmethod
    def hash_state(cls) -> Self:
        """
        Return a context ready for a plain Skein-256-256 hash (v1.1 IV).
        """
        ctx = cls((0, 0, 0, 0), TYPE_CFG)
        ctx.update(_config_block(256))
        return cls(ctx._finish())

    def copy(self) -> "Skein256":
        """
        Return an independent copy of this context.
        """
        other = Skein256(self._cv, self._type)
        other._buf = self._buf
        other._pos = self._pos
        other._first = self._first
        return other

    def start(self, block_type: int) -> None:
        """
        Begin a new UBI call of ``block_type``, discarding any buffered bytes.
        """
        self._buf = b""
        self._pos = 0
        self._type = block_type
        self._first = True

    def _compress(self, block: bytes, final: bool) -> None:
        t1 = self._type << 56
        if self._first:
            t1 |= _FIRST
            self._first = False
        if final:
            t1 |= _FINAL
        words = _WORDS.unpack(block)
        out = threefish256(self._cv, self._pos, t1, words)
        self._cv = (
            out[0] ^ words[0],
            out[1] ^ words[1],
            out[2] ^ words[2],
            out[3] ^ words[3],
        )

    def update(self, data: bytes) -> None:
        """
        Feed bytes into the current UBI call.
        """
        buf = self._buf + data
        n = len(buf)
        off = 0
        # Strictly greater: the last full block waits in case it is the final one.
        while n - off > BLOCK_BYTES:
            self._pos += BLOCK_BYTES
            self._compress(buf[off : off + BLOCK_BYTES], final=False)
            off += BLOCK_BYTES
        self._buf = buf[off:]

    def _finish(self) -> Words:
        self._pos += len(self._buf)
        self._compress(self._buf.ljust(BLOCK_BYTES, b"\0"), final=True)
        self._buf = b""
        return self._cv

    def final_pad(self) -> bytes:
        """
        Finish the current UBI call and return the chaining value (no output stage).
        """
        return _WORDS.pack(*self._finish())

    def final(self) -> bytes:
        """
        Finish the current UBI call, run the output stage and return 32 bytes.
        """
        self._finish()
        self.start(TYPE_OUT)
        # The output message is counter 0 as 8 bytes; T0 counts only those 8.
        self._buf = bytes(8)
        return _WORDS.pack(*self._finish())


def _config_block(output_bits: int) -> bytes:
    return b"SHA3" + struct.pack("<HHQ", 1, 0, output_bits) + bytes(16)


def skein256(message: bytes) -> bytes:
    """
    Return the plain (v1.1) Skein-256-256 digest of ``message``.
    """
    ctx = Skein256.hash_state()
    ctx.update(message)
    return ctx.final()


def iv_words(output_bits: int) -> Words:
    """
    Return the Skein-256 IV for ``output_bits`` (checks against spec 17.1).
    """
    ctx = Skein256((0, 0, 0, 0), TYPE_CFG)
    ctx.update(_config_block(output_bits))
    return ctx._finish()


def prepare(serial: bytes, secret: bytes, personalisation: bytes) -> Skein256:
    """
    Build the key's "prepared state" (spec 7.2), quirk included.

    Args:
        serial: the 12-byte binary serial number.
        secret: the 32-byte key (master, long-term or session key).
        personalisation: one of the 96-byte ``PERS_*`` strings.

    Returns:
        A context in message mode; copy it for each use.
    """
    ctx = Skein256((0, 0, 0, 0), TYPE_KEY)
    ctx.update(serial + secret)
    ctx = Skein256(ctx._finish(), TYPE_CFG)
    ctx.update(_config_block(256))
    ctx = Skein256(ctx._finish(), TYPE_PERS)
    # Only two of the three blocks get compressed; the third stays buffered and
    # is dropped by start(), exactly like the firmware.
    ctx.update(personalisation)
    ctx.start(TYPE_MSG)
    return ctx


def mac48(state: Skein256, data: bytes) -> bytes:
    """
    Return the 6-byte MAC of ``data``: Final_Pad bytes 0..2 and 29..31.
    """
    ctx = state.copy()
    ctx.update(data)
    full = ctx.final_pad()
    return full[0:3] + full[29:32]


def keyed_hash(state: Skein256, *parts: bytes) -> bytes:
    """
    Return ``Final(state + parts...)``: the 32-byte derivation of spec section 8.
    """
    ctx = state.copy()
    for part in parts:
        ctx.update(part)
    return ctx.final()


class SessionCrypto:
    """
    The per-session-key states: frame MAC (PMS) and entropy pad (EES).

    Build one per session key (zero key after reset) and reuse it for every frame.
    """

    __slots__ = ("_ees", "_pms", "key", "serial")

    def __init__(self, serial: bytes, session_key: bytes = ZERO_KEY) -> None:
        self.serial = serial
        self.key = session_key
        self._pms = prepare(serial, session_key, PERS_PMS)
        self._ees = prepare(serial, session_key, PERS_EES)

    def mac(self, body: bytes) -> bytes:
        """
        Return the 6-byte MAC of frame bytes 2..53.
        """
        return mac48(self._pms, body)

    def pad(self, subcode_chars: bytes) -> bytes:
        """
        Return the 32-byte one-time pad for the two raw sub-code characters.
        """
        return keyed_hash(self._ees, subcode_chars)


def derive_session_key(
    serial: bytes, long_term_key: bytes, device_entropy: bytes, nonce: bytes
) -> bytes:
    """
    Return ``SK' = Final(Prep(RS, LTK) + device entropy + host nonce)``.
    """
    return keyed_hash(prepare(serial, long_term_key, PERS_RS), device_entropy, nonce)


def derive_long_term_key(
    serial: bytes, master_key: bytes, device_entropy: bytes, nonce: bytes
) -> bytes:
    """
    Return ``LTK' = Final(Prep(LRS, MK) + device entropy + LT nonce)``.
    """
    return keyed_hash(prepare(serial, master_key, PERS_LRS), device_entropy, nonce)


def lt_nonce_mac(serial: bytes, master_key: bytes, nonce: bytes) -> bytes:
    """
    Return the 6-byte long-term nonce MAC, ``Final_Pad(Prep(LKMS, MK) + nonce)``.
    """
    return mac48(prepare(serial, master_key, PERS_LKMS), nonce)
