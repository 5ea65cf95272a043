"""
The simulated key: frames it sends, commands it obeys, faults it injects.
"""

import random

import pytest

from sources.entropykey.sim.model import (
    TEXT_LT_BAD_MAC,
    TEXT_LT_LOCKED,
    DeviceModel,
    PlaintextFault,
)
from sources.entropykey.skein import SessionCrypto, derive_session_key, lt_nonce_mac
from sources.entropykey.wire import (
    FailureMode,
    FrameSynchroniser,
    FrameType,
    Packet,
    encode_lt_mac,
    encode_lt_rekey,
    encode_session_rekey,
    parse_info,
    parse_packet,
    verify_mac,
)

SERIAL = bytes.fromhex("37006F065837393049391143")
LTK = bytes(range(32))
MK = bytes(range(32))
DEVICE_ENTROPY = bytes.fromhex(
    "e97c4bc1e9737a15831fca1f540ee6a0befa2a2423d2bb8a9aab3d4fbca05bf4"
)
ZERO = SessionCrypto(SERIAL)


def fixed_entropy(n: int) -> bytes:
    """
    A noise source that always returns the 17.3 device entropy.
    """
    return DEVICE_ENTROPY[:n]


def packets(device: DeviceModel) -> list[Packet]:
    """
    Parse everything the device has sent since the last call.
    """
    return [parse_packet(f) for f in FrameSynchroniser().feed(device.data_to_send())]


def make(**kwargs: object) -> DeviceModel:
    """
    A device with a seeded noise source (overridable).
    """
    kwargs.setdefault("random_bytes", random.Random(3).randbytes)
    return DeviceModel(SERIAL, LTK, master_key=MK, **kwargs)  # type: ignore[arg-type]


def test_power_on_sends_serial_frame() -> None:
    """
    At power-on the key sends the documented S! frame under the zero key.
    """
    device = make()
    expected = b"* S!AANwBvBlg3OTBJORFD".ljust(54) + b"Al/Smw1b\r\n"
    assert expected == device.data_to_send()


def test_reset_byte_and_r_send_serial_frame() -> None:
    """
    0x03 (even mid-command) and an idle 'R' or 'r' reset the key.
    """
    device = make()
    device.data_to_send()
    device.receive_data(b"KAAA\x03")
    device.receive_data(b"r")
    device.receive_data(b"R")
    assert [p.type for p in packets(device)] == [FrameType.SERIAL] * 3


def test_unkeyed_key_asks_for_a_key_each_fips_block() -> None:
    """
    Without a session key every FIPS block produces one k> frame.
    """
    device = make(block_interval=1.0, info_interval=100.0)
    device.data_to_send()
    device.advance(3.5)
    frames = packets(device)
    assert [p.type for p in frames] == [FrameType.KEY_REQUEST] * 3
    assert all(verify_mac(p, ZERO) for p in frames)


def test_spec_17_3_keying_frame() -> None:
    """
    K with the 17.3 nonce gives the documented K! frame, then the new key.
    """
    device = make(random_bytes=fixed_entropy)
    device.data_to_send()
    nonce = bytes(4) + bytes(range(0xA1, 0xA9))
    device.receive_data(encode_session_rekey(nonce))
    expected = b"* K!MA6XxLwelzehWDH8ofVA7moL76KiQj0ruKmqs9T7ygW/Q=    SstvMUTe\r\n"
    assert expected == device.data_to_send()
    assert derive_session_key(SERIAL, LTK, DEVICE_ENTROPY, nonce) == device.session_key
    assert (device.keyed, device.next_sequence) == (True, 0)


def test_entropy_frames_after_keying() -> None:
    """
    A keyed key sends 78 E! frames per block, numbered from 0, under the new key.
    """
    device = make(block_interval=1.0, info_interval=100.0)
    device.receive_data(encode_session_rekey(bytes(12)))
    device.data_to_send()
    device.advance(1.0)
    frames = packets(device)
    assert [p.type for p in frames] == [FrameType.ENTROPY] * 78
    assert list(range(78)) == [p.subcode for p in frames]
    crypto = SessionCrypto(SERIAL, device.session_key)
    assert all(verify_mac(p, crypto) and len(p.data) == 32 for p in frames)


def test_sequence_exhaustion_then_key_request() -> None:
    """
    After sequence 4095 no E! is sent; the next block yields k> instead.
    """
    device = make(block_interval=1.0, info_interval=100.0)
    device.receive_data(encode_session_rekey(bytes(12)))
    assert device.produce_entropy_frames(5000) == 4096
    assert device.produce_entropy_frames(1) == 0
    device.data_to_send()
    device.advance(1.0)
    assert [p.type for p in packets(device)] == [FrameType.KEY_REQUEST]


def test_periodic_info_frames() -> None:
    """
    Every info interval the key sends T/V, F and S status frames.
    """
    device = make(block_interval=100.0, info_interval=2.0)
    device.data_to_send()
    device.advance(2.0)
    infos = [parse_info(p.text) for p in packets(device)]
    assert infos[0].temperature_dk == 3150
    assert infos[1].fips is not None
    assert infos[2].generator is not None
    assert infos[2].generator.failure_mode == FailureMode.OK


def test_unknown_input_warns_and_drops_rest_of_packet() -> None:
    """
    An unknown byte gives W> naming it in hex; the rest of that packet is lost.
    """
    device = make()
    device.data_to_send()
    device.receive_data(b"eR")
    frames = packets(device)
    assert [(p.type, p.text) for p in frames] == [
        (FrameType.WARNING, "Unknown Input Character 0x65")
    ]


def test_bad_byte_inside_nonce_abandons_command() -> None:
    """
    A non-PEM byte inside a K command abandons it with W> (assumed behaviour).
    """
    device = make()
    device.data_to_send()
    device.receive_data(b"KAA!A.")
    assert [p.type for p in packets(device)] == [FrameType.WARNING]
    assert not device.keyed


def test_long_term_rekey_spec_17_4() -> None:
    """
    M then L with the 17.4 nonce gives M>, the documented L! frame and the new LTK.
    """
    device = make(random_bytes=fixed_entropy)
    device.data_to_send()
    nonce = bytes(range(12))
    device.receive_data(encode_lt_mac(lt_nonce_mac(SERIAL, MK, nonce)))
    assert [p.type for p in packets(device)] == [FrameType.LT_UNLOCKED]
    device.receive_data(encode_lt_rekey(nonce))
    expected = b"* L!MA6XxLwelzehWDH8ofVA7moL76KiQj0ruKmqs9T7ygW/Q=    NyRmYel5\r\n"
    assert expected == device.data_to_send()
    new_ltk = "ba361285400dfab389817a3a164add915be1425a1a749c9c6f76cf343fa2a513"
    assert bytes.fromhex(new_ltk) == device.long_term_key


def test_long_term_rekey_refusals() -> None:
    """
    L without M is locked out; L with a nonce not matching M's MAC is refused.
    """
    device = make()
    device.data_to_send()
    device.receive_data(encode_lt_rekey(bytes(12)))
    device.receive_data(encode_lt_mac(lt_nonce_mac(SERIAL, MK, bytes(12))))
    device.receive_data(encode_lt_rekey(bytes(range(12))))
    frames = packets(device)
    assert [(p.type, p.text) for p in frames] == [
        (FrameType.LT_REFUSED, TEXT_LT_LOCKED),
        (FrameType.LT_UNLOCKED, "Long-term rekey unlocked"),
        (FrameType.LT_REFUSED, TEXT_LT_BAD_MAC),
    ]
    assert device.long_term_key == LTK


def test_generator_failure_is_latched_until_power_cycle() -> None:
    """
    A failed key stops entropy, reports the code in I>S, answers K with B>, and
    stays failed across a reset; only a power cycle clears it.
    """
    device = make(block_interval=1.0, info_interval=1.0)
    device.receive_data(encode_session_rekey(bytes(12)))
    device.fail_generator(FailureMode.DEBIAS_RIGHT_BAD)
    device.data_to_send()
    device.advance(1.0)
    frames = packets(device)
    assert FrameType.ENTROPY not in [p.type for p in frames]
    gen = parse_info(frames[-1].text).generator
    assert gen is not None
    assert gen.failure_mode == FailureMode.DEBIAS_RIGHT_BAD
    device.receive_data(b"\x03" + encode_session_rekey(bytes(12)))
    assert [p.type for p in packets(device)] == [FrameType.SERIAL, FrameType.GONE_BAD]
    assert device.failure_mode == FailureMode.DEBIAS_RIGHT_BAD
    device.power_cycle(2.0)
    assert [device.failure_mode] == [FailureMode.OK]
    with pytest.raises(ValueError, match="power_cycle"):
        device.fail_generator(FailureMode.OK)


@pytest.mark.parametrize(
    ("fault", "check"),
    [
        (PlaintextFault.STUCK, lambda blocks: len(set(blocks)) == 1),
        (
            PlaintextFault.BIASED,
            lambda blocks: (
                sum(bin(b).count("1") for x in blocks for b in x)
                < 0.35 * 8 * 32 * len(blocks)
            ),
        ),
    ],
)
def test_plaintext_faults(fault: PlaintextFault, check: object) -> None:
    """
    Stuck and biased plaintext are still correctly encrypted and MAC'd.
    """
    device = make()
    device.plaintext_fault = fault
    device.receive_data(encode_session_rekey(bytes(12)))
    device.data_to_send()
    device.produce_entropy_frames(50)
    crypto = SessionCrypto(SERIAL, device.session_key)
    blocks = []
    for p in packets(device):
        assert verify_mac(p, crypto)
        pad = crypto.pad(p.subcode_chars)
        blocks.append(bytes(a ^ b for a, b in zip(p.data, pad, strict=True)))
    assert callable(check)
    assert check(blocks)


def test_corrupt_macs_and_garbage() -> None:
    """
    corrupt_macs breaks every MAC; garbage is written after every frame.
    """
    device = make()
    device.data_to_send()
    device.corrupt_macs = True
    device.garbage = b"zz"
    device.receive_data(b"R")
    data = device.data_to_send()
    assert data.endswith(b"\r\nzz")
    (packet,) = [parse_packet(f) for f in FrameSynchroniser().feed(data)]
    assert not verify_mac(packet, ZERO)


def test_mute_key_never_answers() -> None:
    """
    A mute key ignores commands and sends nothing, not even on reset.
    """
    device = make()
    device.data_to_send()
    device.mute = True
    device.receive_data(b"\x03R")
    device.advance(60.0)
    assert device.data_to_send() == b""
    assert device.produce_entropy_frames(5) == 0


def test_constructor_validates_sizes() -> None:
    """
    Serial and long-term key sizes are checked.
    """
    with pytest.raises(ValueError, match="12 bytes"):
        DeviceModel(b"short", LTK)
