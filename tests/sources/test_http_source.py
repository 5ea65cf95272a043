"""
The ``http`` upstream source against small real aiohttp servers on loopback
that answer as ebroker's ``/v1/entropy`` does: reads, backpressure (429/503
with Retry-After), refusals (401, 403, 400, redirects), malformed and short
answers, a slow upstream, failover (inside a read, and at an open), TLS
verification with a test CA and a client certificate, and a token that never
shows in logs, errors or status.
"""

# ruff: noqa: S105, S106 - the tokens here are test values, not secrets

import asyncio
import contextlib
import os
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import structlog
import trustme
from aiohttp import web

from broker.config import parse_config
from broker.errors import ConfigError, SourceError
from sources.http import HttpSource, HttpSourceConfig, retry_after
from tests.helpers import DEADLINE, free_port

TOKEN = "s3cret-upstream-token-0123456789"

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class Upstream:
    """
    A fake upstream broker: ``behaviour`` decides each answer; every request's
    query and Authorization header are recorded.
    """

    def __init__(self, behaviour: str = "good", token: str | None = TOKEN) -> None:
        self.behaviour = behaviour
        self.token = token
        self.queries: list[dict[str, str]] = []
        self.sent: list[bytes] = []
        self.busy = 0
        self.url = ""
        self._runner: web.AppRunner | None = None
        self._released = asyncio.Event()

    async def start(
        self, ssl_context: ssl.SSLContext | None = None, port: int = 0
    ) -> "Upstream":
        app = web.Application()
        app.router.add_get("/v1/entropy", self._entropy)
        app.router.add_get("/base/v1/entropy", self._entropy)
        self._runner = web.AppRunner(
            app, handle_signals=False, handler_cancellation=True
        )
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", port, ssl_context=ssl_context)
        await site.start()
        bound = self._runner.addresses[0][1]
        scheme = "https" if ssl_context else "http"
        self.url = f"{scheme}://127.0.0.1:{bound}/"
        return self

    async def stop(self) -> None:
        self._released.set()
        if self._runner is not None:
            await self._runner.cleanup()

    async def _entropy(self, request: web.Request) -> web.StreamResponse:
        self.queries.append(dict(request.query))
        count = int(request.query["bytes"])
        behaviour = self.behaviour
        if self.token is not None and (
            request.headers.get("Authorization") != f"Bearer {self.token}"
        ):
            return web.json_response(
                {"error": "unknown bearer token", "limit": "auth"},
                status=401,
                headers={"WWW-Authenticate": 'Bearer realm="ebroker"'},
            )
        if behaviour == "busy_then_good" and self.busy < 2:
            self.busy += 1
            return web.json_response(
                {"error": "only 0 bytes ready"},
                status=503 if self.busy == 1 else 429,
                headers={"Retry-After": "0"},
            )
        if behaviour == "always_busy":
            return web.json_response(
                {"error": "only 0 bytes ready"},
                status=503,
                headers={"Retry-After": "0"},
            )
        if behaviour == "quota":
            return web.json_response(
                {"error": "quota spent", "limit": "quota"},
                status=403,
                headers={"Retry-After": "300"},
            )
        if behaviour == "bad_request":
            return web.json_response(
                {"error": "'bytes' must be an integer 1..1024"}, status=400
            )
        if behaviour == "echo_token":
            header = request.headers.get("Authorization", "")
            return web.json_response({"error": f"no thanks, {header}"}, status=500)
        if behaviour == "redirect":
            raise web.HTTPFound("https://elsewhere.example/")
        if behaviour == "html":
            return web.Response(text="<html>hello</html>", content_type="text/html")
        if behaviour == "short":
            return web.Response(
                body=os.urandom(count - 1), content_type="application/octet-stream"
            )
        if behaviour == "cut":
            response = web.StreamResponse(
                headers={"Content-Type": "application/octet-stream"}
            )
            response.content_length = count
            await response.prepare(request)
            await response.write(os.urandom(count // 2))
            assert request.transport is not None
            request.transport.close()
            return response
        if behaviour == "slow":
            await self._released.wait()
        body = os.urandom(count)
        self.sent.append(body)
        return web.Response(body=body, content_type="application/octet-stream")


@contextlib.asynccontextmanager
async def serving(
    behaviour: str = "good",
    token: str | None = TOKEN,
    ssl_context: ssl.SSLContext | None = None,
) -> AsyncIterator[Upstream]:
    upstream = await Upstream(behaviour, token).start(ssl_context)
    try:
        yield upstream
    finally:
        await upstream.stop()


@pytest.fixture
def token_file(tmp_path: Path) -> Path:
    path = tmp_path / "token"
    path.write_text(TOKEN + "\n")
    path.chmod(0o600)
    return path


def config(*urls: str, **settings: Any) -> HttpSourceConfig:
    return HttpSourceConfig.model_validate(
        {"name": "up", "kind": "http", "urls": list(urls), **settings}
    )


def make(*urls: str, **settings: Any) -> HttpSource:
    return HttpSource(config(*urls, **settings), rng=lambda: 0.0)


async def open_and_read(source: HttpSource, reads: int = 1) -> list[bytes]:
    """
    Open ``source`` and read ``reads`` times.
    """
    async with source:
        return [await source.read() for _ in range(reads)]


async def read_until_failure(
    source: HttpSource, then: Callable[[], Awaitable[None]]
) -> None:
    """
    Open ``source``, read once, run ``then``, and read on until one fails.
    """
    async with source:
        await source.read()
        await then()
        async with asyncio.timeout(DEADLINE):
            while True:
                await source.read()


# ---- reading -------------------------------------------------------------------


async def test_reads_raw_bytes_with_the_token_and_wait(token_file: Path) -> None:
    """
    Each read is ``read_size`` raw bytes; requests carry the bearer token,
    ``format=raw``, and ``wait=`` except the open's first (``wait=0``).
    """
    async with serving() as upstream:
        blocks = await open_and_read(
            make(upstream.url, token_file=str(token_file), read_size=1000), reads=3
        )
    assert [1000, 1000, 1000] == [len(block) for block in blocks]
    assert len(set(blocks)) == 3
    assert {"bytes": "1000", "format": "raw"} == upstream.queries[0]
    assert {"bytes": "1000", "format": "raw", "wait": "10"} == upstream.queries[1]


async def test_token_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """
    ``token_env`` names the variable holding the token.
    """
    monkeypatch.setenv("UPSTREAM_TOKEN", TOKEN)
    async with serving() as upstream:
        blocks = await open_and_read(make(upstream.url, token_env="UPSTREAM_TOKEN"))
    assert 4096 == len(blocks[0])


async def test_base_url_with_a_path() -> None:
    """
    A base URL with a path (behind a reverse proxy) keeps it.
    """
    async with serving(token=None) as upstream:
        source = make(upstream.url + "base")
        await open_and_read(source)
    assert 1 == len(upstream.queries)


async def test_backpressure_waits_and_asks_again(token_file: Path) -> None:
    """
    503 and 429 are an upstream doing its job: the read waits what
    Retry-After says and asks the same endpoint again, without failing.
    """
    async with serving("busy_then_good") as upstream:
        source = make(upstream.url, token_file=str(token_file))
        async with source:
            assert 4096 == len(await source.read())
            details = source.details()
    assert 0 == details["failovers"]
    assert None is details["last_error"]
    # the open's 503 counts as a working upstream; the read waited once
    assert 1 == details["backpressure_waits"]


async def test_an_upstream_that_stays_empty_delivers_nothing() -> None:
    """
    Endless backpressure leaves the read pending: the supervisor's watchdog,
    not the driver, turns that into a stall.
    """
    async with serving("always_busy", token=None) as upstream:
        source = make(upstream.url)
        with pytest.raises(TimeoutError):
            async with source, asyncio.timeout(0.2):
                await source.read()
    assert 1 == source.details()["endpoints"][0]["failures"]


@pytest.mark.parametrize(
    ("behaviour", "message"),
    [
        ("html", "answered 'text/html', not raw bytes"),
        ("short", "answered 4095 bytes, 4096 asked"),
        ("cut", "answer cut short"),
        ("bad_request", "refused the request (400) ('bytes' must be an integer"),
        ("redirect", "redirects (302) to 'https://elsewhere.example/'"),
    ],
)
async def test_bad_answers_fail_with_a_clear_message(
    behaviour: str, message: str
) -> None:
    """
    A malformed, short or cut answer, a 400 or a redirect fails the open
    with a message naming the endpoint and what was wrong.
    """
    async with serving(behaviour, token=None) as upstream:
        with pytest.raises(SourceError) as caught:
            await open_and_read(make(upstream.url))
    assert message in str(caught.value)
    assert upstream.url in str(caught.value)


async def test_a_refused_token_says_so_and_is_never_shown(tmp_path: Path) -> None:
    """
    401: the error says the token was refused and where to look; neither the
    error, the logs nor the status hold the token.
    """
    wrong = tmp_path / "wrong"
    wrong.write_text("wrong-" + TOKEN)
    wrong.chmod(0o400)
    with structlog.testing.capture_logs() as logs:
        async with serving() as upstream:
            source = make(upstream.url, token_file=str(wrong))
            with pytest.raises(SourceError) as caught:
                await open_and_read(source)
    text = str(caught.value)
    assert "refused the bearer token (401) (unknown bearer token)" in text
    assert "token_file" in text
    assert TOKEN not in text
    assert TOKEN not in repr(logs)
    assert TOKEN not in repr(source.details())


async def test_an_upstream_echoing_the_token_is_redacted(token_file: Path) -> None:
    """
    An upstream that puts the Authorization header in its error message does
    not get the token into our errors or logs.
    """
    with structlog.testing.capture_logs() as logs:
        async with serving("echo_token") as upstream:
            source = make(upstream.url, token_file=str(token_file))
            with pytest.raises(SourceError) as caught:
                await open_and_read(source)
    assert "[token]" in str(caught.value)
    assert TOKEN not in str(caught.value)
    assert TOKEN not in repr(logs)
    assert TOKEN not in repr(source.details())


async def test_a_spent_quota_keeps_the_endpoint_away_for_retry_after() -> None:
    """
    403 with Retry-After (a spent quota): the endpoint fails, and backs off
    at least as long as the upstream asked.
    """
    async with serving("quota", token=None) as upstream:
        source = make(upstream.url)
        with pytest.raises(SourceError, match=r"denied access \(403\) \(quota"):
            await open_and_read(source)
    assert 299.0 < source.details()["endpoints"][0]["backoff"] <= 300.0


async def test_a_slow_upstream_fails_the_open_within_connect_timeout() -> None:
    """
    An upstream that accepts and never answers fails the open in
    ``connect_timeout``.
    """
    async with serving("slow", token=None) as upstream:
        with pytest.raises(SourceError, match=r"no answer within 0\.2 s"):
            await open_and_read(make(upstream.url, connect_timeout="0.2 s"))


async def test_fails_over_and_shows_the_endpoint() -> None:
    """
    A dead first URL is skipped; the source reads from the second, and the
    status names it and why the first was left.
    """
    dead = f"http://127.0.0.1:{free_port()}/"
    async with serving(token=None) as upstream:
        source = make(dead, upstream.url)
        async with source:
            assert await source.read()
            details = source.details()
    assert upstream.url == details["endpoint"]
    assert "cannot connect" in details["endpoints"][0]["last_error"]


async def test_a_read_goes_on_from_the_next_upstream_when_one_dies(
    token_file: Path,
) -> None:
    """
    When the upstream in use dies, no read fails: the next read is served by
    the other upstream (its open-style first block), the failover is counted
    and logged at warning, the dead one backs off, and the token shows in no
    log.
    """
    async with serving() as first, serving() as second:
        source = make(first.url, second.url, token_file=str(token_file))
        with structlog.testing.capture_logs() as logs:
            async with source:
                blocks = [await source.read()]
                await first.stop()
                async with asyncio.timeout(DEADLINE):
                    blocks += [await source.read() for _ in range(3)]
                details = source.details()
    assert first.sent[:1] == blocks[:1]
    assert second.sent == blocks[1:]
    assert "wait" not in second.queries[0]  # asked as an open asks
    assert second.url == details["endpoint"]
    assert 1 == details["failovers"]
    assert 1 == details["endpoints"][0]["failures"]
    assert 0 < details["endpoints"][0]["backoff"]
    failover = [entry for entry in logs if entry["event"] == "upstream_failover"]
    assert [second.url] == [entry["endpoint"] for entry in failover]
    assert "warning" == failover[0]["log_level"]
    assert first.url == failover[0]["previous"]
    assert TOKEN not in repr(logs)


async def test_a_cut_answer_is_asked_again_of_the_next_upstream() -> None:
    """
    An answer cut short mid-read is never returned, in part or whole: the
    read returns a whole block from the next upstream instead, and no block
    twice.
    """
    async with serving(token=None) as first, serving(token=None) as second:
        source = make(first.url, second.url, read_size=1000)
        async with source:
            blocks = [await source.read()]
            first.behaviour = "cut"
            blocks.append(await source.read())
            details = source.details()
    assert first.sent == blocks[:1]
    assert second.sent == blocks[1:]
    assert [1000, 1000] == [len(block) for block in blocks]
    assert "answer cut short" in details["endpoints"][0]["last_error"]


async def test_a_busy_next_upstream_is_waited_for_not_failed() -> None:
    """
    The upstream moved to answers with backpressure: the read waits and asks
    it again, as it would the upstream it started on.
    """
    async with (
        serving(token=None) as first,
        serving("busy_then_good", token=None) as second,
    ):
        source = make(first.url, second.url)
        async with source:
            assert await source.read()
            await first.stop()
            async with asyncio.timeout(DEADLINE):
                assert 4096 == len(await source.read())
            details = source.details()
    assert second.url == details["endpoint"]
    assert 1 == details["backpressure_waits"]


async def test_a_read_fails_soon_when_every_upstream_is_dead() -> None:
    """
    The upstream in use dies and the other refuses: the read fails at once,
    naming both and why, and both back off.
    """
    dead = f"http://127.0.0.1:{free_port()}/"
    loop = asyncio.get_running_loop()
    async with serving(token=None) as first:
        source = make(first.url, dead)
        started = loop.time()
        with pytest.raises(SourceError) as caught:
            await read_until_failure(source, then=first.stop)
        assert loop.time() - started < 2.0
    assert first.url in str(caught.value)
    assert f"no other endpoint answered: {dead}: cannot connect" in str(caught.value)
    assert [1, 1] == [entry["failures"] for entry in source.details()["endpoints"]]


async def test_an_open_after_a_failed_upstream_moves_to_the_other(
    token_file: Path,
) -> None:
    """
    A source that failed on its only live upstream, opened again once the
    other is up, moves to it and logs the failover at warning.
    """
    port = free_port()
    other = f"http://127.0.0.1:{port}/"
    async with serving() as first:
        source = make(first.url, other, token_file=str(token_file))
        with pytest.raises(SourceError):
            await read_until_failure(source, then=first.stop)
    back = await Upstream().start(port=port)
    try:
        source.endpoints._states[1].due = 0.0
        with structlog.testing.capture_logs() as logs:
            await open_and_read(source)
    finally:
        await back.stop()
    failover = [entry for entry in logs if entry["event"] == "upstream_failover"]
    assert [other] == [entry["endpoint"] for entry in failover]
    assert "warning" == failover[0]["log_level"]
    assert 1 == source.details()["failovers"]
    assert TOKEN not in repr(logs)


async def test_failback_to_the_preferred_upstream_between_reads() -> None:
    """
    With ``failback`` due and the preferred upstream back, the next read is
    served by it, without an error in between; the move is a failover.
    """
    port = free_port()
    preferred = f"http://127.0.0.1:{port}/"
    async with serving(token=None) as fallback:
        source = make(preferred, fallback.url, failback="0.05 s")
        async with source:
            assert await source.read()
            assert fallback.url == source.details()["endpoint"]
            back = await Upstream(token=None).start(port=port)
            try:
                source.endpoints._states[0].due = 0.0
                async with asyncio.timeout(DEADLINE):
                    while source.details()["endpoint"] != preferred:
                        assert await source.read()
                assert await source.read()
            finally:
                await back.stop()
    assert back.queries
    assert 1 == source.details()["failovers"]


# ---- secrets on disk -------------------------------------------------------------


@pytest.fixture
def readable_token_file(token_file: Path) -> Path:
    token_file.chmod(0o644)
    return token_file


async def test_a_readable_token_file_is_refused(readable_token_file: Path) -> None:
    """
    A token file its group or others may read is refused before any request.
    """
    token_file = readable_token_file
    async with serving() as upstream:
        with pytest.raises(SourceError, match=r"accessible to others \(mode 0644\)"):
            await open_and_read(make(upstream.url, token_file=str(token_file)))
    assert [] == upstream.queries


async def test_an_unset_token_variable_is_an_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """
    A token variable that is not set is a clear error, not an anonymous read.
    """
    monkeypatch.delenv("NO_SUCH_TOKEN", raising=False)
    with pytest.raises(SourceError, match="NO_SUCH_TOKEN holds no token"):
        await open_and_read(make("http://127.0.0.1:1/", token_env="NO_SUCH_TOKEN"))


# ---- TLS -----------------------------------------------------------------------


@pytest.fixture
def ca() -> trustme.CA:
    return trustme.CA()


def server_context(ca: trustme.CA, client_ca: bool = False) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(context)
    if client_ca:
        ca.configure_trust(context)
        context.verify_mode = ssl.CERT_REQUIRED
    return context


async def test_tls_verified_with_ca_file(ca: trustme.CA, tmp_path: Path) -> None:
    """
    HTTPS against an upstream whose certificate ``ca_file`` vouches for.
    """
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    async with serving(token=None, ssl_context=server_context(ca)) as upstream:
        blocks = await open_and_read(make(upstream.url, ca_file=str(ca_file)))
    assert 4096 == len(blocks[0])


async def test_tls_unknown_ca_is_refused(ca: trustme.CA) -> None:
    """
    Verification is on by default: an upstream certificate from a CA the
    system does not trust fails the open, saying why.
    """
    async with serving(token=None, ssl_context=server_context(ca)) as upstream:
        with pytest.raises(SourceError, match="TLS certificate not trusted"):
            await open_and_read(make(upstream.url))
        assert [] == upstream.queries


async def test_tls_client_certificate(ca: trustme.CA, tmp_path: Path) -> None:
    """
    An upstream that requires a client certificate gets ours.
    """
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    client = ca.issue_cert("vm-broker.example")
    cert, key = tmp_path / "client.pem", tmp_path / "client.key"
    client.cert_chain_pems[0].write_to_path(str(cert))
    client.private_key_pem.write_to_path(str(key))
    key.chmod(0o600)
    context = server_context(ca, client_ca=True)
    async with serving(token=None, ssl_context=context) as upstream:
        with pytest.raises(SourceError):
            await open_and_read(make(upstream.url, ca_file=str(ca_file)))
        blocks = await open_and_read(
            make(
                upstream.url,
                ca_file=str(ca_file),
                client_cert=str(cert),
                client_key=str(key),
            )
        )
    assert 4096 == len(blocks[0])


# ---- config --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"urls": ["ftp://host/"]}, "sources[0].urls[0]: "),
        ({"urls": ["https://user:pw@host/"]}, "no credentials in the URL"),
        ({"urls": ["https://host/?bytes=1"]}, "no query or fragment"),
        (
            {"urls": ["http://broker.example/"], "token_env": "T"},
            "not sent in clear text",
        ),
        ({"token_env": "T", "token_file": "/t"}, "token_file or token_env, not both"),
        ({"client_key": "/k"}, "client_key needs client_cert"),
        ({"wait": "30 s"}, "must be shorter than the watchdog"),
        ({"read_size": 0}, "sources[0].read_size: "),
    ],
)
def test_bad_settings_are_refused_with_the_key_path(
    settings: dict[str, Any], message: str
) -> None:
    """
    Mistakes are refused at load, with the key path and the reason.
    """
    source = {"name": "up", "kind": "http", "urls": ["https://a.example/"]}
    data = {
        "sources": [{**source, **settings}],
        "sinks": [{"kind": "egd", "listen": ["tcp://127.0.0.1:0"]}],
    }
    with pytest.raises(ConfigError) as caught:
        parse_config(data)
    assert message in str(caught.value)


def test_plain_http_is_fine_on_loopback_with_a_token() -> None:
    """
    ``http://`` with a token is allowed on loopback (tests, a local proxy).
    """
    assert config("http://127.0.0.1:8889/", token_env="T").urls == [
        "http://127.0.0.1:8889/"
    ]
    assert config("http://localhost:8889", token_env="T").urls == [
        "http://localhost:8889/"
    ]


@pytest.mark.parametrize(
    ("header", "seconds"),
    [
        ("3", 3.0),
        ("0", 0.0),
        ("", 1.0),
        ("Wed, 21 Oct 2015 07:28:00 GMT", 1.0),
        ("9999", 60.0),
        ("-1", 1.0),
        ("nan", 1.0),
    ],
)
def test_retry_after(header: str, seconds: float) -> None:
    """
    Retry-After seconds, capped at a minute; 1 s when absent or a date.
    """
    assert seconds == retry_after({"Retry-After": header} if header else {})


async def test_reads_do_not_outlast_the_deadline() -> None:
    """
    A sanity bound: a healthy upstream answers many reads quickly.
    """
    async with serving(token=None) as upstream, asyncio.timeout(DEADLINE):
        blocks = await open_and_read(make(upstream.url), reads=20)
    assert 20 == len(blocks)
