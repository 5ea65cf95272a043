"""
Config model of the EGD sink.
"""

from typing import Literal

from pydantic import Field, field_validator

from broker.configbase import SinkConfigBase, Size


class EgdSinkConfig(SinkConfigBase):
    """
    ``kind = "egd"``: EGD over TCP and Unix sockets.
    """

    kind: Literal["egd"] = Field(description="sink type")
    trust_writes: bool = Field(
        default=False,
        description="credit bytes clients send with command 0x03 (at most the bits "
        "they claim, at most 8 per byte); otherwise they are mixed in with zero credit",
    )
    max_pending_bytes: Size = Field(
        default=65536,
        ge=255,
        description="outstanding requested bytes per connection before the broker "
        "stops reading from it (TCP back-pressure, never a disconnect)",
    )
    max_buffered_output: Size = Field(
        default=65536,
        ge=1024,
        description="reply bytes handed to a client but not yet read (the broker's "
        "buffer plus the kernel's send queue) before nothing more is withdrawn "
        "for it",
    )
    chunk_size: int = Field(
        default=64,
        ge=1,
        le=255,
        description="bytes handed to one blocked reader before the next gets a turn",
    )
    socket_mode: str = Field(
        default="0600", description="permissions of Unix sockets, in octal"
    )

    @field_validator("socket_mode")
    @classmethod
    def _octal_mode(cls, value: str) -> str:
        try:
            mode = int(value, 8)
        except ValueError:
            raise ValueError(f"{value!r} is not an octal mode such as '0600'") from None
        if not 0 <= mode <= 0o777:
            raise ValueError(f"{value!r} is not a permission mode (0000-0777)")
        return value
