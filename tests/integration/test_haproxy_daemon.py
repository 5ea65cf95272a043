"""
The real daemon behind a real haproxy that sends PROXY headers: each VM is
known by its own address, not haproxy's, and only haproxy may say who a
client is. Several 127.0.0.x source addresses stand for different VMs; haproxy
and the broker's trusted proxy are 127.0.0.1.

As config/multi-key-ha.toml does, the broker has direct sinks that trust no
proxy and proxy-facing sinks (``egd-lb``, ``http-lb``) that trust 127.0.0.1
and so require a PROXY header from it; haproxy reaches only the latter, its
health checks carrying a v2 LOCAL (or v1) header (``check-send-proxy``).
"""

import asyncio
import contextlib
import socket
import subprocess
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.helpers import DEADLINE, free_port
from tests.integration.clients import poll_until, running_daemon
from tests.integration.daemon import Daemon

pytestmark = pytest.mark.needs_tool("haproxy")

HAPROXY = "127.0.0.1"
"""haproxy's address as the broker sees it, and where everything listens."""
ALPHA = "127.0.0.2"
BETA = "127.0.0.3"
STRANGER = "127.0.0.4"
DENIED = "127.0.0.5"

EGD_READ = b"\x02\x10"


@dataclass(frozen=True)
class Ports:
    """
    Fixed loopback ports: haproxy's config must name the broker's.
    """

    egd: int
    http: int
    egd_lb: int
    http_lb: int
    operator: int
    front_egd_v2: int
    front_egd_v1: int
    front_http: int


def broker_config(state_dir: Path, ports: Ports) -> str:
    return textwrap.dedent(
        f"""
        [broker]
        state_dir = "{state_dir}"
        pool_size = "64 KiB"
        low_watermark = "1 KiB"
        drain = "0 s"
        shutdown_grace = "2 s"

        [logging]
        level = "info"
        format = "json"

        [[sources]]
        name = "getrandom"
        kind = "getrandom"

        [[sinks]]
        name = "egd"
        kind = "egd"
        listen = ["tcp://127.0.0.1:{ports.egd}"]

        [[sinks]]
        name = "http"
        kind = "http"
        listen = ["tcp://127.0.0.1:{ports.http}"]

        [[sinks]]
        name = "egd-lb"
        kind = "egd"
        listen = ["tcp://127.0.0.1:{ports.egd_lb}"]
        trusted_proxies = ["{HAPROXY}/32"]

        [[sinks]]
        name = "http-lb"
        kind = "http"
        listen = ["tcp://127.0.0.1:{ports.http_lb}"]
        trusted_proxies = ["{HAPROXY}/32"]

        [[sinks]]
        name = "operator"
        kind = "http"
        plane = "operator"
        listen = ["tcp://127.0.0.1:{ports.operator}"]

        [[customers]]
        id = "alpha"
        networks = ["{ALPHA}/32"]
        client_rate = "64 KiB/s"

        [[customers]]
        id = "beta"
        networks = ["{BETA}/32"]
        client_rate = "32 KiB/s"

        [[customers]]
        id = "denied"
        networks = ["{DENIED}/32"]
        deny = true
        """
    )


def haproxy_config(ports: Ports) -> str:
    # As config/haproxy.cfg, for one broker: v2 headers to both proxy-facing
    # sinks, health checks with a header (check-send-proxy) on the proxy-facing
    # HTTP port; plus a frontend whose backend sends v1.
    egd = f"127.0.0.1:{ports.egd_lb}"
    http = f"127.0.0.1:{ports.http_lb}"
    check = ports.http_lb
    return textwrap.dedent(
        f"""
        global
            log stdout format raw local0

        defaults
            mode tcp
            timeout connect 5s
            timeout client 60s
            timeout server 60s
            timeout check 5s

        frontend egd_v2
            bind 127.0.0.1:{ports.front_egd_v2}
            default_backend broker_egd_v2

        frontend egd_v1
            bind 127.0.0.1:{ports.front_egd_v1}
            default_backend broker_egd_v1

        backend broker_egd_v2
            option httpchk GET /healthz
            default-server inter 200ms fall 2 rise 1
            server broker1 {egd} send-proxy-v2 check check-send-proxy port {check}

        backend broker_egd_v1
            option httpchk GET /healthz
            default-server inter 200ms fall 2 rise 1
            server broker1 {egd} send-proxy check check-send-proxy port {check}

        frontend http
            bind 127.0.0.1:{ports.front_http}
            mode http
            default_backend broker_http

        backend broker_http
            mode http
            option httpchk GET /healthz
            default-server inter 200ms fall 2 rise 1
            server broker1 {http} send-proxy-v2 check check-send-proxy
        """
    )


@contextlib.contextmanager
def running_haproxy(tmp_path: Path, ports: Ports) -> Iterator[None]:
    """
    haproxy in the foreground on ``ports``; stopped on the way out.
    """
    config = tmp_path / "haproxy.cfg"
    config.write_text(haproxy_config(ports))
    # A config haproxy rejects fails here with its reason, not as a timeout.
    checked = subprocess.run(
        ["haproxy", "-c", "-f", str(config)],
        capture_output=True,
        text=True,
        timeout=DEADLINE,
        check=False,
    )
    assert 0 == checked.returncode, checked.stdout + checked.stderr
    with (tmp_path / "haproxy.log").open("wb") as log:
        process = subprocess.Popen(
            ["haproxy", "-db", "-f", str(config)], stdout=log, stderr=log
        )
    try:
        yield
    finally:
        process.terminate()
        try:
            process.wait(DEADLINE)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[tuple[Daemon, Ports]]:
    """
    The broker with direct sinks and proxy-facing sinks trusting 127.0.0.1,
    and haproxy in front of the latter.
    """
    ports = Ports(*(free_port() for _ in range(8)))
    config = broker_config(tmp_path / "state", ports)
    with running_daemon(tmp_path, config) as daemon, running_haproxy(tmp_path, ports):
        yield daemon, ports


async def exchange(source_ip: str, port: int, request: bytes = EGD_READ) -> bytes:
    """
    Connect from ``source_ip``, send ``request`` (an EGD read by default), and
    return the first 16 bytes of the answer, or what came before the server
    closed; b"" for a closed or refused connection.
    """
    sock = socket.socket()
    sock.bind((source_ip, 0))
    sock.setblocking(False)
    try:
        await asyncio.get_running_loop().sock_connect(sock, (HAPROXY, port))
    except OSError:
        sock.close()
        return b""
    reader, writer = await asyncio.open_connection(sock=sock)
    try:
        writer.write(request)
        async with asyncio.timeout(DEADLINE):
            try:
                return await reader.readexactly(16)
            except asyncio.IncompleteReadError as short:
                return short.partial
    except ConnectionError:
        return b""
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


async def http_get(source_ip: str, port: int, path: str) -> int | None:
    """
    The status of ``GET path`` from ``source_ip``; None when the connection
    failed.
    """
    connector = aiohttp.TCPConnector(local_addr=(source_ip, 0), force_close=True)
    try:
        async with (
            aiohttp.ClientSession(
                connector=connector, timeout=aiohttp.ClientTimeout(total=DEADLINE)
            ) as session,
            session.get(f"http://{HAPROXY}:{port}{path}") as response,
        ):
            await response.read()
            return response.status
    except aiohttp.ClientConnectionError:
        return None


async def status(ports: Ports) -> dict[str, Any]:
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=DEADLINE)) as session,
        session.get(f"http://{HAPROXY}:{ports.operator}/v1/status") as response,
    ):
        response.raise_for_status()
        document: dict[str, Any] = await response.json()
        return document


def clients_of(document: dict[str, Any]) -> dict[str, set[str]]:
    return {
        customer: set(view["clients"])
        for customer, view in document["accounts"]["customers"].items()
    }


@pytest.fixture
async def served_through_haproxy(
    broker: tuple[Daemon, Ports],
) -> Ports:
    """
    The stack once haproxy serves both sinks: alpha has drawn over EGD (v2)
    and beta over HTTP, each through haproxy.
    """
    _, ports = broker
    await poll_until(
        lambda: exchange(ALPHA, ports.front_egd_v2), lambda data: len(data) == 16
    )
    await poll_until(
        lambda: http_get(BETA, ports.front_http, "/v1/entropy?bytes=16"),
        lambda code: code == 200,
    )
    return ports


async def test_each_vm_is_known_by_its_own_address(
    served_through_haproxy: Ports,
) -> None:
    """
    Behind haproxy, the broker's status lists each VM under its own address
    and customer, and haproxy's own address as no client at all.
    """
    ports = served_through_haproxy
    document = await poll_until(
        lambda: status(ports),
        lambda doc: (
            clients_of(doc)["alpha"] == {f"ip:{ALPHA}"}
            and clients_of(doc)["beta"] == {f"ip:{BETA}"}
        ),
    )
    clients = clients_of(document)
    assert not any(f"ip:{HAPROXY}" in keys for keys in clients.values()), clients
    customers = document["accounts"]["customers"]
    assert customers["alpha"]["bytes_served"] >= 16
    assert customers["beta"]["bytes_served"] >= 16


async def test_denied_vm_is_refused_behind_haproxy(
    served_through_haproxy: Ports,
) -> None:
    """
    A VM of a denied customer is refused through haproxy (over EGD with v1 or
    v2 headers, and over HTTP) while an allowed VM on the same path is served:
    the broker judged the VM, not haproxy.
    """
    ports = served_through_haproxy
    await poll_until(
        lambda: exchange(ALPHA, ports.front_egd_v1), lambda data: len(data) == 16
    )
    assert b"" == await exchange(DENIED, ports.front_egd_v2)
    assert b"" == await exchange(DENIED, ports.front_egd_v1)
    assert 403 == await http_get(DENIED, ports.front_http, "/v1/entropy?bytes=16")
    assert 16 == len(await exchange(ALPHA, ports.front_egd_v2))
    assert 200 == await http_get(BETA, ports.front_http, "/v1/entropy?bytes=16")
    document = await status(ports)
    assert document["accounts"]["customers"]["denied"]["denied"] >= 3


def sink_named(document: dict[str, Any], name: str) -> dict[str, Any]:
    sinks: list[dict[str, Any]] = document["sinks"]
    (sink,) = (sink for sink in sinks if sink["name"] == name)
    return sink


def turned_away(sink: dict[str, Any], reason: str) -> int:
    # A sink that serves an untrusted peer at once counts its later closing
    # as ``closed``; one that had not served it yet as ``refused``.
    closed: dict[str, int] = sink.get("closed", {})
    return int(sink["refused"].get(reason, 0)) + closed.get(reason, 0)


HEADER_FOR_ALPHA_V2 = (
    b"\r\n\r\n\x00\r\nQUIT\n!\x11\x00\x0c"
    + socket.inet_aton(ALPHA)
    + socket.inet_aton(HAPROXY)
    + b"\x30\x39\x22\xb8"
)
HEADER_FOR_ALPHA_V1 = f"PROXY TCP4 {ALPHA} {HAPROXY} 12345 8888\r\n".encode()


@pytest.mark.parametrize("source", [STRANGER, HAPROXY], ids=["stranger", "local"])
@pytest.mark.parametrize(
    "header", [HEADER_FOR_ALPHA_V1, HEADER_FOR_ALPHA_V2], ids=["v1", "v2"]
)
async def test_header_on_a_direct_sink_is_refused(
    broker: tuple[Daemon, Ports], header: bytes, source: str
) -> None:
    """
    A client that sends a PROXY header to a direct sink, claiming another
    VM's address, gets its connection closed with no data on either sink,
    counted as ``proxy_untrusted``, even from the address the proxy-facing
    sinks trust (any local process); without a header the same client is
    served as itself.
    """
    _, ports = broker
    assert b"" == await exchange(source, ports.egd, header + EGD_READ)
    assert 16 == len(await exchange(source, ports.egd))
    request = b"GET /v1/entropy?bytes=16 HTTP/1.0\r\n\r\n"
    assert b"" == await exchange(source, ports.http, header + request)
    assert 200 == await http_get(source, ports.http, "/v1/entropy?bytes=16")
    document = await status(ports)
    assert f"ip:{source}" in clients_of(document)["default"]
    assert f"ip:{ALPHA}" not in clients_of(document)["alpha"]
    # The EGD sink serves an untrusted peer at once, so it counts this
    # closing among served connections closed, not in ``refused``.
    sink = sink_named(document, "http")
    assert 1 == turned_away(sink, "proxy_untrusted"), sink


async def test_trusted_address_without_header_is_refused(
    served_through_haproxy: Ports,
) -> None:
    """
    On the proxy-facing sinks a connection from the trusted address that
    starts without a PROXY header is closed with no data and counted as
    ``proxy_missing``, while haproxy's own health checks (which carry a
    header) are not refused; from the same address the direct sinks serve.
    """
    ports = served_through_haproxy
    request = b"GET /v1/entropy?bytes=16 HTTP/1.0\r\n\r\n"
    assert b"" == await exchange(HAPROXY, ports.egd_lb)
    assert b"" == await exchange(HAPROXY, ports.http_lb, request)
    assert 16 == len(await exchange(HAPROXY, ports.egd))
    assert 200 == await http_get(HAPROXY, ports.http, "/v1/entropy?bytes=16")
    document = await status(ports)
    egd_lb = sink_named(document, "egd-lb")["refused"]
    http_lb = sink_named(document, "http-lb")["refused"]
    assert {"proxy_missing": 1} == egd_lb, egd_lb
    assert {"proxy_missing": 1} == http_lb, http_lb
    assert {} == sink_named(document, "egd")["refused"]
    assert {} == sink_named(document, "http")["refused"]
    # haproxy still relays: its checks passed and its clients are named.
    assert 16 == len(await exchange(ALPHA, ports.front_egd_v2))


async def test_direct_client_is_served_without_a_word_first(
    broker: tuple[Daemon, Ports],
) -> None:
    """
    A direct EGD client from the trusted address is identified as soon as it
    connects, before sending a byte (no PROXY header is awaited, so no header
    deadline runs), and is served on that connection when it asks; the same
    silent connection to the proxy-facing sink stays unidentified, waiting
    for a header.
    """
    _, ports = broker
    before = await status(ports)
    direct_before = sink_named(before, "egd")["connections_total"]
    lb_before = sink_named(before, "egd-lb")["connections_total"]
    sockets: list[socket.socket] = []
    streams: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    try:
        for port in (ports.egd, ports.egd_lb):
            sock = socket.socket()
            sockets.append(sock)
            sock.bind((HAPROXY, 0))
            sock.setblocking(False)
            await asyncio.get_running_loop().sock_connect(sock, (HAPROXY, port))
            streams.append(await asyncio.open_connection(sock=sock))
        document = await poll_until(
            lambda: status(ports),
            lambda doc: (
                sink_named(doc, "egd")["connections_total"] == direct_before + 1
                and sink_named(doc, "egd-lb")["connections"] >= 1
            ),
        )
        assert lb_before == sink_named(document, "egd-lb")["connections_total"]
        assert f"ip:{HAPROXY}" in clients_of(document)["default"]
        (reader, writer), _ = streams
        writer.write(EGD_READ)
        async with asyncio.timeout(DEADLINE):
            assert 16 == len(await reader.readexactly(16))
        document = await status(ports)
        assert {} == sink_named(document, "egd")["refused"]
        assert 1 == sink_named(document, "egd")["connections"]
    finally:
        for _, writer in streams:
            writer.close()
        for sock in sockets:
            sock.close()
