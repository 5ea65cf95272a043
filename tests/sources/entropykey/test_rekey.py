"""
Long-term re-keying against the simulator: the new key is stored only when the
device confirmed it.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from sources.entropykey.encoding import crc8, pem_encode
from sources.entropykey.keyring import load_keyring
from sources.entropykey.rekey import RekeyError, run_rekey, store_long_term_key
from sources.entropykey.sim.key import SimulatedKey
from sources.entropykey.sim.keypairs import new_key_pair, write_keyring
from sources.entropykey.sim.unix_server import UnixKeyServer
from sources.entropykey.transport import UnixTransport
from tests.helpers import wait_until
from tests.integration.daemon import REPO


def master_key_text(master_key: bytes) -> str:
    """
    The master key as printed on the card: 44 PEM characters with a CRC-8.
    """
    text = pem_encode(master_key + bytes([crc8(master_key)])).decode()
    return " ".join(text[i : i + 4] for i in range(0, len(text), 4))


async def test_rekey_stores_the_key_the_device_derived(tmp_path: Path) -> None:
    """
    With the right master key the device confirms with L!, and host and device
    agree on the new long-term key, which replaces the old keyring line.
    """
    pair = new_key_pair()
    master_key = os.urandom(32)
    keyring = tmp_path / "keyring"
    write_keyring(keyring, [pair, new_key_pair()])
    key = SimulatedKey(pair.serial, pair.long_term_key, master_key=master_key)
    async with UnixKeyServer(key, tmp_path / "key.sock"):
        result = await run_rekey(
            UnixTransport(tmp_path / "key.sock"), pair.serial, master_key
        )
    assert key.long_term_key == result.long_term_key
    assert pair.long_term_key != result.long_term_key
    store_long_term_key(keyring, result.serial, result.long_term_key)
    stored = load_keyring(keyring)
    assert result.long_term_key == stored[pair.serial]
    assert 2 == len(stored)
    assert 0o600 == keyring.stat().st_mode & 0o777


async def test_wrong_master_key_changes_nothing(tmp_path: Path) -> None:
    """
    A master key that is not this key's is refused by the device; nothing is
    returned to store and the device keeps its key.
    """
    pair = new_key_pair()
    key = SimulatedKey(pair.serial, pair.long_term_key, master_key=os.urandom(32))
    async with UnixKeyServer(key, tmp_path / "key.sock"):
        with pytest.raises(RekeyError, match="refused"):
            await run_rekey(
                UnixTransport(tmp_path / "key.sock"), pair.serial, os.urandom(32)
            )
    assert pair.long_term_key == key.long_term_key


async def test_silent_device_times_out(tmp_path: Path) -> None:
    """
    A key that never answers ends the re-key with a clear error.
    """
    pair = new_key_pair()
    key = SimulatedKey(pair.serial, pair.long_term_key, master_key=os.urandom(32))
    key.set_fault(mute=True)
    async with UnixKeyServer(key, tmp_path / "key.sock"):
        with pytest.raises(RekeyError, match="did not answer"):
            await run_rekey(
                UnixTransport(tmp_path / "key.sock"),
                pair.serial,
                os.urandom(32),
                timeout=0.5,
            )


def test_cli_rekey_against_simulate_key(tmp_path: Path) -> None:
    """
    `ebroker simulate-key` serves a key; `ebroker rekey` with the master key on
    stdin re-keys it and writes the new keyring line; a CRC typo is refused.
    """
    pair = new_key_pair()
    master_key = os.urandom(32)
    keyring = tmp_path / "keyring"
    write_keyring(keyring, [pair])
    master_file = tmp_path / "master"
    master_file.write_text(master_key_text(master_key))
    sock = tmp_path / "key.sock"
    server = subprocess.Popen(
        [sys.executable, "-m", "broker.cli", "simulate-key",
         "--serial", pair.serial_text, "--keyring", str(keyring),
         "--socket", str(sock), "--master-key-file", str(master_file)],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        wait_until(lambda: sock.exists() or server.poll() is not None, timeout=30)
        command = [
            sys.executable, "-m", "broker.cli", "rekey", "--serial", pair.serial_text,
            "--keyring", str(keyring), "--transport", "unix", "--path", str(sock),
        ]  # fmt: skip
        typo = master_key_text(master_key)
        typo = typo[:-1] + ("A" if typo[-1] != "A" else "B")
        refused = subprocess.run(
            command, input=typo + "\n", capture_output=True, text=True, cwd=REPO,
            timeout=60, check=False,
        )  # fmt: skip
        assert 1 == refused.returncode
        assert "keyring unchanged" in refused.stderr
        assert pair.long_term_key == load_keyring(keyring)[pair.serial]
        done = subprocess.run(
            command, input=master_key_text(master_key) + "\n", capture_output=True,
            text=True, cwd=REPO, timeout=60, check=False,
        )  # fmt: skip
        assert 0 == done.returncode, done.stderr
        assert "stored" in done.stdout
        assert pair.long_term_key != load_keyring(keyring)[pair.serial]
    finally:
        server.terminate()
        server.wait(timeout=20)
    assert not sock.exists()
