"""
``make install-cli`` (which ``make run`` runs first) puts ``ebroker`` on PATH:
a symlink to the venv's script, in ``$PREFIX/bin`` as root and in
``~/.local/bin`` otherwise, and never replaces someone else's file silently.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.daemon import REPO

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="needs make")

VENV = Path(sys.prefix)
"""The venv running the tests: its ``bin/ebroker`` is what gets linked."""


def install_cli(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """
    Run ``make install-cli`` with HOME and PREFIX under ``tmp_path``, without
    rebuilding the venv, and a PATH that holds neither.
    """
    return subprocess.run(
        [
            "make",
            "--no-print-directory",
            "-C",
            str(REPO),
            "-o",
            str(VENV / ".installed"),
            "install-cli",
            f"VENV={VENV}",
            f"PREFIX={tmp_path / 'prefix'}",
            *args,
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "HOME": str(tmp_path / "home"), "PATH": "/usr/bin:/bin"},
        check=False,
        timeout=60,
    )


def cli_dir(tmp_path: Path) -> Path:
    if os.geteuid() == 0:
        return tmp_path / "prefix" / "bin"
    return tmp_path / "home" / ".local" / "bin"


def test_links_the_venv_script_and_says_how_to_reach_it(tmp_path: Path) -> None:
    """
    The link points at the venv's ``ebroker``; the output names it and, as
    the directory is not on PATH, the exact line to add.
    """
    result = install_cli(tmp_path)
    assert 0 == result.returncode, result.stderr
    link = cli_dir(tmp_path) / "ebroker"
    assert VENV / "bin" / "ebroker" == Path(os.readlink(link))
    assert f"linked {link}" in result.stdout
    assert f'export PATH="{cli_dir(tmp_path)}:$PATH"' in result.stdout


def test_a_new_shell_finds_ebroker(tmp_path: Path) -> None:
    """
    With the directory on PATH, ``ebroker`` runs from any directory.
    """
    assert 0 == install_cli(tmp_path).returncode
    shell = subprocess.run(
        ["/bin/sh", "-c", "cd / && ebroker --version"],
        capture_output=True,
        text=True,
        env={"PATH": f"{cli_dir(tmp_path)}:/usr/bin:/bin"},
        check=False,
        timeout=60,
    )
    assert 0 == shell.returncode, shell.stderr
    assert shell.stdout.startswith("ebroker ")


def test_running_again_keeps_the_link(tmp_path: Path) -> None:
    """
    A second run finds the link in place and says so.
    """
    assert 0 == install_cli(tmp_path).returncode
    again = install_cli(tmp_path)
    assert 0 == again.returncode
    assert "already links to" in again.stdout


def test_another_file_is_left_alone_unless_forced(tmp_path: Path) -> None:
    """
    A different ``ebroker`` already there is not replaced: make says so and
    how to replace it; FORCE=1 replaces it and says what it was.
    """
    directory = cli_dir(tmp_path)
    directory.mkdir(parents=True)
    other = directory / "ebroker"
    other.write_text("#!/bin/sh\necho packaged\n")
    kept = install_cli(tmp_path)
    assert 0 == kept.returncode
    assert "#!/bin/sh\necho packaged\n" == other.read_text()
    assert "left alone" in kept.stderr
    assert "FORCE=1" in kept.stderr
    forced = install_cli(tmp_path, "FORCE=1")
    assert 0 == forced.returncode
    assert other.is_symlink()
    assert "replacing" in forced.stdout


def test_cli_dir_picks_the_directory(tmp_path: Path) -> None:
    """
    CLI_DIR overrides the choice; a directory already on PATH gets no hint.
    """
    chosen = tmp_path / "bin"
    result = subprocess.run(
        [
            "make",
            "--no-print-directory",
            "-C",
            str(REPO),
            "-o",
            str(VENV / ".installed"),
            "install-cli",
            f"VENV={VENV}",
            f"CLI_DIR={chosen}",
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "PATH": f"{chosen}:/usr/bin:/bin"},
        check=False,
        timeout=60,
    )
    assert 0 == result.returncode, result.stderr
    assert (chosen / "ebroker").is_symlink()
    assert "not on your PATH" not in result.stdout
