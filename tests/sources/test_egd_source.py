"""
The ``egd`` upstream source against small real EGD servers on loopback:
pipelined blocking reads, bad answers, short reads, end of file mid-answer, a
slow server, failover between endpoints (inside a read, and at an open), Unix
sockets, and the config's endpoint checks with their key paths.
"""

import asyncio
import contextlib
import os
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import structlog

from broker.config import parse_config
from broker.errors import ConfigError, SourceError
from sources.egd import EgdEndpoint, EgdSource, EgdSourceConfig, parse_egd_endpoint
from tests.helpers import DEADLINE, eventually, free_port

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Any]


class EgdServer:
    """
    A tiny EGD server: answers ``00`` with a level and ``02 NN`` with NN
    random bytes, unless the test gives it another behaviour. Records every
    request, every byte it sent, and how many requests were outstanding at
    most.
    """

    def __init__(self, behaviour: str = "good") -> None:
        self.behaviour = behaviour
        self.requests: list[int] = []
        self.connections = 0
        self.max_outstanding = 0
        self.sent = bytearray()
        self.server: asyncio.Server | None = None
        self.endpoint = ""
        self._writers: list[asyncio.StreamWriter] = []

    async def start(self, unix: Path | None = None) -> "EgdServer":
        if unix is not None:
            self.server = await asyncio.start_unix_server(self._handle, str(unix))
            self.endpoint = f"unix:{unix}"
        else:
            self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
            port = self.server.sockets[0].getsockname()[1]
            self.endpoint = f"tcp://127.0.0.1:{port}"
        return self

    async def stop(self) -> None:
        """
        Stop listening and drop every connection (a killed server).
        """
        if self.server is not None:
            self.server.close()
        for writer in self._writers:
            writer.transport.abort()
        if self.server is not None:
            await self.server.wait_closed()

    async def _handle(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self.connections += 1
        self._writers.append(writer)
        try:
            await self._serve(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass  # the client went away: nothing to answer
        finally:
            writer.transport.abort()

    async def _serve(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        if self.behaviour == "close":
            # Read the request first: closing with unread bytes sends a reset.
            await reader.readexactly(1)
            writer.close()
            await writer.wait_closed()
            return
        if self.behaviour == "silent":
            await reader.read(1)
            await asyncio.Event().wait()
        if (await reader.readexactly(1)) != b"\x00":
            return
        writer.write((4096).to_bytes(4, "big"))
        if self.behaviour == "slow":
            await asyncio.Event().wait()
        served = 0
        while True:
            command = await reader.readexactly(2)
            assert 0x02 == command[0]
            self.requests.append(command[1])
            # Everything the client already wrote counts as outstanding.
            buffered = len(reader._buffer) // 2  # type: ignore[attr-defined]
            self.max_outstanding = max(self.max_outstanding, 1 + buffered)
            data = os.urandom(command[1])
            if self.behaviour == "eof_mid_answer" and served:
                writer.write(data[:100])
                self.sent += data[:100]
                await writer.drain()
                return
            self.sent += data
            if self.behaviour == "extra":
                data += b"\x00\x01\x02"
            if self.behaviour == "pieces":
                for index in range(0, len(data), 7):
                    writer.write(data[index : index + 7])
                    await writer.drain()
            else:
                writer.write(data)
            await writer.drain()
            served += 1


@contextlib.asynccontextmanager
async def serving(
    behaviour: str = "good", unix: Path | None = None
) -> AsyncIterator[EgdServer]:
    server = await EgdServer(behaviour).start(unix)
    try:
        yield server
    finally:
        await server.stop()


def make(*endpoints: str, **settings: Any) -> EgdSource:
    config = EgdSourceConfig.model_validate(
        {"name": "up", "kind": "egd", "endpoints": list(endpoints), **settings}
    )
    return EgdSource(config, rng=lambda: 0.0)


async def read_at_least(source: EgdSource, count: int) -> bytes:
    data = b""
    async with asyncio.timeout(DEADLINE):
        while len(data) < count:
            data += await source.read()
    return data


async def open_and_read(
    source: EgdSource,
    within: float | None = None,
    then: Callable[[], Awaitable[None]] | None = None,
) -> None:
    """
    Open ``source``, read once (within ``within`` s), run ``then``, and read
    on until something fails.
    """
    async with source:
        async with asyncio.timeout(within):
            await source.read()
        if then is not None:
            await then()
        await read_at_least(source, 1 << 30)


# ---- reading -------------------------------------------------------------------


async def test_reads_with_pipelined_blocking_requests() -> None:
    """
    The source asks ``02 FF`` requests, ``pipeline`` of them outstanding at
    once, and returns the bytes as they come.
    """
    async with serving() as server, make(server.endpoint, pipeline=3) as source:
        data = await read_at_least(source, 10 * 255)
    assert 10 * 255 <= len(data)
    assert {255} == set(server.requests)
    assert 3 == server.max_outstanding


async def test_replies_in_pieces_are_counted_not_framed() -> None:
    """
    A blocking reply streamed in small pieces (as ekeyd does) is read piece
    by piece, and nothing more is asked than ``pipeline`` allows.
    """
    async with serving("pieces") as server, make(server.endpoint) as source:
        data = await read_at_least(source, 2000)
    assert 2000 <= len(data)
    assert 4 >= server.max_outstanding


async def test_credit_comes_from_the_config_only() -> None:
    """
    The upstream's entropy level plays no part: the credit is the config's.
    """
    assert 2.5 == make("tcp://127.0.0.1:1", credit=2.5).credit


async def test_more_bytes_than_asked_is_a_protocol_error() -> None:
    """
    A peer sending more than was requested is not an EGD server (or a
    broken one): the read fails, naming it.
    """
    async with serving("extra") as server, make(server.endpoint) as source:
        with pytest.raises(SourceError, match="more bytes than were requested"):
            await read_at_least(source, 1 << 20)


async def test_eof_mid_answer_fails_with_what_was_owed() -> None:
    """
    An upstream closing the connection in the middle of an answer fails the
    read, saying how many requested bytes were left unanswered.
    """
    async with serving("eof_mid_answer") as server, make(server.endpoint) as source:
        with pytest.raises(SourceError, match="requested bytes unanswered"):
            await read_at_least(source, 1 << 20)


async def test_a_server_that_closes_at_once_fails_the_open() -> None:
    """
    A peer that closes before answering the entropy-level request is not an
    EGD server: the open fails, and says so.
    """
    async with serving("close") as server:
        with pytest.raises(SourceError, match="before answering"):
            async with make(server.endpoint):
                pass


async def test_a_silent_server_fails_the_open_within_connect_timeout() -> None:
    """
    A port that accepts and never answers (an HTTP port, a hung proxy) fails
    the open after ``connect_timeout``, not never.
    """
    async with serving("silent") as server:
        source = make(server.endpoint, connect_timeout="0.2 s")
        with pytest.raises(SourceError, match=r"no answer within 0\.2 s"):
            async with source:
                pass


async def test_a_slow_server_leaves_the_read_pending_and_the_source_closable() -> None:
    """
    A read has no time limit of its own (the watchdog's job): against an
    upstream that never answers it stays pending, and once cancelled the
    source closes cleanly and blames the endpoint.
    """
    async with serving("slow") as server:
        source = make(server.endpoint)
        with pytest.raises(TimeoutError):
            await open_and_read(source, within=0.1)
        assert source.endpoints.current is None
        assert 1 == source.details()["endpoints"][0]["failures"]


async def test_refused_endpoint_names_the_reason() -> None:
    """
    Nothing listening: the open fails with the endpoint and the refusal.
    """
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    with pytest.raises(SourceError, match=rf"{endpoint}: Connection refused"):
        async with make(endpoint):
            pass


async def test_unix_socket_endpoint(tmp_path: Path) -> None:
    """
    ``unix:/PATH`` reads from an EGD server on a Unix socket.
    """
    async with (
        serving(unix=tmp_path / "egd.sock") as server,
        make(server.endpoint) as source,
    ):
        assert 255 <= len(await read_at_least(source, 255))


async def test_ipv6_loopback_endpoint() -> None:
    """
    ``tcp://[::1]:PORT`` connects over IPv6.
    """
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    try:
        server = await asyncio.start_server(
            EgdServer()._handle, "::1", 0, family=socket.AF_INET6
        )
    except OSError:
        pytest.skip("no IPv6 loopback")
    port = server.sockets[0].getsockname()[1]
    try:
        async with make(f"tcp://[::1]:{port}") as source:
            assert await source.read()
            assert f"tcp://[::1]:{port}" == source.details()["endpoint"]
    finally:
        server.close()
        await server.wait_closed()


# ---- failover ------------------------------------------------------------------


async def read_tracking(
    source: EgdSource, count: int
) -> tuple[dict[EgdEndpoint, bytes], int]:
    """
    Read at least ``count`` bytes; each read's bytes filed under the endpoint
    the source was on when it returned (one read, one connection), in order.
    """
    by_endpoint: dict[EgdEndpoint, bytes] = {}
    total = 0
    async with asyncio.timeout(DEADLINE):
        while total < count:
            data = await source.read()
            endpoint = source.endpoints.current
            assert endpoint is not None
            by_endpoint[endpoint] = by_endpoint.get(endpoint, b"") + data
            total += len(data)
    return by_endpoint, total


async def test_a_read_spanning_an_endpoint_dying_goes_on_from_the_next() -> None:
    """
    The first endpoint dies in the middle of an answer: no read fails, the
    reads go on from the second; what the first sent before dying is
    returned once, in order, and nothing of it again; the first backs off,
    and the failover is shown, counted and logged at warning with the reason.
    """
    async with serving("eof_mid_answer") as first, serving() as second:
        source = make(first.endpoint, second.endpoint, pipeline=1)
        with structlog.testing.capture_logs() as logs:
            async with source:
                by_endpoint, _ = await read_tracking(source, 4 * 255)
                details = source.details()
    one, two = (parse_egd_endpoint(s.endpoint) for s in (first, second))
    assert {one, two} == set(by_endpoint)
    assert bytes(first.sent) == by_endpoint[one]
    assert 255 + 100 == len(by_endpoint[one])
    assert bytes(second.sent[: len(by_endpoint[two])]) == by_endpoint[two]
    assert second.endpoint == details["endpoint"]
    assert 1 == details["failovers"]
    assert 1 == details["endpoints"][0]["failures"]
    assert 0 < details["endpoints"][0]["backoff"]
    assert "requested bytes unanswered" in details["last_error"]
    failover = [entry for entry in logs if entry["event"] == "upstream_failover"]
    assert 1 == len(failover)
    assert "warning" == failover[0]["log_level"]
    assert (second.endpoint, first.endpoint) == (
        failover[0]["endpoint"],
        failover[0]["previous"],
    )
    assert first.endpoint in failover[0]["reason"]


async def test_a_killed_endpoint_fails_over_without_a_failed_read() -> None:
    """
    The endpoint in use is killed (its connections dropped, nothing
    listening): the next read is served by the other endpoint, not failed.
    """
    async with serving() as first, serving() as second:
        source = make(first.endpoint, second.endpoint)
        async with source:
            assert await source.read()
            await first.stop()
            _, total = await read_tracking(source, 10 * 255)
            assert second.endpoint == source.details()["endpoint"]
    assert 10 * 255 <= total


async def test_a_read_fails_soon_when_every_endpoint_is_dead() -> None:
    """
    The endpoint in use dies and the other refuses: the read fails at once,
    naming both and why; both back off, and closing blames neither twice.
    """
    dead = f"tcp://127.0.0.1:{free_port()}"
    async with serving() as first:
        source = make(first.endpoint, dead)
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(SourceError) as caught:
            await open_and_read(source, then=first.stop)
        assert loop.time() - started < 1.0
    assert first.endpoint in str(caught.value)
    assert f"no other endpoint answered: {dead}: Connection refused" in str(
        caught.value
    )
    assert [1, 1] == [entry["failures"] for entry in source.details()["endpoints"]]
    assert source.endpoints.current is None


async def test_a_failover_ends_within_half_the_watchdog() -> None:
    """
    The next endpoint accepts and never answers, and ``connect_timeout`` is
    longer than the watchdog: the failover gives up at half the watchdog, so
    the read fails before the watchdog fires, saying why.
    """
    async with serving("eof_mid_answer") as first, serving("silent") as second:
        source = make(
            first.endpoint, second.endpoint, connect_timeout="20 s", watchdog="1 s"
        )
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(SourceError, match="the read's failover budget"):
            await open_and_read(source)
        assert loop.time() - started < 1.0
    assert source.endpoints.current is None


async def test_a_read_cancelled_while_failing_over_leaves_the_source_closable() -> None:
    """
    Cancelled while it fails over (the watchdog, a shutdown), a read leaves
    no connection open and the source closes cleanly; the endpoint that died
    backs off, the one being tried is not blamed.
    """
    async with serving("eof_mid_answer") as first, serving("silent") as second:
        source = make(first.endpoint, second.endpoint, connect_timeout="20 s")
        with pytest.raises(TimeoutError):
            async with source, asyncio.timeout(0.3):
                await read_at_least(source, 1 << 30)
        await eventually(lambda: second.connections == 1)
    assert source.endpoints.current is None
    assert [1, 0] == [entry["failures"] for entry in source.details()["endpoints"]]


async def test_an_open_after_a_failed_endpoint_says_so() -> None:
    """
    A source that failed on its first endpoint (the other one down then) and
    is opened again by the supervisor connects to the second; the move is a
    failover, logged at warning with the reason.
    """
    second_port = free_port()
    second_endpoint = f"tcp://127.0.0.1:{second_port}"
    async with serving() as first:
        source = make(first.endpoint, second_endpoint)
        with pytest.raises(SourceError, match=r"(unanswered|reset by peer); no other"):
            await open_and_read(source, then=first.stop)
    server = await asyncio.start_server(EgdServer()._handle, "127.0.0.1", second_port)
    try:
        source.endpoints._states[1].due = 0.0
        with structlog.testing.capture_logs() as logs:
            async with source:
                assert await source.read()
                details = source.details()
    finally:
        server.close()
        await server.wait_closed()
    assert second_endpoint == details["endpoint"]
    assert 1 == details["failovers"]
    assert first.endpoint in details["endpoints"][0]["last_error"]
    failover = [entry for entry in logs if entry["event"] == "upstream_failover"]
    assert 1 == len(failover)
    assert "warning" == failover[0]["log_level"]
    assert first.endpoint == failover[0]["previous"]


async def test_an_open_skips_a_dead_endpoint_to_reach_a_live_one() -> None:
    """
    With the preferred endpoint refusing, one open reaches the next.
    """
    dead = f"tcp://127.0.0.1:{free_port()}"
    async with serving() as live, make(dead, live.endpoint) as source:
        assert await source.read()
        assert live.endpoint == source.details()["endpoint"]
        assert "refused" in source.details()["endpoints"][0]["last_error"]


async def test_an_open_waits_for_the_earliest_when_all_back_off() -> None:
    """
    Every endpoint backing off: the open waits for the first one due, then
    connects (here the server came back meanwhile).
    """
    async with serving() as server:
        source = make(server.endpoint)
        source.endpoints.failed(
            parse_egd_endpoint(server.endpoint),
            asyncio.get_running_loop().time(),
            "eof",
        )
        async with source:
            assert await source.read()


async def test_failback_moves_to_the_preferred_endpoint_between_reads() -> None:
    """
    With ``failback`` due, the source connects to the preferred endpoint
    between two reads and keeps reading without an error.
    """
    dead_port = free_port()
    preferred = f"tcp://127.0.0.1:{dead_port}"
    async with serving() as fallback:
        source = make(preferred, fallback.endpoint, failback="0.05 s")
        async with source:
            assert fallback.endpoint == source.details()["endpoint"]
            assert await source.read()
            server = await asyncio.start_server(
                EgdServer()._handle, "127.0.0.1", dead_port
            )
            try:
                source.endpoints._states[0].due = 0.0
                await eventually(lambda: bool(source.endpoints._failback_at))
                async with asyncio.timeout(DEADLINE):
                    while source.details()["endpoint"] != preferred:
                        assert await source.read()
                assert await source.read()
            finally:
                server.close()
                await server.wait_closed()
        assert 1 == source.details()["failovers"]


# ---- config --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("tcp://127.0.0.1:8888", EgdEndpoint("tcp", host="127.0.0.1", port=8888)),
        ("tcp://host.example:8888", EgdEndpoint("tcp", "host.example", 8888)),
        ("tcp://[::1]:8888", EgdEndpoint("tcp", host="::1", port=8888)),
        ("127.0.0.1:8888", EgdEndpoint("tcp", host="127.0.0.1", port=8888)),
        ("unix:/run/egd.sock", EgdEndpoint("unix", path="/run/egd.sock")),
    ],
)
def test_endpoints_parse(text: str, expected: EgdEndpoint) -> None:
    """
    TCP with a name, IPv4 or bracketed IPv6, and absolute Unix paths parse,
    and print back as written.
    """
    assert expected == parse_egd_endpoint(text)
    assert text.removeprefix("127.0.0.1") in str(expected)


@pytest.mark.parametrize(
    ("endpoint", "message"),
    [
        ("unix:egd.sock", "needs an absolute path"),
        ("tcp://127.0.0.1", "is not an EGD endpoint"),
        ("tcp://127.0.0.1:0", "port 0 is out of range"),
        ("tcp://127.0.0.1:70000", "port 70000 is out of range"),
        ("tcp://::1:8888", "is not an EGD endpoint"),
        ("http://127.0.0.1:8888", "is not an EGD endpoint"),
        ("unix:/" + "x" * 200, "socket path longer than"),
    ],
)
def test_bad_endpoints_are_refused_with_the_key_path(
    endpoint: str, message: str
) -> None:
    """
    A bad endpoint is refused at load, naming its key path and the reason.
    """
    data = {
        "sources": [
            {"name": "up", "kind": "egd", "endpoints": ["tcp://127.0.0.1:1", endpoint]}
        ],
        "sinks": [{"kind": "egd", "listen": ["tcp://127.0.0.1:0"]}],
    }
    with pytest.raises(ConfigError) as caught:
        parse_config(data)
    assert "sources[0].endpoints[1]: " in str(caught.value)
    assert message in str(caught.value)


def test_an_empty_endpoint_list_is_refused() -> None:
    """
    At least one endpoint.
    """
    data = {
        "sources": [{"name": "up", "kind": "egd", "endpoints": []}],
        "sinks": [{"kind": "egd", "listen": ["tcp://127.0.0.1:0"]}],
    }
    with pytest.raises(ConfigError, match=r"sources\[0\].endpoints: List should"):
        parse_config(data)
