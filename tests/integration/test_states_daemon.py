"""
Every configured source shows in the real daemon's status, with a reason when
it is not running, and health says what needs a look: a wildcard Entropy Key
entry with no key attached, an optional hardware RNG this machine lacks.

A device that exists but cannot be opened for permissions is covered by unit
tests (tests/sources/test_device.py) with a refused ``open``: the suite runs as
root, and root opens a mode-000 file all the same.
"""

from pathlib import Path
from typing import Any

from sources.entropykey.sim.keypairs import new_key_pair, write_keyring
from tests.integration.clients import BrokerHttp, poll_until, running_daemon
from tests.integration.daemon import default_config

WAITING = "no Entropy Key attached; waiting for one"


def by_name(status: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {source["name"]: source for source in status["sources"]}


async def test_wildcard_key_entry_without_a_key_is_listed_and_degrades(
    tmp_path: Path,
) -> None:
    """
    ``serial = "*"`` with no keyring yet: the entry is listed as failed with
    the reason, health is degraded naming it (still serving: /healthz 200 with
    the reason in its body), and the log says so at start. Once a keyring
    with keys appears, the entry takes the first key, turns healthy, and
    health is ok again.
    """
    keyring = tmp_path / "keys" / "keyring"
    sources = f"""
        [[sources]]
        name = "ekeys"
        kind = "entropykey"
        serial = "*"
        transport = "simulated"
        keyring = "{keyring}"
        simulated_rate = 20000
        rescan_interval = "1 s"
        priority = 0

        [[sources]]
        name = "getrandom"
        kind = "getrandom"
        priority = 1
        """
    with running_daemon(tmp_path, default_config(tmp_path / "state", sources)) as (
        daemon
    ):
        async with BrokerHttp(daemon) as http:
            status = await poll_until(
                http.status,
                lambda status: (
                    "failed" == by_name(status)["ekeys"]["state"]
                    and "degraded" == status["health"]["status"]
                ),
            )
            entry = by_name(status)["ekeys"]
            assert entry["reason"].startswith(WAITING)
            assert str(keyring) in entry["reason"]
            assert any(
                reason.startswith(f"ekeys: {WAITING}")
                for reason in status["health"]["reasons"]
            )
            code, body = await http.healthz()
            assert 200 == code
            assert f"ekeys: {WAITING}" in body
            missing = [
                entry
                for entry in daemon.logs()
                if "entropy_key_missing" == entry.get("event")
            ]
            assert ["ekeys"] == [entry["source"] for entry in missing]

            keyring.parent.mkdir()
            write_keyring(keyring, [new_key_pair(), new_key_pair()])
            status = await poll_until(
                http.status,
                lambda status: (
                    "healthy" == by_name(status)["ekeys"]["state"]
                    and "ok" == status["health"]["status"]
                ),
                timeout=90,
            )
            assert 0 == status["tiers"]["active_tier"]
            # The second key got a source of its own.
            assert 3 == len(status["sources"])
        assert 0 == daemon.stop()


async def test_absent_optional_hwrng_is_listed_as_skipped(tmp_path: Path) -> None:
    """
    An optional hwrng this machine lacks is listed as stopped with a
    ``skipped:`` reason naming the path, and health stays ok: ``optional``
    says the operator expects that.
    """
    absent = tmp_path / "no-hwrng"
    sources = f"""
        [[sources]]
        name = "hwrng"
        kind = "hwrng"
        path = "{absent}"
        optional = true

        [[sources]]
        name = "getrandom"
        kind = "getrandom"
        priority = 1
        """
    with running_daemon(tmp_path, default_config(tmp_path / "state", sources)) as (
        daemon
    ):
        async with BrokerHttp(daemon) as http:
            status = await poll_until(
                http.status,
                lambda status: (
                    "stopped" == by_name(status)["hwrng"]["state"]
                    and "healthy" == by_name(status)["getrandom"]["state"]
                    and "ok" == status["health"]["status"]
                ),
            )
            reason = by_name(status)["hwrng"]["reason"]
            assert reason.startswith("skipped: ")
            assert str(absent) in reason
            assert [] == status["health"]["reasons"]
        assert 0 == daemon.stop()
