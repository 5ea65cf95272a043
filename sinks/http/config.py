"""
Config model of the HTTP sink.
"""

from typing import Literal

from pydantic import Field, field_validator

from broker.configbase import Duration, ListenAddress, SinkConfigBase, Size

# How much longer than the longest ``?wait=`` a request may take: room for the
# grant, the budget store and writing the answer.
_REQUEST_MARGIN = 10.0


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
        "this many seconds after connecting is answered 408 and closed",
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
