"""
Frame synchronisation, packet parsing, MACs, I> records and host commands.
"""

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sources.entropykey.encoding import encode_subcode
from sources.entropykey.skein import SessionCrypto, derive_session_key
from sources.entropykey.wire import (
    FailureMode,
    FipsCounters,
    FrameError,
    FrameSynchroniser,
    FrameType,
    GeneratorStats,
    Info,
    InfoError,
    build_binary_frame,
    build_text_frame,
    encode_lt_mac,
    encode_lt_rekey,
    encode_session_rekey,
    format_info,
    parse_info,
    parse_packet,
    verify_mac,
)

SERIAL = bytes.fromhex("37006F065837393049391143")
ZERO = SessionCrypto(SERIAL)
DEVICE_ENTROPY = bytes.fromhex(
    "e97c4bc1e9737a15831fca1f540ee6a0befa2a2423d2bb8a9aab3d4fbca05bf4"
)
HOST_NONCE = bytes(4) + bytes(range(0xA1, 0xA9))
SESSION = SessionCrypto(
    SERIAL, derive_session_key(SERIAL, bytes(range(32)), DEVICE_ENTROPY, HOST_NONCE)
)

# Spec 17.1: frames whose MAC verifies under the all-zero session key.
ZERO_KEY_FRAMES = [
    ("S!AANwBvBlg3OTBJORFD", "Al/Smw1b"),
    ("k>Unable to send entropy. Please re-key session.", "VqrrSb4k"),
    ("I>T03143 V03254", "apKTNVoy"),
    ("I>T03150 V03254", "6ihYwAqo"),
    ("I>F07342:00000:00000:00000:00000", "1L9eG/G8"),
    ("I>S08052:23751:23792:23584:07112:20876:08063:24150:0", "Sr3rR9o3"),
    ("K!AA6XxLwelzehWDH8ofVA7moL76KiQj0ruKmqs9T7ygW/Q=", "Qkbxfpr4"),
    ("M>Long-term rekey unlocked", "vrHSYIoF"),
    ("l>Long-term rekey locked-out", "m/wvdw2F"),
    ("l>Nonce MAC does not match", "6l+FxwYn"),
    ("W>Unknown Input Character 0x65", "TRNC7UwS"),
]

# Spec 17.1 frames that must NOT verify under the zero key.
NON_VERIFYING_FRAMES = [
    ("E!UYIYK1Z/uc21bcnUi9QF37X+rgByqWP+RJdvcaSBWNBhY=", "OIq9Dvd3"),
    ("L!AA6XxLwelzehWDH8ofVA7moL76KiQj0ruKmqs9T7ygW/Q=", "Qkbxfpr4"),
    ("B>Generators have gone bad, rekeying abandoned.", "Dv+8RVaa"),
]

K_FRAME_17_3 = b"* K!MA6XxLwelzehWDH8ofVA7moL76KiQj0ruKmqs9T7ygW/Q=    SstvMUTe\r\n"
E_FRAME_17_3 = b"* E!AA6LSUT/i551ppmCmVLrk3oeIS8rKhLko2BM2U8qC+FE0=    Jq/CatHV\r\n"
I_FRAME_17_3 = b"* I>T03150 V03254" + b" " * 37 + b"4SE9vbTh\r\n"
L_FRAME_17_4 = b"* L!MA6XxLwelzehWDH8ofVA7moL76KiQj0ruKmqs9T7ygW/Q=    NyRmYel5\r\n"


def frame(body: str, mac: str) -> bytes:
    """
    Assemble a 64-byte frame from the body (padded to 52) and MAC.
    """
    return b"* " + body.encode().ljust(52) + mac.encode() + b"\r\n"


ALL_FRAMES = [frame(b, m) for b, m in ZERO_KEY_FRAMES] + [
    K_FRAME_17_3,
    E_FRAME_17_3,
    I_FRAME_17_3,
]
STREAM = b"".join(ALL_FRAMES)


@pytest.mark.parametrize(("body", "mac"), ZERO_KEY_FRAMES)
def test_documented_frames_verify_with_zero_key(body: str, mac: str) -> None:
    """
    Every documented example frame verifies under the zero session key.
    """
    raw = frame(body, mac)
    assert len(raw) == 64
    assert verify_mac(parse_packet(raw), ZERO)


@pytest.mark.parametrize(("body", "mac"), ZERO_KEY_FRAMES)
def test_builders_reproduce_documented_frames(body: str, mac: str) -> None:
    """
    The frame builders produce the documented frames byte for byte.
    """
    packet = parse_packet(frame(body, mac))
    if packet.binary:
        built = build_binary_frame(packet.type, packet.subcode_chars, packet.data, ZERO)
    else:
        built = build_text_frame(packet.type, packet.text, ZERO)
    assert frame(body, mac) == built


@pytest.mark.parametrize(("body", "mac"), NON_VERIFYING_FRAMES)
def test_documented_bad_examples_do_not_verify(body: str, mac: str) -> None:
    """
    The E!, L! and B> doc examples do not verify under the zero key (spec 17.1).
    """
    assert not verify_mac(parse_packet(frame(body, mac)), ZERO)


def test_session_example_frames() -> None:
    """
    The 17.3 K! (zero key, sub-code 12), E! and I> (new key) frames verify.
    """
    key = parse_packet(K_FRAME_17_3)
    assert (key.type, key.subcode, key.data) == (FrameType.KEY, 12, DEVICE_ENTROPY)
    assert verify_mac(key, ZERO)
    entropy = parse_packet(E_FRAME_17_3)
    assert verify_mac(entropy, SESSION)
    assert not verify_mac(entropy, ZERO)
    plain = bytes(a ^ b for a, b in zip(entropy.data, SESSION.pad(b"AA"), strict=True))
    assert bytes(range(32)) == plain
    info = parse_packet(I_FRAME_17_3)
    assert verify_mac(info, SESSION)
    assert (
        build_binary_frame(FrameType.KEY, encode_subcode(12), DEVICE_ENTROPY, ZERO)
        == K_FRAME_17_3
    )


def test_lt_rekey_example_frame() -> None:
    """
    The 17.4 L! frame (zero key, sub-code 12) verifies and is reproduced.
    """
    packet = parse_packet(L_FRAME_17_4)
    assert (packet.type, packet.subcode) == (FrameType.LT_REKEY, 12)
    assert verify_mac(packet, ZERO)
    built = build_binary_frame(FrameType.LT_REKEY, b"MA", DEVICE_ENTROPY, ZERO)
    assert built == L_FRAME_17_4


def test_host_commands() -> None:
    """
    The host command encoders give the 17.3 and 17.4 byte strings.
    """
    assert encode_session_rekey(HOST_NONCE) == b"KAAAAAKGio6Slpqeo."
    assert encode_lt_mac(bytes.fromhex("634da194fa99")) == b"MY02hlPqZ"
    assert encode_lt_rekey(bytes(range(12))) == b"LAAECAwQFBgcICQoL."
    with pytest.raises(ValueError, match="6 bytes"):
        encode_lt_mac(b"12345")


def test_sync_whole_stream() -> None:
    """
    Fed whole, the synchroniser returns every frame with no errors.
    """
    sync = FrameSynchroniser()
    assert sync.feed(STREAM) == ALL_FRAMES
    assert (len(ALL_FRAMES), 0, 0) == (
        sync.frames_ok,
        sync.framing_errors,
        sync.bytes_discarded,
    )


def test_sync_one_byte_at_a_time() -> None:
    """
    Fed one byte at a time, the synchroniser returns the same frames.
    """
    sync = FrameSynchroniser()
    out = [f for i in range(len(STREAM)) for f in sync.feed(STREAM[i : i + 1])]
    assert out == ALL_FRAMES


def test_sync_garbage_around_and_between() -> None:
    """
    Garbage (including stray '*' and '* ') before, between and after frames is
    skipped and counted; every frame is still found.
    """
    garbage = [b"junk", b"*", b"* x\r\n**", b"\x00" * 70, b"*  * "]
    stream = garbage[0]
    for i, f in enumerate(ALL_FRAMES):
        stream += f + garbage[(i + 1) % len(garbage)]
    sync = FrameSynchroniser()
    assert sync.feed(stream) == ALL_FRAMES
    assert sync.framing_errors > 0
    assert sync.bytes_discarded > 0


def test_sync_truncated_frame_is_dropped() -> None:
    """
    A frame cut short by a reset is discarded and the next frame is found.
    """
    stream = ALL_FRAMES[0][:30] + ALL_FRAMES[1]
    assert [ALL_FRAMES[1]] == FrameSynchroniser().feed(stream)


def test_sync_holds_partial_frame() -> None:
    """
    A partial frame is buffered until it completes.
    """
    sync = FrameSynchroniser()
    assert sync.feed(ALL_FRAMES[0][:63]) == []
    assert [ALL_FRAMES[0]] == sync.feed(ALL_FRAMES[0][63:])


@given(st.lists(st.integers(0, len(STREAM)), max_size=20), st.binary(max_size=40))
def test_any_split_parses_the_same(cuts: list[int], prefix: bytes) -> None:
    """
    However the stream (with leading garbage) is split, the same frames come out.
    """
    data = prefix + STREAM
    whole = FrameSynchroniser().feed(data)
    sync = FrameSynchroniser()
    points = sorted({0, len(data), *(c % (len(data) + 1) for c in cuts)})
    pieces = [data[a:b] for a, b in itertools.pairwise(points)]
    assert whole == [f for p in pieces for f in sync.feed(p)]
    assert whole[-len(ALL_FRAMES) :] == ALL_FRAMES


def test_parse_text_and_binary_packets() -> None:
    """
    Text payloads lose trailing spaces; binary ones are PEM-decoded.
    """
    serial = parse_packet(frame(*ZERO_KEY_FRAMES[0]))
    assert (
        serial.type,
        serial.binary,
        serial.subcode_chars,
        serial.subcode,
        serial.data,
    ) == (FrameType.SERIAL, True, b"AA", 0, SERIAL)
    warn = parse_packet(frame(*ZERO_KEY_FRAMES[-1]))
    assert (
        warn.type,
        warn.binary,
        warn.text,
    ) == (FrameType.WARNING, False, "Unknown Input Character 0x65")
    assert warn.subcode == 0


def test_parse_rejects_unknown_type_and_class() -> None:
    """
    Unknown frame types (e.g. the unused 'A') and classes raise FrameError.
    """
    with pytest.raises(FrameError, match="unknown frame type"):
        parse_packet(frame("A>hello", "AAAAAAAA"))
    with pytest.raises(FrameError, match="unknown payload class"):
        parse_packet(frame("I?hello", "AAAAAAAA"))


def test_corrupted_mac_fails() -> None:
    """
    Changing any MAC-covered byte or the MAC itself makes verification fail.
    """
    good = frame(*ZERO_KEY_FRAMES[2])
    body_flip = good[:10] + b"9" + good[11:]
    mac_flip = good[:54] + b"B" + good[55:]
    assert not verify_mac(parse_packet(body_flip), ZERO)
    assert not verify_mac(parse_packet(mac_flip), ZERO)


def test_builders_validate() -> None:
    """
    Builders refuse oversize payloads and bad sub-codes.
    """
    with pytest.raises(ValueError, match="50 printable"):
        build_text_frame(FrameType.WARNING, "x" * 51, ZERO)
    with pytest.raises(ValueError, match="50 printable"):
        build_text_frame(FrameType.WARNING, "tab\there", ZERO)
    with pytest.raises(ValueError, match="36 bytes"):
        build_binary_frame(FrameType.ENTROPY, b"AA", bytes(37), ZERO)
    with pytest.raises(ValueError, match="2-character"):
        build_binary_frame(FrameType.ENTROPY, b"A", bytes(32), ZERO)


def test_parse_info_records() -> None:
    """
    T/V, F and S records parse into typed values (spec 6.3 examples).
    """
    tv = parse_info("T03150 V03254")
    assert (
        tv.temperature_dk,
        tv.voltage_mv,
        tv.fips,
        tv.generator,
    ) == (3150, 3254, None, None)
    assert tv.temperature_c == pytest.approx(41.85)
    fips = parse_info("F07342:00000:00000:00000:00000").fips
    assert FipsCounters(7342, 0, 0, 0, 0) == fips
    gen = parse_info("S08052:23751:23792:23584:07112:20876:08063:24150:0").generator
    assert gen is not None
    assert (
        gen.raw_bytes,
        gen.debiased_right_shannons,
        gen.failure_mode,
    ) == (8052, 24150, FailureMode.OK)
    assert Info() == parse_info("")
    assert Info().temperature_c is None


@pytest.mark.parametrize(
    ("char", "mode"),
    [
        ("1", FailureMode.RAW_LEFT_BAD),
        ("3", FailureMode.RAW_XOR_BAD),
        ("9", FailureMode.FIPS_THRESHOLD_EXCEEDED),
        ("A", FailureMode.VOLT_TOO_LOW),
        ("B", FailureMode.VOLT_TOO_HIGH),
        ("6", FailureMode.UNDEFINED),
        ("Z", FailureMode.UNDEFINED),
    ],
)
def test_failure_modes(char: str, mode: FailureMode) -> None:
    """
    The failure character maps to its mode; unnamed characters are UNDEFINED.
    """
    info = parse_info(f"S08052:23751:23792:23584:07112:20876:08063:24150:{char}")
    assert info.generator is not None
    assert mode == info.generator.failure_mode
    assert mode.description


def test_parse_info_stops_after_f_or_s_and_skips_unknown() -> None:
    """
    Parsing stops after an F or S record; unknown record letters are skipped.
    """
    info = parse_info("X1 T00001 F00001:00000:00000:00000:00000 V00002")
    assert (info.temperature_dk, info.voltage_mv) == (1, None)


@pytest.mark.parametrize(
    "text", ["T12a", "V1:2", "F1:2:3", "S1:2:3:4:5:6:7:8:", "S1:2:3:4:5:6:7:8"]
)
def test_parse_info_rejects_malformed(text: str) -> None:
    """
    Malformed T, V, F or S records raise InfoError.
    """
    with pytest.raises(InfoError, match="malformed"):
        parse_info(text)


def test_format_info_round_trips_documented_text() -> None:
    """
    format_info writes the key's 5-digit style, matching the documented frames.
    """
    for text in (
        "T03150 V03254",
        "F07342:00000:00000:00000:00000",
        "S08052:23751:23792:23584:07112:20876:08063:24150:0",
    ):
        assert text == format_info(parse_info(text))
    stats = GeneratorStats(1, 2, 3, 4, 5, 6, 7, 8, "9")
    assert (
        format_info(Info(generator=stats))
        == "S00001:00002:00003:00004:00005:00006:00007:00008:9"
    )
