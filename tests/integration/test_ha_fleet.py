"""
Two brokers behind the shipped haproxy (config/haproxy.cfg, ports rewritten)
while a QEMU-like EGD client, a guest-like EGD client that thinks between
requests, and an HTTP client draw through haproxy the whole time: what a
broker's death, drain and restart cost them.

Each test prints its measurements on a line starting with ``HA-FLEET`` (see
them with ``pytest -s``) and writes them to ``ha-fleet-<scenario>.json`` in
its tmp_path.
"""

import json
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from tests.integration.fleet import (
    Fleet,
    HttpLoop,
    QemuEgdClient,
    running_fleet,
    send_signal,
    wait_exit,
)

pytestmark = pytest.mark.needs_tool("haproxy")

QEMU_IP = "127.0.0.2"
GUEST_IP = "127.0.0.3"
GUEST_THINK = 0.2
"""Seconds a guest-like client waits between two answers and its next
request (a real guest waits 1 to 60 s; this keeps the test short)."""


def report(tmp_path: Path, scenario: str, data: dict[str, Any]) -> None:
    """
    Print ``data`` for ``pytest -s`` and keep it as a JSON artifact.
    """
    text = json.dumps(data, indent=2, sort_keys=True, default=str)
    (tmp_path / f"ha-fleet-{scenario}.json").write_text(text + "\n")
    print(f"HA-FLEET {scenario}: {json.dumps(summary(data), sort_keys=True)}")


def summary(data: dict[str, Any]) -> dict[str, Any]:
    """
    The headline numbers: no per-request detail.
    """
    keep = {"longest_gap_s", "lost", "sent", "answered", "ok", "requests"}
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out[key] = {k: v for k, v in value.items() if k in keep}
            if "errors" in value:
                out[key]["errors"] = len(value["errors"])
        elif not isinstance(value, list):
            out[key] = value
    return out


async def test_killed_broker_costs_at_most_the_outstanding_request(
    tmp_path: Path,
) -> None:
    """
    SIGKILL the broker a QEMU-like client is connected to: the client loses
    at most the one request it had outstanding, reconnects through haproxy
    to the other broker and is served there; a guest on the other broker
    notices nothing, and the HTTP client sees no error (haproxy retries and
    redispatches what the dead broker refused or dropped).
    """
    with running_fleet(tmp_path) as fleet:
        try:
            data = await killed_broker(fleet)
        finally:
            await fleet.aclose()
    report(tmp_path, "sigkill", data)
    qemu, guest, http = data["qemu"], data["guest"], data["http"]
    assert qemu["sent"] == qemu["answered"] + qemu["lost"], qemu
    assert qemu["lost"] <= 1, qemu
    assert 2 == qemu["connections"], qemu
    assert [] == qemu["errors"], qemu
    assert 0 == guest["lost"], guest
    assert 1 == guest["connections"], guest
    assert [] == guest["errors"], guest
    assert [] == http["errors"], http


async def killed_broker(fleet: Fleet) -> dict[str, Any]:
    await fleet.all_up()
    qemu = QemuEgdClient(fleet.egd_front, source_ip=QEMU_IP, name="qemu")
    guest = QemuEgdClient(
        fleet.egd_front, source_ip=GUEST_IP, think=GUEST_THINK, name="guest"
    )
    http = HttpLoop(fleet.http_front)
    async with qemu, http:
        victim = await fleet.broker_of_egd_session()
        survivor = 1 - victim
        await qemu.answered_more(20)
        # leastconn: the guest goes to the broker without a session.
        async with guest:
            await guest.answered_more(2)
            assert 1 == await fleet.egd_connections(survivor)
            await http.succeeded_more(20)
            killed_at = send_signal(fleet.brokers[victim], signal.SIGKILL)
            await wait_exit(fleet.brokers[victim])
            await qemu.connected_again()
            await qemu.answered_more(20)
            assert 2 == await fleet.egd_connections(survivor)
            await fleet.all_down_but(survivor)
            await http.succeeded_more(20)
            await guest.answered_more(2)
            await qemu.stop()
            await guest.stop()
            await http.stop()
    return {
        "victim": fleet.names[victim],
        "killed_at": killed_at,
        # How long the QEMU client's session outlived its broker.
        "eof_after_kill_s": round(qemu.eofs[0] - killed_at, 4) if qemu.eofs else None,
        "qemu": qemu.measurements(),
        "guest": guest.measurements(),
        "http": http.measurements(),
        "haproxy": await fleet.counters(),
        "measured_at": time.time(),
    }
