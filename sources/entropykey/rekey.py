"""
Long-term re-keying (what ekey-setkey does), sans-I/O, plus an async runner.

Theory of operation
-------------------
`LongTermRekey` is fed device bytes and answers with host bytes:

1. start: send a reset (0x03) and wait for a ``S!`` frame whose serial is the
   one asked for (other frames are skipped; after `MAX_FRAMES` the reset is
   re-sent, as ekey-setkey does).
2. send ``M`` + PEM(MAC48(LKMS, MK, N)) for a fresh 12-byte nonce N; wait for
   ``M>``.
3. send ``L`` + PEM(N) + ``.``; wait for ``L!`` (success) or ``l>`` (the key
   refused: the master key does not match, or re-keying is locked out).
4. on ``L!`` with a valid MAC (zero session key: the reset cleared it), the new
   long-term key is ``Final(Prep(LRS, MK) + L!-payload + N)``.

Every frame must carry a valid MAC under the zero key, so nothing forged on the
line can make us store a key the device does not hold. The caller writes the
keyring only after `done`, i.e. after the device confirmed with ``L!``.
"""

import enum
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from broker.errors import SourceError

from .keyring import HEADER, KeyringError, check_keyring_permissions, parse_keyring
from .keyring import format_keyring as _format_keyring
from .skein import SessionCrypto, derive_long_term_key, lt_nonce_mac
from .transport import KeyTransport
from .wire import (
    RESET,
    FrameError,
    FrameSynchroniser,
    FrameType,
    encode_lt_mac,
    encode_lt_rekey,
    parse_packet,
    verify_mac,
)

MAX_FRAMES = 20
NONCE_BYTES = 12


class RekeyError(Exception):
    """
    The long-term re-key did not complete; no key was changed on the host.
    """


class _Step(enum.Enum):
    WAIT_SERIAL = "wait_serial"
    WAIT_UNLOCK = "wait_unlock"
    WAIT_REKEY = "wait_rekey"
    DONE = "done"


@dataclass(frozen=True, slots=True)
class RekeyResult:
    """
    The new long-term key the device confirmed.
    """

    serial: bytes
    long_term_key: bytes


class LongTermRekey:
    """
    The host side of one long-term re-key.

    Args:
        serial: the key's 12-byte serial.
        master_key: the 32-byte master key from the key's card.
        random_bytes: source of the nonce.
    """

    def __init__(
        self,
        serial: bytes,
        master_key: bytes,
        random_bytes: Callable[[int], bytes] = os.urandom,
    ) -> None:
        self._serial = serial
        self._master_key = master_key
        self._nonce = random_bytes(NONCE_BYTES)
        self._crypto = SessionCrypto(serial)
        self._sync = FrameSynchroniser()
        self._out = bytearray(RESET)
        self._step = _Step.WAIT_SERIAL
        self._skipped = 0
        self.result: RekeyResult | None = None

    @property
    def done(self) -> bool:
        return self._step is _Step.DONE

    def data_to_send(self) -> bytes:
        out = bytes(self._out)
        self._out.clear()
        return out

    def receive_data(self, data: bytes) -> None:
        """
        Feed device bytes.

        Raises:
            RekeyError: the device refused, or never answered as expected.
        """
        for frame in self._sync.feed(data):
            if self._step is _Step.DONE:
                return
            self._handle(frame)

    def _handle(self, frame: bytes) -> None:
        try:
            packet = parse_packet(frame)
        except FrameError:
            self._skip()
            return
        if not verify_mac(packet, self._crypto):
            self._skip()
            return
        if self._step is _Step.WAIT_SERIAL:
            if packet.type is FrameType.SERIAL and packet.data == self._serial:
                nonce_mac = lt_nonce_mac(self._serial, self._master_key, self._nonce)
                self._out += encode_lt_mac(nonce_mac)
                self._step, self._skipped = _Step.WAIT_UNLOCK, 0
            elif packet.type is FrameType.SERIAL:
                raise RekeyError("the device on this path has a different serial")
            else:
                self._skip(resend_reset=True)
        elif self._step is _Step.WAIT_UNLOCK:
            if packet.type is FrameType.LT_UNLOCKED:
                self._out += encode_lt_rekey(self._nonce)
                self._step, self._skipped = _Step.WAIT_REKEY, 0
            else:
                self._skip()
        elif self._step is _Step.WAIT_REKEY:
            if packet.type is FrameType.LT_REKEY and len(packet.data) == 32:
                key = derive_long_term_key(
                    self._serial, self._master_key, packet.data, self._nonce
                )
                self.result = RekeyResult(self._serial, key)
                self._step = _Step.DONE
            elif packet.type is FrameType.LT_REFUSED:
                raise RekeyError(
                    f"the key refused: {packet.text or 'refused'} (is this the master "
                    "key printed on this key's card?)"
                )
            elif packet.type is FrameType.GONE_BAD:
                raise RekeyError("the key reports its generators have failed")
            else:
                self._skip()

    def _skip(self, *, resend_reset: bool = False) -> None:
        self._skipped += 1
        if self._skipped > MAX_FRAMES:
            raise RekeyError(f"no answer from the key at step {self._step.value}")
        if resend_reset:
            self._out += RESET


async def run_rekey(
    transport: KeyTransport, serial: bytes, master_key: bytes, timeout: float = 20.0
) -> RekeyResult:
    """
    Drive a `LongTermRekey` over ``transport``.

    Raises:
        RekeyError: refused, wrong key, or no answer within ``timeout``.
    """
    import asyncio

    rekey = LongTermRekey(serial, master_key)
    await transport.open()
    try:
        async with asyncio.timeout(timeout):
            while not rekey.done:
                outgoing = rekey.data_to_send()
                if outgoing:
                    await transport.write(outgoing)
                rekey.receive_data(await transport.read())
    except TimeoutError:
        raise RekeyError(f"the key did not answer within {timeout:g} s") from None
    except SourceError as exc:
        raise RekeyError(str(exc)) from exc
    finally:
        await transport.close()
    if rekey.result is None:  # done implies a result; kept for the type checker
        raise RekeyError("re-key ended without a key")
    return rekey.result


def store_long_term_key(path: Path, serial: bytes, long_term_key: bytes) -> None:
    """
    Put (or replace) one key in the keyring, atomically, keeping mode 0600.

    Raises:
        KeyringError: the existing keyring is malformed or too widely readable.
    """
    keys: dict[bytes, bytes] = {}
    if path.exists():
        check_keyring_permissions(path)
        keys = parse_keyring(path.read_text(encoding="ascii"))
    keys.pop(serial, None)
    # ekey-setkey writes the newest key first.
    text = _format_keyring({serial: long_term_key, **keys})
    if not text.startswith(HEADER):
        raise KeyringError("unexpected keyring format")
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="ascii") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        temporary.replace(path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
