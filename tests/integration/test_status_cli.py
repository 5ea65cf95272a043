"""
``ebroker status``, ``keys`` and ``rekey`` against the real daemon: the table,
the Nagios/Icinga exit codes (0 OK, 1 WARNING, 2 CRITICAL, 3 UNKNOWN), where
``keys`` finds the keyring, and ``rekey`` refusing a key the broker holds.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

from sources.entropykey.sim.keypairs import new_key_pair, write_keyring
from tests.helpers import wait_until
from tests.integration.clients import running_daemon
from tests.integration.daemon import REPO, Daemon, default_config
from tests.sources.entropykey.test_rekey import master_key_text


def ebroker(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    """
    Run the ``ebroker`` command line as an operator would, without a terminal.
    """
    return subprocess.run(
        [sys.executable, "-m", "broker.cli", *args],
        input=stdin,
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, "NO_COLOR": ""},
        timeout=60,
        check=False,
    )


def status_document(daemon: Daemon) -> dict[str, Any]:
    with urllib.request.urlopen(daemon.operator_url + "/v1/status", timeout=5) as r:  # noqa: S310 - loopback http URL
        document: dict[str, Any] = json.load(r)
    return document


def wait_for_health(daemon: Daemon, word: str) -> None:
    wait_until(lambda: word == status_document(daemon)["health"]["status"])


def missing_device(tmp_path: Path, priority: int = 0) -> str:
    return f"""
        [[sources]]
        name = "hwrng"
        kind = "hwrng"
        path = "{tmp_path / "no-such-rng"}"
        priority = {priority}
        """


def test_healthy_broker_exits_0_with_a_table(daemon: Daemon) -> None:
    """
    A broker serving from its best tier: exit 0, the plugin line first, then
    pool, sources, sinks and customers, without colour off a terminal.
    """
    wait_for_health(daemon, "ok")
    result = ebroker("status", "--url", daemon.operator_url)
    assert 0 == result.returncode, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("EBROKER OK - serving, health ok, 1 of 1 sources")
    headings = {line.split()[0] for line in lines if line and not line[0].isspace()}
    assert {"HEALTH", "POOL", "SOURCES", "SINKS", "ACCOUNTS"} <= headings
    assert any(line.split()[:3] == ["*", "getrandom", "getrandom"] for line in lines)
    assert "\x1b[" not in result.stdout


def test_nagios_line_and_json(daemon: Daemon) -> None:
    """
    ``--nagios`` prints one plugin line with perfdata; ``--json`` the document.
    """
    wait_for_health(daemon, "ok")
    nagios = ebroker("status", "--nagios", "--url", daemon.operator_url)
    assert 0 == nagios.returncode
    assert 1 == len(nagios.stdout.splitlines())
    assert "| pool_bytes=" in nagios.stdout
    raw = ebroker("status", "--json", "--url", daemon.operator_url)
    assert 0 == raw.returncode
    assert "sources" in json.loads(raw.stdout)


def test_degraded_broker_exits_1(tmp_path: Path) -> None:
    """
    The tier-0 device failed and only getrandom at tier 1 feeds the pool: the
    broker is degraded, and status says WARNING with exit 1.
    """
    sources = missing_device(tmp_path) + (
        '\n[[sources]]\nname = "getrandom"\nkind = "getrandom"\npriority = 1\n'
    )
    config = default_config(tmp_path / "state", sources)
    with running_daemon(tmp_path, config) as daemon:
        wait_for_health(daemon, "degraded")
        result = ebroker("status", "--url", daemon.operator_url)
    assert 1 == result.returncode, result.stdout
    first = result.stdout.splitlines()[0]
    assert first.startswith("EBROKER WARNING - serving, health degraded")
    assert "hwrng" in first


def test_unhealthy_broker_exits_2(tmp_path: Path) -> None:
    """
    No source can run and the pool is empty: CRITICAL, exit 2.
    """
    config = default_config(tmp_path / "state", missing_device(tmp_path))
    with running_daemon(tmp_path, config) as daemon:
        wait_for_health(daemon, "unhealthy")
        result = ebroker("status", "--nagios", "--url", daemon.operator_url)
    assert 2 == result.returncode, result.stdout
    assert result.stdout.startswith("EBROKER CRITICAL - ")


def test_no_broker_exits_3() -> None:
    """
    Nothing listening: UNKNOWN, exit 3, saying where it looked.
    """
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    result = ebroker("status", "--url", url)
    assert 3 == result.returncode
    assert result.stdout.startswith(f"EBROKER UNKNOWN - no broker answered at {url}")


def test_tenant_plane_answer_exits_3(daemon: Daemon) -> None:
    """
    A tenant-plane sink answers only a tenant's view: not a broker's status.
    """
    result = ebroker("status", "--url", daemon.http_url)
    assert 3 == result.returncode
    assert "operator-plane" in result.stdout


def _interruptible() -> None:
    # A shell starts a background job (CI, `make stress &`) with SIGINT
    # ignored, and children inherit that: Ctrl-C from a terminal meets the
    # default handling, so give the watch that.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_watch_redraws_until_ctrl_c(daemon: Daemon) -> None:
    """
    ``--watch`` prints a frame per interval, and Ctrl-C ends it with exit 0.
    """
    process = subprocess.Popen(
        [sys.executable, "-m", "broker.cli", "status", "--watch", "0.1",
         "--url", daemon.operator_url],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
        preexec_fn=_interruptible,
    )  # fmt: skip
    assert process.stdout is not None
    frames = 0
    with process:
        try:
            for line in process.stdout:
                frames += line.startswith("EBROKER ")
                if frames == 2:
                    break
            process.send_signal(signal.SIGINT)
            _, err = process.communicate(timeout=30)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
    assert 2 == frames
    assert 0 == process.returncode, err
    assert "Traceback" not in err


def key_config(tmp_path: Path, keyring: Path, serial: str) -> str:
    """
    One simulated Entropy Key at tier 0 with the keyring at ``keyring``.
    """
    return default_config(
        tmp_path / "state",
        f"""
        [[sources]]
        name = "ekey"
        kind = "entropykey"
        serial = "{serial}"
        transport = "simulated"
        keyring = "{keyring}"
        priority = 0

        [[sources]]
        name = "getrandom"
        kind = "getrandom"
        priority = 1
        """,
    )


def test_keys_reads_the_keyring_of_the_broker_or_the_config(tmp_path: Path) -> None:
    """
    Without --keyring, ``keys`` uses the running broker's keyring, or the one
    in --config, and says which; with neither, the default path.
    """
    pair = new_key_pair()
    keyring = tmp_path / "keyring"
    write_keyring(keyring, [pair])
    config = key_config(tmp_path, keyring, pair.serial_text)
    with running_daemon(tmp_path, config) as daemon:
        from_broker = ebroker("keys", "--url", daemon.operator_url)
    assert 0 == from_broker.returncode, from_broker.stderr
    assert (
        f"keyring {keyring} (the running broker's)"
        == (from_broker.stdout.splitlines()[0])
    )
    assert pair.serial_text in from_broker.stdout
    from_config = ebroker(
        "keys", "--url", "", "--config", str(tmp_path / "ebroker.toml")
    )
    assert (
        f"keyring {keyring} (from {tmp_path / 'ebroker.toml'})"
        == (from_config.stdout.splitlines()[0])
    )


def test_keys_names_a_missing_keyring_and_the_fix(tmp_path: Path) -> None:
    """
    A keyring that is not there is named with what to do.
    """
    missing = tmp_path / "nope"
    result = ebroker("keys", "--url", "", "--keyring", str(missing))
    assert 0 == result.returncode
    assert f"keyring {missing} (--keyring)" == result.stdout.splitlines()[0]
    assert f"keyring {missing}: no such file or directory (give --keyring" in (
        result.stderr
    )


def test_rekey_refuses_a_key_the_broker_holds(tmp_path: Path) -> None:
    """
    ``rekey`` on a key the running broker drives says which broker (pid), to
    stop it first, and exits 1 without touching the key or the keyring.
    """
    pair = new_key_pair()
    keyring = tmp_path / "keyring"
    write_keyring(keyring, [pair])
    before = keyring.read_text()
    config = key_config(tmp_path, keyring, pair.serial_text)
    with running_daemon(tmp_path, config) as daemon:
        wait_until(
            lambda: any(
                s["kind"] == "entropykey" and s["details"].get("serial")
                for s in status_document(daemon)["sources"]
            )
        )
        result = ebroker(
            "rekey", "--serial", pair.serial_text, "--keyring", str(keyring),
            "--url", daemon.operator_url, stdin="x\n",
        )  # fmt: skip
        pid = daemon.process.pid
    assert 1 == result.returncode
    assert (
        f"ebroker: the broker (pid {pid}) holds key {pair.serial_text}: stop it "
        "first (systemctl stop ebroker) and run rekey again\n"
    ) == result.stderr
    assert before == keyring.read_text()


def test_rekey_of_a_key_in_use_says_to_stop_its_user(tmp_path: Path) -> None:
    """
    Asked not to consult the broker (``--url ''``), ``rekey`` meets a key
    another program drives (the simulator, like ekey-ulusbd, closes a second
    client): it fails, exit 1, saying to stop that program first.
    """
    pair = new_key_pair()
    keyring = tmp_path / "keyring"
    write_keyring(keyring, [pair])
    sock = tmp_path / "key.sock"
    simulator = subprocess.Popen(
        [sys.executable, "-m", "broker.cli", "simulate-key",
         "--serial", pair.serial_text, "--keyring", str(keyring),
         "--socket", str(sock)],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        wait_until(lambda: sock.exists() or simulator.poll() is not None)
        config = default_config(
            tmp_path / "state",
            f"""
            [[sources]]
            name = "ekey"
            kind = "entropykey"
            serial = "{pair.serial_text}"
            transport = "unix"
            path = "{sock}"
            keyring = "{keyring}"
            """,
        )
        with running_daemon(tmp_path, config) as daemon:
            wait_until(
                lambda: "healthy" == status_document(daemon)["sources"][0]["state"]
            )
            result = ebroker(
                "rekey", "--serial", pair.serial_text, "--keyring", str(keyring),
                "--transport", "unix", "--path", str(sock), "--url", "",
                stdin=master_key_text(os.urandom(32)) + "\n",
            )  # fmt: skip
    finally:
        simulator.terminate()
        simulator.wait(timeout=20)
    assert 1 == result.returncode
    assert result.stderr.startswith("ebroker: rekey failed, keyring unchanged: ")
    assert result.stderr.endswith(
        "; if a broker (or ekeyd) drives this key, stop it first "
        "(systemctl stop ebroker) and run rekey again\n"
    )
