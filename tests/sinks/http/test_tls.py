"""
TLS on the HTTP sink: the context built from the config's files, the checks
at load, a reload that swaps the certificate for new handshakes only (and
keeps the old one when the new files are bad), the handshake deadline, and
the client certificate read from a connection.
"""

import asyncio
import contextlib
import datetime
import hashlib
import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog
from pydantic import ValidationError

from broker.accounts.identity import PeerCertificate
from broker.errors import ConfigError
from sinks.http.config import HttpSinkConfig
from sinks.http.tls import (
    ServerTls,
    TlsFiles,
    TlsSession,
    build_context,
    certificate_info,
    der_not_after,
    key_exposed,
    peer_certificate,
)
from tests.helpers import DEADLINE, eventually
from tests.sinks.http.test_connections import port_of, running
from tests.tls_ca import CertFiles, TestCA


@pytest.fixture
def ca(tmp_path: Path) -> TestCA:
    return TestCA(tmp_path)


@pytest.fixture
def server(ca: TestCA) -> CertFiles:
    return ca.server_cert()


def tls_config(server: CertFiles, **overrides: Any) -> HttpSinkConfig:
    return HttpSinkConfig.model_validate(
        {
            "kind": "http",
            "listen": ["tcp://127.0.0.1:0"],
            "tls_cert": str(server.cert),
            "tls_key": str(server.key),
            **overrides,
        }
    )


def fingerprint_of(path: Path) -> str:
    der = ssl.PEM_cert_to_DER_cert(
        path.read_text().split("-----END")[0] + "-----END CERTIFICATE-----\n"
    )
    return "sha256:" + hashlib.sha256(der).hexdigest()


async def served_certificate(
    port: int, context: ssl.SSLContext, request: bytes = b""
) -> tuple[str, bytes]:
    """
    The fingerprint of the certificate a new connection is shown, and what
    the server answers ``request`` with (read to EOF).
    """
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", port, ssl=context, server_hostname="127.0.0.1"
    )
    try:
        ssl_object = writer.get_extra_info("ssl_object")
        der = ssl_object.getpeercert(binary_form=True)
        answer = b""
        if request:
            writer.write(request)
            async with asyncio.timeout(DEADLINE):
                answer = await reader.read()
        return "sha256:" + hashlib.sha256(der).hexdigest(), answer
    finally:
        writer.close()


HEALTHZ = b"GET /healthz HTTP/1.0\r\n\r\n"


# ---- building the context -------------------------------------------------------


def test_context_requires_tls12_and_loads_the_pair(
    ca: TestCA, server: CertFiles
) -> None:
    """
    The context refuses anything older than TLS 1.2 and reports the
    certificate's fingerprint and expiry.
    """
    context, info = build_context(TlsFiles(server.cert, server.key))
    assert ssl.TLSVersion.TLSv1_2 == context.minimum_version
    assert ssl.CERT_NONE == context.verify_mode
    assert fingerprint_of(server.cert) == info.fingerprint
    assert (
        info.not_after > datetime.datetime(2100, 1, 1, tzinfo=datetime.UTC).timestamp()
    )


def test_client_auth_sets_the_verify_mode(ca: TestCA, server: CertFiles) -> None:
    """
    ``optional`` verifies an offered client certificate, ``required``
    demands one.
    """
    optional, _ = build_context(
        TlsFiles(server.cert, server.key, ca.ca_path, "optional")
    )
    required, _ = build_context(
        TlsFiles(server.cert, server.key, ca.ca_path, "required")
    )
    assert ssl.CERT_OPTIONAL == optional.verify_mode
    assert ssl.CERT_REQUIRED == required.verify_mode


def test_key_of_another_certificate_is_refused_naming_the_key(
    ca: TestCA, server: CertFiles
) -> None:
    """
    A key that does not match the certificate is a config error at
    ``tls_key`` that names both files.
    """
    other = ca.server_cert()
    with pytest.raises(ValidationError) as caught:
        tls_config(server, tls_key=str(other.key))
    error = caught.value.errors()[0]
    assert ("tls_key",) == error["loc"]
    assert str(other.key) in error["msg"]
    assert "does not match" in error["msg"]


def test_unreadable_files_are_refused_with_their_key(
    tmp_path: Path, server: CertFiles
) -> None:
    """
    A missing certificate or key, or one that is not PEM, is refused at its
    own key.
    """
    missing = tmp_path / "missing.pem"
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    cases = [
        ({"tls_cert": str(missing)}, "tls_cert", "cannot read"),
        ({"tls_key": str(missing)}, "tls_key", "cannot read"),
        ({"tls_cert": str(garbage)}, "tls_cert", "no PEM certificate"),
        ({"tls_key": str(garbage)}, "tls_key", "not a PEM private key"),
    ]
    for overrides, key, reason in cases:
        with pytest.raises(ValidationError) as caught:
            tls_config(server, **overrides)
        error = caught.value.errors()[0]
        assert ((key,), True) == (error["loc"], reason in error["msg"]), overrides


def test_tls_keys_must_come_together(ca: TestCA, server: CertFiles) -> None:
    """
    ``tls_cert`` without ``tls_key`` (and the reverse), client-certificate
    keys without a certificate, a client auth mode without a CA, and TLS
    behind PROXY headers are refused.
    """
    base = {"kind": "http", "listen": ["tcp://127.0.0.1:0"]}
    cases: list[tuple[dict[str, Any], str]] = [
        ({"tls_cert": str(server.cert)}, "tls_key"),
        ({"tls_key": str(server.key)}, "tls_cert"),
        ({"tls_client_ca": str(ca.ca_path)}, "tls_client_ca"),
        (
            {
                "tls_cert": str(server.cert),
                "tls_key": str(server.key),
                "tls_client_auth": "required",
            },
            "tls_client_ca",
        ),
        (
            {
                "tls_cert": str(server.cert),
                "tls_key": str(server.key),
                "trusted_proxies": ["10.0.0.1/32"],
            },
            "trusted_proxies",
        ),
    ]
    for overrides, key in cases:
        with pytest.raises(ValidationError) as caught:
            HttpSinkConfig.model_validate({**base, **overrides})
        assert (key,) == caught.value.errors()[0]["loc"], overrides


def test_client_auth_defaults_to_optional_with_a_ca(
    ca: TestCA, server: CertFiles
) -> None:
    """
    With ``tls_client_ca`` and no ``tls_client_auth`` a client certificate
    is optional; without a CA none is asked for; plain HTTP has no files.
    """
    with_ca = tls_config(server, tls_client_ca=str(ca.ca_path)).tls_files
    without = tls_config(server).tls_files
    assert with_ca is not None
    assert without is not None
    assert ("optional", "none") == (with_ca.client_auth, without.client_auth)
    plain = HttpSinkConfig.model_validate(
        {"kind": "http", "listen": ["tcp://127.0.0.1:0"]}
    )
    assert plain.tls_files is None


def test_key_readable_by_others_is_noticed(server: CertFiles) -> None:
    """
    A key file with group or other read bits is reported; 0600 is not.
    """
    assert not key_exposed(server.key)
    server.key.chmod(0o640)
    assert key_exposed(server.key)


def test_expiry_is_read_from_the_certificate(ca: TestCA) -> None:
    """
    ``notAfter`` comes from the certificate, in UTCTime or GeneralizedTime.
    """
    soon = datetime.datetime(2027, 3, 4, 5, 6, 7, tzinfo=datetime.UTC)
    files = ca.server_cert(not_after=soon)
    info = certificate_info(files.cert.read_bytes(), files.cert)
    assert soon.timestamp() == info.not_after
    assert info.expires_within(14, soon.timestamp() - 13 * 86400)
    assert not info.expires_within(14, soon.timestamp() - 15 * 86400)
    with pytest.raises(ValueError, match="truncated"):
        der_not_after(b"\x30\x05\x01")


# ---- reload ---------------------------------------------------------------------


@pytest.fixture
def captured() -> Iterator[list[Any]]:
    with structlog.testing.capture_logs() as logs:
        yield logs


async def test_reload_serves_the_new_certificate_to_new_handshakes_only(
    ca: TestCA, server: CertFiles, captured: list[Any]
) -> None:
    """
    After a reload a new connection is shown the new certificate, while a
    keep-alive connection made before it goes on being served.
    """
    async with running(tls_config(server)) as sink:
        port = port_of(sink)
        client = ca.client_context()
        old = fingerprint_of(server.cert)
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=client, server_hostname="127.0.0.1"
        )
        renewed = ca.server_cert()
        renewed.cert.replace(server.cert)
        renewed.key.replace(server.key)
        apply = await sink.prepare_tls_reload()
        assert apply is not None
        shown, _ = await served_certificate(port, client)
        assert old == shown, "nothing changes before the reload is applied"
        apply()
        shown, answer = await served_certificate(port, client, HEALTHZ)
        assert (fingerprint_of(server.cert), True) == (
            shown,
            answer.startswith(b"HTTP/1.0 200"),
        )
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        async with asyncio.timeout(DEADLINE):
            assert (await reader.read()).startswith(b"HTTP/1.1 200")
        assert (
            old
            == "sha256:"
            + hashlib.sha256(
                writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
            ).hexdigest()
        )
        writer.close()
    assert ["tls_reloaded"] == [
        e["event"] for e in captured if e["event"] == "tls_reloaded"
    ]


async def test_bad_files_on_reload_keep_the_old_certificate(
    ca: TestCA, server: CertFiles, captured: list[Any]
) -> None:
    """
    A key that no longer matches at reload is refused with a clear log; new
    handshakes still get the certificate in force.
    """
    async with running(tls_config(server)) as sink:
        old = fingerprint_of(server.cert)
        ca.server_cert().key.replace(server.key)
        with pytest.raises(ConfigError, match=r"tls_key: .* does not match"):
            await sink.prepare_tls_reload()
        shown, answer = await served_certificate(
            port_of(sink), ca.client_context(), HEALTHZ
        )
        assert (old, True) == (shown, answer.startswith(b"HTTP/1.0 200"))
    refused = [e for e in captured if e["event"] == "tls_reload_refused"]
    assert 1 == len(refused)
    assert old == refused[0]["kept"]


async def test_plain_sink_has_nothing_to_reload() -> None:
    """
    A sink without TLS reloads no files.
    """
    config = HttpSinkConfig.model_validate(
        {"kind": "http", "listen": ["tcp://127.0.0.1:0"]}
    )
    async with running(config) as sink:
        assert (None, False) == (await sink.prepare_tls_reload(), sink.tls)


def test_server_tls_swaps_the_context_for_new_handshakes(
    ca: TestCA, server: CertFiles
) -> None:
    """
    Until a reload is applied new handshakes get the first context; after
    it, the new one.
    """
    tls = ServerTls(TlsFiles(server.cert, server.key))
    first = tls.current
    commit = tls.prepare_reload()
    assert first is tls.current
    info = commit()
    assert info == tls.info
    assert first is not tls.current


# ---- deadlines ------------------------------------------------------------------


async def test_a_client_that_never_handshakes_is_dropped_by_header_timeout(
    ca: TestCA, server: CertFiles
) -> None:
    """
    A TCP connection that sends no ClientHello is closed once
    ``header_timeout`` passes, and another client is served meanwhile.
    """
    async with running(tls_config(server, header_timeout=0.5)) as sink:
        port = port_of(sink)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"\x16\x03\x01")  # the start of a record, then nothing
        _, answer = await served_certificate(port, ca.client_context(), HEALTHZ)
        assert answer.startswith(b"HTTP/1.0 200")
        try:
            async with asyncio.timeout(DEADLINE):
                assert b"" == await reader.read()
        except ConnectionResetError:
            pass  # an abort is a close too
        writer.close()


async def test_a_plain_http_client_gets_no_answer_from_an_https_sink(
    server: CertFiles,
) -> None:
    """
    Cleartext HTTP to a TLS listener fails the handshake and is closed.
    """
    async with running(tls_config(server)) as sink:
        reader, writer = await asyncio.open_connection("127.0.0.1", port_of(sink))
        writer.write(HEALTHZ)
        try:
            async with asyncio.timeout(DEADLINE):
                answer = await reader.read()
        except ConnectionResetError:
            answer = b""
        assert not answer.startswith(b"HTTP/1.0 200")
        writer.close()
        await eventually(lambda: 0 == sink.status().connections)


# ---- the client's certificate -----------------------------------------------------


async def peer_seen(
    tls: ServerTls, client: ssl.SSLContext
) -> tuple[PeerCertificate | None, ssl.SSLObject | None]:
    """
    What `peer_certificate` reads from the server side of one connection
    made with ``client``.
    """
    seen: asyncio.Future[tuple[PeerCertificate | None, Any]] = (
        asyncio.get_running_loop().create_future()
    )

    async def accept(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        transport = writer.transport
        seen.set_result(
            (peer_certificate(transport), transport.get_extra_info("ssl_object"))
        )
        writer.close()

    listener = await asyncio.start_server(accept, "127.0.0.1", 0, ssl=tls.current)
    port = listener.sockets[0].getsockname()[1]
    try:
        _, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=client, server_hostname="127.0.0.1"
        )
        async with asyncio.timeout(DEADLINE):
            result = await seen
        writer.close()
        return result
    finally:
        listener.close()


async def test_verified_client_certificate_is_read_from_the_connection(
    ca: TestCA, server: CertFiles
) -> None:
    """
    A client certificate verified in the handshake is reported with the
    SHA-256 of its DER form and its subject CN; a client without one is
    reported as having none.
    """
    tls = ServerTls(TlsFiles(server.cert, server.key, ca.ca_path, "optional"))
    guest = ca.client_cert("guest-7")
    with_cert, _ = await peer_seen(tls, ca.client_context(guest))
    without, ssl_object = await peer_seen(tls, ca.client_context())
    assert PeerCertificate(fingerprint_of(guest.cert), "guest-7") == with_cert
    assert "CN=guest-7" == with_cert.subject
    assert (None, True) == (without, ssl_object is not None)


def test_no_certificate_on_plain_or_closed_connections() -> None:
    """
    A request whose transport is gone, or which came over plain TCP, has no
    client certificate.
    """

    class Plain:
        def get_extra_info(self, name: str, default: Any = None) -> Any:
            return default

    assert (None, None) == (peer_certificate(None), peer_certificate(Plain()))


# ---- what the operator is told --------------------------------------------------


async def test_start_logs_the_certificate_and_warns_of_expiry_and_exposed_keys(
    ca: TestCA, captured: list[Any]
) -> None:
    """
    A sink whose certificate expires within 14 days, with a key others may
    read, logs the certificate, an expiry warning and a key warning.
    """
    soon = datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=5)
    files = ca.server_cert(not_after=soon.replace(microsecond=0))
    files.key.chmod(0o644)
    async with running(tls_config(files)) as sink:
        assert sink.tls
    events = {entry["event"]: entry for entry in captured}
    assert fingerprint_of(files.cert) == events["tls_certificate_loaded"]["fingerprint"]
    assert 4 < events["tls_certificate_expiring"]["days_left"] <= 5
    assert str(files.key) == events["tls_key_readable_by_others"]["path"]
    assert events["sink_started"]["tls"] is True


async def test_a_distant_expiry_is_not_warned_about(
    server: CertFiles, captured: list[Any]
) -> None:
    """
    A certificate valid for years starts without warnings.
    """
    async with running(tls_config(server)):
        pass
    assert [] == [entry for entry in captured if entry["log_level"] == "warning"]


async def test_reload_applies_a_new_client_ca_to_new_handshakes(
    tmp_path: Path, ca: TestCA, server: CertFiles
) -> None:
    """
    Replacing the ``tls_client_ca`` file and reloading makes new handshakes
    accept certificates of the new CA and refuse those of the old one.
    """
    other_directory = tmp_path / "other"
    other_directory.mkdir()
    other = TestCA(other_directory, "other")
    bundle = tmp_path / "clients.pem"
    bundle.write_bytes(ca.ca_path.read_bytes())
    config = tls_config(server, tls_client_ca=str(bundle), tls_client_auth="required")

    async def accepted(port: int, issuer: TestCA) -> bool:
        context = ca.client_context(issuer.client_cert("guest-7"))
        try:
            _, answer = await served_certificate(port, context, HEALTHZ)
        except (ssl.SSLError, ConnectionResetError):
            return False
        return answer.startswith(b"HTTP/1.0 200")

    async with running(config) as sink:
        port = port_of(sink)
        assert (True, False) == (await accepted(port, ca), await accepted(port, other))
        bundle.write_bytes(other.ca_path.read_bytes())
        apply = await sink.prepare_tls_reload()
        assert apply is not None
        apply()
        assert (False, True) == (await accepted(port, ca), await accepted(port, other))


def test_relative_paths_are_refused(server: CertFiles) -> None:
    """
    A relative ``tls_*`` path is refused: a shell and the service would read
    different files.
    """
    with pytest.raises(ValidationError) as caught:
        tls_config(server, tls_key="server.key")
    error = caught.value.errors()[0]
    assert (("tls_key",), True) == (error["loc"], "absolute" in error["msg"])


def test_encrypted_key_is_refused_without_a_prompt(
    tmp_path: Path, server: CertFiles
) -> None:
    """
    A passphrase-protected key is refused at ``tls_key`` rather than
    prompting on the terminal.
    """
    from cryptography.hazmat.primitives import serialization

    key = serialization.load_pem_private_key(server.key.read_bytes(), None)
    encrypted = tmp_path / "encrypted.key"
    encrypted.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"passphrase"),
        )
    )
    with pytest.raises(ValidationError) as caught:
        tls_config(server, tls_key=str(encrypted))
    error = caught.value.errors()[0]
    assert (("tls_key",), True) == (error["loc"], "is encrypted" in error["msg"])


# ---- the session over memory buffers ---------------------------------------------


def handshake_pair(
    ca: TestCA, server: CertFiles, client: CertFiles | None = None
) -> tuple[TlsSession, ssl.SSLObject, ssl.MemoryBIO, ssl.MemoryBIO]:
    """
    A `TlsSession` and a client `ssl.SSLObject` (with its incoming and
    outgoing buffers) that have not yet exchanged a byte.
    """
    files = TlsFiles(server.cert, server.key, ca.ca_path, "optional")
    session = TlsSession(build_context(files)[0])
    into_client, from_client = ssl.MemoryBIO(), ssl.MemoryBIO()
    peer = ca.client_context(client).wrap_bio(
        into_client, from_client, server_hostname="127.0.0.1"
    )
    return session, peer, into_client, from_client


def run_handshake(
    session: TlsSession,
    peer: ssl.SSLObject,
    into_client: ssl.MemoryBIO,
    from_client: ssl.MemoryBIO,
) -> None:
    for _ in range(10):
        try:
            peer.do_handshake()
        except ssl.SSLWantReadError:
            pass
        else:
            if session.established:
                return
        assert b"" == session.receive(from_client.read())
        into_client.write(session.outgoing())
    raise AssertionError("handshake did not finish")


def test_session_handshakes_and_relays_both_ways(ca: TestCA, server: CertFiles) -> None:
    """
    In memory: the handshake ends, the client's certificate is there,
    application bytes go both ways, and a close_notify ends the stream.
    """
    session, peer, into_client, from_client = handshake_pair(
        ca, server, ca.client_cert("guest-7")
    )
    assert not session.established
    run_handshake(session, peer, into_client, from_client)
    assert "guest-7" == (peer_certificate_of(session) or "")
    peer.write(b"GET / HTTP/1.1\r\n\r\n")
    assert b"GET / HTTP/1.1\r\n\r\n" == session.receive(from_client.read())
    into_client.write(session.send(b"HTTP/1.1 200 OK\r\n\r\n"))
    assert b"HTTP/1.1 200 OK\r\n\r\n" == peer.read(100)
    # Our close_notify is out; the server's comes later.
    with contextlib.suppress(ssl.SSLWantReadError):
        peer.unwrap()
    assert b"" == session.receive(from_client.read())
    assert session.peer_closed
    assert session.close()


def peer_certificate_of(session: TlsSession) -> str | None:
    seen = peer_certificate(_Extra(session.ssl_object))
    return None if seen is None else seen.common_name


class _Extra:
    def __init__(self, ssl_object: ssl.SSLObject) -> None:
        self.ssl_object = ssl_object

    def get_extra_info(self, name: str) -> Any:
        return self.ssl_object if name == "ssl_object" else None


def test_session_refuses_garbage_with_an_alert(ca: TestCA, server: CertFiles) -> None:
    """
    Cleartext instead of a ClientHello fails the handshake.
    """
    session, *_ = handshake_pair(ca, server)
    with pytest.raises(ssl.SSLError):
        session.receive(HEALTHZ)
    assert not session.established


# ---- counted from accept ----------------------------------------------------------


async def test_silent_tls_connections_count_against_the_caps_from_accept(
    ca: TestCA, server: CertFiles
) -> None:
    """
    TCP connections that never send a ClientHello hold the client's share;
    one more is refused at once, another client is served meanwhile.
    """
    config = tls_config(server, max_connections_per_client=2, header_timeout=30)
    async with running(config) as sink:
        port = port_of(sink)
        held = [
            await asyncio.open_connection(
                "127.0.0.1", port, local_addr=("127.0.1.1", 0)
            )
            for _ in range(3)
        ]
        await eventually(
            lambda: 1 == sink.status().refused.get("max_connections_per_client", 0)
        )
        async with asyncio.timeout(DEADLINE):
            assert b"" == await held[2][0].read()
        assert 2 == sink.status().connections
        _, answer = await served_certificate(port, ca.client_context(), HEALTHZ)
        assert answer.startswith(b"HTTP/1.0 200")
        assert not held[0][0].at_eof()
        for _, writer in held:
            writer.close()
        await eventually(lambda: 0 == sink.status().connections)


async def test_a_failed_handshake_is_counted(server: CertFiles) -> None:
    """
    Cleartext to the HTTPS port is counted as ``tls_handshake``.
    """
    async with running(tls_config(server)) as sink:
        _, writer = await asyncio.open_connection("127.0.0.1", port_of(sink))
        writer.write(HEALTHZ)
        await eventually(lambda: 1 == sink.status().refused.get("tls_handshake", 0))
        writer.close()
