"""
Config model of the Entropy Key source.
"""

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from broker.configbase import Duration, Size, SourceConfigBase

from .encoding import serial_from_text

ANY_SERIAL = "*"
DEFAULT_KEYRING = Path("/etc/entropykey/keyring")


class EntropyKeySourceConfig(SourceConfigBase):
    """
    ``kind = "entropykey"``: a Simtec Entropy Key.
    """

    kind: Literal["entropykey"] = Field(description="source driver")
    serial: str = Field(
        description="the key's 16-character serial number, or '*' for every key on "
        "the bus that the keyring knows"
    )
    keyring: Path = Field(
        default=DEFAULT_KEYRING,
        description="ekeyd keyring file (serial and long-term key per line, mode 0600)",
    )
    transport: Literal["usb", "tty", "unix", "simulated"] = Field(
        default="usb",
        description="usb (pyusb, detaches cdc_acm), tty (/dev/ttyACM* or "
        "/dev/entropykey/SERIAL), unix (a stream socket such as ekey-ulusbd's), "
        "or simulated (an in-process device model, to try ebroker without "
        "hardware)",
    )
    path: Path | None = Field(
        default=None,
        description="device or socket path for the tty and unix transports",
    )
    simulated_rate: Size = Field(
        default=4000,
        ge=100,
        le=1 << 20,
        description="entropy bytes per second a simulated key delivers",
    )
    response_timeout: Duration = Field(
        default=5.0, gt=0, description="seconds without a valid frame before a reset"
    )
    rescan_interval: Duration = Field(
        default=5.0,
        gt=0,
        description="with serial = '*', how often to look for newly plugged keys",
    )

    @field_validator("serial")
    @classmethod
    def _serial_is_pem(cls, value: str) -> str:
        if value == ANY_SERIAL:
            return value
        try:
            serial_from_text(value)
        except ValueError:
            raise ValueError(
                f"{value!r} is not an Entropy Key serial (16 characters of "
                "A-Z a-z 0-9 + /, as printed by `ebroker keys`)"
            ) from None
        return value

    @model_validator(mode="after")
    def _path_matches_transport(self) -> "EntropyKeySourceConfig":
        if self.transport in ("tty", "unix") and self.path is None:
            raise ValueError(f"transport {self.transport!r} needs a 'path'")
        if self.serial == ANY_SERIAL and self.transport in ("tty", "unix"):
            raise ValueError(
                "serial = '*' needs the usb or simulated transport; a tty or socket "
                "path is one key"
            )
        return self

    @property
    def serial_bytes(self) -> bytes | None:
        if self.serial == ANY_SERIAL:
            return None
        return serial_from_text(self.serial)
