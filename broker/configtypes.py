"""
Config building blocks: the strict base model, unit-aware field types and
listen addresses. Every config model is made of these.
"""

import ipaddress
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, PlainSerializer

from broker.units import Rate, parse_duration, parse_rate, parse_size

# Linux sun_path is 108 bytes including the terminating NUL.
MAX_UNIX_PATH = 107


class StrictModel(BaseModel):
    """
    Base of every config model: unknown keys are errors and values are frozen.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)


Size = Annotated[int, BeforeValidator(parse_size), Field(ge=0)]
Duration = Annotated[float, BeforeValidator(parse_duration), Field(ge=0)]
ByteRate = Annotated[
    Rate, BeforeValidator(parse_rate), PlainSerializer(lambda r: r.per_second)
]
Name = Annotated[
    str,
    Field(
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$",
        description="letters, digits, '.', '_' and '-'; at most 63 characters",
    ),
]


@dataclass(frozen=True, slots=True)
class ListenAddress:
    """
    One place a sink listens: a TCP host and port, or a Unix socket path.
    """

    scheme: Literal["tcp", "unix"]
    host: str = ""
    port: int = 0
    path: str = ""

    def __str__(self) -> str:
        if self.scheme == "unix":
            return f"unix:{self.path}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"tcp://{host}:{self.port}"

    @property
    def is_loopback(self) -> bool:
        if self.scheme == "unix":
            return True
        return ipaddress.ip_address(self.host).is_loopback

    def resolved(self, state_dir: Path) -> "ListenAddress":
        """
        Return this address with a relative Unix path placed in ``state_dir``.
        """
        if self.scheme != "unix" or os.path.isabs(self.path):
            return self
        return ListenAddress("unix", path=str(state_dir / self.path))


_TCP_RE = re.compile(
    r"^(?:tcp://)?(?:\[(?P<v6>[^\]]+)\]|(?P<host>[^:/\[\]]+)):(?P<port>\d+)$"
)


def parse_listen(value: object) -> ListenAddress:
    """
    Parse ``tcp://HOST:PORT``, ``HOST:PORT``, ``tcp://[V6]:PORT`` or ``unix:PATH``.

    HOST must be an IP address or ``localhost`` (resolved to 127.0.0.1), so that
    what we bind is exactly what the operator wrote.

    Raises:
        ValueError: the address cannot be used.
    """
    if isinstance(value, ListenAddress):
        return value
    if not isinstance(value, str):
        raise ValueError("a listen address is a string like 'tcp://127.0.0.1:8888'")
    if value.startswith("unix:"):
        path = value.removeprefix("unix:").removeprefix("//")
        if not path:
            raise ValueError("unix: needs a socket path, e.g. 'unix:egd.sock'")
        if "\0" in path:
            raise ValueError("a socket path cannot contain NUL")
        if len(os.fsencode(path)) > MAX_UNIX_PATH:
            raise ValueError(f"socket path longer than {MAX_UNIX_PATH} bytes")
        return ListenAddress("unix", path=path)
    match = _TCP_RE.match(value)
    if match is None:
        raise ValueError(
            f"{value!r} is not a listen address "
            "(use 'tcp://127.0.0.1:8888', 'tcp://[::1]:8888' or 'unix:PATH')"
        )
    host = match["v6"] or match["host"]
    if host == "localhost":
        host = "127.0.0.1"
    try:
        host = str(ipaddress.ip_address(host))
    except ValueError:
        raise ValueError(
            f"{host!r} is not an IP address; write the address to bind, "
            "e.g. 127.0.0.1 or ::1"
        ) from None
    port = int(match["port"])
    if port > 65535:
        raise ValueError(f"port {port} is out of range (0-65535)")
    return ListenAddress("tcp", host=host, port=port)


Listen = Annotated[ListenAddress, BeforeValidator(parse_listen), PlainSerializer(str)]
