"""
What an EGD connection carries to a successor broker: requests re-encoded
exactly as clients send them, and its state through JSON and back.
"""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from broker.accounts import Peer
from sinks.egd.handoff import Carried, encode_request
from sinks.egd.wire import (
    NEED_DATA,
    EgdServerConnection,
    Event,
    GetLevel,
    GetPid,
    ReadBlocking,
    ReadNonBlocking,
    WriteEntropy,
)
from tests.sinks.egd.test_wire import CASES


@pytest.mark.parametrize(("data", "event"), CASES)
def test_each_request_encodes_as_its_client_sent_it(data: bytes, event: Event) -> None:
    """
    Encoding is the parser's inverse, byte for byte.
    """
    assert data == encode_request(event)


events = st.one_of(
    st.just(GetLevel()),
    st.just(GetPid()),
    st.builds(ReadNonBlocking, st.integers(0, 255)),
    st.builds(ReadBlocking, st.integers(0, 255)),
    st.builds(WriteEntropy, st.integers(0, 65535), st.binary(max_size=255)),
)


@given(st.lists(events, max_size=20), st.binary(max_size=3))
def test_carried_requests_and_a_partial_one_parse_the_same(
    queue: list[Event], partial: bytes
) -> None:
    """
    A queue re-encoded, followed by the start of a request and its rest,
    parses into the same requests in the same order.
    """
    rest = b"\x02\x20"
    carried = b"".join(map(encode_request, queue)) + rest[: len(partial) % 2]
    parser = EgdServerConnection()
    parser.receive_data(carried)
    parser.receive_data(rest[len(partial) % 2 :])
    parsed: list[Event] = []
    while (event := parser.next_event()) is not NEED_DATA:
        parsed.append(event)
    assert [*queue, ReadBlocking(32)] == parsed


def test_unparsed_bytes_are_what_is_left_of_a_request() -> None:
    """
    A parser hands over the start of a request it could not parse yet.
    """
    parser = EgdServerConnection()
    parser.receive_data(b"\x00\x03\x00\x08\x02\xaa")
    assert GetLevel() == parser.next_event()
    assert NEED_DATA is parser.next_event()
    assert b"\x03\x00\x08\x02\xaa" == parser.unparsed()


@pytest.mark.parametrize(
    "carried",
    [
        Carried("egd", Peer("tcp", ip="10.0.0.5"), "10.0.0.5:4711", b"\x02"),
        Carried("egd", Peer("unix", uid=1000), "unix"),
        Carried("egd", Peer("unix"), "unix", bytes(range(256))),
        Carried("egd-public", None, "10.0.0.7:999"),
    ],
)
def test_carried_state_survives_json(carried: Carried) -> None:
    """
    Sink, client identity, how logs show it and pending bytes round-trip.
    """
    assert carried == Carried.from_json(carried.to_json())


@pytest.mark.parametrize(
    "document",
    [
        None,
        {},
        {"sink": "egd", "shown": "x", "pending": "!!", "peer": None},
        {"sink": "egd", "shown": "x", "pending": "", "peer": {"transport": "http"}},
        {
            "sink": "egd",
            "shown": "x",
            "pending": "",
            "peer": {"transport": "tcp", "ip": 5, "uid": None},
        },
        {"sink": 3, "shown": "x", "pending": "", "peer": None},
    ],
)
def test_malformed_state_is_refused(document: object) -> None:
    """
    Anything but what `to_json` writes is a ValueError, never a crash.
    """
    with pytest.raises(ValueError, match="not a handed-over EGD connection"):
        Carried.from_json(document)
