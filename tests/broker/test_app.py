"""
The broker's lifecycle: a shutdown always ends, whatever a component does.
"""

import asyncio
import resource
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from broker import app
from broker.app import Broker
from broker.config import parse_config
from broker.fdlimit import needed_for


def minimal_config(state_dir: Path) -> dict[str, object]:
    return {
        "broker": {"state_dir": str(state_dir)},
        "sources": [{"name": "getrandom", "kind": "getrandom"}],
        "sinks": [{"kind": "egd", "listen": ["tcp://127.0.0.1:0"]}],
    }


async def test_shutdown_ends_when_the_quota_store_hangs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """
    A quota store that stops answering while refunds are pushed at shutdown
    costs those refunds, not the shutdown: the broker stops, and says why.
    """
    monkeypatch.setattr(app, "ACCOUNTS_CLOSE_TIMEOUT", 0.05)
    broker = Broker(parse_config(minimal_config(tmp_path / "state")))
    hung = asyncio.Event()

    async def never_closes() -> None:
        hung.set()
        await asyncio.Event().wait()

    monkeypatch.setattr(broker.accounts, "close", never_closes)
    with capture_logs() as logs:
        async with broker:
            pass
    assert hung.is_set()
    assert ["accounts_close_timed_out"] == [
        entry["event"] for entry in logs if entry["log_level"] == "error"
    ]


async def test_start_raises_the_open_file_limit_for_the_caps(tmp_path: Path) -> None:
    """
    Started with systemd's usual soft limit far below what its connection
    caps need, the broker raises its own limit (within the hard limit) before
    it accepts anyone.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    config = parse_config(minimal_config(tmp_path / "state"))
    needed = needed_for([sink.max_connections for sink in config.sinks])
    expected = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
    resource.setrlimit(resource.RLIMIT_NOFILE, (128, hard))
    try:
        async with Broker(config):
            raised, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert expected == raised
