"""
Cold start: from spawning ``ebroker serve`` to the first EGD byte served and
to ``/healthz`` answering 200, next to the interpreter's own start-up and a
bare aiohttp process's start to its first 200.

The config is ``config/ebroker.toml`` itself with its three TCP ports moved to
free ones and its state directory to a temporary one: the hwrng source
(skipped when ``/dev/hwrng`` is absent), getrandom, EGD on TCP and a Unix
socket, both HTTP planes, info logging. From the spawn, one thread connects to
the EGD port and sends ``02 01`` until a byte comes back, another asks
``GET /healthz`` until it is 200; each retries 1 ms after a refusal.
Baselines: ``python -c pass`` and ``python -c "import broker.app"`` (spawn to
exit), and ``bare_http.py`` (spawn to the first 200 of
``GET /v1/entropy?bytes=32``). Net = a figure minus ``python -c pass``, the
part the interpreter does not account for. Each is measured `REPEATS` times;
medians are reported.
"""

import http.client
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tests.integration.daemon import REPO

from .baselines import read_port, spawn
from .common import REPEATS, Report, ratio, spread
from .processes import stop

DEFAULT_CONFIG = REPO / "config" / "ebroker.toml"
TIMEOUT = 60.0
RETRY = 0.001


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def _config(state_dir: Path, ports: list[int]) -> str:
    """
    ``config/ebroker.toml`` with free ports and ``state_dir``.

    Raises:
        RuntimeError: the shipped file no longer has what is replaced.
    """
    text = DEFAULT_CONFIG.read_text()
    swaps = {
        'state_dir = "var"': f'state_dir = "{state_dir}"',
        **{
            f"tcp://127.0.0.1:{old}": f"tcp://127.0.0.1:{new}"
            for old, new in zip((8888, 8889, 8890), ports, strict=True)
        },
    }
    for old, new in swaps.items():
        if text.count(old) != 1:
            raise RuntimeError(f"{DEFAULT_CONFIG}: expected {old!r} once")
        text = text.replace(old, new)
    return text


def _until(attempt: Callable[[float], bool], deadline: float) -> float:
    """
    Call ``attempt`` until it returns True; the time it did.

    Raises:
        TimeoutError: not by ``deadline``.
    """
    while time.monotonic() < deadline:
        try:
            if attempt(deadline - time.monotonic()):
                return time.monotonic()
        except OSError:
            # Not listening yet (refused) or closed on us: try again.
            pass
        time.sleep(RETRY)
    raise TimeoutError("no answer before the deadline")


def _egd_byte(port: int) -> Callable[[float], bool]:
    def attempt(timeout: float) -> bool:
        with socket.create_connection(("127.0.0.1", port), timeout) as sock:
            sock.sendall(b"\x02\x01")
            return len(sock.recv(1)) == 1

    return attempt


def _http_ok(port: int, path: str) -> Callable[[float], bool]:
    def attempt(timeout: float) -> bool:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
        try:
            connection.request("GET", path)
            return connection.getresponse().status == 200
        finally:
            connection.close()

    return attempt


def _ebroker_command(config: Path) -> list[str]:
    script = Path(sys.executable).with_name("ebroker")
    if script.exists():
        return [str(script), "serve", "--config", str(config)]
    return [sys.executable, "-m", "broker.cli", "serve", "--config", str(config)]


def _ebroker() -> tuple[float, float]:
    """
    Seconds from spawn to the first EGD byte, and to /healthz 200.
    """
    with tempfile.TemporaryDirectory() as directory:
        tmp = Path(directory)
        egd, tenant, operator = _free_ports(3)
        config = tmp / "ebroker.toml"
        config.write_text(_config(tmp / "state", [egd, tenant, operator]))
        with (tmp / "stderr.log").open("wb") as log, ThreadPoolExecutor(2) as pool:
            start = time.monotonic()
            process = subprocess.Popen(
                _ebroker_command(config), cwd=tmp, stdout=subprocess.DEVNULL, stderr=log
            )
            try:
                deadline = start + TIMEOUT
                byte = pool.submit(_until, _egd_byte(egd), deadline)
                healthy = pool.submit(_until, _http_ok(tenant, "/healthz"), deadline)
                return byte.result() - start, healthy.result() - start
            finally:
                stop(process)


def _bare_http() -> float:
    """
    Seconds from spawning the bare aiohttp server to its first 200.
    """
    start = time.monotonic()
    process = spawn("bare_http")
    try:
        port = read_port(process)
        ok = _until(_http_ok(port, "/v1/entropy?bytes=32"), start + TIMEOUT)
        return ok - start
    finally:
        stop(process)


def _python(*args: str) -> float:
    start = time.monotonic()
    subprocess.run([sys.executable, *args], cwd=REPO, check=True)
    return time.monotonic() - start


def run(seconds: float) -> Report:
    del seconds  # Each figure is one start-up, however long it takes.
    runs: dict[str, list[float]] = {}
    for _ in range(REPEATS):
        measured = {
            "python_pass": _python("-c", "pass"),
            "python_import_broker_app": _python("-c", "import broker.app"),
            "bare_http_first_200": _bare_http(),
        }
        measured["ebroker_first_egd_byte"], measured["ebroker_healthz_200"] = _ebroker()
        for key, value in measured.items():
            runs.setdefault(key, []).append(value)
    median = {key: statistics.median(values) for key, values in runs.items()}
    python = median["python_pass"]
    bare_net = median["bare_http_first_200"] - python
    texts = {
        "python_pass": "python -c pass (spawn to exit)",
        "python_import_broker_app": 'python -c "import broker.app" (spawn to exit)',
        "bare_http_first_200": "bare aiohttp: spawn to first 200",
        "ebroker_healthz_200": "ebroker serve: spawn to /healthz 200",
        "ebroker_first_egd_byte": "ebroker serve: spawn to first EGD byte",
    }
    lines = [
        f"Median of {REPEATS}; ms. Net = minus python -c pass. Config: "
        "config/ebroker.toml on free ports.",
        "",
        "| measurement | ms | runs (ms) | net ms | net vs bare aiohttp net |",
        "|---|---|---|---|---|",
    ]
    for key, text in texts.items():
        net = median[key] - python
        versus = "-" if key == "python_pass" else ratio(net, bare_net)
        lines.append(
            f"| {text} | {median[key] * 1e3:,.0f} | {spread(runs[key], 1e-3, 0)} "
            f"| {net * 1e3:,.0f} | {versus} |"
        )
    return Report(
        lines,
        {
            "runs_s": runs,
            "median_s": median,
            "net_s": {key: median[key] - python for key in median},
        },
    )
