"""
The shipped systemd units (config/ebroker.service, config/ebroker.socket) and
udev rule (config/60-ebroker.rules) say what the documentation says of them.

systemd judges the units itself where it can without a running manager:
``systemd-analyze security --offline=true`` rates the sandbox and
``systemd-analyze verify`` checks every setting parses. The rest reads the
files and compares them with the broker's own defaults and with
config/ebroker.toml, so a changed default or listen address cannot leave the
units behind.
"""

import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest

from broker.config import BrokerSection, load_config, parse_config
from broker.configbase import SinkConfigBase
from broker.configtypes import ListenAddress
from broker.fdlimit import needed_for
from sinks.egd.config import EgdSinkConfig
from sources.entropykey.transport import PRODUCT_ID, VENDOR_ID

CONFIG_DIR = Path(__file__).parents[1] / "config"
SERVICE = CONFIG_DIR / "ebroker.service"
SOCKET = CONFIG_DIR / "ebroker.socket"
UDEV_RULES = CONFIG_DIR / "60-ebroker.rules"

MAX_EXPOSURE = 3.0
"""The highest ``systemd-analyze security`` rating the service may have."""

Unit = dict[str, list[tuple[str, str]]]
"""A unit file: each section's assignments in file order."""


def read_unit(path: Path) -> Unit:
    """
    Parse a unit file as systemd does: ``[Section]`` headers, ``Key=value``
    lines, ``#`` and ``;`` comments, a trailing backslash continuing a line.
    """
    unit: Unit = {}
    section: list[tuple[str, str]] | None = None
    pending = ""
    for raw in path.read_text().splitlines():
        line = pending + raw.strip()
        pending = ""
        if not line or line[0] in "#;":
            continue
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        if line.startswith("[") and line.endswith("]"):
            section = unit.setdefault(line[1:-1], [])
            continue
        key, separator, value = line.partition("=")
        assert separator, f"{path.name}: not an assignment: {line!r}"
        assert section is not None, f"{path.name}: {key} before any section"
        section.append((key.strip(), value.strip()))
    return unit


def values(unit: Unit, section: str, key: str) -> list[str]:
    """
    Every value ``key`` holds in ``section``, as systemd accumulates a list
    setting: an empty assignment clears what came before it.
    """
    found: list[str] = []
    for name, value in unit.get(section, []):
        if name == key:
            found = [*found, value] if value else []
    return found


def value(unit: Unit, section: str, key: str) -> str:
    """
    The one value of a single-valued setting (the last assignment wins).
    """
    assigned = [v for name, v in unit.get(section, []) if name == key]
    assert assigned, f"[{section}] {key}= is not set"
    return assigned[-1]


def words(unit: Unit, section: str, key: str) -> set[str]:
    """
    The space-separated items of a list setting, all assignments together.
    """
    return {word for item in values(unit, section, key) for word in item.split()}


_SPAN_UNITS = {"ms": 0.001, "s": 1.0, "sec": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0}


def seconds(span: str) -> float:
    """
    A systemd time span (``30``, ``30s``, ``1min 30s``) in seconds.
    """
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]*)", span)
    assert parts, f"not a time span: {span!r}"
    return sum(float(number) * _SPAN_UNITS[unit or "s"] for number, unit in parts)


def listen_stream(address: ListenAddress) -> str:
    """
    How ``ListenStream=`` writes a resolved sink listen address.
    """
    if address.scheme == "unix":
        return address.path
    host = f"[{address.host}]" if ":" in address.host else address.host
    return f"{host}:{address.port}"


def state_directory(service: Unit) -> Path:
    """
    Where systemd puts the service's ``StateDirectory=``.
    """
    return Path("/var/lib") / value(service, "Service", "StateDirectory")


def analyze(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["systemd-analyze", *args],
        capture_output=True,
        text=True,
        errors="replace",
        timeout=60,
        check=False,
    )


@pytest.fixture(scope="module")
def service() -> Unit:
    return read_unit(SERVICE)


@pytest.fixture(scope="module")
def socket_unit() -> Unit:
    return read_unit(SOCKET)


# ---- systemd's own judgement ----


@pytest.mark.needs_tool("systemd-analyze")
def test_service_sandbox_rates_at_most_3_0() -> None:
    """
    ``systemd-analyze security --offline=true --threshold=30`` accepts the
    service: its exposure is 3.0 or lower (OK on systemd's scale).
    """
    result = analyze(
        "security",
        "--offline=true",
        f"--threshold={MAX_EXPOSURE * 10:.0f}",
        str(SERVICE),
    )
    output = result.stdout + result.stderr
    assert 0 == result.returncode, output
    rating = re.search(
        r"Overall exposure level for ebroker\.service: (\d+\.\d+)", output
    )
    assert rating is not None, output
    assert float(rating[1]) <= MAX_EXPOSURE, output


@pytest.mark.needs_tool("systemd-analyze")
def test_security_threshold_fails_an_unhardened_unit(tmp_path: Path) -> None:
    """
    The threshold really gates: a unit with no sandboxing rates above 3.0 and
    ``systemd-analyze security --threshold=30`` exits non-zero for it.
    """
    bare = tmp_path / "bare.service"
    bare.write_text("[Service]\nExecStart=/bin/true\n")
    result = analyze(
        "security", "--offline=true", f"--threshold={MAX_EXPOSURE * 10:.0f}", str(bare)
    )
    assert 0 != result.returncode, result.stdout + result.stderr


@pytest.mark.needs_tool("systemd-analyze")
def test_units_pass_systemd_verify(tmp_path: Path, service: Unit) -> None:
    """
    ``systemd-analyze verify`` loads both units without a word: every setting
    parses and ``Service=`` finds the service. verify also insists that each
    Exec*= program exists, and /opt/ebroker is the installed host's, not this
    machine's: copies of the units run with a stub at each program path that
    is absent here, every other line unchanged.
    """
    text = SERVICE.read_text()
    for key in ("ExecStart", "ExecReload"):
        program = value(service, "Service", key).lstrip("-@:+!").split()[0]
        if not Path(program).exists():
            stub = tmp_path / "bin" / Path(program).name
            stub.parent.mkdir(exist_ok=True)
            stub.write_text("#!/bin/sh\nexit 0\n")
            stub.chmod(0o755)
            text = text.replace(f"{key}={program}", f"{key}={stub}")
    (tmp_path / SERVICE.name).write_text(text)
    shutil.copy(SOCKET, tmp_path / SOCKET.name)

    result = analyze(
        "verify", str(tmp_path / SOCKET.name), str(tmp_path / SERVICE.name)
    )
    # verify exits 0 even for a line it ignores; it says so on stderr.
    assert ("", 0) == (result.stdout + result.stderr, result.returncode)


# ---- the service ----


def test_service_notifies_and_reloads_with_sighup(service: Unit) -> None:
    """
    The broker tells systemd when it is ready, reloading and stopping
    (Type=notify, from the main process only); reload is SIGHUP, stop is
    SIGTERM, and a crash restarts it.
    """
    expected = {
        "Type": "notify",
        "NotifyAccess": "main",
        "ExecReload": "/bin/kill -HUP $MAINPID",
        "KillSignal": "SIGTERM",
        "Restart": "on-failure",
    }
    assert expected == {key: value(service, "Service", key) for key in expected}


def test_stop_timeout_covers_drain_and_grace(service: Unit) -> None:
    """
    systemd waits longer than the broker's drain plus shutdown grace before
    SIGKILL, with the defaults and with every shipped config.
    """
    default = BrokerSection()
    longest = max(
        [default.drain + default.shutdown_grace]
        + [
            config.broker.drain + config.broker.shutdown_grace
            for config in map(load_config, sorted(CONFIG_DIR.glob("*.toml")))
        ]
    )
    assert seconds(value(service, "Service", "TimeoutStopSec")) > longest


def test_service_may_open_only_entropy_devices(service: Unit) -> None:
    """
    The device policy is closed except for Entropy Keys (USB device nodes
    read-write, their cdc_acm ttys read-write) and /dev/hwrng read-only.
    """
    assert "closed" == value(service, "Service", "DevicePolicy")
    assert {"char-usb_device rw", "char-ttyACM rw", "/dev/hwrng r"} == set(
        values(service, "Service", "DeviceAllow")
    )


def test_descriptor_limit_covers_10000_clients(service: Unit) -> None:
    """
    LimitNOFILE leaves room for 10,000 client connections and the broker's own
    descriptors, with a margin (at least 20,000).
    """
    limit = int(value(service, "Service", "LimitNOFILE"))
    assert limit >= 20_000
    assert limit >= needed_for([10_000])


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        ("NoNewPrivileges", "yes"),
        ("CapabilityBoundingSet", ""),
        ("ProtectSystem", "strict"),
        ("ProtectHome", "yes"),
        ("PrivateTmp", "yes"),
        ("MemoryDenyWriteExecute", "yes"),
        ("SystemCallArchitectures", "native"),
        ("RestrictNamespaces", "yes"),
        ("ProtectKernelTunables", "yes"),
        ("ProtectKernelModules", "yes"),
        ("ProtectKernelLogs", "yes"),
        ("ProtectControlGroups", "yes"),
        ("UMask", "0077"),
    ],
)
def test_service_sandbox_setting(service: Unit, key: str, expected: str) -> None:
    """
    Each sandbox setting the documentation names has the value it names.
    """
    assert expected == value(service, "Service", key)


def test_service_keeps_network_netlink_and_system_service_calls(service: Unit) -> None:
    """
    The sandbox still lets the broker do its job: Internet and Unix sockets
    for clients and sd_notify, netlink for libusb (libusb_init opens a uevent
    socket), and the @system-service system calls (getrandom among them).
    """
    assert {"AF_UNIX", "AF_INET", "AF_INET6", "AF_NETLINK"} == words(
        service, "Service", "RestrictAddressFamilies"
    )
    assert ["@system-service", "~@privileged"] == values(
        service, "Service", "SystemCallFilter"
    )


def test_service_runs_as_ebroker_in_the_default_state_dir(service: Unit) -> None:
    """
    The broker runs as user and group ebroker, and systemd's state directory
    is the broker's default state_dir (/var/lib/ebroker).
    """
    assert ("ebroker", "ebroker") == (
        value(service, "Service", "User"),
        value(service, "Service", "Group"),
    )
    assert BrokerSection().state_dir == state_directory(service)


def test_service_pulls_in_its_socket(service: Unit) -> None:
    """
    Starting or enabling the service brings ebroker.socket along, and the
    service starts after it, so it always inherits the listeners.
    """
    assert "ebroker.socket" in words(service, "Unit", "Wants")
    assert "ebroker.socket" in words(service, "Unit", "After")
    assert "ebroker.socket" in words(service, "Install", "Also")


# ---- the socket ----


def test_socket_listens_on_the_default_config_addresses(
    service: Unit, socket_unit: Unit
) -> None:
    """
    ListenStream= names exactly the listen addresses of config/ebroker.toml as
    installed (state_dir set to the service's state directory, so
    ``unix:egd.sock`` is /var/lib/ebroker/egd.sock): the broker matches
    inherited sockets by bound address.
    """
    raw = tomllib.loads((CONFIG_DIR / "ebroker.toml").read_text())
    raw["broker"]["state_dir"] = str(state_directory(service))
    config = parse_config(raw)
    expected = sorted(
        listen_stream(address.resolved(config.broker.state_dir))
        for sink in config.sinks
        for address in sink.listen
    )
    assert expected == sorted(values(socket_unit, "Socket", "ListenStream"))


def test_socket_matches_the_sink_defaults(service: Unit, socket_unit: Unit) -> None:
    """
    The socket unit feeds ebroker.service with the sinks' default backlog,
    the EGD sink's default Unix socket mode and owner, one process per port,
    and TCP_NODELAY.
    """
    expected = {
        "Service": "ebroker.service",
        "Backlog": str(SinkConfigBase.model_fields["backlog"].default),
        "SocketMode": EgdSinkConfig.model_fields["socket_mode"].default,
        "SocketUser": value(service, "Service", "User"),
        "SocketGroup": value(service, "Service", "Group"),
        "ReusePort": "no",
        "NoDelay": "yes",
    }
    assert expected == {key: value(socket_unit, "Socket", key) for key in expected}


# ---- the udev rule ----


def udev_rules(path: Path) -> list[dict[str, str]]:
    """
    Each rule line as ``{"KEY op": value}``, e.g. ``{"GROUP =": "ebroker"}``.
    """
    pattern = re.compile(r'([A-Z_]+(?:\{[^}]*\})?)\s*(==|!=|\+=|-=|:=|=)\s*"([^"]*)"')
    return [
        {f"{key} {op}": text for key, op, text in pattern.findall(line)}
        for line in path.read_text().splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]


def test_udev_rule_gives_the_devices_to_the_service_group(service: Unit) -> None:
    """
    config/60-ebroker.rules gives the Entropy Key's USB node and tty (the
    vendor and product ids the USB transport looks for) and /dev/hwrng
    (kernel name hw_random) to the group the service runs as.
    """
    group = value(service, "Service", "Group")
    ids = {
        "ATTR{idVendor} ==": f"{VENDOR_ID:04x}",
        "ATTR{idProduct} ==": f"{PRODUCT_ID:04x}",
    }
    parent_ids = {f"ATTRS{key[4:]}": hex_id for key, hex_id in ids.items()}
    wanted = {
        "usb device": {
            "SUBSYSTEM ==": "usb",
            **ids,
            "GROUP =": group,
            "MODE =": "0660",
        },
        "tty": {
            "SUBSYSTEM ==": "tty",
            **parent_ids,
            "GROUP =": group,
            "MODE =": "0660",
        },
        "hwrng": {
            "SUBSYSTEM ==": "misc",
            "KERNEL ==": "hw_random",
            "GROUP =": group,
            "MODE =": "0640",
        },
    }
    rules = udev_rules(UDEV_RULES)
    found = {
        name: any(want.items() <= rule.items() for rule in rules)
        for name, want in wanted.items()
    }
    assert dict.fromkeys(wanted, True) == found
