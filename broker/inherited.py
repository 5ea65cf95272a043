"""
Listening sockets handed to this process instead of bound by it.

A broker can start on sockets that are already bound and listening, so that
no connection attempt is ever refused across a restart: the kernel keeps
queueing connections in the socket's backlog while no process accepts them,
and the next broker accepts them.

Two places hand sockets over, and both end up in one `InheritedListeners`
bank:

* **systemd socket activation.** A ``.socket`` unit (``ListenStream=`` with
  the same addresses as the sinks' ``listen`` lists) passes the sockets as fds
  3, 4, ... with ``LISTEN_PID`` (this process), ``LISTEN_FDS`` (how many) and,
  optionally, ``LISTEN_FDNAMES`` (colon-separated names, used in log lines
  only). `InheritedListeners.from_systemd` reads them and removes the three
  variables from ``os.environ``, so a child process does not take the sockets
  for its own. Any ``ListenStream=`` the config's sinks name works::

      # ebroker.socket
      [Socket]
      ListenStream=127.0.0.1:8888
      ListenStream=/run/ebroker/egd.sock
      SocketMode=0600
      # ebroker.service: ExecStart=ebroker serve --config /etc/ebroker.toml

  A sink listening on ``unix:egd.sock`` (relative to ``state_dir``) claims
  the socket whose path is ``state_dir/egd.sock``: write the same absolute
  path in both files. The broker neither unlinks nor re-creates a Unix socket
  it got from systemd (systemd owns the file, its mode and owner).
* **Takeover** (``ebroker serve --takeover``, `broker.handover`): the running
  broker sends every listener to its successor, each tagged with the sink and
  configured address it served, so that a sink configured on port 0 gets the
  very socket it had before.

Matching is by the socket's actual bound address, never by name (a systemd
``FileDescriptorName=`` may not contain ``:``): a sink's configured
``tcp://HOST:PORT`` claims the inherited TCP socket bound to that address
family, host and port; ``unix:PATH`` claims the Unix socket bound to that path
(a relative path is resolved in ``state_dir`` first). A configured port 0
claims only a socket a previous broker tagged for that sink and address. What
no sink claims is logged (``inherited_sockets_unclaimed``, naming each one) and
closed by `InheritedListeners.close_unclaimed` once every sink has started.
Sockets that are not listening stream sockets are refused at once the same way.
"""

import contextlib
import ipaddress
import os
import socket
from collections.abc import Iterable, Mapping, MutableMapping
from dataclasses import dataclass
from typing import Final, Literal

import structlog

from broker.configbase import ListenAddress

log = structlog.get_logger("ebroker.inherited")

SD_LISTEN_FDS_START: Final = 3
"""The first fd systemd passes (after stdin, stdout and stderr)."""
SD_ENVIRONMENT: Final = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")


class ListenFdsError(ValueError):
    """
    ``LISTEN_FDS`` and friends are present but malformed.
    """


def parse_listen_fds(
    environ: Mapping[str, str], pid: int
) -> list[tuple[int, str | None]]:
    """
    The fds (with their names, if given) systemd passed to process ``pid``.

    Returns:
        ``[(3, "egd"), (4, None), ...]``; empty when ``LISTEN_PID`` is absent
        or names another process (the variables were meant for a parent).

    Raises:
        ListenFdsError: ``LISTEN_PID`` or ``LISTEN_FDS`` is not a number, or
            ``LISTEN_FDNAMES`` does not have one name per fd.
    """
    listen_pid = environ.get("LISTEN_PID")
    if listen_pid is None:
        return []
    try:
        if int(listen_pid) != pid:
            return []
        count = int(environ.get("LISTEN_FDS", "0"))
    except ValueError:
        raise ListenFdsError(
            f"LISTEN_PID={listen_pid!r} LISTEN_FDS={environ.get('LISTEN_FDS')!r} "
            "are not numbers"
        ) from None
    if count < 0:
        raise ListenFdsError(f"LISTEN_FDS={count} is negative")
    names: list[str | None] = [None] * count
    if "LISTEN_FDNAMES" in environ:
        given = environ["LISTEN_FDNAMES"].split(":")
        if len(given) != count:
            raise ListenFdsError(
                f"LISTEN_FDNAMES has {len(given)} names for {count} fds"
            )
        names = [name or None for name in given]
    return [(SD_LISTEN_FDS_START + index, names[index]) for index in range(count)]


@dataclass(frozen=True, slots=True)
class BoundAddress:
    """
    Where a socket is bound, normalised for comparison.
    """

    scheme: Literal["tcp", "unix"]
    host: str = ""
    port: int = 0
    path: str = ""

    def __str__(self) -> str:
        return str(ListenAddress(self.scheme, self.host, self.port, self.path))


def bound_address(sock: socket.socket) -> BoundAddress | None:
    """
    The address ``sock`` is bound to, or None for a family we do not serve
    (or an unnamed Unix socket).
    """
    name = sock.getsockname()
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        return BoundAddress("tcp", host=_normal_host(str(name[0])), port=int(name[1]))
    if sock.family == socket.AF_UNIX and isinstance(name, str) and name:
        return BoundAddress("unix", path=os.path.normpath(name))
    return None


def matches(configured: ListenAddress, bound: BoundAddress) -> bool:
    """
    Whether a sink configured on ``configured`` (already resolved against the
    state directory) may serve on a socket bound to ``bound``. A configured
    port 0 matches nothing here: only a tag from a previous broker says which
    socket it got.
    """
    if configured.scheme != bound.scheme:
        return False
    if configured.scheme == "unix":
        return os.path.normpath(configured.path) == bound.path
    return (
        configured.port != 0
        and configured.port == bound.port
        and _normal_host(configured.host) == bound.host
    )


def _normal_host(host: str) -> str:
    try:
        return str(ipaddress.ip_address(host.split("%", 1)[0]))
    except ValueError:
        return host


@dataclass(slots=True)
class Inherited:
    """
    One inherited listening socket.
    """

    sock: socket.socket
    bound: BoundAddress
    name: str | None = None
    """systemd's ``FileDescriptorName=``, for log lines only."""
    tag: tuple[str, str] | None = None
    """(sink name, configured address) under which a previous broker served it."""
    owned: bool = False
    """True when a broker created its Unix socket file (and the last one to
    serve it removes the file); False for systemd's, which systemd owns."""

    def describe(self) -> str:
        return f"{self.bound} ({self.name})" if self.name else str(self.bound)


@dataclass(frozen=True, slots=True)
class Listening:
    """
    One listener a sink serves on, as a takeover hands it on.
    """

    sink: str
    address: str
    """The configured (resolved) address it serves: the tag the successor
    claims it by."""
    sock: socket.socket
    owned: bool
    """Whether the successor removes its Unix socket file when it is the last
    to serve it (see `Inherited.owned`)."""


class InheritedListeners:
    """
    The bank of inherited listening sockets that sinks claim at start.
    """

    def __init__(self, entries: Iterable[Inherited] = ()) -> None:
        self._entries = list(entries)

    @classmethod
    def from_systemd(
        cls, environ: MutableMapping[str, str] | None = None, pid: int | None = None
    ) -> "InheritedListeners":
        """
        The sockets systemd passed (none without socket activation); removes
        the ``LISTEN_*`` variables from ``environ`` (default ``os.environ``).

        Raises:
            ListenFdsError: the variables are malformed.
        """
        env = os.environ if environ is None else environ
        try:
            passed = parse_listen_fds(env, os.getpid() if pid is None else pid)
        finally:
            for variable in SD_ENVIRONMENT:
                env.pop(variable, None)
        bank = cls()
        for fd, name in passed:
            try:
                sock = socket.socket(fileno=fd)
            except OSError as exc:
                log.warning("inherited_fd_unusable", fd=fd, name=name, error=str(exc))
                continue
            bank.add(sock, name=name)
        if passed:
            log.info(
                "inherited_sockets",
                origin="systemd",
                sockets=[entry.describe() for entry in bank._entries],
            )
        return bank

    def add(
        self,
        sock: socket.socket,
        *,
        name: str | None = None,
        tag: tuple[str, str] | None = None,
        owned: bool = False,
    ) -> None:
        """
        Put ``sock`` in the bank; a socket that is not a listening stream
        socket of a family we serve is logged and closed instead.
        """
        sock.set_inheritable(False)
        reason = _unusable(sock)
        bound = None if reason else bound_address(sock)
        if bound is None:
            log.warning(
                "inherited_socket_refused",
                fd=sock.fileno(),
                name=name,
                reason=reason or "not a TCP or named Unix socket",
            )
            sock.close()
            return
        self._entries.append(Inherited(sock, bound, name, tag, owned))

    def take(self, sink: str, address: ListenAddress) -> Inherited | None:
        """
        Remove and return the socket for ``sink``'s configured (resolved)
        ``address``: first the one a previous broker tagged for it, else one
        bound to that address.
        """
        tag = (sink, str(address))
        for entry in self._entries:
            if entry.tag == tag and (
                entry.bound.scheme == address.scheme
                and (address.scheme == "unix" or matches_host(address, entry.bound))
            ):
                return self._claim(entry)
        for entry in self._entries:
            if matches(address, entry.bound):
                return self._claim(entry)
        return None

    def absorb(self, other: "InheritedListeners") -> None:
        """
        Move every socket of ``other`` into this bank.
        """
        entries, other._entries = other._entries, []
        self._entries.extend(entries)

    def _claim(self, entry: Inherited) -> Inherited:
        self._entries.remove(entry)
        entry.sock.setblocking(False)
        return entry

    def __len__(self) -> int:
        return len(self._entries)

    def unclaimed(self) -> list[Inherited]:
        return list(self._entries)

    def close_unclaimed(self) -> None:
        """
        Close every socket no sink claimed, with one warning naming them.
        """
        entries, self._entries = self._entries, []
        if not entries:
            return
        log.warning(
            "inherited_sockets_unclaimed",
            sockets=[entry.describe() for entry in entries],
            hint="no sink's listen address matches; they are closed",
        )
        for entry in entries:
            if entry.owned and entry.bound.scheme == "unix":
                with contextlib.suppress(OSError):
                    os.unlink(entry.bound.path)
            entry.sock.close()


def matches_host(configured: ListenAddress, bound: BoundAddress) -> bool:
    """
    Whether a TCP address, port aside, names the host ``bound`` is bound to.
    """
    return _normal_host(configured.host) == bound.host


def _unusable(sock: socket.socket) -> str | None:
    try:
        if sock.type != socket.SOCK_STREAM:
            return "not a stream socket"
        if not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
            return "not listening"
    except OSError as exc:
        return f"not a socket ({exc.strerror or exc})"
    return None
