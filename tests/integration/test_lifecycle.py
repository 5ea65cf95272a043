"""
The daemon's life: start, clean shutdown on signals, CLI errors without tracebacks.
"""

import signal
import subprocess
import sys
from pathlib import Path

from tests.helpers import wait_until
from tests.integration.daemon import REPO, Daemon, default_config, start_daemon


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "broker.cli", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_sigterm_shuts_down_cleanly(daemon: Daemon) -> None:
    """
    SIGTERM stops the broker with status 0 and removes its Unix socket and
    runtime files.
    """
    socket_path = Path(daemon.egd_unix)
    assert socket_path.exists()
    assert 0 == daemon.stop(signal.SIGTERM)
    assert not socket_path.exists()
    assert not (daemon.state_dir / "listeners.json").exists()
    events = [entry.get("event") for entry in daemon.logs()]
    assert "broker_stopped" in events
    assert not any("Traceback" in str(entry) for entry in daemon.logs())


def test_sigint_shuts_down_cleanly(daemon: Daemon) -> None:
    """
    Ctrl-C (SIGINT) is a clean stop too.
    """
    assert 0 == daemon.stop(signal.SIGINT)


def test_check_config_accepts_good_and_refuses_bad(tmp_path: Path) -> None:
    """
    check-config exits 0 for a valid file and 1 with key-path reasons otherwise.
    """
    good = tmp_path / "good.toml"
    good.write_text(default_config(tmp_path))
    result = run_cli("check-config", str(good))
    assert 0 == result.returncode, result.stderr
    assert "ok" in result.stdout
    bad = tmp_path / "bad.toml"
    bad.write_text(
        default_config(tmp_path).replace('kind = "getrandom"', 'kind = "magic"')
    )
    result = run_cli("check-config", str(bad))
    assert 1 == result.returncode
    assert "sources[0]: unknown kind 'magic'" in result.stderr
    assert "Traceback" not in result.stderr


def test_version() -> None:
    """
    --version prints the program name and version.
    """
    result = run_cli("--version")
    assert 0 == result.returncode
    assert result.stdout.startswith("ebroker ")


def test_serve_with_bad_config_is_one_clear_error(tmp_path: Path) -> None:
    """
    serve refuses an invalid or missing file without a traceback.
    """
    result = run_cli("serve", "--config", str(tmp_path / "missing.toml"))
    assert 1 == result.returncode
    assert "no such file" in result.stderr
    assert "Traceback" not in result.stderr


def test_port_in_use_is_one_clear_error(daemon: Daemon, tmp_path: Path) -> None:
    """
    A second broker on a port already taken fails with one line, not a traceback.
    """
    host, port = daemon.egd_tcp
    config = tmp_path / "second.toml"
    config.write_text(
        default_config(tmp_path / "second").replace(
            "tcp://127.0.0.1:0", f"tcp://{host}:{port}", 1
        )
    )
    result = run_cli("serve", "--config", str(config))
    assert 1 == result.returncode
    assert "Traceback" not in result.stderr
    assert "in use" in result.stderr.lower()
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("ebroker: ")


def test_optional_hwrng_absent_still_serves(tmp_path: Path) -> None:
    """
    The default layout (optional hwrng first, getrandom fallback) serves on a
    machine without a hardware RNG and says hwrng was skipped.
    """
    sources = f"""
        [[sources]]
        name = "hwrng"
        kind = "hwrng"
        path = "{tmp_path / "no-hwrng"}"
        optional = true

        [[sources]]
        name = "getrandom"
        kind = "getrandom"
        priority = 1
        """
    daemon = start_daemon(tmp_path, default_config(tmp_path / "state", sources))
    try:
        wait_until(
            lambda: any(e.get("event") == "source_skipped" for e in daemon.logs())
        )
        skipped = [e for e in daemon.logs() if e.get("event") == "source_skipped"]
        assert "hwrng" == skipped[0]["source"]
    finally:
        assert 0 == daemon.stop()
