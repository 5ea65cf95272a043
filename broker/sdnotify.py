"""
The systemd notification protocol (``sd_notify``), for ``Type=notify`` units.

systemd hands the service a datagram socket in ``$NOTIFY_SOCKET`` (a path, or
an abstract name written with a leading ``@``) and reads newline-separated
``KEY=value`` assignments from it:

* ``READY=1`` once every listener accepts, so units ordered after ebroker
  (libvirtd and its QEMU guests) start only when the EGD socket answers;
* ``RELOADING=1`` with ``MONOTONIC_USEC`` while a SIGHUP reload runs, then
  ``READY=1`` again;
* ``STOPPING=1`` when the drain begins;
* ``STATUS=`` a line for ``systemctl status``: the broker's phase;
* ``WATCHDOG=1`` every half ``$WATCHDOG_USEC`` while the event loop runs,
  when the unit sets ``WatchdogSec=``.

Without ``$NOTIFY_SOCKET`` (not started by systemd) every call does nothing.
A notification that cannot be sent is logged once and otherwise ignored: the
broker serves whether or not systemd hears about it.
"""

import asyncio
import os
import socket
import time

import structlog

log = structlog.get_logger("ebroker.sdnotify")


class Notifier:
    """
    Sends state changes to the service manager named by the environment.
    """

    def __init__(self, environ: dict[str, str] | None = None) -> None:
        env = dict(os.environ) if environ is None else environ
        self._address = _address(env.get("NOTIFY_SOCKET", ""))
        self._watchdog_interval = _watchdog_interval(env)
        self._warned = False

    @property
    def enabled(self) -> bool:
        return self._address is not None

    @property
    def watchdog_interval(self) -> float | None:
        """
        Seconds between two ``WATCHDOG=1`` pings, or None without a watchdog.
        """
        return self._watchdog_interval

    def send(self, **fields: str | int) -> None:
        """
        Send one message, e.g. ``send(READY=1, STATUS="serving")``.
        """
        address = self._address
        if address is None:
            return
        message = "\n".join(f"{key}={value}" for key, value in fields.items())
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
                sock.sendto(message.encode(), address)
        except OSError as exc:
            if not self._warned:
                self._warned = True
                log.warning("sd_notify_failed", error=str(exc))

    def ready(self, status: str) -> None:
        self.send(READY=1, STATUS=status)

    def reloading(self) -> None:
        # systemd 253+ wants the monotonic time to match RELOADING with READY.
        self.send(
            RELOADING=1,
            MONOTONIC_USEC=time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000,
            STATUS="reloading customers and limits",
        )

    def stopping(self, status: str) -> None:
        self.send(STOPPING=1, STATUS=status)

    def status(self, status: str) -> None:
        self.send(STATUS=status)

    async def keep_watchdog_fed(self) -> None:
        """
        Ping the watchdog until cancelled: a stalled event loop stops the
        pings, and systemd restarts the broker.
        """
        interval = self._watchdog_interval
        if interval is None:
            return
        while True:
            self.send(WATCHDOG=1)
            await asyncio.sleep(interval)


def _address(value: str) -> str | None:
    if not value or value[0] not in "/@":
        return None
    # A leading '@' names a socket in the abstract namespace.
    return "\0" + value[1:] if value[0] == "@" else value


def _watchdog_interval(env: dict[str, str]) -> float | None:
    try:
        usec = int(env.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    pid = env.get("WATCHDOG_PID")
    if usec <= 0 or (pid is not None and pid != str(os.getpid())):
        return None
    return usec / 2 / 1_000_000
