"""
Serial numbers, long-term keys and keyring files for simulated keys in tests
and demos.
"""

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from ..encoding import SERIAL_BYTES, serial_to_text
from ..keyring import format_keyring


@dataclass(frozen=True, slots=True)
class KeyPair:
    """
    A serial number and its long-term key.
    """

    serial: bytes
    long_term_key: bytes

    @property
    def serial_text(self) -> str:
        """
        The 16-character PEM serial.
        """
        return serial_to_text(self.serial)

    def keyring_text(self) -> str:
        """
        A keyring file (header and one line) holding this key.
        """
        return format_keyring({self.serial: self.long_term_key})


def random_serial() -> bytes:
    """
    Return a random 12-byte serial number.
    """
    return os.urandom(SERIAL_BYTES)


def new_key_pair() -> KeyPair:
    """
    Return a random serial with a random long-term key.
    """
    return KeyPair(random_serial(), os.urandom(32))


def write_keyring(path: str | Path, pairs: Iterable[KeyPair]) -> None:
    """
    Write a keyring file with mode 0600 (replacing any file at ``path``).
    """
    text = format_keyring({pair.serial: pair.long_term_key for pair in pairs})
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="ascii") as file:
        # O_CREAT's mode does not apply to a file that already existed.
        os.fchmod(file.fileno(), 0o600)
        file.write(text)
