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


def test_haproxy_example_names_each_client_to_the_brokers() -> None:
    """
    Every broker server in the example gets a PROXY v2 header naming the VM,
    and its health checks one too (``check-send-proxy``: v2 LOCAL): a broker
    refuses a trusted proxy's connection that starts without a header.
    """
    servers = [
        line.split()
        for line in (CONFIG_DIR / "haproxy.cfg").read_text().splitlines()
        if line.split()[:1] == ["server"]
    ]
    assert servers
    for server in servers:
        assert "send-proxy-v2" in server, server
        assert "check-send-proxy" in server, server
