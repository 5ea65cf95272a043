"""
Suite-wide rules: tests that run a system program need it on PATH.

Without the program the test is skipped with the command that installs it, and
the run ends with one line saying what to install. Under ``CI=true`` the same
test fails instead: CI must never pass by skipping.
"""

import pytest

from tests import system_tools


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "needs_tool(name, ...): the test runs these programs; it is skipped "
        "(failed under CI=true) when one is not on PATH",
    )


def tools_of(item: pytest.Item) -> list[str]:
    """
    The system programs ``item`` runs: from its markers and its fixtures.
    """
    tools = [tool for marker in item.iter_markers("needs_tool") for tool in marker.args]
    fixtures = getattr(item, "fixturenames", ())
    tools += [
        tool
        for fixture, tool in system_tools.FIXTURE_TOOLS.items()
        if fixture in fixtures
    ]
    return tools


def pytest_runtest_setup(item: pytest.Item) -> None:
    system_tools.require(tools_of(item))


def pytest_terminal_summary(
    terminalreporter: pytest.TerminalReporter, config: pytest.Config
) -> None:
    absent = system_tools.skipped_for
    if absent:
        terminalreporter.section("missing system packages", yellow=True)
        terminalreporter.line(
            f"tests that run {', '.join(sorted(absent))} were skipped; "
            f"install as root with: {system_tools.install_command(absent)} "
            "(make test does this itself when run as root)"
        )
