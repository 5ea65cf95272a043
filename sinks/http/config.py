"""
Config model of the HTTP sink.
"""

from typing import Literal

from pydantic import Field, field_validator

from broker.configbase import Duration, ListenAddress, SinkConfigBase, Size


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
    admin_token: str | None = Field(
        default=None,
        pattern=r"^sha256:[0-9a-f]{64}$",
        description="SHA-256 of the admin bearer token ('sha256:HEX', from "
        "`ebroker hash-token`) that unlocks POST /v1/admin/reload",
    )
    simulator_control: bool = Field(
        default=False,
        description="serve POST /v1/simulator/SERIAL/ACTION (loopback clients only) "
        "to unplug, replug, fail or heal simulated Entropy Keys",
    )

    @field_validator("listen")
    @classmethod
    def _tcp_only(cls, value: list[ListenAddress]) -> list[ListenAddress]:
        for address in value:
            if address.scheme != "tcp":
                raise ValueError(
                    f"{address}: the http sink listens on TCP addresses only"
                )
        return value
