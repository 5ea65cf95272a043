"""
Config model of the HTTP sink.
"""

from pathlib import Path
from typing import Final, Literal, Self

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_core import InitErrorDetails, PydanticCustomError

from broker.configbase import Duration, ListenAddress, SinkConfigBase, Size
from broker.errors import ConfigError
from sinks.http.tls import ClientAuth, TlsFiles, build_context

# How much longer than the longest ``?wait=`` a request may take: room for the
# grant, the budget store and writing the answer.
_REQUEST_MARGIN = 10.0

API_PATHS: Final = frozenset(
    {"/v1/entropy", "/healthz", "/readyz", "/v1/status", "/v1/history", "/metrics"}
)
"""Paths of the API's own routes, which the pollen endpoint cannot share."""

API_PREFIXES: Final = ("/v1/admin/", "/v1/simulator/")
"""Prefixes of the API's own routes, which the pollen endpoint cannot share."""

POLLEN_BODY_BYTES: Final = len("challenge=") + 128
"""
Size of pollinate's POST body: ``challenge=`` and the hex of a SHA-512, so
a smaller ``max_body_bytes`` would answer every pollinate 413.
"""


def path_taken(path: str) -> bool:
    """
    Whether ``path`` is one of the API's own routes (``/`` is not).
    """
    return path in API_PATHS or path.startswith(API_PREFIXES)


class HttpSinkConfig(SinkConfigBase):
    """
    ``kind = "http"``: the HTTP API (entropy, health, status, metrics).
    """

    kind: Literal["http"] = Field(description="sink type")
    plane: Literal["tenant", "operator"] = Field(
        default="tenant",
        description="tenant: guests draw entropy here (/v1/entropy, /healthz, "
        "/readyz); status, metrics, the status page and admin endpoints answer "
        "only the admin token. operator: every endpoint, for the operator's own "
        "network (keep it on loopback or a management address)",
    )
    max_request_bytes: Size = Field(
        default=65536, ge=1, le=1 << 20, description="largest ?bytes= a client may ask"
    )
    max_wait: Duration = Field(
        default=30.0, description="longest ?wait= a client may ask, in seconds"
    )
    header_timeout: Duration = Field(
        default=10.0,
        gt=0,
        description="a connection that has not sent its first request's headers "
        "this many seconds after connecting is answered 408 and closed; with "
        "TLS, the handshake must finish within it too, and the headers then "
        "get it again",
    )
    idle_timeout: Duration = Field(
        default=75.0,
        gt=0,
        description="a keep-alive connection idle this long between requests "
        "(or still sending the next request's headers) is closed",
    )
    request_timeout: Duration | None = Field(
        default=None,
        gt=0,
        description="a request not answered after this long gets a 503 "
        "(default: max_wait + 10 s); a client that reads none of its response "
        "for this long is disconnected",
    )
    max_header_bytes: Size = Field(
        default=8190,
        ge=256,
        le=65536,
        description="longest request line, and longest single header, in bytes; "
        "a longer one is answered 400",
    )
    max_headers: int = Field(
        default=64,
        ge=8,
        le=1024,
        description="most header lines in one request; more are answered 400",
    )
    max_body_bytes: Size = Field(
        default=8192,
        ge=0,
        le=1 << 20,
        description="largest request body accepted; a larger Content-Length is "
        "answered 413 (the API's requests have no body)",
    )
    admin_token: str | None = Field(
        default=None,
        pattern=r"^sha256:[0-9a-f]{64}$",
        description="SHA-256 of the admin bearer token ('sha256:HEX', from "
        "`ebroker hash-token`) that unlocks POST /v1/admin/reload",
    )
    pollen: bool = Field(
        default=False,
        description="answer pollinate (Ubuntu's boot-time seeding client) at "
        "pollen_path, under the same customers and limits as /v1/entropy",
    )
    pollen_path: str = Field(
        default="/",
        pattern=r"^/[A-Za-z0-9._~/-]*$",
        description="path of the pollen endpoint (POST, or GET with ?challenge=)",
    )
    simulator_control: bool = Field(
        default=False,
        description="serve POST /v1/simulator/SERIAL/ACTION (loopback clients only) "
        "to unplug, replug, fail or heal simulated Entropy Keys",
    )

    tls_cert: Path | None = Field(
        default=None,
        description="PEM certificate (chain) to serve HTTPS with; with tls_key. "
        "Unset: plain HTTP. Re-read on SIGHUP",
    )
    tls_key: Path | None = Field(
        default=None,
        description="PEM private key of tls_cert (unencrypted; keep it mode "
        "0600). Re-read on SIGHUP",
    )
    tls_client_ca: Path | None = Field(
        default=None,
        description="PEM bundle of the CAs client certificates must chain to; "
        "needs tls_cert. Re-read on SIGHUP",
    )
    tls_client_auth: ClientAuth | None = Field(
        default=None,
        description="none: ask for no client certificate; optional: verify one "
        "if offered; required: refuse a handshake without a valid one. Default: "
        "optional with tls_client_ca, none without",
    )

    @property
    def tls_files(self) -> TlsFiles | None:
        """
        The TLS files, or None for plain HTTP.
        """
        if self.tls_cert is None or self.tls_key is None:
            return None
        auth = self.tls_client_auth
        if auth is None:
            auth = "optional" if self.tls_client_ca is not None else "none"
        return TlsFiles(self.tls_cert, self.tls_key, self.tls_client_ca, auth)

    @model_validator(mode="after")
    def _check_tls(self) -> Self:
        # Each problem at its own key: "sinks[1].tls_key: ... does not match".
        problems = self._tls_problems()
        if problems:
            raise ValidationError.from_exception_data(
                type(self).__name__,
                [
                    InitErrorDetails(
                        type=PydanticCustomError("tls", reason),
                        loc=(key,),
                        input=str(getattr(self, key)),
                    )
                    for key, reason in problems
                ],
            )
        return self

    @model_validator(mode="after")
    def _check_pollen(self) -> Self:
        if not self.pollen:
            return self
        problems: list[InitErrorDetails] = []
        if path_taken(self.pollen_path):
            problems.append(
                InitErrorDetails(
                    type=PydanticCustomError(
                        "pollen",
                        "{path} is taken by another endpoint of the API; "
                        "pollen needs a path of its own (or /)",
                        {"path": self.pollen_path},
                    ),
                    loc=("pollen_path",),
                    input=self.pollen_path,
                )
            )
        if self.max_body_bytes < POLLEN_BODY_BYTES:
            problems.append(
                InitErrorDetails(
                    type=PydanticCustomError(
                        "pollen",
                        "pollinate POSTs {need} bytes (challenge= and 128 hex "
                        "digits): with pollen, give at least {need}",
                        {"need": POLLEN_BODY_BYTES},
                    ),
                    loc=("max_body_bytes",),
                    input=self.max_body_bytes,
                )
            )
        if problems:
            raise ValidationError.from_exception_data(type(self).__name__, problems)
        return self

    @field_validator("tls_cert", "tls_key", "tls_client_ca")
    @classmethod
    def _absolute(cls, value: Path | None) -> Path | None:
        # `ebroker check-config` in a shell and the service under systemd
        # (working directory /) would read different files from one
        # relative path.
        if value is not None and not value.is_absolute():
            raise ValueError(f"{value}: give an absolute path")
        return value

    def _tls_problems(self) -> list[tuple[str, str]]:
        if (self.tls_cert is None) != (self.tls_key is None):
            missing = "tls_key" if self.tls_key is None else "tls_cert"
            return [(missing, "tls_cert and tls_key go together: give both or neither")]
        if self.tls_cert is None:
            for key in ("tls_client_ca", "tls_client_auth"):
                if getattr(self, key) is not None:
                    return [(key, "needs tls_cert and tls_key")]
            return []
        if self.tls_client_auth in ("optional", "required") and not self.tls_client_ca:
            return [("tls_client_ca", "needed to verify client certificates")]
        if self.trusted_proxies:
            return [
                (
                    "trusted_proxies",
                    "a PROXY header travels ahead of TLS, and this sink reads "
                    "it inside TLS: terminate TLS on the proxy, or pass TLS "
                    "through without PROXY headers",
                )
            ]
        files = self.tls_files
        if files is None:
            return []
        try:
            build_context(files)
        except ConfigError as exc:
            key, _, reason = str(exc).partition(": ")
            return [(key, reason)]
        return []

    @property
    def request_deadline(self) -> float:
        """
        ``request_timeout``, or its default derived from ``max_wait``.
        """
        if self.request_timeout is not None:
            return self.request_timeout
        return self.max_wait + _REQUEST_MARGIN

    @field_validator("listen")
    @classmethod
    def _tcp_only(cls, value: list[ListenAddress]) -> list[ListenAddress]:
        for address in value:
            if address.scheme != "tcp":
                raise ValueError(
                    f"{address}: the http sink listens on TCP addresses only"
                )
        return value
