"""
Skein-256 (2008 constants) and the Entropy Key derivations: spec 17.1-17.4.
"""

import struct

import pytest

from sources.entropykey.skein import (
    PERS_EES,
    PERS_LKMS,
    PERS_LRS,
    PERS_PMS,
    PERS_RS,
    TYPE_CFG,
    TYPE_KEY,
    SessionCrypto,
    Skein256,
    derive_long_term_key,
    derive_session_key,
    iv_words,
    lt_nonce_mac,
    prepare,
    skein256,
)

SERIAL = bytes.fromhex("37006F065837393049391143")
LTK = bytes(range(32))
DEVICE_ENTROPY = bytes.fromhex(
    "e97c4bc1e9737a15831fca1f540ee6a0befa2a2423d2bb8a9aab3d4fbca05bf4"
)
HOST_NONCE = bytes(4) + bytes(range(0xA1, 0xA9))
SESSION_KEY = bytes.fromhex(
    "21244172e5b6531586b8df94dd6e47aa1a944ab3e3d1051c50280155a9febeff"
)


def _state_bytes(ctx: Skein256) -> bytes:
    # The chaining value of a prepared state, as the spec prints it.
    return struct.pack("<4Q", *ctx._cv)


@pytest.mark.parametrize(
    ("bits", "words"),
    [
        (256, "388512680E660046 4B72D5DEC5A8FF01 281A9298CA5EB3A5 54CA5249F46070C4"),
        (224, "B80929699AE0F431 D340DC14A06929DC AE866594BDE4DC5A 339767C25A60EA1D"),
        (160, "A38A0D80A3687723 B73CDB6A5963FFC9 9633E8EA07A1B447 CA0ED09EC9529C22"),
        (128, "302F7EA23D7FE2E1 ADE4683A6913752B 975CFABEF208AB0A 2AF4BA95F831F55B"),
    ],
)
def test_iv_table(bits: int, words: str) -> None:
    """
    The config block over a zero chain reproduces skein_iv.h (v1.1 constants).
    """
    assert tuple(int(w, 16) for w in words.split()) == iv_words(bits)


@pytest.mark.parametrize(
    ("message", "v11", "v13"),
    [
        (
            b"",
            "bc2763f707e262b80e0313791543a7ab0a4b6cd083270afb2fce4272e1bb0aa9",
            "c8877087da56e072870daa843f176e9453115929094c3a40c463a196c29bf7ba",
        ),
        (
            b"\xff",
            "a47be71a185ba0af820b3ce845a3d35a80ec64f96a0d6a36e3f5363624d8a091",
            "0b98dcd198ea0e50a7a244c444e25c23da30c10fc9a1f270a6637f1f34e67ed2",
        ),
        (
            bytes(range(0xFF, 0xDF, -1)),
            "cc2da82f3973c2f7a8ced0bbb54aa028ecaf6b5911628d0ffabb2008e411d171",
            "8d0fa4ef777fd759dfd4044e6f6a5ac3c774aec943dcfc07927b723b5dbf408b",
        ),
        (
            bytes(range(0xFF, 0xBF, -1)),
            "fa1a762b6b1c72b70d52926353e10eb8fb0edd7313da20a2413180b8e289b872",
            "df28e916630d0b44c4a849dc9a02f07a07cb30f732318256b15d865ac4ae162f",
        ),
    ],
)
def test_plain_skein256_v11(message: bytes, v11: str, v13: str) -> None:
    """
    Plain Skein-256-256 gives the v1.1 digests of spec 17.2, not the v1.3 ones.
    """
    digest = skein256(message)
    assert bytes.fromhex(v11) == digest
    assert bytes.fromhex(v13) != digest


def test_streaming_split_matches_one_shot() -> None:
    """
    Feeding a message in pieces gives the same digest as feeding it at once.
    """
    message = bytes(range(200))
    ctx = Skein256.hash_state()
    for i in range(0, 200, 7):
        ctx.update(message[i : i + 7])
    assert skein256(message) == ctx.final()


def test_key_and_config_intermediates() -> None:
    """
    The chaining values after the KEY and CFG UBI calls match spec 17.2.
    """
    key = Skein256((0, 0, 0, 0), TYPE_KEY)
    key.update(SERIAL + bytes(32))
    after_key = key.final_pad()
    assert (
        bytes.fromhex(
            "1e94e82cc02e284bf6df900a29af319daefd3d2b60432b631cfdc8009246f561"
        )
        == after_key
    )
    cfg = Skein256(struct.unpack("<4Q", after_key), TYPE_CFG)
    cfg.update(b"SHA3" + struct.pack("<HHQ", 1, 0, 256) + bytes(16))
    assert (
        bytes.fromhex(
            "a74cc188745f8191aa5ab13de9cfc6bef5e2e305b362d20a6745fee7bfd287b3"
        )
        == cfg.final_pad()
    )


@pytest.mark.parametrize(
    ("pers", "expected"),
    [
        (PERS_PMS, "bbff299f9d7d052420e4191648a0eafde6a944cb85845c721a52cc4f95d142a3"),
        (PERS_LKMS, "bbff299f9d7d052420e4191648a0eafde6a944cb85845c721a52cc4f95d142a3"),
        (PERS_RS, "7c0aaabb436dde9b158baef0e12b010db561543c39cc0f6d450b38a74e9a3a97"),
        (PERS_EES, "3c2474169c090e05097646ad98ecb31aee970d366b0aee278ddc145405073ff1"),
        (PERS_LRS, "4251067c05e9276caa8221f3144a2bb871e9320ec58bf4b916ffbbbbabf95e51"),
    ],
)
def test_prepared_states(pers: bytes, expected: str) -> None:
    """
    Prepared states with the zero secret match spec 17.2 (PMS == LKMS quirk).
    """
    assert len(pers) == 96
    assert bytes.fromhex(expected) == _state_bytes(prepare(SERIAL, bytes(32), pers))


def test_full_final_pad_of_serial_frame() -> None:
    """
    The Final_Pad output over the S! example frame body is the 17.2 value.
    """
    ctx = prepare(SERIAL, bytes(32), PERS_PMS)
    ctx.update(b"S!AANwBvBlg3OTBJORFD".ljust(52))
    expected = "025fd2b9721204efd357c7f6e95984e5ead17d799bda97118bd116b6929b0d5b"
    assert bytes.fromhex(expected) == ctx.final_pad()


def test_session_key_derivation() -> None:
    """
    SK' = Final(Prep(RS, LTK) + device entropy + host nonce) matches spec 17.3.
    """
    assert derive_session_key(SERIAL, LTK, DEVICE_ENTROPY, HOST_NONCE) == SESSION_KEY


@pytest.mark.parametrize(
    ("chars", "pad"),
    [
        (b"AA", "e8b5964cfcbce15d6191239e22b439aef203e0a1b53b5c211cd48ee9bca30a52"),
        (b"BA", "860d4b89fdaf68d26b56f5573410cb28ff5881e6dfe64f0d6b71c94ee55fd283"),
        (b"AB", "797cfc85ecad6c609f19a126c0b0a5b554d538bd6a6b1d2338a23c9e3d1ddbaf"),
        (b"UY", "3f1ecf001def53298fc7aa2f98007e3dbec2829b93b1493b544b261f480e0b35"),
        (b"//", "93b25762164b259c8e53c5fcdac14c437fd80476b367dfe80de19838c535503b"),
    ],
)
def test_entropy_pads(chars: bytes, pad: str) -> None:
    """
    The EES one-time pads for the 17.3 session key match the spec.
    """
    assert bytes.fromhex(pad) == SessionCrypto(SERIAL, SESSION_KEY).pad(chars)


def test_lt_nonce_mac_and_new_long_term_key() -> None:
    """
    The LKMS Final_Pad over the LT nonce and the new LTK match spec 17.4.
    """
    master = bytes(range(32))
    nonce = bytes(range(12))
    ctx = prepare(SERIAL, master, PERS_LKMS)
    ctx.update(nonce)
    full = bytes.fromhex(
        "634da11139db5a95b13812f64b58d4e98dc67cb4ad29afbb5228517b0d94fa99"
    )
    assert full == ctx.final_pad()
    assert full[:3] + full[29:] == lt_nonce_mac(SERIAL, master, nonce)
    new_ltk = bytes.fromhex(
        "ba361285400dfab389817a3a164add915be1425a1a749c9c6f76cf343fa2a513"
    )
    assert new_ltk == derive_long_term_key(SERIAL, master, DEVICE_ENTROPY, nonce)


def test_prepared_state_is_not_mutated_by_use() -> None:
    """
    Using a SessionCrypto for many MACs keeps giving the same answer.
    """
    crypto = SessionCrypto(SERIAL)
    first = crypto.mac(b"x" * 52)
    crypto.mac(b"y" * 52)
    assert first == crypto.mac(b"x" * 52)
