"""
The keys every source and every sink has, whatever its kind.

Source and sink packages define their own models on top of these; `broker.config`
assembles them into the whole file.
"""

from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

from pydantic import (
    Field,
    IPvAnyNetwork,
    ModelWrapValidatorHandler,
    ValidationError,
    model_validator,
)
from pydantic_core import InitErrorDetails, PydanticCustomError

from broker.configtypes import (
    ByteRate,
    Duration,
    Listen,
    ListenAddress,
    Name,
    Size,
    StrictModel,
)
from broker.health_config import HealthConfig

__all__ = [
    "ByteRate",
    "Duration",
    "Listen",
    "ListenAddress",
    "Name",
    "SinkConfigBase",
    "Size",
    "SourceConfigBase",
    "StrictModel",
]


class SourceConfigBase(StrictModel):
    """
    Keys every ``[[sources]]`` entry has, whatever its kind.
    """

    replaced_keys: ClassVar[Mapping[str, str]] = {}
    """Old key -> the key that replaced it; an old key is refused, naming the new."""

    name: Name = Field(
        description="unique name of this source, used in logs and status"
    )
    priority: int = Field(
        default=0,
        ge=0,
        le=100,
        description="tier: lower is preferred; lower tiers feed the pool first",
    )
    credit: float = Field(
        default=8.0,
        ge=0.0,
        le=8.0,
        description="entropy credited per byte, in bits (0 mixes without credit)",
    )
    enabled: bool = Field(
        default=True, description="set false to keep an entry but not run it"
    )
    health: HealthConfig = Field(
        default_factory=HealthConfig,
        description="continuous health tests run on this source's bytes",
    )
    watchdog: Duration | None = Field(
        default=None,
        gt=0,
        description="a read that takes longer than this marks the source stalled "
        "and restarts it (default: derived from the source's nominal rate)",
    )
    record_raw: Path | None = Field(
        default=None,
        description="append this source's raw bytes to this file, for offline "
        "assessment",
    )

    @model_validator(mode="wrap")
    @classmethod
    def _refuse_replaced_keys(
        cls, data: Any, handler: ModelWrapValidatorHandler["SourceConfigBase"]
    ) -> "SourceConfigBase":
        # "unknown key" would leave an operator upgrading an old file guessing:
        # name the key that replaced it, next to every other problem found.
        if not isinstance(data, Mapping):
            return handler(data)
        old = [key for key in cls.replaced_keys if key in data]
        if not old:
            return handler(data)
        errors: list[InitErrorDetails] = [
            InitErrorDetails(
                type=PydanticCustomError(
                    "replaced_key", f"replaced by {cls.replaced_keys[key]!r}"
                ),
                loc=(key,),
                input=data[key],
            )
            for key in old
        ]
        try:
            handler({key: value for key, value in data.items() if key not in old})
        except ValidationError as exc:
            # Re-raised as custom errors: the messages are final text already.
            errors += [
                InitErrorDetails(
                    type=PydanticCustomError(error["type"], error["msg"]),
                    loc=error["loc"],
                    input=error["input"],
                )
                for error in exc.errors(include_url=False)
            ]
        raise ValidationError.from_exception_data(cls.__name__, errors)


class SinkConfigBase(StrictModel):
    """
    Keys every ``[[sinks]]`` entry has, whatever its kind.
    """

    name: Name | None = Field(
        default=None, description="optional name used in logs and status"
    )
    listen: list[Listen] = Field(
        min_length=1,
        description="addresses to listen on: 'tcp://HOST:PORT' or 'unix:PATH'",
    )
    max_connections: int = Field(
        default=1024, ge=1, description="connections accepted at once; more are refused"
    )
    max_connections_per_client: int = Field(
        default=64,
        ge=1,
        description="connections one client (source address, Unix uid) may hold at "
        "once, so one host cannot take every slot (for EGD, across all of the "
        "broker's EGD sinks together)",
    )
    backlog: int = Field(
        default=10240,
        ge=1,
        le=1 << 20,
        description="listen backlog: connections the kernel queues before they are "
        "accepted (sized for 10,000 guests reconnecting at once; the kernel caps "
        "it at net.core.somaxconn)",
    )
    trusted_proxies: list[IPvAnyNetwork] = Field(
        default_factory=list,
        description="addresses of load balancers allowed to send a PROXY protocol "
        "header (v1 or v2): their connections are identified by the client "
        "address in the header; a header from any other address is refused",
    )
