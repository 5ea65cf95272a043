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

`prepare_state_dir` and `file_problem` turn a failed file operation into one
line that names the path and what to do about it, instead of a bare
"Permission denied".
"""

import contextlib
import errno
import fcntl
import os
import pwd
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
                "cannot start: "
                + file_problem(exc, self.path, "pid file", self.path.parent)
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


def _owner(path: Path) -> str | None:
    try:
        uid = path.stat().st_uid
    except OSError:
        return None
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def _me() -> str:
    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        return str(os.geteuid())


def file_problem(
    exc: OSError,
    path: Path,
    what: str,
    directory: Path | None = None,
    *,
    access: str = "write",
) -> str:
    """
    One line for the operator: what failed, on which path, and the fix.

    Args:
        exc: the error the file operation raised.
        path: the path it was about.
        what: what the path is to the broker (``state_dir``, ``pid file``).
        directory: the directory whose ownership matters (default: ``path``'s
            nearest existing parent).
        access: what the broker needs to do with it, ``read`` or ``write``.
    """
    why = (exc.strerror or str(exc)).lower()
    code = exc.errno
    if code in (errno.EACCES, errno.EPERM):
        where = directory or _existing_parent(path)
        owner, me = _owner(where), _me()
        if directory is None and not path.exists():
            fix = f"create it as a user that may: sudo install -d -o {me} {path}"
        elif owner == me:
            bits = "r" if access == "read" else "rwx" if where.is_dir() else "rw"
            fix = f"its owner may not {access} it: chmod u+{bits} {where}"
        elif access == "read":
            fix = f"run as the user that owns it ({owner}), or let {me} read it"
        else:
            fix = f"run as the user that owns it ({owner}), or chown -R {me} {where}"
    elif code in (errno.ENOTDIR, errno.EEXIST):
        fix = f"a part of {path} is a file, not a directory: choose another path"
    elif code == errno.ENOENT:
        fix = f"create {path.parent} or choose another path"
    elif code == errno.EROFS:
        fix = "it is on a read-only file system: choose a writable path"
    elif code == errno.ENOSPC:
        fix = "the disk is full"
    else:
        fix = "check the path"
    return f"{what} {path}: {why} ({fix})"


def _existing_parent(path: Path) -> Path:
    for candidate in (path, *path.parents):
        if candidate.exists():
            return candidate
    return path


def prepare_state_dir(state_dir: Path) -> None:
    """
    Create the state directory (and its parents) if need be, and check that
    this process may write it.

    Raises:
        BrokerError: it cannot be created or written; the message names the
            path and the fix.
    """
    try:
        state_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise BrokerError(
            "cannot start: " + file_problem(exc, state_dir, "state_dir")
        ) from exc
    if not state_dir.is_dir():
        raise BrokerError(
            "cannot start: "
            + file_problem(
                OSError(errno.ENOTDIR, os.strerror(errno.ENOTDIR)),
                state_dir,
                "state_dir",
            )
        )
    if not os.access(state_dir, os.W_OK | os.X_OK):
        raise BrokerError(
            "cannot start: "
            + file_problem(
                PermissionError(errno.EACCES, os.strerror(errno.EACCES)),
                state_dir,
                "state_dir",
                state_dir,
            )
        )
