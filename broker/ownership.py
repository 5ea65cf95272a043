"""
One broker per state directory: the pid file is a lock held for the broker's
whole life.

`StateDirLock.acquire` opens ``ebroker.pid`` in the state directory and takes
an exclusive ``flock`` on it, without waiting. A second broker started on the
same directory finds it taken and refuses to start, naming the directory and
the pid that holds it, before it has touched any listener or socket file. The
kernel drops the lock when the process dies, however it dies, so a pid file
left by a crashed broker never blocks the next one.

`holder` answers "which live broker owns this directory?" for the command line
(``ebroker reload``): a pid counts only while its lock is held, so a stale file
naming a pid that has since been reused by an unrelated process is never
signalled.
"""

import contextlib
import fcntl
import os
from pathlib import Path
from typing import Self

from broker.errors import BrokerError

PID_FILE = "ebroker.pid"


class StateDirLock:
    """
    The exclusive lock on a state directory's pid file.
    """

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / PID_FILE
        self._fd: int | None = None

    def acquire(self) -> Self:
        """
        Take the lock and write this process's pid into the file.

        Raises:
            BrokerError: another live broker holds it (or the file cannot be
                opened); the message names the directory and the fix.
        """
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise BrokerError(
                f"cannot open {self.path}: {exc.strerror or exc}; check that the "
                "broker's user may write its state_dir"
            ) from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = _read_pid(fd)
            os.close(fd)
            who = f"pid {owner}" if owner is not None else "another process"
            raise BrokerError(
                f"state_dir {self.path.parent} is in use by a running broker "
                f"({who}); stop it first, or give this one another state_dir"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        """
        Remove the pid file and drop the lock (removed first, so nobody reads a
        pid that no longer holds it).
        """
        fd, self._fd = self._fd, None
        if fd is None:
            return
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        os.close(fd)


def holder(state_dir: Path) -> int | None:
    """
    The pid of the live broker that holds ``state_dir``, or None when no
    broker holds it (no file, or a file nobody has locked).
    """
    try:
        fd = os.open(state_dir / PID_FILE, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _read_pid(fd)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None  # left behind by a broker that is gone
    finally:
        os.close(fd)


def _read_pid(fd: int) -> int | None:
    try:
        return int(os.pread(fd, 32, 0).decode().strip())
    except (OSError, ValueError):
        return None
