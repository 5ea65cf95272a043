"""
The HTML status page served at ``/``.

The page lives in ``sinks/http/static/`` as three files a contributor edits
and can open in a browser: ``status.html``, ``status.css`` and ``status.js``.
They are read once, when this module is imported, and served as ONE
document with the style sheet and the script inlined, so the page loads
nothing else: no second route, no CDN, no web font. What it shows it fetches
from ``/v1/status`` every two seconds and, where the broker keeps it, from
``/v1/history``.

Inline code would need ``'unsafe-inline'`` under a Content-Security-Policy;
instead the policy names the SHA-256 of the one style sheet and the one
script, which the document never changes after it is built, so nothing
injected into the page could run or style it. ``connect-src 'self'`` lets the
script poll the broker and nothing else; ``img-src data:`` covers only the
empty favicon that keeps browsers from asking for ``/favicon.ico``.

Serving the page is handing out bytes built once (gzip-compressed once, too,
for a client that accepts it): no templating, no state per request.
"""

import base64
import functools
import gzip
import hashlib
from dataclasses import dataclass
from importlib import resources
from typing import Final

from aiohttp import web

_CSS_MARK: Final = "<style>/* status.css */</style>"
_JS_MARK: Final = "<script>/* status.js */</script>"


@dataclass(frozen=True, slots=True)
class StatusPage:
    """
    The built document and the headers it is served with.
    """

    body: bytes
    gzipped: bytes
    headers: dict[str, str]


def _source_hash(text: str) -> str:
    digest = hashlib.sha256(text.encode("utf-8")).digest()
    return "'sha256-" + base64.b64encode(digest).decode("ascii") + "'"


def content_security_policy(css: str, js: str) -> str:
    """
    The policy for a document whose only style sheet is ``css`` and only
    script ``js``, both inline.
    """
    return "; ".join(
        (
            "default-src 'none'",
            f"script-src {_source_hash(js)}",
            f"style-src {_source_hash(css)}",
            "connect-src 'self'",
            "img-src data:",
            "base-uri 'none'",
            "form-action 'none'",
            "frame-ancestors 'none'",
        )
    )


def build_page(html: str, css: str, js: str) -> StatusPage:
    """
    Inline ``css`` and ``js`` into ``html`` at their markers.

    Raises:
        ValueError: a marker is missing, or the code would end its own
            element early (it contains ``</style`` or ``</script``).
    """
    for mark in (_CSS_MARK, _JS_MARK):
        if html.count(mark) != 1:
            raise ValueError(f"status.html must hold {mark!r} exactly once")
    if "</style" in css.lower() or "</script" in js.lower():
        raise ValueError("inline code must not close its own element")
    document = html.replace(_CSS_MARK, f"<style>{css}</style>").replace(
        _JS_MARK, f"<script>{js}</script>"
    )
    body = document.encode("utf-8")
    headers = {
        "Content-Type": "text/html; charset=utf-8",
        "Content-Security-Policy": content_security_policy(css, js),
        "X-Content-Type-Options": "nosniff",
        "X-Frame-Options": "DENY",
        "Referrer-Policy": "no-referrer",
        "Vary": "Accept-Encoding",
    }
    # mtime=0: the same bytes on every start, whatever the clock says.
    return StatusPage(body, gzip.compress(body, 9, mtime=0), headers)


@functools.cache
def status_page() -> StatusPage:
    """
    The page built from the package's ``static/`` files, read once.
    """
    static = resources.files("sinks.http").joinpath("static")
    return build_page(
        static.joinpath("status.html").read_text("utf-8"),
        static.joinpath("status.css").read_text("utf-8"),
        static.joinpath("status.js").read_text("utf-8"),
    )


# Built at import, outside the event loop: the handler never touches a file.
status_page()


def _accepts_gzip(request: web.BaseRequest) -> bool:
    for coding in request.headers.get("Accept-Encoding", "").split(","):
        name, _, params = coding.strip().partition(";")
        if name.strip().lower() == "gzip":
            # "gzip;q=0" refuses it.
            return params.replace(" ", "").lower() not in {"q=0", "q=0.0", "q=0.00"}
    return False


async def index(request: web.Request) -> web.Response:
    """
    ``GET /``: the self-contained status page, polling ``/v1/status``.
    """
    page = status_page()
    if _accepts_gzip(request):
        return web.Response(
            body=page.gzipped,
            headers={**page.headers, "Content-Encoding": "gzip"},
        )
    return web.Response(body=page.body, headers=page.headers)
