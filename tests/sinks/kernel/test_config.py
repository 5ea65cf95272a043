"""
The kernel sink's settings: defaults that credit exactly the 256 bits a new
kernel needs, and refusals at load for settings that could not work.
"""

from typing import Any

import pytest

from broker.config import parse_config
from broker.errors import ConfigError
from sinks.kernel.config import KernelSinkConfig
from sinks.kernel.plan import PlanSettings


def config_with(**sink: Any) -> dict[str, Any]:
    return {
        "sources": [{"name": "rng", "kind": "getrandom"}],
        "sinks": [{"kind": "kernel", **sink}],
    }


def test_defaults_credit_exactly_what_a_new_kernel_needs() -> None:
    """
    64 bytes at 4 bits per byte: 256 bits, the CRNG's readiness threshold;
    reseeds every 60 s, the kernel's own cadence; classic top-ups from 1024
    to 3072 bits.
    """
    config = KernelSinkConfig(kind="kernel")
    assert (64, 4.0, 60.0, 1024, 3072, "auto", True, None) == (
        config.seed_bytes,
        config.credit,
        config.reseed_interval,
        config.watermark,
        config.target,
        config.semantics,
        config.uevents,
        config.record,
    )
    assert 256 == config.seed_bytes * config.credit
    assert ([], 0) == (config.listen, config.max_connections)


def test_units_are_accepted() -> None:
    """
    Durations take units like every other duration in the file.
    """
    parsed = parse_config(config_with(reseed_interval="2 min", check_interval="500 ms"))
    [sink] = parsed.sinks
    assert isinstance(sink, KernelSinkConfig)
    assert (120.0, 0.5) == (sink.reseed_interval, sink.check_interval)


@pytest.mark.parametrize(
    ("settings", "says"),
    [
        ({"credit": 9}, "credit"),
        ({"credit": -1}, "credit"),
        ({"credit": 2, "seed_bytes": 64}, "at least 256 bits"),
        ({"watermark": 3072}, "watermark must be below target"),
        ({"target": 4096}, "target"),
        ({"seed_bytes": 1024}, "seed_bytes"),
        ({"semantics": "lrng"}, "semantics"),
        ({"listen": ["tcp://127.0.0.1:1"]}, "listen"),
        ({"reseed_interval": "0 s"}, "reseed_interval"),
    ],
)
def test_impossible_settings_are_refused_at_load(
    settings: dict[str, Any], says: str
) -> None:
    """
    Credit above 8 bits per byte, a boot seed crediting less than 256 bits,
    a watermark not below the target, a target the classic pool can never
    reach, a write too large for one ioctl, an unknown generation, a listen
    address: each is refused with the key named.
    """
    with pytest.raises(ConfigError, match=says):
        parse_config(config_with(**settings))


def test_no_credit_at_all_is_allowed() -> None:
    """
    ``credit = 0`` never credits anything (the kernel must get ready by
    other means); the boot seed is then plain input of seed_bytes.
    """
    config = KernelSinkConfig(kind="kernel", credit=0)
    assert 64 == PlanSettings.from_config(config).seed_nbytes
