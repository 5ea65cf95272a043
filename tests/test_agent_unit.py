"""
The VM agent's systemd unit (config/ebroker-agent.service): it runs early in
boot, never holds boot up while brokers are unreachable, has CAP_SYS_ADMIN
and nothing else, and matches config/agent.toml.

systemd judges the unit itself where it can without a running manager
(``systemd-analyze verify`` and ``security --offline=true``); the ordering
facts the boot behaviour rests on are read from the file. That READY=1 comes
before any broker answers is proven on the real daemon
(tests/integration/test_agent_daemon.py).
"""

import re
from pathlib import Path

import pytest

from broker.config import load_config
from tests.test_systemd_units import (
    MAX_EXPOSURE,
    Unit,
    analyze,
    read_unit,
    seconds,
    value,
    values,
    words,
)

CONFIG_DIR = Path(__file__).parents[1] / "config"
AGENT_SERVICE = CONFIG_DIR / "ebroker-agent.service"
AGENT_TOML = CONFIG_DIR / "agent.toml"

MAX_BOOT_WAIT = 30.0
"""Longest the boot may wait for the agent's READY=1 before going on."""


@pytest.fixture(scope="module")
def unit() -> Unit:
    return read_unit(AGENT_SERVICE)


def optional(unit: Unit, section: str, key: str) -> str | None:
    assigned = [v for name, v in unit.get(section, []) if name == key]
    return assigned[-1] if assigned else None


# ---- systemd's own judgement ----


@pytest.mark.needs_tool("systemd-analyze")
def test_agent_sandbox_rates_at_most_3_0() -> None:
    """
    ``systemd-analyze security --offline=true --threshold=30`` accepts the
    agent unit, CAP_SYS_ADMIN and network access included.
    """
    result = analyze(
        "security",
        "--offline=true",
        f"--threshold={MAX_EXPOSURE * 10:.0f}",
        str(AGENT_SERVICE),
    )
    output = result.stdout + result.stderr
    assert 0 == result.returncode, output
    rating = re.search(
        r"Overall exposure level for ebroker-agent\.service: (\d+\.\d+)", output
    )
    assert rating is not None, output
    assert float(rating[1]) <= MAX_EXPOSURE, output


@pytest.mark.needs_tool("systemd-analyze")
def test_agent_unit_passes_systemd_verify(tmp_path: Path, unit: Unit) -> None:
    """
    ``systemd-analyze verify`` loads the unit without a word. verify insists
    that ExecStart's program exists: a copy runs with a stub there when
    /opt/ebroker is absent, every other line unchanged.
    """
    text = AGENT_SERVICE.read_text()
    program = value(unit, "Service", "ExecStart").lstrip("-@:+!").split()[0]
    if not Path(program).exists():
        stub = tmp_path / "bin" / Path(program).name
        stub.parent.mkdir()
        stub.write_text("#!/bin/sh\nexit 0\n")
        stub.chmod(0o755)
        text = text.replace(f"ExecStart={program}", f"ExecStart={stub}")
    copy = tmp_path / AGENT_SERVICE.name
    copy.write_text(text)
    result = analyze("verify", str(copy))
    assert ("", 0) == (result.stdout + result.stderr, result.returncode)


# ---- boot ordering ----


def test_agent_starts_before_sysinit_without_default_dependencies(
    unit: Unit,
) -> None:
    """
    No implicit After=basic.target: the agent is ordered before
    sysinit.target, so before every ordinary service and the network, and
    is pulled in by sysinit.target itself.
    """
    assert "no" == value(unit, "Unit", "DefaultDependencies")
    assert {"sysinit.target", "shutdown.target"} <= words(unit, "Unit", "Before")
    assert ["sysinit.target"] == values(unit, "Install", "WantedBy")


def test_agent_waits_for_nothing_on_the_network(unit: Unit) -> None:
    """
    It is ordered after local file systems and the journal only: nothing on
    the network, no remote file system, no other service that could hang.
    """
    after = words(unit, "Unit", "After")
    assert after <= {
        "local-fs.target",
        "systemd-remount-fs.service",
        "systemd-journald.socket",
    }
    for key in ("Requires", "Wants", "BindsTo", "Requisite"):
        assert [] == values(unit, "Unit", key), key


def test_a_failed_agent_never_fails_the_boot(unit: Unit) -> None:
    """
    sysinit.target only wants the agent (a failure does not propagate), and
    the boot waits for READY at most TimeoutStartSec (bounded, non-zero).
    """
    assert [] == values(unit, "Install", "RequiredBy")
    assert 0 < seconds(value(unit, "Service", "TimeoutStartSec")) <= MAX_BOOT_WAIT


def test_agent_stops_with_the_system(unit: Unit) -> None:
    """
    Without default dependencies a unit must conflict with shutdown.target
    itself, or it would be left running through shutdown.
    """
    assert "shutdown.target" in words(unit, "Unit", "Conflicts")


def test_agent_notifies_and_restarts_after_a_crash(unit: Unit) -> None:
    """
    Type=notify from the main process (READY=1 once the kernel sink runs,
    never after a broker answers, and the watchdog is fed); a crash restarts
    it; SIGTERM stops it within TimeoutStopSec, which exceeds the agent's
    drain plus shutdown grace.
    """
    expected = {
        "Type": "notify",
        "NotifyAccess": "main",
        "Restart": "on-failure",
        "KillSignal": "SIGTERM",
    }
    assert expected == {key: value(unit, "Service", key) for key in expected}
    assert seconds(value(unit, "Service", "WatchdogSec")) > 0
    agent = load_config(AGENT_TOML)
    assert seconds(value(unit, "Service", "TimeoutStopSec")) > (
        agent.broker.drain + agent.broker.shutdown_grace
    )


# ---- privilege and sandbox ----


def test_agent_has_cap_sys_admin_and_no_other_capability(unit: Unit) -> None:
    """
    RNDADDENTROPY needs CAP_SYS_ADMIN: it is the bounding set and the ambient
    set, for a dynamic user, not root. User namespaces stay off (a capability
    inside one does not count for /dev/random).
    """
    assert {"CAP_SYS_ADMIN"} == words(unit, "Service", "CapabilityBoundingSet")
    assert {"CAP_SYS_ADMIN"} == words(unit, "Service", "AmbientCapabilities")
    assert "yes" == value(unit, "Service", "DynamicUser")
    assert optional(unit, "Service", "User") in (None, "")
    assert optional(unit, "Service", "PrivateUsers") in (None, "no")


def test_agent_keeps_what_the_kernel_sink_needs(unit: Unit) -> None:
    """
    Netlink for NEW_VMGENID uevents, Internet and Unix sockets for brokers
    and sd_notify, the host's network namespace (uevents reach it only),
    /dev/random through PrivateDevices, and /proc/sys readable (poolsize
    tells the kernel generation).
    """
    assert {"AF_UNIX", "AF_INET", "AF_INET6", "AF_NETLINK"} == words(
        unit, "Service", "RestrictAddressFamilies"
    )
    assert optional(unit, "Service", "PrivateNetwork") in (None, "no")
    assert "yes" == value(unit, "Service", "PrivateDevices")
    assert optional(unit, "Service", "ProcSubset") in (None, "all")
    assert "yes" == value(unit, "Service", "ProtectKernelTunables")
    assert "native" == value(unit, "Service", "SystemCallArchitectures")


def test_agent_unit_matches_agent_toml(unit: Unit) -> None:
    """
    The unit runs config/agent.toml as installed, and its state directory is
    that file's state_dir.
    """
    exec_start = value(unit, "Service", "ExecStart").split()
    assert ["serve", "--config", "/etc/ebroker/agent.toml"] == exec_start[1:]
    state_dir = Path("/var/lib") / value(unit, "Service", "StateDirectory")
    assert load_config(AGENT_TOML).broker.state_dir == state_dir


def test_unit_comment_states_the_measured_rating(unit: Unit) -> None:
    """
    The rating the unit's comment quotes is the one the threshold test
    accepts (kept in step by hand; this checks it is at most the threshold).
    """
    quoted = re.search(r"rates it (\d+\.\d+)", AGENT_SERVICE.read_text())
    assert quoted is not None
    assert float(quoted[1]) <= MAX_EXPOSURE
