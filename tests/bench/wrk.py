"""
wrk, the HTTP load generator (Debian package ``wrk``): running it with
keep-alive connections and reading its report.

Its CPU time comes from ``wait4`` (`processes.Child`), so the report can show
whether the load generator, not the server, was the limit.
"""

import re
import shutil

from .processes import Child

THREADS = 2
CONNECTIONS = 16
TIMEOUT = "10s"
"""Per-request timeout: above the longest ``wait=`` a scenario asks for."""

_UNITS_S = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_UNITS_B = {"B": 1, "KB": 1024, "MB": 1024**2, "GB": 1024**3, "TB": 1024**4}
_TOTAL = re.compile(r"(\d+) requests in ([\d.]+)(us|ms|s|m|h), ([\d.]+)([KMGT]?B) read")
_RATE = re.compile(r"Requests/sec:\s+([\d.]+)")
_NON_2XX = re.compile(r"Non-2xx or 3xx responses:\s+(\d+)")
_SOCKET = re.compile(
    r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)"
)
_PERCENTILE = re.compile(r"^\s+(50|75|90|99)%\s+([\d.]+)(us|ms|s|m|h)\s*$", re.M)


def find() -> str | None:
    return shutil.which("wrk")


def run(
    exe: str, url: str, seconds: float, connections: int = CONNECTIONS
) -> dict[str, float]:
    """
    Load ``url`` for ``seconds`` (whole seconds, at least one, as wrk takes
    them) and return what wrk measured.

    Returns:
        ``req_s`` (every response), ``ok`` and ``non_2xx`` responses,
        ``socket_errors``, ``transfer_mb_s`` (wrk's count: headers and bodies),
        ``p50_ms`` .. ``p99_ms``, ``seconds`` (wrk's own), ``client_cores``,
        and wrk's ``cpu`` seconds and ``wall`` seconds from spawn to exit.

    Raises:
        RuntimeError: wrk failed or its report could not be read.
    """
    duration = max(1, round(seconds))
    args = [exe, f"-t{THREADS}", f"-c{connections}", f"-d{duration}s"]
    args += ["--latency", "--timeout", TIMEOUT, url]
    with Child(args, timeout=duration + 60) as child:
        finished = child.finish()
    text = finished.stdout
    total, rate = _TOTAL.search(text), _RATE.search(text)
    if finished.returncode != 0 or total is None or rate is None:
        raise RuntimeError(
            f"wrk exited {finished.returncode}: {text.strip()} {finished.stderr}"
        )
    elapsed = float(total[2]) * _UNITS_S[total[3]]
    requests = int(total[1])
    non_2xx = int(m[1]) if (m := _NON_2XX.search(text)) else 0
    socket = _SOCKET.search(text)
    read_bytes = float(total[4]) * _UNITS_B[total[5]]
    result = {
        "req_s": float(rate[1]),
        "requests": requests,
        "ok": requests - non_2xx,
        "non_2xx": non_2xx,
        "socket_errors": sum(int(n) for n in socket.groups()) if socket else 0,
        "transfer_mb_s": read_bytes / elapsed / 1e6,
        "seconds": elapsed,
        "client_cores": finished.cpu / finished.wall,
        "cpu": finished.cpu,
        "wall": finished.wall,
    }
    for percentile, value, unit in _PERCENTILE.findall(text):
        result[f"p{percentile}_ms"] = float(value) * _UNITS_S[unit] * 1e3
    return result
