"""
The simulated fleet a broker keeps for ``transport = "simulated"`` keys.
"""

import pytest
import structlog

from sources.entropykey.factory import SimulatedFleet
from sources.entropykey.sim.key import SimulatedKey
from sources.entropykey.sim.keypairs import new_key_pair
from sources.entropykey.wire import FailureMode


@pytest.fixture
def fleet() -> SimulatedFleet:
    return SimulatedFleet()


def add_key(fleet: SimulatedFleet) -> tuple[str, SimulatedKey]:
    pair = new_key_pair()
    return pair.serial_text, fleet.get(pair.serial_text, pair.long_term_key, 4000.0)


def test_get_makes_a_key_once(fleet: SimulatedFleet) -> None:
    """
    The first ``get`` makes the key with its serial; later ones return it.
    """
    serial, key = add_key(fleet)
    assert serial == key.serial_text
    assert key is fleet.get(serial, bytes(32), 1.0)
    assert {serial: key} == fleet.keys


def test_control_unplugs_and_replugs(fleet: SimulatedFleet) -> None:
    """
    ``unplug`` pulls the key out and ``replug`` powers it up again; each
    action is logged as a warning and returned.
    """
    serial, key = add_key(fleet)
    with structlog.testing.capture_logs() as logs:
        assert "unplug" == fleet.control(serial, "unplug")
        unplugged = key.plugged
        assert "replug" == fleet.control(serial, "replug")
    assert (False, True, 1) == (unplugged, key.plugged, key.generation)
    assert [
        {
            "event": "simulated_key_control",
            "serial": serial,
            "action": action,
            "log_level": "warning",
        }
        for action in ("unplug", "replug")
    ] == logs


def test_control_fails_and_heals(fleet: SimulatedFleet) -> None:
    """
    ``fail`` latches a generator failure; ``heal`` clears it.
    """
    serial, key = add_key(fleet)
    assert "fail" == fleet.control(serial, "fail")
    failed = key.failure_mode
    assert "heal" == fleet.control(serial, "heal")
    assert (FailureMode.RAW_XOR_BAD, FailureMode.OK) == (failed, key.failure_mode)


def test_control_refuses_unknown_serials_and_actions(fleet: SimulatedFleet) -> None:
    """
    An unknown serial is a KeyError, an unknown action a ValueError naming the
    actions; neither touches the key.
    """
    serial, key = add_key(fleet)
    with pytest.raises(KeyError):
        fleet.control("AAAAAAAAAAAAAAAA", "unplug")
    with pytest.raises(ValueError, match="unplug, replug, fail, heal"):
        fleet.control(serial, "explode")
    assert key.plugged
    assert FailureMode.OK == key.failure_mode
