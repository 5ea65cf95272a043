"""
Debian's real pollinate against the daemon's pollen endpoint, over HTTP and
HTTPS: it seeds from the tenant plane and from a configured path, fails where
pollen is off or the certificate is not trusted, and a customer past its quota
is refused while another customer's pollinate still succeeds. The operator
plane's status page shares ``/`` with pollen.

pollinate is run as in the systemd unit but in testing mode (``-t``): it
writes its 64 seed bytes (binary: Debian's ``/etc/default/pollinate`` sets
``BINARY=1``) to stdout, needs no root and leaves no flag file. It reports
through syslog only, so a test reads its verdict from the exit status: 0
seeded; 1 a failed challenge (any non-pollen answer, a refusal included,
whether ``--strict`` or not) or, under ``--strict``, a failed connection.
"""

import asyncio
import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest

from tests.helpers import DEADLINE
from tests.integration.clients import BrokerHttp, metric_value, poll_until
from tests.integration.daemon import Daemon, default_config, start_daemon
from tests.tls_ca import TestCA

pytestmark = pytest.mark.needs_tool("pollinate")

GREEDY_IP = "127.0.0.2"
VICTIM_IP = "127.0.0.3"
GREEDY_QUOTA = 256
"""Four pollinate runs of 64 bytes each."""


@dataclass(frozen=True, slots=True)
class Run:
    """
    One pollinate run: exit status and what it wrote.
    """

    returncode: int
    stdout: bytes
    stderr: bytes


async def pollinate(server: str, *options: str, strict: bool = True) -> Run:
    """
    ``pollinate -t [--strict] -w 5 -s SERVER OPTIONS...``.
    """
    args = ["-t", *(["--strict"] if strict else []), "-w", "5", "-s", server]
    process = await asyncio.create_subprocess_exec(
        "pollinate",
        *args,
        *options,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        async with asyncio.timeout(DEADLINE):
            stdout, stderr = await process.communicate()
    except TimeoutError:
        process.kill()
        await process.wait()
        raise
    assert process.returncode is not None
    return Run(process.returncode, stdout, stderr)


def from_address(ip: str) -> str:
    """
    pollinate's option that makes curl connect from ``ip``: one customer's host.
    """
    return f"--interface {ip}"


def config(state_dir: Path, ca: TestCA) -> str:
    server = ca.server_cert()
    sinks = f"""
        [[sinks]]
        name = "pollen"
        kind = "http"
        plane = "tenant"
        pollen = true
        listen = ["tcp://127.0.0.1:0"]

        [[sinks]]
        name = "pollen_operator"
        kind = "http"
        plane = "operator"
        pollen = true
        listen = ["tcp://127.0.0.1:0"]

        [[sinks]]
        name = "seed"
        kind = "http"
        plane = "tenant"
        pollen = true
        pollen_path = "/entropy/seed"
        listen = ["tcp://127.0.0.1:0"]

        [[sinks]]
        name = "pollen_tls"
        kind = "http"
        plane = "tenant"
        pollen = true
        listen = ["tcp://127.0.0.1:0"]
        tls_cert = "{server.cert}"
        tls_key = "{server.key}"

        [[customers]]
        id = "greedy"
        networks = ["{GREEDY_IP}/32"]
        quota = "{GREEDY_QUOTA} B/week"

        [[customers]]
        id = "victim"
        networks = ["{VICTIM_IP}/32"]
        """
    return default_config(state_dir, extra=sinks)


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> TestCA:
    return TestCA(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory, ca: TestCA) -> Iterator[Daemon]:
    """
    One broker for the module: pollinate only asks, and each test that counts
    does so by its own customer or by differences.
    """
    tmp_path = tmp_path_factory.mktemp("broker")
    running = start_daemon(tmp_path, config(tmp_path / "state", ca))
    try:
        yield running
    finally:
        if running.process.poll() is None:
            running.process.kill()
            running.process.wait()


def url(daemon: Daemon, sink: str, path: str = "/", scheme: str = "http") -> str:
    return f"{scheme}://" + daemon.address(sink, "tcp://").removeprefix("tcp://") + path


@pytest.fixture
async def pool_ready(daemon: Daemon) -> None:
    """
    The pool holds enough for every request of a test, so that none waits.
    """
    async with BrokerHttp(daemon) as broker:
        await poll_until(broker.status, lambda status: status["pool"]["level"] >= 2048)


async def sink_counts(daemon: Daemon, sink: str) -> tuple[float, float]:
    """
    The sink's requests and output bytes, from the operator's metrics.
    """
    async with BrokerHttp(daemon) as broker:
        text = await broker.metrics()
    requests = metric_value(text, "ebroker_sink_requests_total", sink=sink)
    output = metric_value(text, "ebroker_sink_output_bytes_total", sink=sink)
    assert requests is not None
    assert output is not None
    return requests, output


@pytest.mark.usefixtures("pool_ready")
async def test_pollinate_seeds_from_the_tenant_plane(daemon: Daemon) -> None:
    """
    ``pollinate -t --strict -w 5 -s http://127.0.0.1:PORT/`` exits 0 and
    prints 64 bytes; two runs print different seeds; each run is one request
    and 64 bytes in the sink's metrics.
    """
    before = await sink_counts(daemon, "pollen")
    first = await pollinate(url(daemon, "pollen"))
    second = await pollinate(url(daemon, "pollen"))
    assert (0, 0) == (first.returncode, second.returncode), (first, second)
    assert (64, 64) == (len(first.stdout), len(second.stdout))
    assert first.stdout != second.stdout
    after = await sink_counts(daemon, "pollen")
    assert (2.0, 128.0) == (after[0] - before[0], after[1] - before[1])


@pytest.mark.usefixtures("pool_ready")
async def test_get_challenge_answers_like_pollen(daemon: Daemon) -> None:
    """
    ``GET /?challenge=`` (no pollinate, no curl) gets two lines: the
    challenge's SHA-512 and a fresh hash; without a challenge, pollen's 400.
    """
    target = url(daemon, "pollen")
    async with aiohttp.ClientSession() as session:
        answers = []
        for _ in range(2):
            async with session.get(target, params={"challenge": "a b"}) as response:
                assert 200 == response.status
                assert "text/plain; charset=utf-8" == response.headers["Content-Type"]
                answers.append((await response.text()).split("\n"))
        async with session.post(target) as response:
            assert 400 == response.status
            assert (await response.text()).startswith("Please use the pollinate")
    expected = hashlib.sha512(b"a b").hexdigest()
    assert [expected, expected] == [answer[0] for answer in answers]
    assert answers[0][1] != answers[1][1]
    assert all(128 == len(answer[1]) and "" == answer[2] for answer in answers)


@pytest.mark.usefixtures("pool_ready")
async def test_customer_past_quota_is_refused_another_still_seeds(
    daemon: Daemon,
) -> None:
    """
    A customer's pollinate seeds until its quota is spent, then fails as a
    failed challenge (exit 1 even without ``--strict``: the 403 came back,
    it is no network failure); another customer's pollinate still succeeds.
    """
    target = url(daemon, "pollen")
    greedy = from_address(GREEDY_IP)
    for _ in range(GREEDY_QUOTA // 64):
        seeded = await pollinate(target, "-c", greedy)
        assert 0 == seeded.returncode, seeded
    refused = await pollinate(target, "-c", greedy)
    assert 1 == refused.returncode
    assert b"" == refused.stdout
    assert 1 == (await pollinate(target, "-c", greedy, strict=False)).returncode
    victim = await pollinate(target, "-c", from_address(VICTIM_IP))
    assert 0 == victim.returncode, victim
    assert 64 == len(victim.stdout)
    async with BrokerHttp(daemon) as broker:
        status = await broker.status()
    customers = status["accounts"]["customers"]
    assert 0 == customers["greedy"]["quota"]["remaining"]
    assert 64 == customers["victim"]["bytes_served"]


async def test_pollen_off_fails_pollinate(daemon: Daemon) -> None:
    """
    On a sink without pollen, pollinate's POST gets a 404 it cannot verify:
    exit 1 under ``--strict``.
    """
    run = await pollinate(url(daemon, "http"))
    assert 1 == run.returncode
    assert b"" == run.stdout


@pytest.mark.usefixtures("pool_ready")
async def test_pollen_on_a_configured_path(daemon: Daemon) -> None:
    """
    With ``pollen_path`` pollinate seeds from that path; ``/`` is not pollen.
    """
    seeded = await pollinate(url(daemon, "seed", "/entropy/seed"))
    assert 0 == seeded.returncode, seeded
    assert 64 == len(seeded.stdout)
    assert 1 == (await pollinate(url(daemon, "seed", "/"))).returncode


@pytest.mark.usefixtures("pool_ready")
async def test_operator_plane_serves_page_and_pollen_at_root(daemon: Daemon) -> None:
    """
    On the operator plane ``GET /`` is still the status page while pollinate
    seeds from the same ``/``; the tenant plane hides the page.
    """
    async with aiohttp.ClientSession() as session:
        async with session.get(url(daemon, "pollen_operator")) as response:
            assert 200 == response.status
            assert "text/html" == response.content_type
            assert "<title>ebroker status</title>" in await response.text()
        async with session.get(url(daemon, "pollen")) as response:
            assert 404 == response.status
    seeded = await pollinate(url(daemon, "pollen_operator"))
    assert 0 == seeded.returncode, seeded


@pytest.mark.usefixtures("pool_ready")
async def test_pollinate_over_tls_with_the_ca(daemon: Daemon, ca: TestCA) -> None:
    """
    Over HTTPS pollinate seeds when given the CA (``--capath /dev/null`` as its
    pinned default does), and fails without it or with ``-i`` absent.
    """
    target = url(daemon, "pollen_tls", scheme="https")
    options = f"--cacert {ca.ca_path} --capath /dev/null"
    seeded = await pollinate(target, "-c", options)
    assert 0 == seeded.returncode, seeded
    assert 64 == len(seeded.stdout)
    untrusted = await pollinate(target, "-c", "--capath /dev/null")
    assert 1 == untrusted.returncode
    assert b"" == untrusted.stdout
    # Without --strict a verification failure is a network failure: not fatal.
    assert 0 == (await pollinate(target, strict=False)).returncode
    assert 0 == (await pollinate(target, "-i")).returncode


async def test_plain_http_to_the_tls_port_fails(daemon: Daemon) -> None:
    """
    pollinate pointed at the HTTPS port with ``http://`` gets no answer.
    """
    run = await pollinate(url(daemon, "pollen_tls"))
    assert 1 == run.returncode
