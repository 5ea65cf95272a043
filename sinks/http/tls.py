"""
TLS for the HTTP sink: building the server's `ssl.SSLContext` from the
configured files, swapping it on reload, running one connection's TLS over
memory buffers, and reading a client's certificate.

The listeners accept plain TCP, so that the connection guard
(`sinks.http.connections`) counts a connection against its caps from the
moment it is accepted, before any handshake. Each admitted connection then
gets a `TlsSession` on the context in force (`ServerTls.current`): a reload
builds a complete new context and puts it in force for new handshakes only.
Connections already established keep the certificate they were handshaken
with; a new certificate, key or client CA that does not load is refused and
the context in force stays.

A `TlsSession` is sans-I/O: bytes from the socket go in, decrypted bytes and
bytes for the socket come out, so the guard keeps every deadline (the
handshake is bounded by ``header_timeout``) and the socket's flow control.

Client certificates are verified against ``tls_client_ca`` by OpenSSL during
the handshake; only a verified certificate ever reaches `peer_certificate`, so
its fingerprint and subject CN can be trusted to name a customer.
"""

import contextlib
import hashlib
import ssl
import stat
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from broker.accounts.identity import PeerCertificate
from broker.errors import ConfigError

ClientAuth = Literal["none", "optional", "required"]

EXPIRY_WARNING_DAYS = 14
"""A server certificate expiring within this many days is warned about."""

# Modern AEAD suites only for TLS 1.2 (TLS 1.3 suites are OpenSSL's defaults).
_TLS12_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20:!aNULL:!MD5:!DSS"


@dataclass(frozen=True, slots=True)
class TlsFiles:
    """
    What a TLS context is built from: the sink's ``tls_*`` keys.
    """

    cert: Path
    key: Path
    client_ca: Path | None = None
    client_auth: ClientAuth = "none"


@dataclass(frozen=True, slots=True)
class CertificateInfo:
    """
    Facts about the server certificate in force, for logs and status.
    """

    fingerprint: str
    """``sha256:<hex>`` of the DER certificate."""
    not_after: float
    """Expiry, as a Unix timestamp."""

    def expires_within(self, days: float, now: float) -> bool:
        return self.not_after - now < days * 86400.0

    @property
    def not_after_iso(self) -> str:
        moment = datetime.fromtimestamp(self.not_after, UTC)
        return moment.isoformat().replace("+00:00", "Z")


def key_exposed(path: Path) -> bool:
    """
    Whether the key file may be read by its group or by others.
    """
    try:
        mode = path.stat().st_mode
    except OSError:
        return False
    return bool(mode & (stat.S_IRGRP | stat.S_IROTH))


def _readable(path: Path, key: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{key}: cannot read {path}: {exc.strerror or exc}") from None


def build_context(files: TlsFiles) -> tuple[ssl.SSLContext, CertificateInfo]:
    """
    A server context from ``files``: TLS 1.2 at least, no compression or
    renegotiation, client certificates as ``client_auth`` says.

    Returns:
        The context and facts about its certificate.

    Raises:
        ConfigError: a file is unreadable, not PEM, or the key does not match
            the certificate; the message starts with the key (``tls_key: ...``).
    """
    cert_pem = _readable(files.cert, "tls_cert")
    _readable(files.key, "tls_key")
    info = certificate_info(cert_pem, files.cert)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers(_TLS12_CIPHERS)
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
    context.options |= ssl.OP_NO_RENEGOTIATION

    def no_passphrase() -> str:
        # Without a callback OpenSSL would prompt on the terminal and hang
        # the daemon (or check-config) on an encrypted key.
        raise ConfigError(
            f"tls_key: {files.key} is encrypted; give an unencrypted key "
            "readable only by the broker's user"
        )

    try:
        context.load_cert_chain(files.cert, files.key, password=no_passphrase)
    except ssl.SSLError as exc:
        if "KEY_VALUES_MISMATCH" in str(exc) or "key values mismatch" in str(exc):
            raise ConfigError(
                f"tls_key: {files.key} does not match the certificate in {files.cert}"
            ) from None
        raise ConfigError(
            f"tls_key: {files.key} with tls_cert {files.cert}: not a PEM private "
            f"key and certificate chain ({exc.reason or exc})"
        ) from None
    except OSError as exc:
        raise ConfigError(
            f"tls_key: cannot load {files.key}: {exc.strerror or exc}"
        ) from None
    if files.client_auth != "none" and files.client_ca is not None:
        _readable(files.client_ca, "tls_client_ca")
        try:
            context.load_verify_locations(cafile=files.client_ca)
        except (ssl.SSLError, OSError) as exc:
            raise ConfigError(
                f"tls_client_ca: {files.client_ca}: not a PEM CA bundle ({exc})"
            ) from None
        context.verify_mode = (
            ssl.CERT_REQUIRED if files.client_auth == "required" else ssl.CERT_OPTIONAL
        )
    return context, info


def certificate_info(pem: bytes, path: Path) -> CertificateInfo:
    """
    Fingerprint and expiry of the first certificate in a PEM file.

    Raises:
        ConfigError: no PEM certificate, or one whose DER cannot be read.
    """
    text = pem.decode("ascii", "replace")
    begin = text.find("-----BEGIN CERTIFICATE-----")
    end = text.find("-----END CERTIFICATE-----", begin)
    if begin < 0 or end < 0:
        raise ConfigError(f"tls_cert: {path} holds no PEM certificate")
    try:
        der = ssl.PEM_cert_to_DER_cert(text[begin : end + 25])
        not_after = der_not_after(der)
    except ValueError as exc:
        raise ConfigError(f"tls_cert: {path}: unreadable certificate ({exc})") from None
    return CertificateInfo(
        fingerprint="sha256:" + hashlib.sha256(der).hexdigest(), not_after=not_after
    )


def _der_item(data: bytes, at: int) -> tuple[int, int, int]:
    """
    ``(tag, start of content, end of content)`` of the DER item at ``at``.
    """
    if at + 2 > len(data):
        raise ValueError("truncated DER")
    tag, length = data[at], data[at + 1]
    at += 2
    if length & 0x80:
        count = length & 0x7F
        if count == 0 or count > 4 or at + count > len(data):
            raise ValueError("bad DER length")
        length = int.from_bytes(data[at : at + count], "big")
        at += count
    if at + length > len(data):
        raise ValueError("truncated DER")
    return tag, at, at + length


def der_not_after(der: bytes) -> float:
    """
    The ``notAfter`` of a DER X.509 certificate, as a Unix timestamp.

    Raises:
        ValueError: not a certificate this walk understands.
    """
    _, body, _ = _der_item(der, 0)  # Certificate
    _, at, _ = _der_item(der, body)  # tbsCertificate
    tag, _, end = _der_item(der, at)
    if tag == 0xA0:  # [0] version
        at = end
        tag, _, end = _der_item(der, at)
    # serialNumber, signature, issuer, then validity.
    for _ in range(3):
        _, _, at = _der_item(der, at)
    tag, inner, _ = _der_item(der, at)
    if tag != 0x30:
        raise ValueError("no validity in the certificate")
    _, _, after_before = _der_item(der, inner)
    tag, start, stop = _der_item(der, after_before)
    text = der[start:stop].decode("ascii")
    if tag == 0x17:  # UTCTime YYMMDDHHMMSSZ
        year = int(text[:2])
        text = f"{1900 + year if year >= 50 else 2000 + year}{text[2:]}"
    elif tag != 0x18:  # GeneralizedTime YYYYMMDDHHMMSSZ
        raise ValueError("notAfter is not a time")
    moment = datetime.strptime(text, "%Y%m%d%H%M%SZ").replace(tzinfo=UTC)
    return moment.timestamp()


class ServerTls:
    """
    The TLS context new handshakes get, swapped whole on reload.

    Args:
        files: where the certificate, key and client CA are.

    Raises:
        ConfigError: the files do not make a context (see `build_context`).
    """

    def __init__(self, files: TlsFiles) -> None:
        self.files = files
        self.current, self.info = build_context(files)

    def prepare_reload(self) -> Callable[[], CertificateInfo]:
        """
        Build a context from the files as they are now, without using it yet.

        Returns:
            A function that puts it in force for new handshakes and returns
            its certificate's facts.

        Raises:
            ConfigError: the new files do not load; the old context stays.
        """
        context, info = build_context(self.files)

        def commit() -> CertificateInfo:
            self.current = context
            self.info = info
            return info

        return commit


# Most decrypted bytes taken out of OpenSSL at a time.
_READ_CHUNK = 65536


class TlsSession:
    """
    The server side of one TLS connection, over memory buffers.

    `receive` takes what the socket read and returns the application bytes it
    decrypts to; `send` encrypts; after either, `outgoing` holds what must be
    written to the socket (handshake messages, alerts, records).

    Args:
        context: the server context the handshake uses.
    """

    def __init__(self, context: ssl.SSLContext) -> None:
        self.context = context
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self.ssl_object = context.wrap_bio(
            self._incoming, self._outgoing, server_side=True
        )
        self.established = False
        """Whether the handshake has completed."""
        self.peer_closed = False
        """Whether the peer ended the TLS stream (close_notify, or EOF)."""

    def receive(self, data: bytes) -> bytes:
        """
        Feed bytes read from the socket (``b""``: the socket's EOF).

        Returns:
            The application bytes decrypted so far; check `established` for
            the end of the handshake.

        Raises:
            ssl.SSLError: the handshake failed (no or untrusted client
                certificate, not TLS at all) or a record is corrupt; any
                alert for the peer is in `outgoing`.
        """
        if data:
            self._incoming.write(data)
        else:
            self._incoming.write_eof()
        if not self.established:
            try:
                self.ssl_object.do_handshake()
            except ssl.SSLWantReadError:
                return b""
            self.established = True
        chunks: list[bytes] = []
        while not self.peer_closed:
            try:
                chunk = self.ssl_object.read(_READ_CHUNK)
            except ssl.SSLWantReadError:
                break
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                self.peer_closed = True
                break
            if not chunk:
                self.peer_closed = True
                break
            chunks.append(chunk)
        return b"".join(chunks)

    def send(self, data: bytes | bytearray | memoryview) -> bytes:
        """
        Encrypt application bytes.

        Returns:
            The records to write to the socket (with anything else pending).
        """
        if data:
            self.ssl_object.write(data)
        return self.outgoing()

    def close(self) -> bytes:
        """
        Start a clean TLS close.

        Returns:
            The close_notify alert (and anything pending) for the socket.
        """
        # The peer's close_notify has not come (or never will): ours is in
        # the buffer all the same, and the socket closes next.
        if self.established:
            with contextlib.suppress(ssl.SSLError):
                self.ssl_object.unwrap()
        return self.outgoing()

    def outgoing(self) -> bytes:
        """
        Take the bytes waiting to be written to the socket.
        """
        return self._outgoing.read()


def peer_certificate(transport: Any) -> PeerCertificate | None:
    """
    The verified client certificate on a connection, if any.

    Args:
        transport: the request's transport (``request.transport``), or None
            once the connection is gone.
    """
    if transport is None:
        return None
    ssl_object = transport.get_extra_info("ssl_object")
    if not isinstance(ssl_object, ssl.SSLObject | ssl.SSLSocket):
        return None
    der = ssl_object.getpeercert(binary_form=True)
    if not der:
        return None
    subject = ssl_object.getpeercert() or {}
    return PeerCertificate(
        fingerprint="sha256:" + hashlib.sha256(der).hexdigest(),
        common_name=_common_name(subject.get("subject", ())),
    )


def _common_name(subject: Any) -> str | None:
    for rdn in subject:
        for name, value in rdn:
            if name == "commonName":
                return str(value)
    return None
