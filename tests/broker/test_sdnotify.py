"""
The sd_notify client: where it sends, and that it is silent without systemd.
"""

import os
import socket
from pathlib import Path

from broker.sdnotify import Notifier


def test_without_notify_socket_nothing_is_sent() -> None:
    notifier = Notifier({})
    assert not notifier.enabled
    notifier.ready("serving")  # must not raise


def test_abstract_socket_name_is_understood(tmp_path: Path) -> None:
    """
    systemd may name an abstract socket with a leading '@'.
    """
    name = f"ebroker-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as listener:
        listener.bind("\0" + name)
        Notifier({"NOTIFY_SOCKET": "@" + name}).ready("serving on x")
        assert listener.recv(100) == b"READY=1\nSTATUS=serving on x"


def test_unreachable_socket_does_not_stop_the_broker(tmp_path: Path) -> None:
    notifier = Notifier({"NOTIFY_SOCKET": str(tmp_path / "gone.sock")})
    notifier.stopping("draining")
    notifier.stopping("draining")  # logged once, never raised


def test_watchdog_interval_is_half_the_timeout_for_this_process() -> None:
    assert Notifier({"WATCHDOG_USEC": "4000000"}).watchdog_interval == 2.0
    mine = {"WATCHDOG_USEC": "4000000", "WATCHDOG_PID": str(os.getpid())}
    assert Notifier(mine).watchdog_interval == 2.0
    # Meant for another process (e.g. a wrapper script that exec'd us later).
    other = {"WATCHDOG_USEC": "4000000", "WATCHDOG_PID": "1"}
    assert Notifier(other).watchdog_interval is None
    assert Notifier({"WATCHDOG_USEC": "nonsense"}).watchdog_interval is None
