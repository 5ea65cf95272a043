"""
The EGD parser: every command, any split of the input, bad commands.
"""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sinks.egd.wire import (
    NEED_DATA,
    ConnectionState,
    EgdServerConnection,
    Event,
    GetLevel,
    GetPid,
    LocalProtocolError,
    ReadBlocking,
    ReadNonBlocking,
    RemoteProtocolError,
    WriteEntropy,
    encode_level,
    encode_nonblocking,
    encode_pid,
)

CASES: list[tuple[bytes, Event]] = [
    (b"\x00", GetLevel()),
    (b"\x01\x10", ReadNonBlocking(16)),
    (b"\x02\xff", ReadBlocking(255)),
    (b"\x02\x00", ReadBlocking(0)),
    (b"\x03\x00\x20\x04\xaa\xbb\xcc\xdd", WriteEntropy(32, b"\xaa\xbb\xcc\xdd")),
    (b"\x03\xff\xff\x00", WriteEntropy(65535, b"")),
    (b"\x04", GetPid()),
]


def events_of(chunks: list[bytes]) -> list[Event]:
    parser = EgdServerConnection()
    events: list[Event] = []
    for chunk in chunks:
        parser.receive_data(chunk)
        while (event := parser.next_event()) is not NEED_DATA:
            assert not isinstance(event, type(NEED_DATA))
            events.append(event)
    return events


@pytest.mark.parametrize(("raw", "event"), CASES)
def test_each_command_whole(raw: bytes, event: Event) -> None:
    """
    Each command parses to its event when it arrives in one piece.
    """
    assert [event] == events_of([raw])


@pytest.mark.parametrize(("raw", "event"), CASES)
def test_each_command_byte_by_byte(raw: bytes, event: Event) -> None:
    """
    A command split into single bytes parses the same, and not before its last byte.
    """
    parser = EgdServerConnection()
    for byte in raw[:-1]:
        parser.receive_data(bytes([byte]))
        assert NEED_DATA is parser.next_event()
    parser.receive_data(raw[-1:])
    assert event == parser.next_event()
    assert NEED_DATA is parser.next_event()


@pytest.mark.parametrize(("raw", "event"), CASES)
def test_trailing_bytes_stay_for_the_next_command(raw: bytes, event: Event) -> None:
    """
    Bytes after a command are the start of the next one.
    """
    parser = EgdServerConnection()
    parser.receive_data(raw + b"\x02")
    assert event == parser.next_event()
    assert NEED_DATA is parser.next_event()
    assert 1 == parser.buffered


def test_pipelined_requests_in_order() -> None:
    """
    Coalesced commands come out in the order sent (QEMU and ekeyd-egd-linux pipeline).
    """
    assert [ReadBlocking(0x80)] * 4 + [GetLevel()] == events_of(
        [b"\x02\x80" * 4 + b"\x00"]
    )


def test_unknown_command_is_an_error_after_earlier_requests() -> None:
    """
    Requests before a bad byte are delivered; the bad byte raises and the
    connection refuses further use.
    """
    parser = EgdServerConnection()
    parser.receive_data(b"\x02\x08\xff\x00")
    assert ReadBlocking(8) == parser.next_event()
    with pytest.raises(RemoteProtocolError, match="0xff"):
        parser.next_event()
    assert ConnectionState.ERROR == parser.state
    with pytest.raises(LocalProtocolError):
        parser.next_event()
    with pytest.raises(LocalProtocolError):
        parser.receive_data(b"\x00")


def test_input_is_bounded() -> None:
    """
    A client cannot make the parser hold unbounded unparsed input.
    """
    parser = EgdServerConnection()
    with pytest.raises(RemoteProtocolError, match="too much"):
        parser.receive_data(b"\x00" * ((1 << 20) + 1))


def test_reply_encodings() -> None:
    """
    Replies have the exact byte layouts of the protocol.
    """
    assert b"\x00\x00\x01\x00" == encode_level(256)
    assert b"\xff\xff\xff\xff" == encode_level(2**40)
    assert b"\x00\x00\x00\x00" == encode_level(-5)
    assert b"\x03abc" == encode_nonblocking(b"abc")
    assert b"\x00" == encode_nonblocking(b"")
    assert b"\x0512345" == encode_pid(12345)
    with pytest.raises(ValueError, match="255"):
        encode_nonblocking(bytes(256))


_command = st.sampled_from([raw for raw, _ in CASES]) | st.builds(
    lambda n, data: b"\x03\x00\x08" + bytes([len(data)]) + data,
    st.integers(0, 255),
    st.binary(max_size=255),
)


@given(
    commands=st.lists(_command, min_size=1, max_size=20),
    cuts=st.lists(st.integers(0, 5000), max_size=10),
)
def test_any_split_parses_the_same(commands: list[bytes], cuts: list[int]) -> None:
    """
    However the stream is cut into reads, the same requests come out.
    """
    stream = b"".join(commands)
    points = sorted({cut % (len(stream) + 1) for cut in cuts})
    chunks = [
        stream[a:b] for a, b in zip([0, *points], [*points, len(stream)], strict=True)
    ]
    assert events_of([stream]) == events_of(chunks)
    assert len(commands) == len(events_of(chunks))
