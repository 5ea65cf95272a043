"""
`RawAnswer` on the wire is what aiohttp sends for the same `web.Response`:
the same status line, headers (but for their order and the date), body and
keep-alive, whatever HTTP version and ``Connection`` header the client sent.
"""

import asyncio
from collections.abc import Awaitable, Callable

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from aiohttp.web_request import BaseRequest

from sinks.http.answer import RawAnswer
from tests.sinks.http.test_api import DEADLINE

BODY = b"\x00\x01entropy\xff"
HEADERS = {"Cache-Control": "no-store", "RateLimit-Limit": "64"}
CLOSE = b"GET /last HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"

Serve = Callable[[web.Application], Awaitable[TestServer]]


def app_answering(make: Callable[[web.Request], web.StreamResponse]) -> web.Application:
    async def handle(request: web.Request) -> web.StreamResponse:
        return make(request)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    return app


def aiohttps(request: web.Request) -> web.StreamResponse:
    response = web.Response(
        body=BODY, content_type="application/octet-stream", headers=HEADERS
    )
    if request.path == "/close":
        response.force_close()
    return response


def raw(request: web.Request) -> web.StreamResponse:
    response = RawAnswer(BODY, "application/octet-stream", HEADERS)
    if request.path == "/close":
        response.force_close()
    return response


Answer = tuple[str, dict[str, str], bytes]


def parse_head(head: bytes) -> tuple[str, dict[str, str]]:
    status, *lines = head.decode("ascii").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines)
    headers.pop("Date")
    return status, headers


async def exchange(server: TestServer, data: bytes) -> list[Answer]:
    """
    Send ``data``, read its answer, then (if the connection stays open) the
    answer to a closing request: as (status line, headers but the date, body).
    """
    reader, writer = await asyncio.open_connection(server.host, server.port)
    try:
        async with asyncio.timeout(DEADLINE):
            writer.write(data)
            status, headers = parse_head((await reader.readuntil(b"\r\n\r\n"))[:-4])
            length = 0 if data.startswith(b"HEAD") else int(headers["Content-Length"])
            answers = [(status, headers, await reader.readexactly(length))]
            writer.write(CLOSE)
            try:
                rest = await reader.read()
            except ConnectionResetError:
                rest = b""
    finally:
        writer.close()
    if rest:
        head, _, body = rest.partition(b"\r\n\r\n")
        answers.append((*parse_head(head), body))
    return answers


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        b"GET / HTTP/1.0\r\n\r\n",
        b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n",
        b"GET /close HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET /close HTTP/1.0\r\nConnection: keep-alive\r\n\r\n",
        b"HEAD / HTTP/1.1\r\nHost: x\r\n\r\n",
    ],
)
async def test_a_raw_answer_is_what_aiohttp_would_send(
    aiohttp_server: Serve, request_bytes: bytes
) -> None:
    """
    Same answer, same headers, same keep-alive as aiohttp's own response.
    """
    expected = await exchange(
        await aiohttp_server(app_answering(aiohttps)), request_bytes
    )
    actual = await exchange(await aiohttp_server(app_answering(raw)), request_bytes)
    assert expected == actual
    assert BODY == actual[-1][2]


@pytest.mark.parametrize("answer", [web.Response, RawAnswer])
async def test_a_header_with_a_line_break_is_never_sent(
    aiohttp_server: Serve, answer: type[web.StreamResponse]
) -> None:
    """
    A header that would split the head fails the answer, which aiohttp logs
    and closes the connection on; nothing of it is sent.
    """
    headers = {"X-Bad": "a\r\nSet-Cookie: b"}

    def injected(request: BaseRequest) -> web.StreamResponse:
        if answer is RawAnswer:
            return RawAnswer(BODY, "text/plain", headers)
        return web.Response(body=BODY, content_type="text/plain", headers=headers)

    server = await aiohttp_server(app_answering(injected))
    reader, writer = await asyncio.open_connection(server.host, server.port)
    try:
        writer.write(b"GET / HTTP/1.0\r\n\r\n")
        async with asyncio.timeout(DEADLINE):
            received = await reader.read()
    finally:
        writer.close()
    assert b"" == received
