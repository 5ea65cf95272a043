"""
Config model of the HTTP sink.
"""

from typing import Literal

from pydantic import Field

from broker.configbase import Duration, Size, SinkConfigBase


class HttpSinkConfig(SinkConfigBase):
    """
    ``kind = "http"``: the HTTP API (entropy, health, status, metrics).
    """

    kind: Literal["http"] = Field(description="sink type")
    max_request_bytes: Size = Field(
        default=65536, ge=1, le=1 << 20, description="largest ?bytes= a client may ask"
    )
    max_wait: Duration = Field(
        default=30.0, description="longest ?wait= a client may ask, in seconds"
    )
