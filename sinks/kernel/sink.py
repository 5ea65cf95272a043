"""
The kernel sink's lifecycle: what the broker starts, reports and stops.
"""

from broker.status import BrokerView, SinkStatus
from sinks.kernel.config import KernelSinkConfig


class KernelSink:
    """
    Feeds the local kernel from the pool.
    """

    kind = "kernel"

    def __init__(self, config: KernelSinkConfig, broker: BrokerView) -> None:
        self.name = config.name or "kernel"
        self._config = config
        self._broker = broker

    async def start(self) -> None:
        raise NotImplementedError

    def pre_shutdown(self) -> None:
        return None

    async def shutdown(self, timeout: float) -> None:
        return None

    def status(self) -> SinkStatus:
        return SinkStatus(
            name=self.name,
            kind=self.kind,
            addresses=(),
            connections=0,
            connections_total=0,
            bytes_out=0,
            requests=0,
        )

    def bound_addresses(self) -> list[str]:
        return []
