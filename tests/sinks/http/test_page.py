"""
The status page at ``/``: one self-contained document built from the
package's ``static/`` files, a strict Content-Security-Policy that lets only
its own inline style sheet and script run, and the operator plane only.
"""

import base64
import gzip
import hashlib
import re
from html.parser import HTMLParser
from importlib import resources

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from pytest_aiohttp import AiohttpClient

from sinks.http.app import create_app
from sinks.http.page import build_page, status_page
from tests.sinks.http.test_api import FakeBroker
from tests.sinks.http.test_planes import ADMIN, bearer, config

Client = TestClient[web.Request, web.Application]

MAX_BYTES = 64 * 1024
"""The whole page, uncompressed: a few tens of KiB of hand-written code."""


class Collector(HTMLParser):
    """
    Every URL-bearing attribute and the text of every inline element.
    """

    def __init__(self) -> None:
        super().__init__()
        self.urls: list[tuple[str, str, str]] = []
        self.tags: list[str] = []
        self.inline: dict[str, list[str]] = {"style": [], "script": []}
        self._in: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        for name, value in attrs:
            if name in {"src", "href", "action", "srcset", "poster", "data"}:
                self.urls.append((tag, name, value or ""))
        if tag in self.inline:
            self._in = tag
            self.inline[tag].append("")

    def handle_endtag(self, tag: str) -> None:
        if tag == self._in:
            self._in = None

    def handle_data(self, data: str) -> None:
        if self._in is not None:
            self.inline[self._in][-1] += data


def csp_directives(header: str) -> dict[str, list[str]]:
    directives = {}
    for part in header.split(";"):
        name, *values = part.split()
        directives[name] = values
    return directives


def sha256_source(text: str) -> str:
    digest = hashlib.sha256(text.encode("utf-8")).digest()
    return "'sha256-" + base64.b64encode(digest).decode("ascii") + "'"


@pytest.fixture
async def operator(aiohttp_client: AiohttpClient) -> Client:
    return await aiohttp_client(create_app(config("operator"), FakeBroker()))


@pytest.fixture
async def tenant(aiohttp_client: AiohttpClient) -> Client:
    return await aiohttp_client(create_app(config("tenant"), FakeBroker()))


async def test_page_is_one_self_contained_document(operator: Client) -> None:
    """
    The style sheet and the script are inline, nothing is loaded from
    anywhere (no absolute or protocol-relative URL in any attribute), and the
    page polls the broker's own status endpoint.
    """
    response = await operator.get("/")
    assert 200 == response.status
    assert "text/html" == response.content_type
    page = await response.text()
    parsed = Collector()
    parsed.feed(page)
    assert [("link", "href", "data:,")] == parsed.urls
    assert 1 == len(parsed.inline["script"])
    assert 1 == len(parsed.inline["style"])
    assert not re.search(r"""(?:src|href)\s*=\s*["']?(?:https?:)?//""", page)
    assert "http://" not in page
    assert "https://" not in page
    assert "@import" not in page
    assert "url(" not in page
    assert "/v1/status" in parsed.inline["script"][0]
    assert "/v1/history" in parsed.inline["script"][0]
    assert "<svg" in page


async def test_page_has_a_strict_content_security_policy(operator: Client) -> None:
    """
    Only the page's own inline style sheet and script may run (by hash, no
    ``unsafe-inline`` or ``unsafe-eval``), the script may talk only to the
    broker that served it, and nothing may frame the page.
    """
    response = await operator.get("/")
    parsed = Collector()
    parsed.feed(await response.text())
    policy = csp_directives(response.headers["Content-Security-Policy"])
    assert ["'none'"] == policy["default-src"]
    assert [sha256_source(parsed.inline["script"][0])] == policy["script-src"]
    assert [sha256_source(parsed.inline["style"][0])] == policy["style-src"]
    assert ["'self'"] == policy["connect-src"]
    assert ["data:"] == policy["img-src"]
    assert ["'none'"] == policy["frame-ancestors"]
    assert ["'none'"] == policy["base-uri"]
    assert ["'none'"] == policy["form-action"]
    header = response.headers["Content-Security-Policy"]
    assert "unsafe" not in header
    assert "*" not in header
    assert "nosniff" == response.headers["X-Content-Type-Options"]
    assert "no-store" == response.headers["Cache-Control"]


async def test_page_size_is_sane(operator: Client) -> None:
    """
    The document is a few tens of KiB, and a third of that or less gzipped
    for a browser that accepts it, the same document either way.
    """
    plain = await operator.get("/", headers={"Accept-Encoding": "identity"})
    body = await plain.read()
    assert plain.headers.get("Content-Encoding") is None
    assert 8 * 1024 < len(body) < MAX_BYTES
    zipped = await operator.get(
        "/", headers={"Accept-Encoding": "gzip, deflate"}, auto_decompress=False
    )
    assert "gzip" == zipped.headers["Content-Encoding"]
    assert "Accept-Encoding" == zipped.headers["Vary"]
    compressed = await zipped.read()
    assert len(compressed) < len(body) / 2
    assert body == gzip.decompress(compressed)


async def test_gzip_refused_with_q_zero_gets_the_plain_page(operator: Client) -> None:
    """
    ``gzip;q=0`` says the client does not take gzip.
    """
    response = await operator.get(
        "/", headers={"Accept-Encoding": "gzip;q=0"}, auto_decompress=False
    )
    assert response.headers.get("Content-Encoding") is None
    assert status_page().body == await response.read()


async def test_tenant_plane_hides_the_page(tenant: Client) -> None:
    """
    On the tenant plane ``/`` is a 404 like any unknown path, and the page
    itself with the admin token.
    """
    hidden = await tenant.get("/")
    assert 404 == hidden.status
    assert "Content-Security-Policy" not in hidden.headers
    shown = await tenant.get("/", headers=bearer(ADMIN))
    assert 200 == shown.status
    assert status_page().body == await shown.read()


def test_page_is_built_from_the_packaged_static_files() -> None:
    """
    The served document is status.html with status.css and status.js inlined.
    """
    static = resources.files("sinks.http").joinpath("static")
    html, css, js = (
        static.joinpath(name).read_text("utf-8")
        for name in ("status.html", "status.css", "status.js")
    )
    page = status_page().body.decode("utf-8")
    assert f"<style>{css}</style>" in page
    assert f"<script>{js}</script>" in page
    assert page.startswith(html[: html.index("<style>")])


@pytest.mark.parametrize(
    ("html", "css", "js"),
    [
        ("<style>/* status.css */</style>", "", ""),
        ("<script>/* status.js */</script>", "", ""),
        (
            "<style>/* status.css */</style><script>/* status.js */</script>",
            "</STYLE><script>",
            "",
        ),
        (
            "<style>/* status.css */</style><script>/* status.js */</script>",
            "",
            "'</script>'",
        ),
    ],
)
def test_build_refuses_a_broken_template(html: str, css: str, js: str) -> None:
    """
    A missing marker, or code that would close its own element, is refused.
    """
    with pytest.raises(ValueError, match=r"status\.html|close"):
        build_page(html, css, js)
