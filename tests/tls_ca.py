"""
A throwaway certificate authority for TLS tests, with no network: server
certificates for loopback and client certificates with a chosen CN, each
written as PEM files a daemon, curl or aiohttp can load.
"""

import datetime
import ssl
from dataclasses import dataclass
from pathlib import Path

import trustme

LOOPBACK_NAMES = ("127.0.0.1", "::1", "localhost")


@dataclass(frozen=True, slots=True)
class CertFiles:
    """
    A certificate and its key, as PEM files.
    """

    cert: Path
    key: Path
    """Written mode 0600, as an operator keeps a key."""


class TestCA:
    """
    A CA whose certificate is at `ca_path` (curl's ``--cacert``).

    Args:
        directory: where the PEM files go.
        name: distinguishes the files of two CAs in one directory.
    """

    __test__ = False  # not a pytest test class despite the name

    def __init__(self, directory: Path, name: str = "ca") -> None:
        self.directory = directory
        self.name = name
        self._ca = trustme.CA(organization_name=f"ebroker test {name}")
        self.ca_path = directory / f"{name}.pem"
        self._ca.cert_pem.write_to_path(str(self.ca_path))
        self._issued = 0

    def server_cert(
        self, *names: str, not_after: datetime.datetime | None = None
    ) -> CertFiles:
        """
        A server certificate for ``names`` (default: 127.0.0.1, ::1, localhost),
        valid until ``not_after`` (default: far in the future).
        """
        issued = self._ca.issue_cert(
            *(names or LOOPBACK_NAMES),
            common_name=f"ebroker test server {self._issued + 1}",
            not_after=not_after,
        )
        return self._write(issued, "server")

    def client_cert(self, common_name: str) -> CertFiles:
        """
        A client certificate whose subject CN is ``common_name``.
        """
        issued = self._ca.issue_cert(
            common_name=common_name, organization_name="ebroker test client"
        )
        return self._write(issued, f"client-{common_name}")

    def client_context(self, client: CertFiles | None = None) -> ssl.SSLContext:
        """
        A client context trusting this CA, presenting ``client`` if given.
        """
        context = ssl.create_default_context(cafile=str(self.ca_path))
        if client is not None:
            context.load_cert_chain(client.cert, client.key)
        return context

    def _write(self, issued: trustme.LeafCert, stem: str) -> CertFiles:
        self._issued += 1
        stem = f"{self.name}-{stem}-{self._issued}"
        cert = self.directory / f"{stem}.crt"
        key = self.directory / f"{stem}.key"
        issued.cert_chain_pems[0].write_to_path(str(cert))
        for pem in issued.cert_chain_pems[1:]:
            pem.write_to_path(str(cert), append=True)
        key.touch(mode=0o600)
        issued.private_key_pem.write_to_path(str(key))
        return CertFiles(cert, key)
