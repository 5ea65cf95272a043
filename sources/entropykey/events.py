"""
What an Entropy Key `Session` reports: its states, its health and status,
the events `Session.next_event` returns, and its running totals.

These are plain frozen values with no behaviour beyond formatting, so the
driver and tests can match on them without reaching into the state machine.
"""

import enum
from dataclasses import dataclass
from typing import Final

from .encoding import serial_to_text
from .wire import Info


class SessionState(enum.Enum):
    """
    Connection states of spec 9.1.
    """

    INIT = "init"
    SESSION = "session"
    SESSION_SENT = "session_sent"
    KEYED_FIRST = "keyed_first"
    KEYED = "keyed"
    KEYED_BAD = "keyed_bad"
    UNTRUSTED = "untrusted"
    CLOSED = "closed"


class Health(enum.StrEnum):
    """
    Coarse health, with the same values as the broker's ``SourceState``.
    """

    STARTING = "starting"
    HEALTHY = "healthy"
    QUARANTINED = "quarantined"
    STALLED = "stalled"
    FAILED = "failed"
    STOPPED = "stopped"


@dataclass(frozen=True, slots=True)
class Status:
    """
    Where the session stands; ``creditable`` is true only while HEALTHY.
    """

    health: Health
    reason: str
    state: SessionState

    @property
    def creditable(self) -> bool:
        """
        Whether entropy delivered now may be credited.
        """
        return self.health is Health.HEALTHY


@dataclass(frozen=True, slots=True)
class EntropyBlock:
    """
    32 decrypted bytes from one ``E!`` frame. Never credit it unless ``creditable``.
    """

    data: bytes
    sequence: int
    creditable: bool


@dataclass(frozen=True, slots=True)
class StatusReport:
    """
    A MAC-verified ``I>`` frame: temperature, voltage, FIPS or generator records.
    """

    info: Info


@dataclass(frozen=True, slots=True)
class SerialNumber:
    """
    The key identified itself (first valid ``S!`` frame of the session).
    """

    serial: bytes
    protocol_version: int

    @property
    def text(self) -> str:
        """
        The 16-character PEM form used by keyrings and udev.
        """
        return serial_to_text(self.serial)


@dataclass(frozen=True, slots=True)
class StateChanged:
    """
    The state or the status reason changed.
    """

    old: Status
    new: Status


@dataclass(frozen=True, slots=True)
class Anomaly:
    """
    Something worth a log line that did not by itself end the session.

    ``kind`` is one of: ``mac``, ``protocol``, ``sequence``, ``warning``,
    ``info``, ``reset``, ``timeout``.
    """

    kind: str
    detail: str


Event = EntropyBlock | StatusReport | SerialNumber | StateChanged | Anomaly


class NeedData(enum.Enum):
    """
    Sentinel type of `NEED_DATA`.
    """

    NEED_DATA = "NEED_DATA"


NEED_DATA: Final = NeedData.NEED_DATA


@dataclass(frozen=True, slots=True)
class Counters:
    """
    Running totals, named after ekeyd's ``StatEntropyKey`` fields where they exist.
    """

    frames_ok: int
    framing_errors: int
    packets_ok: int
    packet_errors: int
    resets: int
    nonces: int
    rekeys: int
    total_entropy: int
    sequence_errors: int
    timeouts: int
    stale_frames: int
    """Frames the key queued before it saw a reset, skipped unchecked or
    under the session key they were sent with."""
