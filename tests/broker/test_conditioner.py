"""
The keyed conditioner: output depends on the secret, and fresh secret material
is mixed in at the stated interval.
"""

import hashlib
import itertools
import os
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.conditioner import (
    BLOCK_BYTES,
    RESEED_BLOCKS,
    SECRET_BYTES,
    Conditioner,
)


def fixed_secret(seed: bytes) -> Callable[[int], bytes]:
    """
    A reproducible secret stream: successive SHA-512 blocks of ``seed``.
    """
    counter = itertools.count()

    def secret(size: int) -> bytes:
        assert SECRET_BYTES == size
        return hashlib.sha512(seed + next(counter).to_bytes(8, "big")).digest()

    return secret


class CountingSecret:
    """
    A secret source that records how often it was asked.
    """

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, size: int) -> bytes:
        self.calls += 1
        return os.urandom(size)


def test_block_is_the_documented_construction() -> None:
    """
    The first block is SHA-512 over a label, the 64-byte key and the input,
    truncated to 32 bytes: the key is hashed in like input, ahead of it.
    """
    key = bytes(range(64))
    conditioner = Conditioner(lambda size: key)
    conditioner.absorb(b"raw device bytes")
    expected = hashlib.sha512(
        b"ebroker conditioner v2 key" + key + b"raw device bytes"
    ).digest()[:BLOCK_BYTES]
    assert expected == conditioner.emit()


def test_same_input_different_keys_differ() -> None:
    """
    Two conditioners fed the same bytes give unrelated output unless their
    secrets match.
    """
    outputs = []
    for seed in (b"a", b"b", b"a"):
        conditioner = Conditioner(fixed_secret(seed))
        blocks = bytearray()
        for _ in range(4):
            conditioner.absorb(b"\x00" * 40)
            blocks += conditioner.emit()
        outputs.append(bytes(blocks))
    assert outputs[0] != outputs[1]
    assert outputs[0] == outputs[2]


def test_emitting_without_input_still_changes_the_block() -> None:
    """
    Chaining through the hidden half of the digest means two blocks in a row
    never repeat, even with no input in between.
    """
    conditioner = Conditioner(fixed_secret(b"k"))
    assert conditioner.emit() != conditioner.emit()


@pytest.mark.parametrize("interval", [1, 3, 16])
def test_reseeds_after_every_interval_of_blocks(interval: int) -> None:
    """
    Fresh secret material is drawn once at start-up and once after every
    ``interval`` blocks, not before.
    """
    secret = CountingSecret()
    conditioner = Conditioner(secret, reseed_blocks=interval)
    assert 1 == secret.calls
    for block in range(1, 3 * interval + 1):
        conditioner.emit()
        assert 1 + block // interval == secret.calls
    assert 3 == conditioner.reseeds


def test_reseed_takes_effect_at_the_interval() -> None:
    """
    Two conditioners whose secrets agree on the key but not on the reseed
    material give the same blocks up to the reseed and different ones after.
    """
    key = os.urandom(SECRET_BYTES)

    def then(fresh: bytes) -> Callable[[int], bytes]:
        draws = itertools.chain([key], itertools.repeat(fresh))
        return lambda size: next(draws)

    first = Conditioner(then(b"\x01" * SECRET_BYTES), reseed_blocks=4)
    second = Conditioner(then(b"\x02" * SECRET_BYTES), reseed_blocks=4)
    same = [first.emit() == second.emit() for _ in range(8)]
    assert [True] * 4 + [False] * 4 == same


def test_default_interval_is_32_kib_of_output() -> None:
    """
    The documented policy: a reseed per 1,024 blocks, 32 KiB of output.
    """
    assert 32 * 1024 == RESEED_BLOCKS * BLOCK_BYTES


def test_short_secret_is_refused() -> None:
    """
    A secret source that returns fewer bytes than asked is a bug, not a key.
    """
    with pytest.raises(ValueError, match="secret source"):
        Conditioner(lambda size: b"")


def test_reseed_interval_must_be_positive() -> None:
    """
    An interval of zero blocks is a configuration mistake.
    """
    with pytest.raises(ValueError, match="reseed"):
        Conditioner(reseed_blocks=0)


@settings(max_examples=200, deadline=None)
@given(
    runs=st.lists(
        st.tuples(
            st.integers(0, 50),  # uncredited input before the run
            st.integers(0, 60),  # first piece
            st.integers(1, 60),  # later pieces
            st.integers(1, 9),  # blocks
        ),
        min_size=1,
        max_size=12,
    ),
    interval=st.sampled_from([1, 2, 3, 7, RESEED_BLOCKS]),
)
def test_emitting_many_blocks_equals_emitting_one_by_one(
    runs: list[tuple[int, int, int, int]], interval: int
) -> None:
    """
    `emit_blocks` gives the same blocks, and leaves the same state, as the
    same pieces absorbed and emitted one block at a time, across reseeds.
    """
    one = Conditioner(fixed_secret(b"s"), reseed_blocks=interval)
    many = Conditioner(fixed_secret(b"s"), reseed_blocks=interval)
    expected = bytearray()
    actual = bytearray()
    for mixed, first, step, count in runs:
        extra = os.urandom(mixed)
        one.absorb(extra)
        many.absorb(extra)
        data = os.urandom(3 + first + step * (count - 1))
        position, size = 3, first
        for _ in range(count):
            one.absorb(data[position : position + size])
            expected += one.emit()
            position += size
            size = step
        actual += many.emit_blocks(data, 3, first, step, count)
    assert expected == actual
    assert (one.blocks, one.reseeds) == (many.blocks, many.reseeds)
    assert one.emit() == many.emit()
