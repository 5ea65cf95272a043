"""
The system programs some tests run for real, and the Debian package of each.

One list serves both ends: the Makefile asks it which packages to install
before the suite runs (``python3 tests/system_tools.py missing``, standard
library only, so it works before the venv exists), and the suite's conftest
skips, or under ``CI=true`` fails, a test whose program is not on PATH.
"""

import os
import shutil
import sys
from collections.abc import Iterable

TOOL_PACKAGES: dict[str, str] = {
    "redis-server": "redis-server",
    "haproxy": "haproxy",
    "ekeyd-egd-linux": "ekeyd-egd-linux",
    "systemd-socket-activate": "systemd",
    "systemd-analyze": "systemd",
    "pollinate": "pollinate",
    "promtool": "prometheus",
    "chromium": "chromium",
    "chromedriver": "chromium-driver",
}
"""Program on PATH → Debian package that installs it."""

FIXTURE_TOOLS: dict[str, str] = {
    "redis_server": "redis-server",
}
"""A test that uses one of these fixtures runs that program (tests/redis_server.py
also checks at start, whatever the fixture is called)."""


def missing(tools: Iterable[str] = TOOL_PACKAGES) -> list[str]:
    """
    The programs among ``tools`` that are not on PATH.
    """
    return [tool for tool in tools if shutil.which(tool) is None]


def install_command(tools: Iterable[str]) -> str:
    """
    The command that installs ``tools``, as a root user types it.
    """
    packages = sorted({TOOL_PACKAGES[tool] for tool in tools})
    return "apt-get install -y " + " ".join(packages)


def in_ci() -> bool:
    """
    Whether this run is CI's, where a skipped test would hide a broken set-up.
    """
    return os.environ.get("CI", "").strip().lower() in {"1", "true", "yes"}


skipped_for: set[str] = set()
"""Programs whose absence skipped a test in this run (for the closing summary)."""


def require(tools: Iterable[str]) -> None:
    """
    Skip the calling test when one of ``tools`` is not on PATH, naming the
    command that installs it; under ``CI=true`` fail it instead.
    """
    absent = missing(tools)
    if not absent:
        return
    # Imported here: the Makefile runs this file with a bare python3.
    import pytest

    command = install_command(absent)
    if in_ci():
        pytest.fail(
            f"{', '.join(absent)} not on PATH under CI=true; install with: {command}",
            pytrace=False,
        )
    skipped_for.update(absent)
    pytest.skip(f"{', '.join(absent)} not on PATH; install with: {command}")


def main(argv: list[str]) -> int:
    if argv[1:] != ["missing"]:
        print("usage: system_tools.py missing", file=sys.stderr)
        return 2
    packages = sorted({TOOL_PACKAGES[tool] for tool in missing()})
    if packages:
        print(" ".join(packages))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
