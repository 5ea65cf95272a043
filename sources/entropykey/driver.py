"""
The Entropy Key source: one key, over any transport, as a broker `Source`.

The driver pumps bytes between a `KeyTransport` and the sans-I/O `Session`,
returns decrypted entropy that the session marks creditable, and turns the
session's health into the exceptions the supervisor understands: a key that
reports a latched generator failure raises `SourceQuarantined` (its data is
never credited), a silent key `SourceStalled`, anything else that ends the
session `SourceError` with the session's reason. It also keeps the key's
latest status records (temperature, voltage, FIPS counters) for status pages.

The session's response timer judges the key, not the host: the supervisor may
leave a key unread for many seconds (a full pool, a standby tier), so the time
between calls to `read` is taken off the timer, and a timer that expires while
a transport read is in flight leaves that read running for the next turn
rather than cancelling it and losing the bytes it was returning.
"""

import asyncio
import time
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import structlog

from broker.errors import SourceError, SourceQuarantined, SourceStalled

from .encoding import serial_from_text
from .events import (
    Anomaly,
    EntropyBlock,
    Health,
    SerialNumber,
    StateChanged,
    StatusReport,
)
from .keyring import KeyringError, load_keyring
from .session import OPENING_RESET, Session
from .transport import KeyTransport
from .wire import Info

log = structlog.get_logger("ebroker.entropykey")

# What a real key delivers, per the field reports (about 4 kB/s).
NOMINAL_RATE = 4000.0


class EntropyKeySource:
    """
    One Entropy Key.

    Args:
        name: source name for logs and status.
        serial: the key's 16-character serial.
        keyring: path of the ekeyd keyring holding its long-term key.
        transport: how bytes reach the key.
        priority: tier.
        credit: bits credited per byte.
        response_timeout: seconds without a valid frame before a reset.
        nominal_rate: bytes per second expected.
    """

    kind = "entropykey"

    def __init__(
        self,
        *,
        name: str,
        serial: str,
        keyring: Path,
        transport: KeyTransport,
        priority: int = 0,
        credit: float = 8.0,
        response_timeout: float = 5.0,
        nominal_rate: float = NOMINAL_RATE,
    ) -> None:
        self.name = name
        self.serial = serial
        self.priority = priority
        self.credit = credit
        self.transport = transport
        self._keyring_path = keyring
        self._response_timeout = response_timeout
        self._nominal_rate = nominal_rate
        self._session: Session | None = None
        self._pending: asyncio.Task[bytes] | None = None
        # Loop time at which the driver last stopped reading (None while open
        # and inside `read`, or closed).
        self._idle_since: float | None = None
        self._info = Info()
        self._fips_failed = 0
        self._fips_tested = 0
        self._failure_mode = "0"
        self._bytes_delivered = 0
        self._frames_ok = 0
        self._mac_failures = 0
        self._resets = 0
        self._rekeys = 0
        self._last_seen = 0.0
        self._log = log.bind(source=name, serial=serial)

    @property
    def nominal_rate(self) -> float | None:
        return self._nominal_rate

    # ---- lifecycle ----------------------------------------------------------------

    async def __aenter__(self) -> Self:
        try:
            keyring = await asyncio.to_thread(load_keyring, self._keyring_path)
        except (KeyringError, OSError) as exc:
            raise SourceError(f"keyring: {exc}") from exc
        serial_bytes = serial_from_text(self.serial)
        if serial_bytes not in keyring:
            raise SourceError(
                f"keyring {self._keyring_path} has no long-term key for {self.serial} "
                f"(set one with: ebroker rekey --serial {self.serial})"
            )
        await self.transport.open()
        loop = asyncio.get_running_loop()
        self._session = Session(
            keyring,
            expected_serial=serial_bytes,
            response_timeout=self._response_timeout,
        )
        self._session.start(loop.time())
        try:
            await self._flush()
        except BaseException:
            await self.transport.close()
            raise
        self._idle_since = loop.time()
        self._log.info("entropykey_opened", attachment=self.transport.description)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        session, self._session = self._session, None
        self._idle_since = None
        if session is not None:
            self._absorb_counters(session)
            session.close("driver closed")
        await self._cancel_pending()
        await self.transport.close()

    async def _cancel_pending(self) -> None:
        pending, self._pending = self._pending, None
        if pending is None:
            return
        pending.cancel(msg="Entropy Key source closing")
        # wait() rather than await: our own cancellation still propagates,
        # and the read's outcome is retrieved below instead of raised.
        await asyncio.wait({pending})
        if not pending.cancelled():
            # Retrieved so that asyncio does not report it: a read that failed
            # while the key was closing tells nothing the closing does not.
            pending.exception()

    # ---- reading --------------------------------------------------------------------

    async def read(self) -> bytes:
        session = self._session
        if session is None:
            raise SourceError(f"Entropy Key {self.serial} is not open")
        loop = asyncio.get_running_loop()
        idle_since, self._idle_since = self._idle_since, None
        if idle_since is not None:
            session.extend_timer(loop.time() - idle_since)
        try:
            while True:
                entropy = self._drain_events(session)
                if entropy:
                    self._bytes_delivered += len(entropy)
                    return entropy
                self._raise_for_health(session)
                pending = self._pending
                if pending is None:
                    pending = self._pending = asyncio.create_task(
                        self.transport.read(), name=f"read:{self.name}"
                    )
                deadline = session.get_timer()
                timeout = None if deadline is None else deadline - loop.time()
                await asyncio.wait({pending}, timeout=timeout)
                if pending.done():
                    # Bytes that arrived count before the timer is judged.
                    self._pending = None
                    data = pending.result()
                    self._last_seen = time.time()
                    session.receive_data(data, loop.time())
                else:
                    session.handle_timer(loop.time())
                await self._flush()
        finally:
            self._idle_since = loop.time()

    def _drain_events(self, session: Session) -> bytes:
        entropy = bytearray()
        for event in session.events():
            match event:
                case EntropyBlock(data=data, creditable=True):
                    entropy += data
                case EntropyBlock():
                    pass  # a quarantined key's output is never credited, nor passed on
                case StatusReport(info=info):
                    self._record_info(info)
                case StateChanged(old=old, new=new):
                    self._log.info(
                        "entropykey_state",
                        previous=str(old.health),
                        health=str(new.health),
                        state=new.state.value,
                        reason=new.reason,
                    )
                case SerialNumber():
                    pass  # the session already checked it against the keyring
                case Anomaly(kind="reset", detail=detail) if detail == OPENING_RESET:
                    # Every session begins with a reset: routine, not an anomaly.
                    self._log.info("entropykey_session_opening", reset=detail)
                case Anomaly(kind=kind, detail=detail):
                    self._log.warning("entropykey_anomaly", anomaly=kind, detail=detail)
        return bytes(entropy)

    def _raise_for_health(self, session: Session) -> None:
        status = session.status
        if status.health is Health.QUARANTINED:
            raise SourceQuarantined(f"key reports generator failure: {status.reason}")
        if status.health is Health.STALLED:
            raise SourceStalled(status.reason)
        if status.health in (Health.FAILED, Health.STOPPED):
            raise SourceError(status.reason)

    async def _flush(self) -> None:
        if self._session is None:
            return
        outgoing = self._session.data_to_send()
        if outgoing:
            await self.transport.write(outgoing)

    # ---- status ---------------------------------------------------------------------

    def _record_info(self, info: Info) -> None:
        self._info = Info(
            temperature_dk=(
                info.temperature_dk
                if info.temperature_dk is not None
                else self._info.temperature_dk
            ),
            voltage_mv=info.voltage_mv
            if info.voltage_mv is not None
            else self._info.voltage_mv,
            fips=info.fips or self._info.fips,
            generator=info.generator or self._info.generator,
        )
        if info.fips is not None:
            self._fips_tested = info.fips.blocks_tested
            self._fips_failed = info.fips.blocks_failed
        if info.generator is not None:
            self._failure_mode = info.generator.failure_code

    def _absorb_counters(self, session: Session) -> None:
        counters = session.counters
        self._frames_ok += counters.frames_ok
        self._mac_failures += counters.packet_errors
        self._resets += counters.resets
        self._rekeys += counters.rekeys

    def details(self) -> dict[str, Any]:
        """
        Key-specific status: attachment, session, temperature, voltage, counters.
        """
        session = self._session
        frames_ok, mac_failures = self._frames_ok, self._mac_failures
        resets, rekeys = self._resets, self._rekeys
        session_state = "closed"
        reason = ""
        if session is not None:
            counters = session.counters
            frames_ok += counters.frames_ok
            mac_failures += counters.packet_errors
            resets += counters.resets
            rekeys += counters.rekeys
            session_state = session.state.value
            reason = session.status.reason
        temperature = self._info.temperature_c
        voltage = self._info.voltage_mv
        return {
            "serial": self.serial,
            "keyring": str(self._keyring_path.absolute()),
            "attachment": self.transport.description,
            "session": session_state,
            "session_reason": reason,
            "temperature_c": round(temperature, 1) if temperature is not None else None,
            "voltage_v": voltage / 1000 if voltage is not None else None,
            "fips_blocks_tested": self._fips_tested,
            "fips_failures": self._fips_failed,
            "failure_mode": self._failure_mode,
            "frames_ok": frames_ok,
            "mac_failures": mac_failures,
            "resets": resets,
            "rekeys": rekeys,
            "bytes_delivered": self._bytes_delivered,
            "last_seen": self._last_seen or None,
        }
