"""
The bare servers (``bare_egd``, ``bare_http``) as processes of their own, and
what a scenario needs to know of any server under test.
"""

import contextlib
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

from tests.integration.daemon import REPO

from .processes import stop


class Server(Protocol):
    """
    A server under test: ebroker or a bare floor.
    """

    @property
    def name(self) -> str: ...

    @property
    def pid(self) -> int: ...

    @property
    def port(self) -> int:
        """
        The EGD port (for the bare HTTP server: its only port).
        """
        ...

    @property
    def http_url(self) -> str: ...

    def settle(self) -> None:
        """
        Wait until what one run left behind no longer affects the next.
        """
        ...


@dataclass(frozen=True)
class Bare:
    """
    A bare server process and its port.
    """

    port: int
    pid: int
    name: str = "bare"

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def settle(self) -> None:
        """
        Nothing to wait for: a bare server keeps no state between runs.
        """


def spawn(module: str) -> "subprocess.Popen[str]":
    return subprocess.Popen(
        [sys.executable, "-m", f"tests.bench.{module}"],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )


def read_port(process: "subprocess.Popen[str]") -> int:
    """
    The port a bare server prints once it listens.

    Raises:
        RuntimeError: it exited without printing one.
    """
    if process.stdout is None:
        raise RuntimeError("bare server started without a stdout pipe")
    line = process.stdout.readline()
    if not line.strip().isdigit():
        raise RuntimeError(f"bare server exited {process.wait()} before listening")
    return int(line)


@contextlib.contextmanager
def bare(module: str) -> Iterator[Bare]:
    """
    Run ``python -m tests.bench.MODULE`` until the block ends.
    """
    process = spawn(module)
    try:
        yield Bare(read_port(process), process.pid)
    finally:
        stop(process)


def bare_egd() -> contextlib.AbstractContextManager[Bare]:
    return bare("bare_egd")


def bare_http() -> contextlib.AbstractContextManager[Bare]:
    return bare("bare_http")
