"""
The ``egd`` source: another EGD server (another ebroker, ekeyd, any EGD
server) read with blocking requests, over TCP or a Unix socket, failing over
between a list of endpoints.
"""

from types import TracebackType
from typing import Any, Literal, Self

from pydantic import Field

from broker.configbase import SourceConfigBase


class EgdSourceConfig(SourceConfigBase):
    """
    ``kind = "egd"``: an upstream EGD server.
    """

    kind: Literal["egd"] = Field(description="source driver")
    endpoints: list[str] = Field(
        min_length=1,
        description="EGD servers in order of preference: 'tcp://HOST:PORT' or "
        "'unix:PATH'",
    )


class EgdSource:
    """
    Reads blocks from the first reachable endpoint.
    """

    kind = "egd"

    def __init__(self, config: EgdSourceConfig) -> None:
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
