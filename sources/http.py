"""
The ``http`` source: another ebroker's ``/v1/entropy``, with a bearer
token and TLS verification, failing over between a list of URLs.
"""

from types import TracebackType
from typing import Any, Literal, Self

from pydantic import Field

from broker.configbase import SourceConfigBase


class HttpSourceConfig(SourceConfigBase):
    """
    ``kind = "http"``: an upstream broker over HTTP(S).
    """

    kind: Literal["http"] = Field(description="source driver")
    urls: list[str] = Field(
        min_length=1,
        description="base URLs of upstream brokers in order of preference, "
        "such as 'https://broker-a.example:8889/'",
    )


class HttpSource:
    """
    Reads blocks from the first reachable endpoint.
    """

    kind = "http"

    def __init__(self, config: HttpSourceConfig) -> None:
        self.name = config.name
        self.priority = config.priority
        self.credit = config.credit

    @property
    def nominal_rate(self) -> float | None:
        return None

    async def __aenter__(self) -> Self:
        raise NotImplementedError

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        return None

    async def read(self) -> bytes:
        raise NotImplementedError

    def details(self) -> dict[str, Any]:
        return {}
