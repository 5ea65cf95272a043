"""
HTTPS on the real daemon: clients that trust the test CA are served, others
fail verification; SIGHUP swaps the certificate for new connections while an
established one keeps going; a bad certificate is refused on SIGHUP; a client
that never finishes its handshake is dropped at ``header_timeout``; client
certificates name customers and carry their limits.
"""

import asyncio
import hashlib
import signal
import ssl
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.helpers import DEADLINE, wait_until
from tests.integration.clients import running_daemon
from tests.integration.daemon import Daemon, default_config
from tests.tls_ca import CertFiles, TestCA

HEALTHZ = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"


@pytest.fixture
def ca(tmp_path: Path) -> TestCA:
    directory = tmp_path / "pki"
    directory.mkdir()
    return TestCA(directory)


@pytest.fixture
def server(ca: TestCA) -> CertFiles:
    return ca.server_cert()


def https_config(
    tmp_path: Path,
    server: CertFiles,
    sink_keys: str = "",
    customers: str = "",
) -> str:
    """
    The default test config plus a tenant HTTPS sink ``https``.
    """
    sink = f"""
        [[sinks]]
        name = "https"
        kind = "http"
        listen = ["tcp://127.0.0.1:0"]
        tls_cert = "{server.cert}"
        tls_key = "{server.key}"
        """
    return default_config(tmp_path / "state", extra=sink + sink_keys + "\n" + customers)


@pytest.fixture
def run(tmp_path: Path) -> Iterator[Any]:
    """
    Start a daemon with a config; it is killed at teardown.
    """
    daemons: list[Any] = []

    def start(config: str) -> Daemon:
        manager = running_daemon(tmp_path, config)
        daemon = manager.__enter__()
        daemons.append(manager)
        return daemon

    yield start
    for manager in daemons:
        manager.__exit__(None, None, None)


def https_port(daemon: Daemon) -> int:
    return int(daemon.address("https", "tcp://").rsplit(":", 1)[1])


def https_url(daemon: Daemon) -> str:
    return f"https://127.0.0.1:{https_port(daemon)}"


def fingerprint(writer: asyncio.StreamWriter) -> str:
    der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
    return hashlib.sha256(der).hexdigest()


def file_fingerprint(path: Path) -> str:
    pem = path.read_text()
    first = pem[: pem.index("-----END CERTIFICATE-----") + 25]
    return hashlib.sha256(ssl.PEM_cert_to_DER_cert(first)).hexdigest()


@asynccontextmanager
async def tls_stream(
    daemon: Daemon, context: ssl.SSLContext
) -> AsyncIterator[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    async with asyncio.timeout(DEADLINE):
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", https_port(daemon), ssl=context, server_hostname="127.0.0.1"
        )
    try:
        yield reader, writer
    finally:
        writer.close()
        try:
            async with asyncio.timeout(DEADLINE):
                await writer.wait_closed()
        except (OSError, ssl.SSLError, TimeoutError):
            # A connection the server refused mid-handshake cannot shut TLS
            # down cleanly; drop the socket rather than leave it to the GC.
            writer.transport.abort()


async def ask(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> int:
    """
    One keep-alive ``GET /healthz`` on an open connection: its status.
    """
    writer.write(HEALTHZ)
    async with asyncio.timeout(DEADLINE):
        head = await reader.readuntil(b"\r\n\r\n")
        length = next(
            int(line.split(b":", 1)[1])
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length:")
        )
        await reader.readexactly(length)
    return int(head.split(b" ", 2)[1])


def count(daemon: Daemon, event: str) -> int:
    return sum(1 for entry in daemon.logs() if entry.get("event") == event)


async def hup_and_wait(daemon: Daemon, event: str) -> None:
    before = count(daemon, event)
    daemon.process.send_signal(signal.SIGHUP)
    await asyncio.to_thread(wait_until, lambda: count(daemon, event) > before)


# ---- serving and verification ---------------------------------------------------


async def test_https_is_served_to_clients_that_trust_the_ca(
    run: Any, tmp_path: Path, ca: TestCA, server: CertFiles
) -> None:
    """
    A client trusting the test CA draws entropy over HTTPS; one that trusts
    only the system CAs fails verification; plain HTTP still works on the
    other sink.
    """
    daemon = run(https_config(tmp_path, server))
    timeout = aiohttp.ClientTimeout(total=DEADLINE)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        async with session.get(
            https_url(daemon) + "/v1/entropy",
            params={"bytes": "32", "format": "raw"},
            ssl=ca.client_context(),
        ) as response:
            assert (200, 32) == (response.status, len(await response.read()))
        with pytest.raises(aiohttp.ClientConnectorCertificateError):
            await session.get(https_url(daemon) + "/healthz")
        async with session.get(daemon.http_url + "/healthz") as response:
            assert 200 == response.status
    started = [e for e in daemon.logs() if e.get("event") == "tls_certificate_loaded"]
    assert 1 == len(started)
    assert "sha256:" + file_fingerprint(server.cert) == started[0]["fingerprint"]


async def test_sighup_serves_a_new_certificate_to_new_connections(
    run: Any, tmp_path: Path, ca: TestCA, server: CertFiles
) -> None:
    """
    After the files are replaced and SIGHUP sent, a new connection is shown
    the new certificate while a keep-alive connection opened before goes on
    being served under the old one.
    """
    daemon = run(https_config(tmp_path, server))
    context = ca.client_context()
    old = file_fingerprint(server.cert)
    async with tls_stream(daemon, context) as (reader, writer):
        assert 200 == await ask(reader, writer)
        renewed = ca.server_cert()
        renewed.cert.replace(server.cert)
        renewed.key.replace(server.key)
        await hup_and_wait(daemon, "tls_reloaded")
        async with tls_stream(daemon, context) as (new_reader, new_writer):
            assert file_fingerprint(server.cert) == fingerprint(new_writer)
            assert 200 == await ask(new_reader, new_writer)
        assert old == fingerprint(writer)
        assert 200 == await ask(reader, writer)
    assert old != file_fingerprint(server.cert)


async def test_bad_certificate_on_sighup_is_refused_and_serving_goes_on(
    run: Any, tmp_path: Path, ca: TestCA, server: CertFiles
) -> None:
    """
    A key that does not match the certificate refuses the reload with a log
    naming the key file; new connections still get the old certificate.
    """
    daemon = run(https_config(tmp_path, server))
    old = file_fingerprint(server.cert)
    ca.server_cert().key.replace(server.key)
    await hup_and_wait(daemon, "reload_refused")
    refused = [e for e in daemon.logs() if e.get("event") == "reload_refused"]
    assert str(server.key) in str(refused[-1]["reason"])
    assert "tls_key" in str(refused[-1]["reason"])
    async with tls_stream(daemon, ca.client_context()) as (reader, writer):
        assert (old, 200) == (fingerprint(writer), await ask(reader, writer))


# ---- the handshake deadline -----------------------------------------------------


async def test_a_client_that_never_handshakes_is_dropped_while_others_are_served(
    run: Any, tmp_path: Path, ca: TestCA, server: CertFiles
) -> None:
    """
    A TCP connection that never completes a TLS handshake is closed after
    ``header_timeout``, and a client connecting meanwhile is served.
    """
    daemon = run(https_config(tmp_path, server, 'header_timeout = "1 s"'))
    loop = asyncio.get_running_loop()
    stalled_reader, stalled_writer = await asyncio.open_connection(
        "127.0.0.1", https_port(daemon)
    )
    opened = loop.time()
    stalled_writer.write(b"\x16\x03\x01\x02\x00")  # a record header, no body
    async with tls_stream(daemon, ca.client_context()) as (reader, writer):
        assert 200 == await ask(reader, writer)
    try:
        async with asyncio.timeout(DEADLINE):
            assert b"" == await stalled_reader.read()
    except ConnectionResetError:
        pass  # aborted rather than closed: dropped all the same
    assert loop.time() - opened >= 0.9
    stalled_writer.close()


# ---- client certificates ----------------------------------------------------------


async def get_entropy(daemon: Daemon, context: ssl.SSLContext, size: int) -> int:
    """
    One ``GET /v1/entropy`` on a new HTTPS connection made with ``context``.
    """
    async with tls_stream(daemon, context) as (reader, writer):
        writer.write(
            f"GET /v1/entropy?bytes={size}&format=raw HTTP/1.1\r\n"
            "Host: 127.0.0.1\r\nConnection: close\r\n\r\n".encode()
        )
        async with asyncio.timeout(DEADLINE):
            answer = await reader.read()
    return int(answer.split(b" ", 2)[1])


async def test_client_certificate_carries_its_customers_limits(
    run: Any, tmp_path: Path, ca: TestCA, server: CertFiles
) -> None:
    """
    A client whose certificate CN a rate-limited customer lists is held to
    that customer's burst (429 past it), while a client from the same address
    with an unlisted certificate, and one with none, go on being served.
    """
    customers = """
        [[customers]]
        id = "metered"
        certs = ["CN=guest-7"]
        client_rate = "1 B/s"
        client_burst = "64 B"
        """
    daemon = run(
        https_config(tmp_path, server, f'tls_client_ca = "{ca.ca_path}"', customers)
    )
    metered = ca.client_context(ca.client_cert("guest-7"))
    stranger = ca.client_context(ca.client_cert("guest-8"))
    anonymous = ca.client_context()
    assert 200 == await get_entropy(daemon, metered, 64)
    assert 429 == await get_entropy(daemon, metered, 64)
    for context in (stranger, anonymous, stranger, anonymous):
        assert 200 == await get_entropy(daemon, context, 64)
    assert 429 == await get_entropy(daemon, metered, 64)


async def refused_at_handshake(daemon: Daemon, context: ssl.SSLContext) -> bool:
    """
    Whether a connection made with ``context`` gets no HTTP answer: the
    handshake fails (with TLS 1.3 the client learns it at its first read).
    """
    try:
        async with tls_stream(daemon, context) as (reader, writer):
            writer.write(HEALTHZ)
            async with asyncio.timeout(DEADLINE):
                answer = await reader.read()
    except (ssl.SSLError, ConnectionResetError, BrokenPipeError):
        return True
    return not answer.startswith(b"HTTP/")


async def test_required_client_certificate_refuses_strangers_at_handshake(
    run: Any, tmp_path: Path, ca: TestCA, server: CertFiles
) -> None:
    """
    Under ``tls_client_auth = "required"`` a certificate from another CA and
    no certificate at all are refused in the handshake; a certificate from
    the configured CA is served.
    """
    keys = f'tls_client_ca = "{ca.ca_path}"\ntls_client_auth = "required"'
    daemon = run(https_config(tmp_path, server, keys))
    other_directory = tmp_path / "other-pki"
    other_directory.mkdir()
    other = TestCA(other_directory, "other")
    forged = ca.client_context()
    forged.load_cert_chain(*_files(other.client_cert("guest-7")))
    assert await refused_at_handshake(daemon, forged)
    assert await refused_at_handshake(daemon, ca.client_context())
    guest = ca.client_context(ca.client_cert("guest-7"))
    async with tls_stream(daemon, guest) as (reader, writer):
        assert 200 == await ask(reader, writer)


def _files(files: CertFiles) -> tuple[Path, Path]:
    return files.cert, files.key
