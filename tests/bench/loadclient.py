"""
The compiled EGD load client (``egdload/*.c``): building it, and running it.

It is C with epoll so that the client is not what limits a figure; every run
reports the client's own CPU time next to the result. The binary is built with
``cc -O2`` into a cache directory keyed by the sources, once per change.
"""

import hashlib
import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .processes import Child, Finished

SOURCES = Path(__file__).with_name("egdload")
CFLAGS = ("-O2", "-Wall", "-Wextra")


def build() -> tuple[Path | None, str]:
    """
    Compile ``egdload/*.c`` into a cache directory keyed by the sources.

    Returns:
        The executable, or None and why it could not be built.
    """
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        return None, "no C compiler (cc or gcc) on PATH to build tests/bench/egdload"
    files = sorted([*SOURCES.glob("*.c"), *SOURCES.glob("*.h")])
    digest = hashlib.sha256(" ".join(CFLAGS).encode())
    for path in files:
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    name = f"egdload-{digest.hexdigest()[:16]}"
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    for directory in (cache / "ebroker-bench", Path(tempfile.gettempdir())):
        exe = directory / name
        if exe.exists():
            return exe, ""
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError:
            continue
        partial = directory / f".{name}.{os.getpid()}"
        sources = [str(path) for path in files if path.suffix == ".c"]
        result = subprocess.run(
            [cc, *CFLAGS, "-o", str(partial), *sources],
            capture_output=True,
            text=True,
            check=False,
        )
        if result.returncode != 0:
            partial.unlink(missing_ok=True)
            return None, f"{cc} failed on egdload: {result.stderr.strip()}"
        partial.replace(exe)
        return exe, ""
    return None, "no writable cache or temp directory for the egdload binary"


def command(exe: Path, mode: str, port: int, *args: str) -> list[str]:
    return [str(exe), mode, "-p", str(port), *args]


def result(finished: Finished) -> dict[str, Any]:
    """
    The JSON line a finished run printed last, with ``client_cpu`` (from
    wait4) and ``client_wall`` added.

    Raises:
        RuntimeError: the client failed or printed no result.
    """
    lines = finished.stdout.strip().splitlines()
    if finished.returncode != 0 or not lines or not lines[-1].startswith("{"):
        raise RuntimeError(
            f"egdload exited {finished.returncode}: {finished.stderr.strip()}"
        )
    parsed: dict[str, Any] = json.loads(lines[-1])
    parsed["client_cpu"] = finished.cpu
    parsed["client_wall"] = finished.wall
    return parsed


def run(
    exe: Path, mode: str, port: int, args: Sequence[str], timeout: float
) -> dict[str, Any]:
    """
    Run one load to the end and return its result.
    """
    with Child(command(exe, mode, port, *args), timeout) as child:
        return result(child.finish())


def expect(child: Child, word: str) -> str:
    """
    Read the child's next progress line, which must start with ``word``.

    Raises:
        RuntimeError: the child said something else or ended.
    """
    line = child.readline()
    if not line.startswith(word):
        child.fail(f"egdload said {line!r}, not {word!r}")
    return line
