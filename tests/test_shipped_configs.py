"""
Configs we ship for other programs are accepted by those programs.
"""

import subprocess
from pathlib import Path

import pytest

CONFIG_DIR = Path(__file__).parents[1] / "config"


@pytest.mark.needs_tool("haproxy")
def test_haproxy_example_is_valid() -> None:
    """
    haproxy itself accepts the example load-balancer configuration.
    """
    result = subprocess.run(
        ["haproxy", "-c", "-f", str(CONFIG_DIR / "haproxy.cfg")],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert 0 == result.returncode, result.stdout + result.stderr
