"""
The ekeyd keyring file and the master-key card format (spec 11.1 and 11.3).

A keyring line is ``<16-char PEM serial> <44-char PEM long-term key>``; lines
that are empty or start with ``#`` are comments. A later line for the same
serial replaces an earlier one. The file holds secrets, so `load_keyring`
refuses one that group or others can read, or that another user owns.
"""

import os
import re
import stat
from collections.abc import Mapping
from pathlib import Path
from typing import Final

from .encoding import (
    SERIAL_BYTES,
    crc8,
    pem_decode,
    pem_decode_exact,
    pem_encode,
    serial_from_text,
    serial_to_text,
)

HEADER: Final = "# Do not edit this directly, this file is managed by ekey-setkey"
KEY_LEN: Final = 32

_TOKEN: Final = re.compile(r"[A-Za-z0-9+/=]+")


class KeyringError(ValueError):
    """
    A keyring or master key is malformed.
    """


class KeyringPermissionError(KeyringError):
    """
    The keyring file is accessible to its group or others, or owned by another
    user.
    """


def parse_keyring(text: str) -> dict[bytes, bytes]:
    """
    Parse keyring text into a map of binary serial -> long-term key.

    Raises:
        KeyringError: a non-comment line is not a serial and a key.
    """
    keys: dict[bytes, bytes] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        fields = line.split()
        if not fields or fields[0].startswith("#"):
            continue
        if len(fields) < 2 or not all(_TOKEN.fullmatch(f) for f in fields[:2]):
            raise KeyringError(f"keyring line {number}: expected '<serial> <key>'")
        try:
            serial = serial_from_text(fields[0])
            key = pem_decode_exact(fields[1].encode("ascii"), KEY_LEN)
        except ValueError:
            raise KeyringError(
                f"keyring line {number}: serial must be 16 PEM characters "
                "and the key 44"
            ) from None
        keys[serial] = key
    return keys


def format_keyring(keys: Mapping[bytes, bytes]) -> str:
    """
    Return keyring text (header comment, one line per key) for ``keys``.

    Raises:
        KeyringError: a serial is not 12 bytes or a key not 32.
    """
    lines = [HEADER]
    for serial, key in keys.items():
        if len(serial) != SERIAL_BYTES or len(key) != KEY_LEN:
            raise KeyringError("serials are 12 bytes and long-term keys 32")
        lines.append(f"{serial_to_text(serial)} {pem_encode(key).decode('ascii')}")
    return "\n".join(lines) + "\n"


def permission_problem(path: Path) -> str | None:
    """
    Why the keyring at ``path`` is not safe to trust, or None: a mode that
    grants group or other access, or an owner other than the user running this
    process (that owner could swap the keys).

    Raises:
        OSError: the file cannot be examined.
    """
    info = os.stat(path)
    mode = stat.S_IMODE(info.st_mode)
    if mode & 0o077:
        who = "others" if mode & 0o007 else "its group"
        return (
            f"{path} is accessible to {who} (mode {mode:04o}); it holds secret "
            "keys: chmod 600 it"
        )
    if info.st_uid != os.geteuid():
        return (
            f"{path} is owned by uid {info.st_uid}, not by uid {os.geteuid()} "
            "that runs the broker: chown it"
        )
    return None


def check_keyring_permissions(path: Path) -> None:
    """
    Refuse a keyring file that anyone but its owner may read or write, or that
    another user owns.

    Raises:
        KeyringPermissionError: see `permission_problem`.
        OSError: the file cannot be examined.
    """
    problem = permission_problem(path)
    if problem is not None:
        raise KeyringPermissionError(f"keyring {problem}")


def load_keyring(path: Path) -> dict[bytes, bytes]:
    """
    Check the permissions of the keyring at ``path``, then read and parse it.

    Raises:
        KeyringPermissionError: the file is group- or world-accessible.
        KeyringError: the contents are malformed.
        OSError: the file cannot be read.
    """
    check_keyring_permissions(path)
    return parse_keyring(path.read_text(encoding="ascii"))


def parse_master_key(text: str) -> bytes:
    """
    Decode a master key as typed from its card (spaces allowed).

    44 characters decoding to 33 bytes carry a CRC-8 check byte, which must
    match; 32 bytes are accepted without a check.

    Raises:
        KeyringError: wrong length, bad characters or a wrong check byte.
    """
    compact = "".join(text.split()).encode("ascii", "replace")
    raw = pem_decode(compact)
    if len(compact) != 44 or len(raw) not in (32, 33) or pem_encode(raw) != compact:
        raise KeyringError("a master key is 44 PEM characters (32 or 33 bytes)")
    key = raw[:KEY_LEN]
    if len(raw) == 33 and crc8(key) != raw[32]:
        raise KeyringError("master key check digit does not match: mistyped?")
    return key
