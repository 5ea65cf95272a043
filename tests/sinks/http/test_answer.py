"""
`RawAnswer` on the wire is what aiohttp sends for the same `web.Response`
(and `json_answer` for the same `web.json_response`): the same status line,
headers (but for their order and the date), body and keep-alive, whatever
HTTP version and ``Connection`` header the client sent.
"""

import asyncio
from collections.abc import Awaitable, Callable

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from aiohttp.web_request import BaseRequest

from sinks.http.answer import RawAnswer, json_answer
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


JSON = {"error": "rate limited", "limit": "client_rate", "until": None}
RETRY = {"Retry-After": "3", "RateLimit-Remaining": "0"}
Make = Callable[[web.Request], web.StreamResponse]

# Each kind of answer, as aiohttp makes it and as the sink does.
KINDS: dict[str, tuple[Make, Make]] = {
    "bytes": (
        lambda _: web.Response(
            body=BODY, content_type="application/octet-stream", headers=HEADERS
        ),
        lambda _: RawAnswer(BODY, "application/octet-stream", HEADERS),
    ),
    "text": (
        lambda _: web.Response(text="00ff\n", headers=HEADERS),
        lambda _: RawAnswer(b"00ff\n", "text/plain; charset=utf-8", HEADERS),
    ),
    "json 429": (
        lambda _: web.json_response(JSON, status=429, headers=RETRY),
        lambda _: json_answer(JSON, 429, RETRY),
    ),
    "json 503": (
        lambda _: web.json_response({"error": "shutting down"}, status=503),
        lambda _: json_answer({"error": "shutting down"}, 503),
    ),
}


def closing(make: Make) -> Make:
    """
    ``make``, with the answer to ``/close`` forcing the connection closed.
    """

    def answer(request: web.Request) -> web.StreamResponse:
        response = make(request)
        if request.path == "/close":
            response.force_close()
        return response

    return answer


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
@pytest.mark.parametrize("kind", list(KINDS))
async def test_a_raw_answer_is_what_aiohttp_would_send(
    aiohttp_server: Serve, request_bytes: bytes, kind: str
) -> None:
    """
    Same answer, same headers, same keep-alive as aiohttp's own response.
    """
    theirs, ours = KINDS[kind]
    expected = await exchange(
        await aiohttp_server(app_answering(closing(theirs))), request_bytes
    )
    actual = await exchange(
        await aiohttp_server(app_answering(closing(ours))), request_bytes
    )
    assert expected == actual
    assert actual[-1][2]


@pytest.mark.parametrize("status", [101, 204, 304])
def test_a_status_without_a_body_is_refused(status: int) -> None:
    """
    A raw answer always has a body, so statuses that forbid one are refused.
    """
    with pytest.raises(ValueError, match=str(status)):
        RawAnswer(BODY, "text/plain", status=status)


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
