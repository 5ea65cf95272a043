"""
The daemon's life: start, clean shutdown on signals, CLI errors without tracebacks.
"""

import asyncio
import hashlib
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from broker.cli import main
from sources.entropykey.sim.keypairs import new_key_pair, write_keyring
from tests.helpers import DEADLINE, wait_until
from tests.integration.clients import BrokerHttp, poll_until
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


def check_config(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], sources: str
) -> tuple[int, list[str]]:
    """
    Run ``ebroker check-config`` in-process on a config with ``sources``;
    return the exit status and the lines it wrote to stderr.
    """
    path = tmp_path / "check.toml"
    path.write_text(default_config(tmp_path / "state", sources))
    status = main(["check-config", str(path)])
    return status, capsys.readouterr().err.splitlines()


def key_entry(keyring: Path, serial: str = "*", transport: str = "usb") -> str:
    return f"""
        [[sources]]
        name = "ekeys"
        kind = "entropykey"
        serial = "{serial}"
        transport = "{transport}"
        keyring = "{keyring}"
        """


def test_check_config_refuses_a_keyring_others_can_read(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """
    A keyring with mode 0644 is refused as the driver would refuse it: one line
    with the key path and the fix, exit 1.
    """
    keyring = tmp_path / "keyring"
    write_keyring(keyring, [new_key_pair()])
    keyring.chmod(0o644)
    status, lines = check_config(tmp_path, capsys, key_entry(keyring))
    assert 1 == status
    assert [
        f"sources[0].keyring: {keyring} is accessible to others (mode 0644); "
        "it holds secret keys: chmod 600 it"
    ] == lines


def test_check_config_refuses_a_keyring_another_user_owns(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """
    A mode-0600 keyring owned by someone other than the user checking is
    refused (run as a pretended other uid, so it holds as root too).
    """
    keyring = tmp_path / "keyring"
    write_keyring(keyring, [new_key_pair()])
    owner = os.stat(keyring).st_uid
    monkeypatch.setattr(os, "geteuid", lambda: owner + 1)
    status, lines = check_config(tmp_path, capsys, key_entry(keyring))
    assert 1 == status
    assert [
        f"sources[0].keyring: {keyring} is owned by uid {owner}, not by uid "
        f"{owner + 1} that runs the broker: chown it"
    ] == lines


def test_check_config_keyring_notes_and_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """
    A missing keyring is an error for real keys and a note for a simulated
    wildcard entry (the broker waits for keys); a named key the keyring lacks
    is an error.
    """
    keyring = tmp_path / "keyring"
    status, lines = check_config(tmp_path, capsys, key_entry(keyring))
    assert 1 == status
    assert [
        f"sources[0].keyring: {keyring} does not exist; add each key with "
        "`ebroker rekey`"
    ] == lines
    status, lines = check_config(
        tmp_path, capsys, key_entry(keyring, transport="simulated")
    )
    assert 0 == status
    assert [
        f"note: sources[0].keyring: {keyring} does not exist yet; no keys until it does"
    ] == lines
    write_keyring(keyring, [new_key_pair()])
    serial = new_key_pair().serial_text
    status, lines = check_config(tmp_path, capsys, key_entry(keyring, serial))
    assert 1 == status
    assert [
        f"sources[0].keyring: {keyring} has no key for {serial}; add it with "
        "`ebroker rekey`"
    ] == lines


def device_entry(path: Path, optional: bool) -> str:
    return f"""
        [[sources]]
        name = "getrandom"
        kind = "getrandom"
        priority = 1

        [[sources]]
        name = "hwrng"
        kind = "hwrng"
        path = "{path}"
        optional = {str(optional).lower()}
        """


def test_check_config_device_paths(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """
    An absent optional device is a note (exit 0); absent and required, or
    present but unreadable by this user, it is an error naming the path.
    """
    absent = tmp_path / "no-hwrng"
    status, lines = check_config(tmp_path, capsys, device_entry(absent, True))
    assert 0 == status
    assert [
        f"note: sources[1].path: no such device {absent}; optional, so the "
        "broker skips it"
    ] == lines
    status, lines = check_config(tmp_path, capsys, device_entry(absent, False))
    assert 1 == status
    assert [f"sources[1].path: no such device {absent}"] == lines

    present = tmp_path / "hwrng"
    present.write_bytes(b"")
    status, lines = check_config(tmp_path, capsys, device_entry(present, True))
    assert (0, []) == (status, lines)
    # Root reads a mode-000 file all the same, so the refusal is pretended.
    real_access = os.access
    monkeypatch.setattr(
        os,
        "access",
        lambda path, mode: Path(path) != present and real_access(path, mode),
    )
    status, lines = check_config(tmp_path, capsys, device_entry(present, True))
    assert 1 == status
    assert [
        f"sources[1].path: {present} is not readable by uid {os.geteuid()} "
        "(permission denied)"
    ] == lines


def test_check_config_record_raw_and_state_dir(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """
    A record_raw file whose directory is missing passes (the broker creates
    it, owner-only); one behind a file, and a state_dir that cannot be created
    (a file is in the way), are errors with their key paths.
    """
    sources = f"""
        [[sources]]
        name = "getrandom"
        kind = "getrandom"
        record_raw = "{tmp_path / "missing" / "raw.bin"}"
        """
    status, lines = check_config(tmp_path, capsys, sources)
    assert 0 == status
    assert [] == [line for line in lines if "record_raw" in line]

    in_the_way = tmp_path / "plain-file"
    in_the_way.write_text("")
    sources = f"""
        [[sources]]
        name = "getrandom"
        kind = "getrandom"
        record_raw = "{in_the_way / "raw.bin"}"
        """
    status, lines = check_config(tmp_path, capsys, sources)
    assert 1 == status
    assert [
        f"sources[0].record_raw: cannot create {in_the_way / 'raw.bin'}: "
        f"{in_the_way} is not a directory"
    ] == lines

    blocker = tmp_path / "file"
    blocker.write_text("")
    path = tmp_path / "check.toml"
    path.write_text(default_config(blocker / "state"))
    assert 1 == main(["check-config", str(path)])
    assert [f"broker.state_dir: {blocker} is not a directory"] == (
        capsys.readouterr().err.splitlines()
    )


def test_status_names_the_configuration_in_force(tmp_path: Path) -> None:
    """
    /v1/status carries the digest of the configuration file and when it was
    loaded; an accepted reload moves both, so an operator can tell which
    brokers of a fleet run which file.
    """
    config = default_config(tmp_path / "state")
    daemon = start_daemon(tmp_path, config)
    config_path = tmp_path / "ebroker.toml"

    async def config_status() -> dict[str, Any]:
        async with BrokerHttp(daemon) as http:
            status = await http.status()
        document: dict[str, Any] = status["config"]
        return document

    try:
        first = asyncio.run(config_status())
        assert hashlib.sha256(config_path.read_bytes()).hexdigest() == first["sha256"]
        assert str(config_path) == first["path"]
        config_path.write_text(
            config + '\n[[customers]]\nid = "acme"\nnetworks = ["127.0.0.9/32"]\n'
        )
        daemon.process.send_signal(signal.SIGHUP)
        digest = hashlib.sha256(config_path.read_bytes()).hexdigest()
        second = asyncio.run(
            poll_until(config_status, lambda status: status["sha256"] == digest)
        )
    finally:
        daemon.stop()
    assert second["loaded_at"] > first["loaded_at"]


def _egd_unix_read(path: str, count: int) -> bytes:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
        client.settimeout(DEADLINE)
        client.connect(path)
        client.sendall(bytes([2, count]))
        reply = b""
        while len(reply) < count:
            chunk = client.recv(count - len(reply))
            if not chunk:
                break
            reply += chunk
        return reply


def test_second_broker_on_the_same_state_dir_refuses_to_start(tmp_path: Path) -> None:
    """
    A second broker started on a state directory a live broker owns refuses
    with one line naming the directory and the owner, and takes nothing from
    it: the first keeps its pid file and keeps serving its Unix socket.
    """
    daemon = start_daemon(tmp_path, default_config(tmp_path / "state"))
    try:
        result = run_cli("serve", "--config", str(tmp_path / "ebroker.toml"))
        owner = (daemon.state_dir / "ebroker.pid").read_text().strip()
        served = _egd_unix_read(daemon.egd_unix, 8)
    finally:
        daemon.stop()
    assert (1, False) == (result.returncode, "Traceback" in result.stderr)
    assert (
        f"state_dir {daemon.state_dir} is in use by a running broker "
        f"(pid {daemon.process.pid})"
    ) in result.stderr
    assert (str(daemon.process.pid), 8) == (owner, len(served))


def test_reload_says_whether_the_broker_took_the_file(tmp_path: Path) -> None:
    """
    `ebroker reload` exits 0 when the broker applied the file and 1, with
    the broker's reason, when it refused it.
    """
    daemon = start_daemon(tmp_path, default_config(tmp_path / "state"))
    config = tmp_path / "ebroker.toml"
    try:
        took = run_cli("reload", "--state-dir", str(daemon.state_dir))
        config.write_text(
            config.read_text()
            + '\n[[customers]]\nid = "acme"\nnetworks = ["not-an-address"]\n'
        )
        refused = run_cli("reload", "--state-dir", str(daemon.state_dir))
    finally:
        daemon.stop()
    assert (0, f"reloaded (pid {daemon.process.pid})") == (
        took.returncode,
        took.stdout.strip(),
    )
    assert 1 == refused.returncode
    assert "reload refused" in refused.stderr
    assert "not-an-address" in refused.stderr


def test_reload_never_signals_a_pid_that_does_not_own_the_state_dir(
    tmp_path: Path,
) -> None:
    """
    A pid file left behind names a pid that may now be any other process:
    `ebroker reload` leaves it alone and says no broker holds the directory.
    """
    state = tmp_path / "state"
    state.mkdir()
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (state / "ebroker.pid").write_text(f"{bystander.pid}\n")
        result = run_cli("reload", "--state-dir", str(state))
        alive = bystander.poll() is None
    finally:
        bystander.kill()
        bystander.wait()
    assert (1, True) == (result.returncode, alive)
    assert f"no running broker holds {state}" in result.stderr


def test_a_live_unix_socket_is_never_taken_over(tmp_path: Path) -> None:
    """
    A broker configured with another broker's Unix socket path (a copied
    config, another state_dir) refuses to start instead of unlinking the live
    socket, which goes on serving new clients.
    """
    daemon = start_daemon(tmp_path, default_config(tmp_path / "state"))
    config = tmp_path / "second.toml"
    try:
        config.write_text(
            default_config(tmp_path / "second").replace(
                '"unix:egd.sock"', f'"unix:{daemon.egd_unix}"', 1
            )
        )
        result = run_cli("serve", "--config", str(config))
        served = _egd_unix_read(daemon.egd_unix, 8)
    finally:
        daemon.stop()
    assert (1, False) == (result.returncode, "Traceback" in result.stderr)
    assert "live socket of a running broker" in result.stderr
    assert 8 == len(served)
