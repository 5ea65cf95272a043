"""
The ekey-ulusbd-style Unix socket in front of a `SimulatedKey`.

`UnixKeyServer` lets the broker's ``unix`` transport (and ``ebroker
simulate``) reach a simulated key as it would reach a real one behind
ekey-ulusbd: one client at a time, unread output dropped on connect, a
mode-0600 socket removed on close.
"""

import asyncio
import contextlib
import errno
import os
import socket
import stat
from pathlib import Path
from types import TracebackType
from typing import Final, Self

import structlog

from .key import SimulatedKey, SimulatedUnplugged, aread, awrite

log = structlog.get_logger("ebroker.simulator")

_RELAY_CHUNK: Final = 4096


class UnixKeyServer:
    """
    Relay one client at a time between a Unix stream socket and ``key``, as
    ekey-ulusbd does: extra connections are closed at once; unread output is
    dropped when a client connects; the socket is mode 0600 and removed on
    close. An unplugged key closes the current client; later clients are
    closed as soon as they connect, until the key is replugged.
    """

    def __init__(self, key: SimulatedKey, path: str | Path) -> None:
        self.key = key
        self.path = Path(path)
        self._server: asyncio.Server | None = None
        self._inode: int | None = None
        self._client: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._log = log.bind(serial=key.serial_text, socket=str(self.path))

    @property
    def busy(self) -> bool:
        """
        Whether a client is connected.
        """
        return self._client is not None

    @property
    def inode(self) -> int | None:
        """
        The inode of the bound socket file (None before `start`).
        """
        return self._inode

    async def start(self) -> None:
        """
        Bind and listen.

        Raises:
            FileExistsError: ``path`` exists and is not a socket.
            OSError: the socket cannot be bound.
        """
        sock = _bind_private_unix(self.path)
        self._inode = os.stat(self.path).st_ino
        try:
            self._server = await asyncio.start_unix_server(self._accept, sock=sock)
        except BaseException:
            sock.close()
            self.path.unlink(missing_ok=True)
            raise
        self._log.info("simulator_listening")

    async def close(self) -> None:
        """
        Stop listening, drop the client and remove the socket file.
        """
        server, self._server = self._server, None
        if server is not None:
            server.close()
        for task in list(self._tasks):
            task.cancel(msg="simulator closing")
        # Cancelled handlers end with CancelledError; nothing else to report.
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if server is not None:
            await server.wait_closed()
        with contextlib.suppress(FileNotFoundError):
            if os.stat(self.path).st_ino == self._inode:
                self.path.unlink()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def _accept(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        task = asyncio.current_task()
        assert task is not None  # noqa: S101 -- asyncio runs handlers as tasks
        self._tasks.add(task)
        try:
            if self._client is not None:
                self._log.info("client_refused", reason="another client is connected")
                return
            self._client = task
            try:
                await self._relay(reader, writer)
            except Exception:  # noqa: BLE001 -- one client's failure never ends the server
                self._log.error("client_failed", exc_info=True)
            finally:
                self._client = None
        finally:
            writer.close()
            self._tasks.discard(task)

    async def _relay(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        key = self.key
        dropped = key.discard_pending()
        if not key.plugged:
            self._log.info("client_refused", reason="key unplugged")
            return
        self._log.info("client_connected", dropped_bytes=dropped)

        async def to_client() -> None:
            while True:
                writer.write(await aread(key, _RELAY_CHUNK))
                await writer.drain()

        try:
            async with asyncio.TaskGroup() as tasks:
                down = tasks.create_task(to_client())
                while data := await reader.read(_RELAY_CHUNK):
                    await awrite(key, data)
                down.cancel(msg="client closed its end")
        except* SimulatedUnplugged:
            self._log.info("client_closed", reason="key unplugged")
        except* ConnectionError:
            self._log.info("client_closed", reason="connection lost")
        else:
            self._log.info("client_closed", reason="client disconnected")


async def serve_unix(
    key: SimulatedKey, path: str | Path, *, stop: asyncio.Event | None = None
) -> None:
    """
    Serve ``key`` on a Unix socket at ``path`` until ``stop`` is set (or, without
    one, until cancelled); the socket file is removed on the way out.

    Raises:
        FileExistsError: ``path`` exists and is not a socket.
        OSError: the socket cannot be bound.
    """
    async with UnixKeyServer(key, path):
        await (stop if stop is not None else asyncio.Event()).wait()


def _bind_private_unix(path: Path) -> socket.socket:
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        pass
    else:
        if not stat.S_ISSOCK(mode):
            raise FileExistsError(errno.EEXIST, "exists and is not a socket", str(path))
        # A socket file left by an earlier run, as asyncio itself assumes.
        path.unlink()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(str(path))
        # Connections are refused until listen(), so the key is never
        # reachable through a socket with the umask's looser mode.
        os.chmod(path, 0o600)
    except BaseException:
        sock.close()
        raise
    sock.setblocking(False)
    return sock
