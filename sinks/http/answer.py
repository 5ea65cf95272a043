"""
An answer written as one buffer: status line, head and body.

aiohttp puts every response's head together when it is sent, through its
header multidict (length, date, server, connection, content type), in
several layers of coroutines; for a small entropy answer that costs more
than everything else the sink does. `RawAnswer` writes what aiohttp would
write for an `aiohttp.web.Response` with a bytes body (`json_answer`: for
`aiohttp.web.json_response`), formatted directly:
the request's HTTP version, ``Content-Type``, ``Content-Length``, ``Date``,
``Server``, the ``Connection`` header aiohttp adds when keep-alive differs
from the version's default, then every header set on the answer
(``Cache-Control``, ``RateLimit-*``). Keep-alive follows the request, as
for any aiohttp response, unless `RawAnswer.force_close` was called.
"""

import email.utils
import json
import time
from collections.abc import Mapping
from typing import Final

from aiohttp import web
from aiohttp.abc import AbstractStreamWriter
from aiohttp.http import SERVER_SOFTWARE, HttpVersion10, HttpVersion11
from aiohttp.web_request import BaseRequest

_SERVER: Final = f"Server: {SERVER_SOFTWARE}\r\n"


class _HttpDate:
    """
    ``Date`` header values, formatted once a second.
    """

    def __init__(self) -> None:
        self._second = -1
        self._text = ""

    def __call__(self) -> str:
        second = int(time.time())
        if second != self._second:
            self._text = email.utils.formatdate(second, usegmt=True)
            self._second = second
        return self._text


_http_date = _HttpDate()


_JSON: Final = "application/json; charset=utf-8"


class RawAnswer(web.StreamResponse):
    """
    An answer with ``body``, sent in one write when aiohttp prepares it.

    Args:
        body: the whole body.
        content_type: its ``Content-Type`` (with any charset).
        headers: further headers (the sink's own values, never a client's).
        status: the status code; one that carries a body.

    Raises:
        ValueError: ``status`` is one whose answer has no body (1xx, 204, 304).
    """

    def __init__(
        self,
        body: bytes,
        content_type: str,
        headers: Mapping[str, str] | None = None,
        *,
        status: int = 200,
    ) -> None:
        if status < 200 or status in (204, 304):
            raise ValueError(f"a {status} answer has no body")
        super().__init__(status=status, headers=headers)
        self._answer = body
        self._head = f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
        self._close = False
        self._keeps_alive: bool | None = None
        self._writer: AbstractStreamWriter | None = None

    @property
    def keep_alive(self) -> bool | None:
        """
        Whether the connection stays open after this answer; None until sent.
        """
        return self._keeps_alive

    def force_close(self) -> None:
        self._close = True

    async def prepare(self, request: BaseRequest) -> AbstractStreamWriter | None:
        """
        Write the whole answer (aiohttp calls this, then `write_eof`).
        """
        if self._writer is not None:
            return self._writer
        keep_alive = request.keep_alive and not self._close
        self._keeps_alive = keep_alive
        version = request.version
        connection = ""
        if version == HttpVersion11:
            if not keep_alive:
                connection = "Connection: close\r\n"
        elif version == HttpVersion10 and keep_alive:
            connection = "Connection: keep-alive\r\n"
        extra = ""
        lines = 0
        for name, value in self.headers.items():
            extra += f"{name}: {value}\r\n"
            lines += 1
        # One line break per header: none may hide inside a name or value.
        if extra.count("\n") != lines or extra.count("\r") != lines:
            raise ValueError("a header of a raw answer holds a line break")
        head = (
            f"HTTP/{version.major}.{version.minor} {self.status} {self.reason}\r\n"
            f"{self._head}"
            f"Date: {_http_date()}\r\n{_SERVER}{connection}{extra}\r\n"
        ).encode("ascii")
        writer = self._writer = request.writer
        # No body for HEAD, as aiohttp would send none (Content-Length stays).
        body = b"" if request.method == "HEAD" else self._answer
        await writer.write_eof(head + body)
        return writer

    async def write_eof(self, data: bytes = b"") -> None:
        """
        Nothing left to write: `prepare` sent the whole answer.
        """
        if data:
            raise RuntimeError("a raw answer is complete when prepared")


def json_answer(
    payload: object, status: int = 200, headers: Mapping[str, str] | None = None
) -> RawAnswer:
    """
    ``payload`` as JSON, as `aiohttp.web.json_response` would answer it.
    """
    return RawAnswer(json.dumps(payload).encode(), _JSON, headers, status=status)
