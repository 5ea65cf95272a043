"""
aiohttp's per-connection `RequestHandler`, made quiet about hostile input, and
the per-request bounds the application itself does not set.

aiohttp answers a request it cannot parse (a bad request line, an oversized or
garbled header) with a 400 but logs the parser's exception with a traceback,
once per request: anyone can fill the log. `QuietRequestHandler` answers the
same 4xx with a short JSON reason and reports it as a refusal instead, which is
counted and rate-limited. A 500 (a bug of ours) is still logged in full.

`bounded` wraps the application's request handler: a request body larger than
``max_body_bytes`` is refused from its ``Content-Length`` before anything reads
it, and a request still unanswered after ``request_timeout`` gets a 503. A
``direct`` route is asked first and may answer at once; only a request that
awaits something gets the deadline's timer.
"""

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, Final

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest

from broker.ratelog import CountedLog

# Parser messages can quote the offending bytes at length; a client learns
# (and the log records) only this much of them.
_REASON_MAX: Final = 80

_AppHandler = Callable[[BaseRequest], Awaitable[web.StreamResponse]]
_Later = Callable[[], Awaitable[web.StreamResponse]]
_Direct = Callable[[BaseRequest], web.StreamResponse | _Later | None]


def short_reason(exc: BaseException | None, message: str | None) -> str:
    """
    The first line of a parser error, cut short.
    """
    if isinstance(exc, HttpProcessingError) and exc.message:
        text = exc.message
    else:
        text = message or "bad request"
    first = text.strip().splitlines()[0] if text.strip() else "bad request"
    return first if len(first) <= _REASON_MAX else first[:_REASON_MAX] + "..."


class QuietRequestHandler(RequestHandler):
    """
    aiohttp's handler, answering malformed requests without a traceback.
    """

    def __init__(self, manager: web.Server, *, refusals: CountedLog, **kwargs: Any):
        super().__init__(manager, **kwargs)
        self._refusals = refusals

    def handle_error(
        self,
        request: BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if status >= 500:
            return super().handle_error(request, status, exc, message)
        reason = short_reason(exc, message)
        self._refusals("malformed", peer=request.remote, detail=reason)
        if request.writer.output_size > 0:
            # Part of a response went out already: all that is left is to close.
            raise ConnectionError("malformed request after a partial response")
        response = web.json_response({"error": f"bad request: {reason}"}, status=status)
        response.force_close()
        return response


def bounded(
    handler: _AppHandler,
    *,
    max_body_bytes: int,
    request_timeout: float,
    refusals: CountedLog,
    direct: _Direct | None = None,
) -> _AppHandler:
    """
    ``handler`` refusing oversized bodies and cut off after ``request_timeout``.

    Args:
        handler: the application's handler.
        max_body_bytes: largest ``Content-Length`` accepted.
        request_timeout: longest a request may take to be answered.
        refusals: where refusals are counted and logged.
        direct: asked before ``handler``: returns an answer, the rest of the
            request to await (under the deadline), or None to pass the
            request on to ``handler``.
    """

    async def handle(request: BaseRequest) -> web.StreamResponse:
        length = request.content_length
        if length is not None and length > max_body_bytes:
            refusals("body_too_large", peer=request.remote, bytes=length)
            response = web.json_response(
                {"error": f"request body over {max_body_bytes} bytes"}, status=413
            )
            response.force_close()
            return response
        later: _Later | None = None
        if direct is not None:
            answer = direct(request)
            if isinstance(answer, web.StreamResponse):
                return answer
            later = answer
        deadline = asyncio.timeout(request_timeout)
        try:
            async with deadline:
                if later is not None:
                    return await later()
                return await handler(request)
        except TimeoutError:
            if not deadline.expired():
                raise
            refusals("request_timeout", peer=request.remote, path=request.path)
            if request.writer.output_size > 0 and request.transport is not None:
                # Part of a response went out: the connection cannot carry a
                # 503 any more, and aiohttp drops a response it cannot write.
                request.transport.abort()
            response = web.json_response(
                {"error": "request took too long"},
                status=503,
                headers={"Retry-After": "1"},
            )
            response.force_close()
            return response

    return handle
