"""
Keyring file format, permission check and master-key card parsing.
"""

import os
from pathlib import Path

import pytest

from sources.entropykey.keyring import (
    HEADER,
    KeyringError,
    KeyringPermissionError,
    check_keyring_permissions,
    format_keyring,
    load_keyring,
    parse_keyring,
    parse_master_key,
    permission_problem,
)

SERIAL = bytes.fromhex("37006F065837393049391143")
NEW_LTK = bytes.fromhex(
    "ba361285400dfab389817a3a164add915be1425a1a749c9c6f76cf343fa2a513"
)
LINE_17_4 = "NwBvBlg3OTBJORFD ujYShUAN+rOJgXo6FkrdkVvhQloadJycb3bPND+ipRM="


def test_spec_17_4_keyring_line() -> None:
    """
    The 17.4 keyring line maps the example serial to the new long-term key.
    """
    assert parse_keyring(LINE_17_4 + "\n") == {SERIAL: NEW_LTK}
    assert f"{HEADER}\n{LINE_17_4}\n" == format_keyring({SERIAL: NEW_LTK})


def test_parse_skips_comments_blank_lines_and_takes_last_duplicate() -> None:
    """
    Comments and blank lines are ignored; leading whitespace is allowed; a later
    line for the same serial wins.
    """
    other = "AAAAAAAAAAAAAAAA " + "A" * 43 + "="
    text = f"{HEADER}\n\n   {other}\n  {LINE_17_4}\n{LINE_17_4[:17]}{'A' * 42}Q=\n"
    keys = parse_keyring(text)
    assert len(keys) == 2
    assert bytes(32) == keys[bytes(12)]
    assert keys[SERIAL] == bytes(31) + b"\x04"


def test_round_trip() -> None:
    """
    format_keyring output parses back to the same mapping.
    """
    keys = {SERIAL: NEW_LTK, bytes(range(12)): bytes(range(32))}
    assert keys == parse_keyring(format_keyring(keys))


@pytest.mark.parametrize(
    "line",
    [
        "NwBvBlg3OTBJORFD",
        "NwBvBlg3OTBJ ujYShUAN+rOJgXo6FkrdkVvhQloadJycb3bPND+ipRM=",
        "NwBvBlg3OTBJORFD ujYShUAN+rOJgXo6FkrdkVvhQloadJycb3bPND",
        "NwBvBlg3OTBJORF! ujYShUAN+rOJgXo6FkrdkVvhQloadJycb3bPND+ipRM=",
    ],
)
def test_parse_rejects_malformed_lines(line: str) -> None:
    """
    A line that is not a 12-byte serial and a 32-byte key is an error naming it.
    """
    with pytest.raises(KeyringError, match="line 2"):
        parse_keyring(f"# header\n{line}\n")


def test_format_rejects_bad_lengths() -> None:
    """
    format_keyring refuses serials or keys of the wrong size.
    """
    with pytest.raises(KeyringError, match="12 bytes"):
        format_keyring({b"short": NEW_LTK})


def test_load_accepts_owner_only_file(tmp_path: Path) -> None:
    """
    A mode-0600 keyring loads.
    """
    path = tmp_path / "keyring"
    path.write_text(format_keyring({SERIAL: NEW_LTK}))
    path.chmod(0o600)
    assert load_keyring(path) == {SERIAL: NEW_LTK}


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644, 0o660, 0o606])
def test_refuses_group_or_world_accessible_file(tmp_path: Path, mode: int) -> None:
    """
    A keyring readable or writable by group or others is refused with a clear
    message, via an exception that is a ValueError.
    """
    path = tmp_path / "keyring"
    path.write_text(LINE_17_4 + "\n")
    path.chmod(mode)
    with pytest.raises(KeyringPermissionError, match="chmod 600") as info:
        load_keyring(path)
    assert isinstance(info.value, ValueError)
    with pytest.raises(KeyringPermissionError, match=f"mode {mode:04o}"):
        check_keyring_permissions(path)


def test_refuses_a_file_another_user_owns(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """
    A mode-0600 keyring that another user owns is refused: that user could
    swap the keys. (Checked against a pretended uid, so it runs as root too.)
    """
    path = tmp_path / "keyring"
    path.write_text(LINE_17_4 + "\n")
    path.chmod(0o600)
    owner = os.stat(path).st_uid
    monkeypatch.setattr(os, "geteuid", lambda: owner + 1)
    with pytest.raises(KeyringPermissionError, match=f"owned by uid {owner}"):
        load_keyring(path)
    assert "chown it" in str(permission_problem(path))


def test_master_key_card_with_check_byte() -> None:
    """
    The 17.4 card string (with spaces typed in) gives MK 00..1F; CRC 0x50 checks.
    """
    card = "AAECAwQF BgcICQoL DA0ODxAR EhMUFRYX GBkaGxwd Hh9Q"
    assert bytes(range(32)) == parse_master_key(card)


def test_master_key_without_check_byte() -> None:
    """
    A 32-byte (44 chars with '=') master key is accepted without a check.
    """
    assert bytes(32) == parse_master_key("A" * 43 + "=")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh9R", "check digit"),
        ("AAECAwQF", "44 PEM characters"),
        ("AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh9!", "44 PEM characters"),
    ],
)
def test_master_key_rejections(text: str, message: str) -> None:
    """
    A wrong check byte, wrong length or bad character is rejected.
    """
    with pytest.raises(KeyringError, match=message):
        parse_master_key(text)
