"""
Processes the benchmarks start: stopping them for sure, measuring a load
client's own CPU time, and what ``/proc`` says about a server (CPU time,
resident memory, open descriptors).
"""

import contextlib
import os
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, NoReturn, Self

STOP_TIMEOUT = 10.0
"""Seconds a process gets to exit after SIGTERM before it is killed."""


def stop(process: "subprocess.Popen[str] | subprocess.Popen[bytes]") -> None:
    """
    Terminate ``process``, and kill it if it has not exited in time.
    """
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def cpu_seconds(pid: int) -> float:
    """
    User plus system CPU seconds of every thread of ``pid``.
    """
    # Fields 14 and 15 of /proc/PID/stat; the command name before them may
    # hold spaces, so split after its closing parenthesis.
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine_busy_seconds() -> float:
    """
    CPU seconds every core of the machine has spent not idle since boot.
    """
    # The first line of /proc/stat: user nice system idle iowait irq softirq
    # steal, in clock ticks (guest time is already inside user).
    ticks = [
        int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]
    ]
    idle = ticks[3] + ticks[4]
    return (sum(ticks) - idle) / os.sysconf("SC_CLK_TCK")


def wait_quiet(
    pid: int, cores: float = 0.1, window: float = 0.25, timeout: float = 60.0
) -> bool:
    """
    Wait until ``pid`` uses less than ``cores`` of CPU over one ``window``.

    Returns:
        Whether it went quiet within ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        used = cpu_seconds(pid)
        # A rate needs an interval: this is the measurement, not a guess at
        # how long something takes.
        time.sleep(window)
        if cpu_seconds(pid) - used < cores * window:
            return True
    return False


def rss_kib(pid: int) -> int:
    """
    Resident set size of ``pid`` in KiB (``VmRSS``).
    """
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def open_fds(pid: int) -> int:
    """
    How many descriptors ``pid`` holds open.
    """
    return len(os.listdir(f"/proc/{pid}/fd"))


@dataclass(frozen=True)
class Finished:
    """
    A child that ran to the end: its output, exit status and resource use.
    """

    stdout: str
    stderr: str
    returncode: int
    cpu: float
    """User plus system CPU seconds the child used, from ``wait4``."""
    wall: float
    """Seconds from start to exit."""


class Child:
    """
    A child process whose CPU time is taken from ``wait4`` when it exits, so
    other children exiting meanwhile do not blur it (as RUSAGE_CHILDREN
    would). It is killed after ``timeout`` seconds whatever happens, and
    stopped when the ``with`` block is left early.
    """

    def __init__(
        self, args: Sequence[str], timeout: float, *, stdin: bool = False
    ) -> None:
        # Closed in __exit__: a Child is always used in a with block.
        self._stderr = tempfile.TemporaryFile()  # noqa: SIM115
        self.started = time.monotonic()
        self.process = subprocess.Popen(
            args,
            stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            text=True,
        )
        self._reaped = threading.Lock()
        self._timer = threading.Timer(timeout, self._expire)
        self._timer.daemon = True
        self._timer.start()

    @property
    def pid(self) -> int:
        return self.process.pid

    def _expire(self) -> None:
        with self._reaped:
            if self.process.returncode is None:
                os.kill(self.process.pid, signal.SIGKILL)

    def _stdout(self) -> IO[str]:
        if self.process.stdout is None:
            raise RuntimeError("child started without a stdout pipe")
        return self.process.stdout

    def readline(self) -> str:
        """
        The next line of output without its newline ("" at end of output).
        """
        return self._stdout().readline().rstrip("\n")

    def send_line(self, line: str) -> None:
        if self.process.stdin is None:
            raise RuntimeError("child started without a stdin pipe")
        self.process.stdin.write(line + "\n")
        self.process.stdin.flush()

    def close_stdin(self) -> None:
        if self.process.stdin is not None:
            self.process.stdin.close()

    def fail(self, message: str) -> NoReturn:
        """
        Stop the child and raise ``message`` with what it wrote on stderr.

        Raises:
            RuntimeError: always.
        """
        self._timer.cancel()
        with self._reaped:
            stop(self.process)
        self._stderr.seek(0)
        said = self._stderr.read().decode(errors="replace").strip()
        raise RuntimeError(f"{message}: {said or 'nothing on stderr'}")

    def finish(self) -> Finished:
        """
        Read the rest of the output and reap the child.
        """
        rest = self._stdout().read()
        self.close_stdin()
        _, status, usage = os.wait4(self.process.pid, 0)
        with self._reaped:
            self.process.returncode = os.waitstatus_to_exitcode(status)
        self._timer.cancel()
        self._stderr.seek(0)
        return Finished(
            stdout=rest,
            stderr=self._stderr.read().decode(errors="replace"),
            returncode=self.process.returncode,
            cpu=usage.ru_utime + usage.ru_stime,
            wall=time.monotonic() - self.started,
        )

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._timer.cancel()
        with self._reaped:
            stop(self.process)
        self._stderr.close()
        if self.process.stdout is not None:
            self.process.stdout.close()
        if self.process.stdin is not None and not self.process.stdin.closed:
            # The child is gone: a broken pipe on close is expected.
            with contextlib.suppress(BrokenPipeError):
                self.process.stdin.close()
