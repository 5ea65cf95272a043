"""
Entropy Key commands of the ``ebroker`` CLI: ``keys``, ``rekey``, ``simulate-key``.
"""

import asyncio
import getpass
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from broker.errors import SourceError

from .encoding import serial_from_text, serial_to_text
from .keyring import KeyringError, load_keyring, parse_master_key
from .rekey import RekeyError, run_rekey, store_long_term_key
from .transport import (
    KeyTransport,
    TtyTransport,
    UnixTransport,
    UsbTransport,
    find_usb_keys,
    usb_bus_path,
    usb_serial,
)


@dataclass
class KeyRow:
    """
    One line of ``ebroker keys``.
    """

    serial: str
    attachment: str
    known: str
    state: str = "-"
    temperature: str = "-"
    voltage: str = "-"
    delivered: str = "-"
    source: str = "-"


def _keyring_serials(path: Path) -> tuple[set[str], str | None]:
    try:
        return {serial_to_text(serial) for serial in load_keyring(path)}, None
    except KeyringError as exc:
        return set(), f"{path}: {exc}"
    except OSError as exc:
        return set(), keyring_problem(path, exc)


def keyring_problem(path: Path, exc: OSError) -> str:
    """
    An unreadable keyring, named, with what to do about it.
    """
    why = (exc.strerror or str(exc)).lower()
    if isinstance(exc, FileNotFoundError):
        fix = "give --keyring FILE, or --config with the broker's configuration"
    elif isinstance(exc, PermissionError):
        fix = "run as root or as the broker's user (the keyring is mode 0600)"
    else:
        fix = "check the path"
    return f"{path}: {why} ({fix})"


def list_keys(
    keyring: Path, status: dict[str, Any] | None, backend: Any = None
) -> tuple[list[KeyRow], list[str]]:
    """
    Keys on the USB bus merged with the Entropy Key sources of a running broker.

    Returns:
        The rows and any warnings (unreadable keyring, no USB access).
    """
    warnings: list[str] = []
    known, problem = _keyring_serials(keyring)
    if problem:
        warnings.append(f"keyring {problem}")
    rows: dict[str, KeyRow] = {}
    try:
        devices = find_usb_keys(backend)
    except SourceError as exc:
        warnings.append(f"usb: {exc}")
        devices = []
    for device in devices:
        serial = usb_serial(device) or "?"
        rows[serial] = KeyRow(
            serial, f"usb {usb_bus_path(device)}", "yes" if serial in known else "no"
        )
    for source in (status or {}).get("sources", []):
        if source.get("kind") != "entropykey":
            continue
        details = source.get("details") or {}
        serial = str(details.get("serial", "?"))
        row = rows.setdefault(
            serial,
            KeyRow(
                serial,
                str(details.get("attachment", "?")),
                "yes" if serial in known else ("?" if problem else "no"),
            ),
        )
        row.source = str(source.get("name"))
        row.state = str(source.get("state"))
        if source.get("reason") and source.get("state") != "healthy":
            row.state += f" ({source['reason']})"
        if details.get("temperature_c") is not None:
            row.temperature = f"{details['temperature_c']:.1f} C"
        if details.get("voltage_v") is not None:
            row.voltage = f"{details['voltage_v']:.3f} V"
        row.delivered = str(details.get("bytes_delivered", 0))
    return sorted(rows.values(), key=lambda row: row.serial), warnings


def format_rows(rows: list[KeyRow]) -> str:
    """
    Render rows as an aligned table.
    """
    header = (
        "SERIAL",
        "ATTACHED",
        "KEYRING",
        "SOURCE",
        "TEMP",
        "VOLTS",
        "BYTES",
        "STATE",
    )
    table = [header] + [
        (
            row.serial,
            row.attachment,
            row.known,
            row.source,
            row.temperature,
            row.voltage,
            row.delivered,
            row.state,
        )
        for row in rows
    ]
    widths = [max(len(line[i]) for line in table) for i in range(len(header) - 1)]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=False))
        + "  "
        + line[-1]
        for line in table
    )


def read_master_key() -> bytes:
    """
    Read the master key from stdin (typed at a prompt when stdin is a terminal).

    Raises:
        KeyringError: not a valid master key (wrong length or check digit).
    """
    if sys.stdin.isatty():
        text = getpass.getpass("Master key (as printed on the key's card): ")
    else:
        text = sys.stdin.readline()
    return parse_master_key(text)


def rekey_transport(serial: str, transport: str, path: Path | None) -> KeyTransport:
    """
    The transport ``rekey`` talks through.

    Raises:
        ValueError: tty or unix without a path.
    """
    if transport == "usb":
        return UsbTransport(serial)
    if path is None:
        raise ValueError(f"--transport {transport} needs --path")
    return TtyTransport(path) if transport == "tty" else UnixTransport(path)


def rekey(
    serial: str, keyring: Path, master_key: bytes, transport: KeyTransport
) -> str:
    """
    Perform the long-term re-key and store the new key.

    Returns:
        A line for the operator.

    Raises:
        RekeyError: the device refused or did not answer; the keyring is untouched.
        KeyringError: the keyring could not be updated.
    """
    try:
        serial_bytes = serial_from_text(serial)
    except ValueError:
        raise RekeyError(f"{serial!r} is not an Entropy Key serial") from None
    result = asyncio.run(run_rekey(transport, serial_bytes, master_key))
    store_long_term_key(keyring, result.serial, result.long_term_key)
    return f"new long-term key for {serial} stored in {keyring}"
