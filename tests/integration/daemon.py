"""
Start the real ``ebroker serve`` as a subprocess on loopback for integration tests.
"""

import json
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tests.helpers import DEADLINE, wait_until

REPO = Path(__file__).parents[2]


def default_config(
    state_dir: Path,
    sources: str | None = None,
    extra: str = "",
    *,
    pool_size: str = "64 KiB",
    log_level: str = "info",
    drain: str = "0 s",
) -> str:
    """
    A config on ephemeral loopback ports with a getrandom source: EGD, the
    tenant-plane HTTP sink ``http`` and the operator-plane HTTP sink
    ``operator``. ``drain`` is 0 s: most tests stop brokers that no balancer
    polls.
    """
    if sources is None:
        sources = """
            [[sources]]
            name = "getrandom"
            kind = "getrandom"
            """
    return (
        textwrap.dedent(
            f"""
            [broker]
            state_dir = "{state_dir}"
            pool_size = "{pool_size}"
            low_watermark = "1 KiB"
            drain = "{drain}"
            shutdown_grace = "2 s"

            [logging]
            level = "{log_level}"
            format = "json"
            """
        )
        + textwrap.dedent(sources)
        + textwrap.dedent(
            """
            [[sinks]]
            name = "egd"
            kind = "egd"
            listen = ["tcp://127.0.0.1:0", "unix:egd.sock"]

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
            """
        )
        + textwrap.dedent(extra)
    )


@dataclass
class Daemon:
    """
    A running broker process and where it listens.
    """

    process: subprocess.Popen[bytes]
    state_dir: Path
    stderr_path: Path
    listeners: dict[str, list[str]] = field(default_factory=dict)

    def address(self, sink: str, scheme: str) -> str:
        for address in self.listeners[sink]:
            if address.startswith(scheme):
                return address
        raise KeyError(f"{sink} has no {scheme} listener: {self.listeners}")

    @property
    def egd_tcp(self) -> tuple[str, int]:
        host, port = self.address("egd", "tcp://").removeprefix("tcp://").rsplit(":", 1)
        return host, int(port)

    @property
    def egd_unix(self) -> str:
        return self.address("egd", "unix:").removeprefix("unix:")

    @property
    def http_url(self) -> str:
        """
        The tenant-plane HTTP sink: entropy, health and readiness.
        """
        return "http://" + self.address("http", "tcp://").removeprefix("tcp://")

    @property
    def operator_url(self) -> str:
        """
        The operator-plane HTTP sink: status, metrics, page, simulator control.
        """
        return "http://" + self.address("operator", "tcp://").removeprefix("tcp://")

    def logs(self) -> list[dict[str, object]]:
        entries = []
        for line in self.stderr_path.read_text().splitlines():
            try:
                entries.append(json.loads(line))
            except ValueError:
                entries.append({"event": "unparsed", "line": line})
        return entries

    def stop(self, sig: int = signal.SIGTERM, timeout: float = DEADLINE) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
        return self.process.wait(timeout)


def start_daemon(
    tmp_path: Path,
    config_text: str,
    *,
    args: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
) -> Daemon:
    """
    Write the config, start the broker and wait until it reports its listeners.
    ``args`` go after ``serve --config FILE``; ``env`` is added to this
    process's environment.
    """
    state_dir = tmp_path / "state"
    config = tmp_path / "ebroker.toml"
    config.write_text(config_text)
    listeners = state_dir / "listeners.json"
    # A daemon killed by an earlier step of the test left its file behind; its
    # ports are not this daemon's.
    listeners.unlink(missing_ok=True)
    stderr_path = tmp_path / "stderr.log"
    with stderr_path.open("wb") as stderr:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "broker.cli",
                "serve",
                "--config",
                str(config),
                *args,
            ],
            cwd=REPO,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
        )
    daemon = Daemon(process, state_dir, stderr_path)
    try:
        wait_until(lambda: listeners.exists() or process.poll() is not None)
    except TimeoutError:
        process.kill()
        raise
    if process.poll() is not None:
        raise RuntimeError(f"broker exited early: {stderr_path.read_text()}")
    daemon.listeners = json.loads(listeners.read_text())
    return daemon
