"""
What ``ebroker check-config`` checks beyond the schema: the things the running
broker would refuse or fail on, found before it starts.

A config can be valid and still not run here: a keyring others can read (the
Entropy Key driver refuses it), a device this user may not open, a state
directory that cannot be created. Each finding names its key path, as schema
errors do, so the operator knows which line to fix. Errors are what the broker
would refuse; notes are what it tolerates by design (an optional device this
machine lacks, a wildcard key entry whose keyring lists no keys yet).

The checks look, they do not touch: nothing is opened that a read could start
or reset (some devices do), and nothing is created.
"""

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from broker.config import Config
from sources.device import DeviceSourceConfig, access_problem, is_absent
from sources.entropykey.config import ANY_SERIAL, EntropyKeySourceConfig
from sources.entropykey.keyring import (
    KeyringError,
    parse_keyring,
    permission_problem,
)


@dataclass(frozen=True, slots=True)
class Finding:
    """
    One problem with one key of the config.
    """

    key: str
    """Where in the config, as schema errors put it: ``sources[2].keyring``."""
    message: str
    error: bool
    """True when the broker would refuse or fail on it; False for a note."""

    def __str__(self) -> str:
        return f"{self.key}: {self.message}"


def check(config: Config) -> list[Finding]:
    """
    Everything in ``config`` the broker would refuse on this machine, as this
    user.
    """
    findings = list(_state_dir(config.broker.state_dir))
    for index, source in enumerate(config.sources):
        if not source.enabled:
            continue
        key = f"sources[{index}]"
        if source.record_raw is not None:
            problem = _writable_file(source.record_raw)
            if problem is not None:
                findings.append(Finding(f"{key}.record_raw", problem, error=True))
        if isinstance(source, DeviceSourceConfig):
            findings.extend(_device(key, source))
        elif isinstance(source, EntropyKeySourceConfig):
            findings.extend(_keyring(key, source))
    return findings


def _uid() -> str:
    return f"uid {os.geteuid()}"


def _state_dir(path: Path) -> Iterator[Finding]:
    target = path.absolute()
    existing = target
    while not os.path.lexists(existing):
        existing = existing.parent
    if not existing.is_dir():
        yield Finding("broker.state_dir", f"{existing} is not a directory", True)
    elif not os.access(existing, os.W_OK | os.X_OK):
        if existing == target:
            message = f"{target} is not writable by {_uid()}"
        else:
            message = f"cannot create {target}: {existing} is not writable by {_uid()}"
        yield Finding("broker.state_dir", message, True)


def _writable_file(path: Path) -> str | None:
    target = path.absolute()
    if os.path.lexists(target):
        if os.path.isdir(target):
            return f"{target} is a directory"
        if not os.access(target, os.W_OK):
            return f"{target} is not writable by {_uid()}"
        return None
    # The broker creates missing directories (0700) on the way to the file.
    existing = target.parent
    while not os.path.lexists(existing):
        existing = existing.parent
    if not existing.is_dir():
        return f"cannot create {target}: {existing} is not a directory"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"cannot create {target}: {existing} is not writable by {_uid()}"
    return None


def _device(key: str, source: DeviceSourceConfig) -> Iterator[Finding]:
    if is_absent(source.path) and source.optional:
        yield Finding(
            f"{key}.path",
            f"no such device {source.path}; optional, so the broker skips it",
            error=False,
        )
        return
    problem = access_problem(source.path)
    if problem is not None:
        yield Finding(f"{key}.path", problem, error=True)


def _keyring(key: str, source: EntropyKeySourceConfig) -> Iterator[Finding]:
    path = source.keyring
    where = f"{key}.keyring"
    if not os.path.lexists(path):
        if source.transport == "simulated" and source.serial != ANY_SERIAL:
            return  # the broker provisions a simulated key's long-term key
        if source.serial == ANY_SERIAL and source.transport == "simulated":
            yield Finding(
                where, f"{path} does not exist yet; no keys until it does", False
            )
            return
        yield Finding(
            where,
            f"{path} does not exist; add each key with `ebroker rekey`",
            error=True,
        )
        return
    try:
        problem = permission_problem(path)
        if problem is None:
            if not os.access(path, os.R_OK):
                problem = f"{path} is not readable by {_uid()}"
            else:
                keys = parse_keyring(path.read_text(encoding="ascii"))
                serial = source.serial_bytes
                if not keys and serial is None:
                    yield Finding(where, f"{path} lists no keys yet", error=False)
                elif (
                    serial is not None
                    and serial not in keys
                    and source.transport != "simulated"
                ):
                    problem = (
                        f"{path} has no key for {source.serial}; add it with "
                        "`ebroker rekey`"
                    )
    except (KeyringError, UnicodeDecodeError) as exc:
        problem = f"{path}: {exc}"
    except OSError as exc:
        problem = f"{path}: {exc.strerror or exc}"
    if problem is not None:
        yield Finding(where, problem, error=True)
