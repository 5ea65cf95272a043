"""
Errors about the broker's files name the path and the fix: the state
directory, the pid file, the configuration file.

Root may write anywhere, so the real permission errors are provoked in a
child that runs as root without CAP_DAC_OVERRIDE (``setpriv``), where a
directory's mode bits bind root as they bind anyone.
"""

import errno
import os
import pwd
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from broker.errors import BrokerError
from broker.ownership import file_problem, prepare_state_dir
from tests.integration.daemon import REPO, default_config

ME = pwd.getpwuid(os.geteuid()).pw_name

needs_setpriv = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("setpriv") is None,
    reason="needs root and setpriv to drop CAP_DAC_OVERRIDE",
)


def denied() -> PermissionError:
    return PermissionError(errno.EACCES, os.strerror(errno.EACCES))


def test_state_dir_under_a_file(tmp_path: Path) -> None:
    """
    A state_dir whose parent is a file: the path, why, and what to do.
    """
    (tmp_path / "file").write_text("")
    state_dir = tmp_path / "file" / "state"
    with pytest.raises(BrokerError) as caught:
        prepare_state_dir(state_dir)
    assert (
        f"cannot start: state_dir {state_dir}: not a directory (a part of "
        f"{state_dir} is a file, not a directory: choose another path)"
    ) == str(caught.value)


def test_state_dir_that_is_a_file(tmp_path: Path) -> None:
    """
    A state_dir that exists as a file is refused, naming it.
    """
    state_dir = tmp_path / "state"
    state_dir.write_text("")
    with pytest.raises(BrokerError, match=f"state_dir {state_dir}: file exists"):
        prepare_state_dir(state_dir)


def test_state_dir_is_created(tmp_path: Path) -> None:
    """
    A missing state_dir is created with its parents.
    """
    prepare_state_dir(tmp_path / "a" / "b")
    assert (tmp_path / "a" / "b").is_dir()


@pytest.mark.skipif(os.geteuid() != 0, reason="chown needs root")
def test_denied_on_a_directory_someone_else_owns(tmp_path: Path) -> None:
    """
    Owned by another user: run as that user, or chown it to this one.
    """
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    nobody = pwd.getpwnam("nobody")
    os.chown(state_dir, nobody.pw_uid, nobody.pw_gid)
    assert (
        f"state_dir {state_dir}: permission denied (run as the user that owns "
        f"it (nobody), or chown -R {ME} {state_dir})"
    ) == file_problem(denied(), state_dir, "state_dir")


def test_denied_creating_a_directory(tmp_path: Path) -> None:
    """
    A state_dir that cannot be created: create it for this user.
    """
    state_dir = tmp_path / "missing" / "state"
    assert (
        f"state_dir {state_dir}: permission denied (create it as a user that "
        f"may: sudo install -d -o {ME} {state_dir})"
    ) == file_problem(denied(), state_dir, "state_dir")


def test_pid_file_names_its_directory(tmp_path: Path) -> None:
    """
    A pid file that cannot be created points at the state_dir's mode.
    """
    assert (
        f"pid file {tmp_path / 'ebroker.pid'}: permission denied (its owner may "
        f"not write it: chmod u+rwx {tmp_path})"
    ) == file_problem(denied(), tmp_path / "ebroker.pid", "pid file", tmp_path)


def serve_without_dac_override(config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            "setpriv",
            "--bounding-set=-dac_override,-dac_read_search",
            sys.executable,
            "-m",
            "broker.cli",
            "serve",
            "--config",
            str(config),
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
        check=False,
    )


@needs_setpriv
def test_serve_names_a_state_dir_it_may_not_write(tmp_path: Path) -> None:
    """
    ``ebroker serve`` with a state_dir it may not write: exit 1, one line
    naming the state_dir and the fix, no traceback.
    """
    state_dir = tmp_path / "state"
    state_dir.mkdir(mode=0o500)
    config = tmp_path / "ebroker.toml"
    config.write_text(default_config(state_dir))
    try:
        result = serve_without_dac_override(config)
    finally:
        state_dir.chmod(0o700)
    assert 1 == result.returncode
    assert (
        f"ebroker: cannot start: state_dir {state_dir}: permission denied (its "
        f"owner may not write it: chmod u+rwx {state_dir})\n"
    ) == result.stderr


@needs_setpriv
def test_serve_names_a_config_it_may_not_read(tmp_path: Path) -> None:
    """
    An unreadable configuration file is named, with the fix, not reported as
    an invalid configuration.
    """
    config = tmp_path / "ebroker.toml"
    config.write_text(default_config(tmp_path / "state"))
    config.chmod(0)
    result = serve_without_dac_override(config)
    assert 1 == result.returncode
    assert (
        f"ebroker: cannot start: config file {config}: permission denied (its "
        f"owner may not read it: chmod u+r {config})\n"
    ) == result.stderr
