"""
The VM agent (config/agent.toml) as shipped, run for real against two real
brokers on loopback: the kernel sink in record mode, so the schedule is
proven without touching this machine's kernel.

The shipped file is changed only where a test must: the two endpoints point
at the test brokers, state_dir at the test's directory, the kernel sink
records instead of writing and reseeds more often, logs are JSON.
"""

import itertools
import json
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import DEADLINE, free_port, wait_until
from tests.integration.daemon import Daemon, default_config, start_daemon

AGENT_TOML = Path(__file__).parents[2] / "config" / "agent.toml"
WRITE_BYTES = 512
RESEED_INTERVAL = 0.2
POOL_SIZE = 4096
"""The agent's pool as shipped: bytes it can hand the kernel without asking
a broker again."""


def replace_once(text: str, old: str, new: str) -> str:
    assert 1 == text.count(old), f"config/agent.toml no longer has {old!r}"
    return text.replace(old, new)


def agent_config(state_dir: Path, ports: tuple[int, int]) -> str:
    """
    config/agent.toml pointed at brokers on ``ports``, recording to
    ``STATE_DIR/kernel.jsonl``, reseeding every 0.2 s with 512-byte writes.
    """
    text = AGENT_TOML.read_text()
    text = replace_once(
        text,
        'endpoints = ["tcp://broker-a.example:8888", "tcp://broker-b.example:8888"]',
        f'endpoints = ["tcp://127.0.0.1:{ports[0]}", "tcp://127.0.0.1:{ports[1]}"]',
    )
    text = replace_once(
        text, 'state_dir = "/var/lib/ebroker-agent"', f'state_dir = "{state_dir}"'
    )
    text = replace_once(text, 'format = "console"', 'format = "json"')
    text = replace_once(text, 'endpoint_backoff = "10 s"', 'endpoint_backoff = "1 s"')
    text = replace_once(
        text,
        'reseed_interval = "60 s"',
        f'reseed_interval = "{RESEED_INTERVAL} s"\n'
        f"write_bytes = {WRITE_BYTES}\n"
        'record = "kernel.jsonl"',
    )
    return text


def broker_config(state_dir: Path, port: int) -> str:
    """
    The test brokers' config with its EGD sink on a fixed port, so that a
    broker restarted after a SIGKILL is found where the agent looks.
    """
    text = default_config(state_dir)
    return replace_once(
        text,
        'listen = ["tcp://127.0.0.1:0", "unix:egd.sock"]',
        f'listen = ["tcp://127.0.0.1:{port}"]',
    )


def recorded(daemon: Daemon) -> list[dict[str, Any]]:
    path = daemon.state_dir / "kernel.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line]


def added_bytes(daemon: Daemon) -> int:
    return sum(r["bytes"] for r in recorded(daemon) if r["action"] == "add")


@dataclass
class Fleet:
    tmp_path: Path
    ports: tuple[int, int]
    brokers: dict[str, Daemon]

    def start_broker(self, name: str) -> Daemon:
        index = "ab".index(name)
        directory = self.tmp_path / name
        directory.mkdir(exist_ok=True)
        daemon = start_daemon(
            directory, broker_config(directory / "state", self.ports[index])
        )
        self.brokers[name] = daemon
        return daemon

    def kill(self, name: str) -> None:
        self.brokers[name].stop(signal.SIGKILL)


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    fleet = Fleet(tmp_path, (free_port(), free_port()), {})
    try:
        yield fleet
    finally:
        for daemon in fleet.brokers.values():
            if daemon.process.poll() is None:
                daemon.process.kill()
                daemon.process.wait()


@pytest.fixture
def agent_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "agent"
    directory.mkdir()
    return directory


def start_agent(
    directory: Path, ports: tuple[int, int], env: dict[str, str] | None = None
) -> Daemon:
    return start_daemon(directory, agent_config(directory / "state", ports), env=env)


def stop(daemon: Daemon) -> None:
    if daemon.process.poll() is None:
        daemon.process.kill()
        daemon.process.wait()


def test_agent_seeds_at_start_and_reseeds_periodically(
    fleet: Fleet, agent_dir: Path
) -> None:
    """
    The agent's first write is the boot seed, credited 256 bits (the
    simulated kernel starts not ready); after it only uncredited writes, each
    followed by RNDRESEEDCRNG, one per reseed interval.
    """
    fleet.start_broker("a")
    fleet.start_broker("b")
    agent = start_agent(agent_dir, fleet.ports)
    try:
        wait_until(lambda: len(recorded(agent)) >= 11)
        calls = recorded(agent)
        first, rest = calls[0], calls[1:11]
        assert ("add", 256, "seed", True, "new") == (
            first["action"],
            first["credit"],
            first["reason"],
            first["ready"],
            first["semantics"],
        )
        assert 64 == first["bytes"]
        assert [("add", 0), ("reseed", 0)] * 5 == [
            (r["action"], r["credit"]) for r in rest
        ]
        assert {"periodic"} == {r["reason"] for r in rest}
        adds = [r["time"] for r in calls if r["action"] == "add"]
        gaps = [later - earlier for earlier, later in itertools.pairwise(adds)]
        # Never sooner than the interval (a lower bound: no timing upper bound).
        assert min(gaps) >= RESEED_INTERVAL * 0.9, gaps
        events = [entry["event"] for entry in agent.logs()]
        assert "kernel_sink_started" in events
        assert "kernel_sink_recording" in events
    finally:
        stop(agent)


def wait_for_fresh_bytes(agent: Daemon, since: int) -> None:
    """
    Wait until the agent wrote more than its whole pool (and the upstream
    requests in flight) beyond ``since``: those bytes came from a broker
    after ``since`` was counted.
    """
    wanted = since + POOL_SIZE + 4 * 255 + WRITE_BYTES
    wait_until(lambda: added_bytes(agent) > wanted)


def test_agent_survives_either_broker_going_away(fleet: Fleet, agent_dir: Path) -> None:
    """
    SIGKILL the broker the agent reads from: it keeps reseeding from the
    other. Bring the first back and SIGKILL the second: it keeps reseeding
    from the first. Each time more is written than the agent's pool holds,
    so the bytes came from the broker still up, and that broker's EGD sink
    counts them.
    """
    fleet.start_broker("a")
    fleet.start_broker("b")
    agent = start_agent(agent_dir, fleet.ports)
    try:
        wait_until(lambda: len(recorded(agent)) >= 3)
        fleet.kill("a")
        wait_for_fresh_bytes(agent, added_bytes(agent))
        assert agent.process.poll() is None
        served_by_b = egd_bytes_out(fleet.brokers["b"])
        assert served_by_b > POOL_SIZE

        fleet.start_broker("a")
        fleet.kill("b")
        wait_for_fresh_bytes(agent, added_bytes(agent))
        assert agent.process.poll() is None
        assert egd_bytes_out(fleet.brokers["a"]) > POOL_SIZE
        calls = recorded(agent)
        assert 1 == sum(1 for r in calls if r["credit"] > 0)
        assert {"seed", "periodic"} == {r["reason"] for r in calls}
        failovers = [e for e in agent.logs() if e["event"] == "upstream_failover"]
        assert failovers
    finally:
        stop(agent)


def egd_bytes_out(daemon: Daemon) -> int:
    with urllib.request.urlopen(  # noqa: S310 - a loopback http:// URL
        daemon.operator_url + "/v1/status", timeout=DEADLINE
    ) as response:
        status = json.load(response)
    return sum(
        int(sink["bytes_out"]) for sink in status["sinks"] if sink["kind"] == "egd"
    )


class NotifySocket:
    """
    What systemd listens on for a Type=notify service.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind(str(path))

    def next_with(self, key: str, timeout: float = DEADLINE) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no {key} notification")
            self._sock.settimeout(left)
            data = self._sock.recv(4096).decode()
            message = dict(line.split("=", 1) for line in data.splitlines())
            if key in message:
                return message

    def close(self) -> None:
        self._sock.close()


def test_agent_with_no_broker_reachable_is_ready_at_once_and_keeps_trying(
    fleet: Fleet, agent_dir: Path
) -> None:
    """
    With both brokers down the agent starts, tells systemd READY=1 before it
    has fed the kernel anything (boot is not held up), keeps trying the
    brokers, and seeds the kernel as soon as one comes up.
    """
    notify = NotifySocket(agent_dir / "notify.sock")
    started = time.monotonic()
    agent = start_agent(agent_dir, fleet.ports, env={"NOTIFY_SOCKET": str(notify.path)})
    try:
        ready = notify.next_with("READY")
        ready_after = time.monotonic() - started
        assert "1" == ready["READY"]
        record = agent_dir / "state" / "kernel.jsonl"
        assert f"serving on record:{record}" == ready["STATUS"]
        assert [] == recorded(agent)

        # Retrying: several failed opens, the sink says once that it waits,
        # and the process is still there.
        def retrying() -> bool:
            events = [entry["event"] for entry in agent.logs()]
            return (
                events.count("upstream_endpoint_failed") >= 4
                and "kernel_sink_pool_empty" in events
            )

        wait_until(retrying)
        assert agent.process.poll() is None
        assert [] == recorded(agent)
        events = [entry["event"] for entry in agent.logs()]
        assert 1 == events.count("kernel_sink_pool_empty")
        fleet.start_broker("b")
        wait_until(lambda: len(recorded(agent)) >= 1)
        assert ("add", 256, "seed") == tuple(
            recorded(agent)[0][key] for key in ("action", "credit", "reason")
        )
        # READY came well before any broker could have answered.
        assert ready_after < DEADLINE
    finally:
        stop(agent)
        notify.close()


def test_agent_stops_cleanly_on_sigterm(fleet: Fleet, agent_dir: Path) -> None:
    """
    systemctl stop: SIGTERM ends the agent with status 0.
    """
    fleet.start_broker("a")
    agent = start_agent(agent_dir, fleet.ports)
    try:
        wait_until(lambda: len(recorded(agent)) >= 1)
        assert 0 == agent.stop(signal.SIGTERM)
    finally:
        stop(agent)


def test_agent_config_opens_no_port() -> None:
    """
    The shipped agent has no network listener: only the kernel sink.
    """
    from broker.config import load_config

    config = load_config(AGENT_TOML)
    assert [("kernel", [])] == [(sink.kind, sink.listen) for sink in config.sinks]
    assert ["egd"] == [source.kind for source in config.sources]
    assert Path("/var/lib/ebroker-agent") == config.broker.state_dir
    assert 2 == len(getattr(config.sources[0], "endpoints", []))


def uncomment_status_sink(text: str) -> str:
    """
    The operator-plane sink agent.toml shows commented out, enabled, on an
    ephemeral loopback port.
    """
    block = (
        '# [[sinks]]\n# name = "operator"\n# kind = "http"\n'
        '# plane = "operator"\n# listen = ["tcp://127.0.0.1:8890"]\n'
    )
    enabled = block.replace("# ", "").replace(":8890", ":0")
    return replace_once(text, block, enabled)


def test_status_shows_what_the_kernel_was_fed(fleet: Fleet, agent_dir: Path) -> None:
    """
    With the loopback status sink agent.toml offers, /v1/status lists the
    kernel sink (where it writes, bytes written, writes) and ``ebroker
    status`` prints it.
    """
    fleet.start_broker("a")
    config = uncomment_status_sink(agent_config(agent_dir / "state", fleet.ports))
    agent = start_daemon(agent_dir, config)
    try:
        wait_until(lambda: len(recorded(agent)) >= 3)
        with urllib.request.urlopen(  # noqa: S310 - a loopback http:// URL
            agent.operator_url + "/v1/status", timeout=DEADLINE
        ) as response:
            status = json.load(response)
        [kernel] = [sink for sink in status["sinks"] if sink["kind"] == "kernel"]
        record = f"record:{agent.state_dir / 'kernel.jsonl'}"
        assert [record] == kernel["addresses"]
        assert kernel["requests"] >= 2
        assert kernel["bytes_out"] >= 64 + WRITE_BYTES
        printed = subprocess.run(
            [
                sys.executable,
                "-m",
                "broker.cli",
                "status",
                "--url",
                agent.operator_url,
            ],
            capture_output=True,
            text=True,
            timeout=DEADLINE,
            check=False,
        )
        assert 0 == printed.returncode, printed.stderr
        [line] = [line for line in printed.stdout.splitlines() if record in line]
        assert ["kernel", "kernel"] == line.split()[:2]
    finally:
        stop(agent)


def test_agent_tops_up_a_classic_kernel_to_its_target(
    fleet: Fleet, agent_dir: Path
) -> None:
    """
    ``semantics = "classic"``: the simulated classic kernel starts empty and
    gets credited top-ups, 4 bits per byte, each raising its count, until
    the count reaches 3072 bits (that the burst then stops is proven on a
    fake clock in tests/sinks/kernel/test_sink.py).
    """
    fleet.start_broker("a")
    config = replace_once(
        agent_config(agent_dir / "state", fleet.ports),
        'semantics = "auto"',
        'semantics = "classic"',
    )
    agent = start_daemon(agent_dir, config)
    try:
        wait_until(lambda: any(r["entropy"] >= 3072 for r in recorded(agent)))
        calls = recorded(agent)
        assert {("add", "top_up", "classic")} == {
            (r["action"], r["reason"], r["semantics"]) for r in calls
        }
        assert {WRITE_BYTES * 4} == {r["credit"] for r in calls}
        counts = [r["entropy"] for r in calls]
        # Each write raised the count (credit is asymptotic, never refused).
        assert counts == sorted(set(counts))
        assert len(calls) >= 3
    finally:
        stop(agent)
