"""
A test that needs a missing system program says how to install it, and CI
never passes by skipping it.
"""

import pytest

from tests import system_tools


def test_install_command_names_the_debian_packages() -> None:
    """
    The skip reason carries the exact command that installs what is missing.
    """
    command = system_tools.install_command(["redis-server", "haproxy"])
    assert "apt-get install -y haproxy redis-server" == command


def test_missing_program_skips_outside_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    """
    Without the program on PATH, a developer's run skips the test with the
    install command and remembers it for the closing summary.
    """
    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.delenv("CI", raising=False)
    monkeypatch.setattr(system_tools, "skipped_for", set())
    with pytest.raises(pytest.skip.Exception, match="apt-get install -y haproxy"):
        system_tools.require(["haproxy"])
    assert {"haproxy"} == system_tools.skipped_for


def test_missing_program_fails_under_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    """
    Under CI=true the same absence is a failure, not a skip.
    """
    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="under CI=true"):
        system_tools.require(["redis-server"])


def test_present_program_lets_the_test_run(monkeypatch: pytest.MonkeyPatch) -> None:
    """
    Nothing happens when every program is there.
    """
    monkeypatch.setattr(system_tools, "missing", lambda tools: [])
    system_tools.require(["haproxy"])
