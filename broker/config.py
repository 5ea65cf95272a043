"""
The configuration file: TOML, validated once at load by pydantic models.

Every problem is reported with the key path that caused it (``sources[1].path``)
and a plain reason, all problems at once, as a `ConfigError`.
"""

import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, ValidationError, model_validator

from broker.accounts import AccountsConfig, CustomerConfig, validate_customers
from broker.configbase import Duration, Size, StrictModel
from broker.errors import ConfigError
from sinks.egd.config import EgdSinkConfig
from sinks.http.config import HttpSinkConfig
from sinks.kernel.config import KernelSinkConfig
from sources.device import DeviceSourceConfig
from sources.egd import EgdSourceConfig
from sources.entropykey.config import EntropyKeySourceConfig
from sources.getrandom import GetrandomSourceConfig
from sources.http import HttpSourceConfig

AnySourceConfig = (
    GetrandomSourceConfig
    | DeviceSourceConfig
    | EntropyKeySourceConfig
    | EgdSourceConfig
    | HttpSourceConfig
)
SourceConfig = Annotated[AnySourceConfig, Field(discriminator="kind")]
SinkConfig = Annotated[
    EgdSinkConfig | HttpSinkConfig | KernelSinkConfig, Field(discriminator="kind")
]

_KIND_TAGS = {"getrandom", "device", "hwrng", "entropykey", "egd", "http", "kernel"}


class BrokerSection(StrictModel):
    """
    ``[broker]``: the pool and the process.
    """

    pool_size: Size = Field(
        default=1 << 20,
        ge=4096,
        description="bytes of conditioned output held ready; sources pause when full",
    )
    low_watermark: Size = Field(
        default=4096,
        description="below this many ready bytes, and with no healthy source, "
        "/healthz reports the instance unhealthy; also how much a fallback tier "
        "keeps ready while a better tier runs its start-up test",
    )
    state_dir: Path = Field(
        default=Path("/var/lib/ebroker"),
        description="directory for Unix sockets, the pid file and persisted counters",
    )
    drain: Duration = Field(
        default=7.0,
        description="seconds between SIGTERM and closing the listeners: /healthz "
        "answers 503 while every request is still served, so a load balancer "
        "takes the broker out of rotation first (haproxy's default checks need "
        "about 6 s)",
    )
    shutdown_grace: Duration = Field(
        default=5.0,
        description="seconds requests already accepted get to be answered once "
        "the listeners are closed",
    )

    @model_validator(mode="after")
    def _watermark_fits(self) -> "BrokerSection":
        if self.low_watermark > self.pool_size:
            raise ValueError("low_watermark cannot exceed pool_size")
        return self


class LoggingSection(StrictModel):
    """
    ``[logging]``.
    """

    level: Literal["debug", "info", "warning", "error"] = Field(
        default="info", description="least severe level written"
    )
    format: Literal["console", "json"] = Field(
        default="console", description="console for people, json for log collectors"
    )


class Config(StrictModel):
    """
    The whole configuration file.
    """

    broker: BrokerSection = Field(
        default_factory=BrokerSection, description="pool and process"
    )
    logging: LoggingSection = Field(
        default_factory=LoggingSection, description="logging"
    )
    sources: list[SourceConfig] = Field(min_length=1, description="entropy sources")
    sinks: list[SinkConfig] = Field(min_length=1, description="protocols served")
    accounts: AccountsConfig = Field(
        default_factory=AccountsConfig,
        description="where per-customer budgets and quotas are kept",
    )
    customers: list[CustomerConfig] = Field(
        default_factory=list,
        description="who may draw how much; unmatched clients fall to 'default'",
    )

    @model_validator(mode="after")
    def _unique_names_and_addresses(self) -> "Config":
        problems: list[str] = []
        seen: dict[str, int] = {}
        for index, source in enumerate(self.sources):
            if source.name in seen:
                problems.append(
                    f"sources[{index}].name: {source.name!r} is already used by "
                    f"sources[{seen[source.name]}]"
                )
            seen.setdefault(source.name, index)
        sink_names: dict[str, int] = {}
        bound: dict[str, str] = {}
        for index, sink in enumerate(self.sinks):
            if sink.name is not None:
                if sink.name in sink_names:
                    problems.append(
                        f"sinks[{index}].name: {sink.name!r} is already used by "
                        f"sinks[{sink_names[sink.name]}]"
                    )
                sink_names.setdefault(sink.name, index)
            for position, address in enumerate(sink.listen):
                where = f"sinks[{index}].listen[{position}]"
                resolved = str(address.resolved(self.broker.state_dir))
                if address.scheme == "tcp" and address.port == 0:
                    continue  # an ephemeral port never collides
                if resolved in bound:
                    problems.append(
                        f"{where}: {address} is also used by {bound[resolved]}"
                    )
                bound.setdefault(resolved, where)
        problems.extend(validate_customers(self.customers))
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @property
    def enabled_sources(self) -> list[AnySourceConfig]:
        return [source for source in self.sources if source.enabled]


def _format_location(loc: tuple[int | str, ...]) -> str:
    parts: list[str] = []
    previous: int | str | None = None
    for item in loc:
        if isinstance(item, int):
            parts.append(f"[{item}]")
        elif isinstance(previous, int) and item in _KIND_TAGS:
            pass  # pydantic names the union member; the index already says which
        elif item.startswith("function-"):
            pass  # validator wrapper names carry no meaning for operators
        else:
            parts.append(f".{item}" if parts else item)
        previous = item
    return "".join(parts)


def format_validation_error(error: ValidationError) -> str:
    """
    Render pydantic's errors as ``key.path: reason`` lines.
    """
    lines = []
    for item in error.errors(include_url=False):
        location = _format_location(tuple(item["loc"]))
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            message = "unknown key"
        elif item["type"] == "union_tag_invalid":
            message = (
                f"unknown kind {item['input'].get('kind')!r}"
                if isinstance(item["input"], dict)
                else message
            )
        elif item["type"] == "union_tag_not_found":
            message = "missing 'kind'"
        if location:
            lines.append(f"{location}: {message}")
        else:
            lines.extend(message.split("; "))
    return "\n".join(lines)


def parse_config(data: dict[str, Any]) -> Config:
    """
    Validate an already-parsed TOML document.

    Raises:
        ConfigError: listing every problem with its key path.
    """
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc)) from None


def load_config(path: Path) -> Config:
    """
    Read and validate a config file.

    Raises:
        ConfigError: the file cannot be read, is not TOML, or is invalid.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read: {exc}") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    try:
        return parse_config(data)
    except ConfigError as exc:
        raise ConfigError(
            "\n".join(f"{path}: {line}" for line in str(exc).splitlines())
        ) from None
