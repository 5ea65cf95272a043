"""
A source's raw recording (``record_raw``): every byte it delivers, appended to
a file that only the broker's user may read.

Raw output is as secret as the pool's input until it has been conditioned, so
missing directories are created 0700 and the file 0600; an existing regular
file readable by others is tightened to 0600, and that is logged. A FIFO or
device node (``/dev/null``) is left as it is. A recording that cannot be
opened or written stops with one logged error: a full or failing disk costs
the recording, never the source.
"""

import os
import stat
from pathlib import Path
from typing import Any, BinaryIO

FILE_MODE = 0o600
DIR_MODE = 0o700


class RawRecording:
    """
    Appends raw bytes to ``path``, logging through ``log`` (a bound logger).
    """

    def __init__(self, path: Path, log: Any) -> None:
        self.path = path
        self._log = log
        self._file: BinaryIO | None = None

    def open(self) -> None:
        """
        Open the file; on failure log it and record nothing.
        """
        try:
            self._file = self._open()
        except OSError as exc:
            # The source's data is still good: serve it, unrecorded.
            self._log.error("record_raw_failed", path=str(self.path), error=str(exc))

    def _open(self) -> BinaryIO:
        """
        Raises:
            OSError: the directory or file cannot be created, opened or
                tightened (another user's file).
        """
        path = self.path
        missing = [
            directory
            for directory in (path.parent, *path.parent.parents)
            if not directory.exists()
        ]
        for directory in reversed(missing):
            directory.mkdir(mode=DIR_MODE, exist_ok=True)
        fd = os.open(
            path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, FILE_MODE
        )
        try:
            info = os.fstat(fd)
            mode = stat.S_IMODE(info.st_mode)
            if stat.S_ISREG(info.st_mode) and mode & ~FILE_MODE:
                os.fchmod(fd, FILE_MODE)
                self._log.warning(
                    "record_raw_mode_tightened",
                    path=str(path),
                    previous=f"{mode:04o}",
                    mode=f"{FILE_MODE:04o}",
                )
            return os.fdopen(fd, "ab")
        except BaseException:
            os.close(fd)
            raise

    def write(self, data: bytes) -> None:
        """
        Append ``data``; on failure stop recording (logged once).
        """
        if self._file is None:
            return
        try:
            self._file.write(data)
        except OSError as exc:
            self.close(exc)

    def close(self, error: OSError | None = None) -> None:
        """
        Stop recording; ``error`` (or one from closing) is logged.
        """
        file, self._file = self._file, None
        if file is None:
            return
        try:
            file.close()
        except OSError as exc:
            error = error or exc
        if error is not None:
            self._log.error(
                "record_raw_failed",
                path=str(self.path),
                error=str(error),
                kept="serving, unrecorded",
            )
