"""
The ``http`` source's settings (`HttpSourceConfig`), and what they point at
that an open reads afresh each time: the bearer token (`read_token`) and the
TLS context (`tls_context`).

The token is a secret: it is read from a file that only its owner may read,
or from the environment, and no message here ever holds it. It is never sent
in clear text over the network: a URL with ``http://`` and a token must be a
loopback one.
"""

import ipaddress
import os
import ssl
import stat
from pathlib import Path
from typing import Annotated, Literal, Self

from pydantic import AfterValidator, Field, model_validator
from yarl import URL

from broker.configbase import Duration, Size
from broker.errors import SourceError
from sources.upstream.config import UpstreamConfigBase


def _base_url(value: str) -> str:
    try:
        url = URL(value)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{value!r} is not a URL: {exc}") from None
    if url.scheme not in ("http", "https") or not url.host:
        raise ValueError(
            f"{value!r}: an upstream broker URL is 'https://HOST:PORT/' "
            "(or 'http://' on loopback)"
        )
    if url.user is not None or url.password is not None:
        raise ValueError(
            f"{value!r}: no credentials in the URL; use token_file or token_env"
        )
    if url.query_string or url.fragment:
        raise ValueError(f"{value!r}: a base URL has no query or fragment")
    path = url.path if url.path.endswith("/") else url.path + "/"
    return str(url.with_path(path))


def _is_loopback(url: str) -> bool:
    host = URL(url).host or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


BaseUrl = Annotated[str, AfterValidator(_base_url)]


class HttpSourceConfig(UpstreamConfigBase):
    """
    ``kind = "http"``: an upstream broker over HTTP(S).
    """

    kind: Literal["http"] = Field(description="source driver")
    urls: list[BaseUrl] = Field(
        min_length=1,
        description="base URLs of upstream brokers in order of preference, "
        "such as 'https://broker-a.example:8889/' ('http://' for loopback)",
    )
    token_file: Path | None = Field(
        default=None,
        description="file holding the bearer token (mode 0600 or 0400: a file "
        "its group or others may read is refused)",
    )
    token_env: str | None = Field(
        default=None,
        pattern=r"^[A-Za-z_][A-Za-z0-9_]*$",
        description="environment variable holding the bearer token",
    )
    ca_file: Path | None = Field(
        default=None,
        description="CA certificates (PEM) that verify the upstream's certificate "
        "(unset: the system's CAs)",
    )
    client_cert: Path | None = Field(
        default=None,
        description="client certificate (PEM) for upstreams that map certificates "
        "to customers",
    )
    client_key: Path | None = Field(
        default=None,
        description="private key of client_cert (PEM; unset: in client_cert)",
    )
    read_size: Size = Field(
        default=4096,
        ge=1,
        le=1 << 20,
        description="bytes per request (at most the upstream's max_request_bytes)",
    )
    wait: Duration = Field(
        default=10.0,
        le=300,
        description="seconds each request may wait upstream for its bytes "
        "(?wait=; at most the upstream's max_wait, and below watchdog)",
    )

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        if self.token_file is not None and self.token_env is not None:
            raise ValueError("set token_file or token_env, not both")
        if self.client_key is not None and self.client_cert is None:
            raise ValueError("client_key needs client_cert")
        if self.token_file is not None or self.token_env is not None:
            for url in self.urls:
                if url.startswith("http://") and not _is_loopback(url):
                    raise ValueError(
                        f"{url!r}: a bearer token is not sent in clear text over "
                        "the network; use https:// (http:// only on loopback)"
                    )
        watchdog = self.watchdog if self.watchdog is not None else 30.0
        if self.wait >= watchdog:
            raise ValueError(
                f"wait ({self.wait:g} s) must be shorter than the watchdog "
                f"({watchdog:g} s), or every slow answer is a stall"
            )
        return self


def file_problem(path: Path) -> str | None:
    """
    Why a secret file at ``path`` must not be trusted: group or other access.

    Raises:
        OSError: the file cannot be examined.
    """
    mode = stat.S_IMODE(os.stat(path).st_mode)
    if mode & 0o077:
        who = "others" if mode & 0o007 else "its group"
        return f"{path} is accessible to {who} (mode {mode:04o}): chmod 600 it"
    return None


def read_token(config: HttpSourceConfig) -> str | None:
    """
    The bearer token from ``token_file`` or ``token_env`` (None: no token).

    Raises:
        SourceError: the file is unsafe or unreadable, the variable unset, or
            the token empty or not printable (the message never holds it).
    """
    if config.token_file is not None:
        path = config.token_file
        try:
            problem = file_problem(path)
            if problem is not None:
                raise SourceError(f"token_file {problem}")
            token = path.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8"
            raise SourceError(f"cannot read token_file {path}: {reason}") from None
        where = f"token_file {path}"
    elif config.token_env is not None:
        token = os.environ.get(config.token_env, "").strip()
        where = f"environment variable {config.token_env}"
    else:
        return None
    if not token:
        raise SourceError(f"{where} holds no token")
    if not token.isprintable() or not token.isascii() or " " in token:
        raise SourceError(f"{where}: the token must be printable ASCII, no spaces")
    return token


def tls_context(config: HttpSourceConfig) -> ssl.SSLContext:
    """
    Verification on, with the system's CAs or ``ca_file``; the client
    certificate if configured.

    Raises:
        SourceError: a file is missing, unsafe or not PEM.
    """
    try:
        context = ssl.create_default_context(
            cafile=str(config.ca_file) if config.ca_file else None
        )
    except (OSError, ssl.SSLError) as exc:
        raise SourceError(f"cannot load ca_file {config.ca_file}: {exc}") from None
    if config.client_cert is not None:
        key = config.client_key
        try:
            if key is not None:
                problem = file_problem(key)
                if problem is not None:
                    raise SourceError(f"client_key {problem}")
            context.load_cert_chain(config.client_cert, key)
        except (OSError, ssl.SSLError) as exc:
            raise SourceError(
                f"cannot load client_cert {config.client_cert}: {exc}"
            ) from None
    return context
