"""
Config model of the kernel sink.
"""

from typing import Literal

from pydantic import Field

from broker.configbase import Listen, Name, StrictModel


class KernelSinkConfig(StrictModel):
    """
    ``kind = "kernel"``: feed this machine's kernel (the VM agent).
    """

    kind: Literal["kernel"] = Field(description="sink type")
    name: Name | None = Field(
        default=None, description="optional name used in logs and status"
    )

    @property
    def listen(self) -> list[Listen]:
        """
        The kernel sink listens nowhere.
        """
        return []

    @property
    def max_connections(self) -> int:
        return 0
