"""
Config loading: good files load, bad ones are refused with the key path.
"""

from pathlib import Path
from typing import Any

import pytest

from broker.config import load_config, parse_config
from broker.errors import ConfigError

CONFIG_DIR = Path(__file__).parents[2] / "config"


def minimal(**overrides: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "sources": [{"name": "rng", "kind": "getrandom"}],
        "sinks": [{"kind": "egd", "listen": ["tcp://127.0.0.1:8888"]}],
    }
    data.update(overrides)
    return data


@pytest.mark.parametrize(
    "path", sorted(CONFIG_DIR.glob("*.toml")), ids=lambda p: p.name
)
def test_every_shipped_config_loads(path: Path) -> None:
    """
    Every example config in config/ is valid, so documented examples stay honest.
    """
    config = load_config(path)
    assert config.sources
    assert config.sinks


def test_default_config_is_loopback_only() -> None:
    """
    The embedded default never listens beyond this host.
    """
    config = load_config(CONFIG_DIR / "ebroker.toml")
    addresses = [address for sink in config.sinks for address in sink.listen]
    assert all(address.is_loopback for address in addresses)
    assert {
        "tcp://127.0.0.1:8888",
        "tcp://127.0.0.1:8889",
        "tcp://127.0.0.1:8890",
        "unix:egd.sock",
    } == {str(address) for address in addresses}
    planes = {
        str(sink.listen[0]): sink.plane for sink in config.sinks if sink.kind == "http"
    }
    assert {
        "tcp://127.0.0.1:8889": "tenant",
        "tcp://127.0.0.1:8890": "operator",
    } == planes


def test_units_are_parsed() -> None:
    """
    Sizes in the broker section accept human units.
    """
    config = parse_config(
        minimal(broker={"pool_size": "2 MiB", "low_watermark": "8 KiB"})
    )
    assert 2 << 20 == config.broker.pool_size
    assert 8192 == config.broker.low_watermark


@pytest.mark.parametrize(
    ("source", "key"),
    [
        ({"name": "g", "kind": "getrandom"}, "rate"),
        ({"name": "d", "kind": "hwrng"}, "nominal_rate"),
    ],
)
@pytest.mark.parametrize(
    ("written", "per_second"),
    [("4 KiB/s", 4096.0), ("240 KiB/min", 4096.0), (4096, 4096.0)],
)
def test_source_rates_take_rate_units(
    source: dict[str, Any], key: str, written: object, per_second: float
) -> None:
    """
    A source's rate accepts the same units as a customer's: '4 KiB/s', other
    periods, or a plain number of bytes per second.
    """
    config = parse_config(minimal(sources=[{**source, key: written}]))
    [parsed] = config.sources
    assert per_second == getattr(parsed, key).per_second


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (minimal(brokr={}), "brokr: unknown key"),
        (minimal(broker={"pool_size": "1 XB"}), "broker.pool_size: unknown size unit"),
        (
            minimal(sources=[{"name": "a", "kind": "getrandom", "credit": 9}]),
            "sources[0].credit: Input should be less than or equal to 8",
        ),
        (
            minimal(sources=[{"name": "a", "kind": "lavalamp"}]),
            "sources[0]: unknown kind 'lavalamp'",
        ),
        (minimal(sources=[{"name": "a"}]), "sources[0]: missing 'kind'"),
        (
            minimal(sources=[{"name": "a", "kind": "device", "pth": "/dev/x"}]),
            "sources[0].pth: unknown key",
        ),
        (
            minimal(
                sources=[
                    {"name": "a", "kind": "getrandom"},
                    {"name": "a", "kind": "getrandom"},
                ]
            ),
            "sources[1].name: 'a' is already used by sources[0]",
        ),
        (
            minimal(sinks=[{"kind": "egd", "listen": ["tcp://example.org:1"]}]),
            "sinks[0].listen[0]: 'example.org' is not an IP address",
        ),
        (
            minimal(sinks=[{"kind": "egd", "listen": ["tcp://127.0.0.1:70000"]}]),
            "sinks[0].listen[0]: port 70000 is out of range",
        ),
        (
            minimal(sinks=[{"kind": "egd", "listen": ["unix:" + "x" * 200]}]),
            "sinks[0].listen[0]: socket path longer than 107 bytes",
        ),
        (
            minimal(
                sinks=[
                    {"kind": "egd", "listen": ["tcp://127.0.0.1:9000"]},
                    {"kind": "http", "listen": ["127.0.0.1:9000"]},
                ]
            ),
            "sinks[1].listen[0]: tcp://127.0.0.1:9000 is also used by "
            "sinks[0].listen[0]",
        ),
        (
            minimal(sinks=[{"kind": "egd", "listen": []}]),
            "sinks[0].listen: List should have at least 1 item",
        ),
        (
            minimal(
                sinks=[{"kind": "egd", "listen": ["tcp://[::1]:1"], "socket_mode": "9"}]
            ),
            "sinks[0].socket_mode: '9' is not an octal mode",
        ),
        (minimal(sources=[]), "sources: List should have at least 1 item"),
        (
            minimal(broker={"pool_size": "8 KiB", "low_watermark": "16 KiB"}),
            "low_watermark cannot exceed pool_size",
        ),
    ],
)
def test_bad_values_name_the_key_path(data: dict[str, Any], expected: str) -> None:
    """
    Each mistake is reported with the key path and a plain reason.
    """
    with pytest.raises(ConfigError) as caught:
        parse_config(data)
    assert expected in str(caught.value)


def test_all_problems_are_reported_at_once(tmp_path: Path) -> None:
    """
    An operator fixing a file sees every problem in one go, each with the file name.
    """
    path = tmp_path / "bad.toml"
    path.write_text(
        '[broker]\npool_size = "lots"\n[[sources]]\nname = "x"\nkind = "getrandom"\n'
        'colour = "red"\n[[sinks]]\nkind = "egd"\nlisten = ["tcp://1.2.3:1"]\n'
    )
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    lines = str(caught.value).splitlines()
    assert 3 == len(lines)
    assert all(line.startswith(f"{path}: ") for line in lines)


def test_unreadable_and_malformed_files(tmp_path: Path) -> None:
    """
    Missing files and TOML syntax errors are config errors, not crashes.
    """
    with pytest.raises(ConfigError, match="no such file"):
        load_config(tmp_path / "absent.toml")
    broken = tmp_path / "broken.toml"
    broken.write_text("[broker\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(broken)


def test_a_replaced_key_is_refused_naming_its_successor(tmp_path: Path) -> None:
    """
    A device's old stall_timeout is refused with the key that replaced it
    (watchdog), for either device kind, alongside every other problem in the
    same entry.
    """
    path = tmp_path / "old.toml"
    path.write_text(
        '[[sources]]\nname = "fifo"\nkind = "device"\npath = "/tmp/fifo"\n'
        'stall_timeout = "5 s"\nread_size = "lots"\n'
        '[[sources]]\nname = "hw"\nkind = "hwrng"\nstall_timeout = 5\n'
        '[[sinks]]\nkind = "egd"\nlisten = ["tcp://127.0.0.1:1"]\n'
    )
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert [
        f"{path}: sources[0].stall_timeout: replaced by 'watchdog'",
        f"{path}: sources[0].read_size: 'lots' is not a size "
        "(try '4096', '4 KiB' or '1 MiB')",
        f"{path}: sources[1].stall_timeout: replaced by 'watchdog'",
    ] == str(caught.value).splitlines()


def test_the_watchdog_is_accepted_for_a_device() -> None:
    """
    The key that replaced stall_timeout is read, units and all.
    """
    config = parse_config(
        minimal(sources=[{"name": "d", "kind": "device", "watchdog": "2 min"}])
    )
    assert 120.0 == config.sources[0].watchdog


def test_ipv6_and_ephemeral_ports_are_accepted() -> None:
    """
    IPv6 literals work, and port 0 (pick a free port) never counts as a clash.
    """
    config = parse_config(
        minimal(
            sinks=[
                {"kind": "egd", "listen": ["tcp://[::1]:0", "tcp://127.0.0.1:0"]},
                {"kind": "http", "listen": ["tcp://127.0.0.1:0"]},
            ]
        )
    )
    assert "tcp://[::1]:0" == str(config.sinks[0].listen[0])


def test_relative_unix_sockets_live_in_the_state_dir() -> None:
    """
    unix:NAME is placed in the state directory; absolute paths are kept.
    """
    config = parse_config(
        minimal(
            broker={"state_dir": "/srv/eb"},
            sinks=[{"kind": "egd", "listen": ["unix:egd.sock", "unix:/run/egd"]}],
        )
    )
    state_dir = config.broker.state_dir
    resolved = [str(address.resolved(state_dir)) for address in config.sinks[0].listen]
    assert ["unix:/srv/eb/egd.sock", "unix:/run/egd"] == resolved
