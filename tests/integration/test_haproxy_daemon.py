"""
The real daemon behind a real haproxy that sends PROXY headers: each VM is
known by its own address, not haproxy's, and only haproxy may say who a
client is. Several 127.0.0.x source addresses stand for different VMs; haproxy
and the broker's trusted proxy are 127.0.0.1.
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

from tests.helpers import DEADLINE
from tests.integration.clients import poll_until, running_daemon
from tests.integration.daemon import Daemon
from tests.redis_server import free_port

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
        trusted_proxies = ["{HAPROXY}/32"]

        [[sinks]]
        name = "http"
        kind = "http"
        listen = ["tcp://127.0.0.1:{ports.http}"]
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
    # As config/haproxy.cfg, for one broker: v2 headers to both sinks, plain
    # health checks on the HTTP port; plus a frontend whose backend sends v1.
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
            server broker1 127.0.0.1:{ports.egd} send-proxy-v2 check port {ports.http}

        backend broker_egd_v1
            option httpchk GET /healthz
            default-server inter 200ms fall 2 rise 1
            server broker1 127.0.0.1:{ports.egd} send-proxy check port {ports.http}

        frontend http
            bind 127.0.0.1:{ports.front_http}
            mode http
            default_backend broker_http

        backend broker_http
            mode http
            option httpchk GET /healthz
            default-server inter 200ms fall 2 rise 1
            server broker1 127.0.0.1:{ports.http} send-proxy-v2 check
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
    The broker with both sinks trusting 127.0.0.1, and haproxy in front of it.
    """
    ports = Ports(*(free_port() for _ in range(6)))
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


HEADER_FOR_ALPHA_V2 = (
    b"\r\n\r\n\x00\r\nQUIT\n!\x11\x00\x0c"
    + socket.inet_aton(ALPHA)
    + socket.inet_aton(HAPROXY)
    + b"\x30\x39\x22\xb8"
)
HEADER_FOR_ALPHA_V1 = f"PROXY TCP4 {ALPHA} {HAPROXY} 12345 8888\r\n".encode()


@pytest.mark.parametrize(
    "header", [HEADER_FOR_ALPHA_V1, HEADER_FOR_ALPHA_V2], ids=["v1", "v2"]
)
async def test_header_from_an_untrusted_address_is_refused(
    broker: tuple[Daemon, Ports], header: bytes
) -> None:
    """
    A client that is not a trusted proxy and sends a PROXY header straight to
    the broker, claiming another VM's address, gets its connection closed
    with no data on either sink, counted as ``proxy_untrusted``; without a
    header the same client is served.
    """
    _, ports = broker
    assert b"" == await exchange(STRANGER, ports.egd, header + EGD_READ)
    assert 16 == len(await exchange(STRANGER, ports.egd))
    request = b"GET /v1/entropy?bytes=16 HTTP/1.0\r\n\r\n"
    assert b"" == await exchange(STRANGER, ports.http, header + request)
    assert 200 == await http_get(STRANGER, ports.http, "/v1/entropy?bytes=16")
    document = await status(ports)
    assert f"ip:{STRANGER}" in clients_of(document)["default"]
    assert f"ip:{ALPHA}" not in clients_of(document)["alpha"]
    refused = {sink["name"]: sink["refused"] for sink in document["sinks"]}
    assert 1 == refused["egd"].get("proxy_untrusted"), refused
    assert 1 == refused["http"].get("proxy_untrusted"), refused
