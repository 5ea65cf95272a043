"""
Inherited listening sockets: reading systemd's LISTEN_FDS, matching sockets
to configured addresses by where they are bound, and closing what nobody
claims.
"""

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog

from broker.configbase import ListenAddress
from broker.configtypes import parse_listen
from broker.inherited import (
    BoundAddress,
    InheritedListeners,
    ListenFdsError,
    bound_address,
    matches,
    parse_listen_fds,
)


@pytest.fixture
def opened() -> Iterator[list[socket.socket]]:
    sockets: list[socket.socket] = []
    yield sockets
    for sock in sockets:
        sock.close()


def listening_tcp(
    opened: list[socket.socket], host: str = "127.0.0.1"
) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    opened.append(sock)
    sock.bind((host, 0))
    sock.listen(4)
    return sock


def listening_unix(opened: list[socket.socket], path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    opened.append(sock)
    sock.bind(str(path))
    sock.listen(4)
    return sock


def port_of(sock: socket.socket) -> int:
    return int(sock.getsockname()[1])


# ---- LISTEN_FDS ---------------------------------------------------------------------


def test_fds_start_at_three_with_their_names() -> None:
    """
    LISTEN_FDS=n for this pid means fds 3 .. 3+n-1, named by LISTEN_FDNAMES.
    """
    environ = {"LISTEN_PID": "42", "LISTEN_FDS": "3", "LISTEN_FDNAMES": "egd::http"}
    assert [(3, "egd"), (4, None), (5, "http")] == parse_listen_fds(environ, 42)


def test_fds_without_names() -> None:
    """
    Names are optional.
    """
    assert [(3, None), (4, None)] == parse_listen_fds(
        {"LISTEN_PID": "7", "LISTEN_FDS": "2"}, 7
    )


@pytest.mark.parametrize(
    "environ",
    [
        {},
        {"LISTEN_FDS": "2"},
        {"LISTEN_PID": "41", "LISTEN_FDS": "2"},
        {"LISTEN_PID": "42", "LISTEN_FDS": "0"},
    ],
)
def test_fds_meant_for_another_process_are_not_ours(environ: dict[str, str]) -> None:
    """
    No LISTEN_PID, or another process's, or no fds: nothing inherited.
    """
    assert [] == parse_listen_fds(environ, 42)


@pytest.mark.parametrize(
    "environ",
    [
        {"LISTEN_PID": "x", "LISTEN_FDS": "2"},
        {"LISTEN_PID": "42", "LISTEN_FDS": "two"},
        {"LISTEN_PID": "42", "LISTEN_FDS": "-1"},
        {"LISTEN_PID": "42", "LISTEN_FDS": "2", "LISTEN_FDNAMES": "a:b:c"},
    ],
)
def test_malformed_variables_are_an_error(environ: dict[str, str]) -> None:
    """
    Malformed variables are refused with a reason rather than guessed at.
    """
    with pytest.raises(ListenFdsError):
        parse_listen_fds(environ, 42)


def test_reading_removes_the_variables() -> None:
    """
    The variables are removed once read, so a child process does not think
    the sockets are its own; they are removed even when meant for another pid.
    """
    environ = {"LISTEN_PID": "1", "LISTEN_FDS": "1", "LISTEN_FDNAMES": "x", "PATH": "/"}
    bank = InheritedListeners.from_systemd(environ, pid=2)
    assert 0 == len(bank)
    assert {"PATH": "/"} == environ


# ---- matching -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("configured", "bound", "expected"),
    [
        ("tcp://127.0.0.1:8888", BoundAddress("tcp", "127.0.0.1", 8888), True),
        ("localhost:8888", BoundAddress("tcp", "127.0.0.1", 8888), True),
        ("tcp://127.0.0.1:8888", BoundAddress("tcp", "127.0.0.1", 8889), False),
        ("tcp://127.0.0.1:8888", BoundAddress("tcp", "0.0.0.0", 8888), False),
        ("tcp://[::1]:8888", BoundAddress("tcp", "::1", 8888), True),
        ("tcp://[0:0::1]:8888", BoundAddress("tcp", "::1", 8888), True),
        ("tcp://[::]:8888", BoundAddress("tcp", "::", 8888), True),
        ("tcp://127.0.0.1:0", BoundAddress("tcp", "127.0.0.1", 40000), False),
        ("unix:/run/egd.sock", BoundAddress("unix", path="/run/egd.sock"), True),
        ("unix:/run//egd.sock", BoundAddress("unix", path="/run/egd.sock"), True),
        ("unix:/run/egd.sock", BoundAddress("unix", path="/run/other.sock"), False),
        ("unix:/run/egd.sock", BoundAddress("tcp", "127.0.0.1", 8888), False),
    ],
)
def test_addresses_match_by_where_the_socket_is_bound(
    configured: str, bound: BoundAddress, expected: bool
) -> None:
    """
    Family, host and port (or path) decide; a configured port 0 matches no
    socket by address.
    """
    assert expected == matches(parse_listen(configured), bound)


def test_bound_address_reads_the_socket(
    opened: list[socket.socket], tmp_path: Path
) -> None:
    """
    What a socket says of itself, normalised.
    """
    tcp = listening_tcp(opened)
    unix = listening_unix(opened, tmp_path / "a.sock")
    assert BoundAddress("tcp", "127.0.0.1", port_of(tcp)) == bound_address(tcp)
    assert BoundAddress("unix", path=str(tmp_path / "a.sock")) == bound_address(unix)


def test_a_sink_takes_the_socket_bound_to_its_address(
    opened: list[socket.socket], tmp_path: Path
) -> None:
    """
    Each configured address takes the one socket bound to it, and only once.
    """
    tcp = listening_tcp(opened)
    other = listening_tcp(opened)
    unix = listening_unix(opened, tmp_path / "egd.sock")
    bank = InheritedListeners()
    for sock in (tcp, other, unix):
        bank.add(sock)
    address = ListenAddress("tcp", host="127.0.0.1", port=port_of(tcp))
    taken = bank.take("egd", address)
    assert taken is not None
    assert tcp is taken.sock
    assert not taken.sock.getblocking()
    assert bank.take("egd", address) is None
    path = ListenAddress("unix", path=str(tmp_path / "egd.sock"))
    found = bank.take("egd", path)
    assert found is not None
    assert unix is found.sock
    assert [other] == [entry.sock for entry in bank.unclaimed()]


def test_a_port_zero_address_takes_the_socket_tagged_for_it(
    opened: list[socket.socket],
) -> None:
    """
    Several sinks on ``127.0.0.1:0`` each get back the socket a previous
    broker served them on, told apart by the tag, not by the port.
    """
    first, second = listening_tcp(opened), listening_tcp(opened)
    bank = InheritedListeners()
    bank.add(second, tag=("http", "tcp://127.0.0.1:0"))
    bank.add(first, tag=("egd", "tcp://127.0.0.1:0"))
    anywhere = ListenAddress("tcp", host="127.0.0.1", port=0)
    egd, http = bank.take("egd", anywhere), bank.take("http", anywhere)
    assert egd is not None
    assert http is not None
    assert (first, second) == (egd.sock, http.sock)
    assert bank.take("operator", anywhere) is None


def test_unclaimed_sockets_are_named_and_closed(
    opened: list[socket.socket], tmp_path: Path
) -> None:
    """
    A socket no sink claims is closed with one warning naming it; a Unix
    socket file a broker created goes with it, systemd's stays.
    """
    tcp = listening_tcp(opened)
    port = port_of(tcp)
    ours = listening_unix(opened, tmp_path / "ours.sock")
    systemds = listening_unix(opened, tmp_path / "systemd.sock")
    bank = InheritedListeners()
    bank.add(tcp, name="stray")
    bank.add(ours, owned=True)
    bank.add(systemds)
    with structlog.testing.capture_logs() as logs:
        bank.close_unclaimed()
    assert [
        [
            f"tcp://127.0.0.1:{port} (stray)",
            f"unix:{tmp_path / 'ours.sock'}",
            f"unix:{tmp_path / 'systemd.sock'}",
        ]
    ] == [e["sockets"] for e in logs if e["event"] == "inherited_sockets_unclaimed"]
    assert [-1, -1, -1] == [tcp.fileno(), ours.fileno(), systemds.fileno()]
    assert not (tmp_path / "ours.sock").exists()
    assert (tmp_path / "systemd.sock").exists()


def test_sockets_that_cannot_listen_are_refused(opened: list[socket.socket]) -> None:
    """
    A socket that is not listening, or not a stream, never reaches a sink.
    """
    unbound = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    datagram = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    opened += [unbound, datagram]
    datagram.bind(("127.0.0.1", 0))
    bank = InheritedListeners()
    with structlog.testing.capture_logs() as logs:
        bank.add(unbound)
        bank.add(datagram)
    assert 0 == len(bank)
    assert ["not listening", "not a stream socket"] == [
        e["reason"] for e in logs if e["event"] == "inherited_socket_refused"
    ]
    assert [-1, -1] == [unbound.fileno(), datagram.fileno()]
