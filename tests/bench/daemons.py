"""
The daemon under test: ``ebroker serve`` in its own process (uvloop, as the
CLI runs it), with a config written for the benchmark on loopback ports.

The config is the shipped default's shape (``config/ebroker.toml``): a 1 MiB
pool, health tests on, EGD on TCP and a Unix socket, the tenant and operator
HTTP sinks, info logging (as JSON, to a file). Scenarios change only what they
name: the sources, options of the EGD or operator sink, customers.
"""

import contextlib
import http.client
import json
import subprocess
import tempfile
import textwrap
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.integration.daemon import Daemon, start_daemon

from .common import poll

GETRANDOM = """
    [[sources]]
    name = "getrandom"
    kind = "getrandom"
    credit = 8
    """

STATUS_INTERVAL = 0.02
"""Seconds between two status requests while waiting on the daemon: each one
costs the daemon a little CPU."""
SETTLE_TIMEOUT = 60.0
SETTLE_QUIET = 0.25
"""Seconds without input that mean the sources have paused: a source that is
filling the pool reads again within milliseconds."""


def config_text(
    state_dir: Path,
    *,
    sources: str = GETRANDOM,
    egd: str = "",
    operator: str = "",
    extra: str = "",
) -> str:
    """
    A config on ephemeral loopback ports; ``egd`` and ``operator`` are extra
    keys for those sinks, ``extra`` more tables (``[[customers]]``). In
    ``sources``, ``{state_dir}`` stands for the state directory.
    """
    sources = sources.replace("{state_dir}", str(state_dir))
    head = f"""
        [broker]
        state_dir = "{state_dir}"
        pool_size = "1 MiB"
        low_watermark = "4 KiB"
        drain = "0 s"
        shutdown_grace = "2 s"

        [logging]
        level = "info"
        format = "json"
        """
    sinks = f"""
        [[sinks]]
        name = "egd"
        kind = "egd"
        listen = ["tcp://127.0.0.1:0", "unix:egd.sock"]
        {textwrap.dedent(egd).strip()}

        [[sinks]]
        name = "http"
        kind = "http"
        plane = "tenant"
        listen = ["tcp://127.0.0.1:0"]

        [[sinks]]
        name = "operator"
        kind = "http"
        plane = "operator"
        listen = ["tcp://127.0.0.1:0"]
        {textwrap.dedent(operator).strip()}
        """
    return "\n".join(textwrap.dedent(part) for part in (head, sources, sinks, extra))


@dataclass
class Ebroker:
    """
    A running daemon: where it listens, its pid, and its operator plane.
    """

    daemon: Daemon

    name = "ebroker"

    @property
    def pid(self) -> int:
        return self.daemon.process.pid

    @property
    def port(self) -> int:
        return self.daemon.egd_tcp[1]

    @property
    def http_url(self) -> str:
        return self.daemon.http_url

    def _operator(self, method: str, path: str) -> bytes:
        host, port = self.daemon.operator_url.removeprefix("http://").rsplit(":", 1)
        connection = http.client.HTTPConnection(host, int(port), timeout=10)
        try:
            connection.request(method, path)
            answer = connection.getresponse()
            body = answer.read()
        finally:
            connection.close()
        if answer.status != 200:
            raise RuntimeError(f"{method} {path}: {answer.status} {body!r}")
        return body

    def status(self) -> dict[str, Any]:
        """
        The operator plane's ``/v1/status`` document.
        """
        status: dict[str, Any] = json.loads(self._operator("GET", "/v1/status"))
        return status

    def post(self, path: str) -> None:
        self._operator("POST", path)

    def wait(
        self,
        predicate: Callable[[dict[str, Any]], object],
        timeout: float = SETTLE_TIMEOUT,
    ) -> dict[str, Any]:
        """
        Poll the status until ``predicate(status)`` holds, and return it.

        Raises:
            TimeoutError: it did not hold in time.
        """
        last: dict[str, Any] = {}

        def check() -> bool:
            nonlocal last
            last = self.status()
            return bool(predicate(last))

        if not poll(check, timeout, STATUS_INTERVAL):
            raise TimeoutError(f"daemon status never satisfied the wait: {last}")
        return last

    def settle(self) -> None:
        """
        Wait until the pool has stopped absorbing input for `SETTLE_QUIET`
        seconds: its sources pause once it is as full as the pool's own policy
        keeps it, so every run starts alike whatever that policy is.

        Raises:
            TimeoutError: input never paused in time.
        """
        seen: list[float] = []

        def paused() -> bool:
            absorbed = self.status()["pool"]["bytes_in"]
            now = time.monotonic()
            if not seen or absorbed != seen[0]:
                seen[:] = [absorbed, now]
                return False
            return now - seen[1] >= SETTLE_QUIET

        if not poll(paused, SETTLE_TIMEOUT, STATUS_INTERVAL):
            raise TimeoutError("the daemon's pool never stopped absorbing input")


@contextlib.contextmanager
def ebroker(
    *,
    sources: str = GETRANDOM,
    egd: str = "",
    operator: str = "",
    extra: str = "",
) -> Iterator[Ebroker]:
    """
    Start ``ebroker serve`` with `config_text` and stop it on exit (SIGTERM,
    then SIGKILL if it does not exit in time).
    """
    with tempfile.TemporaryDirectory() as directory:
        tmp = Path(directory)
        text = config_text(
            tmp / "state", sources=sources, egd=egd, operator=operator, extra=extra
        )
        daemon = start_daemon(tmp, text)
        try:
            yield Ebroker(daemon)
        finally:
            try:
                daemon.stop(timeout=10)
            except subprocess.TimeoutExpired:
                daemon.process.kill()
                daemon.process.wait()
