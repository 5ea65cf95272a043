"""
Weighted shares through a real `EntropyPool`, whatever the source's rhythm.

A source read releases blocks in bursts of its own size; greedy readers (two
per customer, as EGD connections) ask again a few event-loop turns after each
answer. Shares must follow the weights for every read size, for bursty
sources, and while customers come and go. There the fake clock never moves:
the source simply lets the loop run between reads, and every rest is short.

Clients in another process ask again only after a round trip. The second half
drives time on a `FakeClock`: a source read of 4 KiB every 0.5 ms, readers that
wait a round trip of 200 µs, 1 ms or 10 ms after each answer, blocking or
polling without blocking. Their requests are large enough that output is scarce
(a reader that asks for less than its share gets all it asks, whatever the
weights, so no split is owed then).
"""

import asyncio
import random
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest

from broker.accounts.fairqueue import WeightedWaitQueue
from broker.pool import BLOCK_BYTES, EntropyPool
from tests.fakeclock import FakeClock

CAPACITY = 4096
CHUNK = 256
REQUEST = 255  # what an EGD client asks for at a time
READERS = 2
MEASURED = 120_000
TOLERANCE = 0.10
READ_SIZES = [64, 256, 1024, 4096]


@dataclass(eq=False)
class Key:
    """
    A stand-in for `Client`: all of a customer's readers share one key, as
    connections from one address do.
    """

    customer_id: str
    weight: float


@dataclass
class Run:
    """
    One simulated broker: pool, customers' readers and what each received.
    """

    clock: FakeClock = field(default_factory=FakeClock)
    pool: EntropyPool = field(init=False)
    received: Counter[str] = field(default_factory=Counter)
    readers: dict[str, list[asyncio.Task[None]]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.pool = EntropyPool(
            CAPACITY, chunk=CHUNK, waiters=WeightedWaitQueue(self.clock)
        )

    def join(self, customer: str, weight: float) -> None:
        """
        Start a customer's greedy readers.
        """
        key = Key(customer, weight)
        self.readers[customer] = [
            asyncio.create_task(self._read(key, gap=1 + i)) for i in range(READERS)
        ]

    async def leave(self, customer: str) -> None:
        """
        Stop a customer's readers (their connections close).
        """
        tasks = self.readers.pop(customer)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _read(self, key: Key, gap: int) -> None:
        while True:
            data = await self.pool.read(REQUEST, partial=True, key=key)
            self.received[key.customer_id] += len(data)
            # The answer travels back and the next request arrives only after
            # the loop has run, as for a connection.
            for _ in range(gap):
                await asyncio.sleep(0)

    async def feed(
        self, until: int, size: Callable[[], int], pause: Callable[[], int]
    ) -> None:
        """
        Add credited source reads until ``until`` more bytes were received,
        letting the loop run ``pause()`` turns after each read.
        """
        target = self.served + until
        while self.served < target:
            await self.pool.wait_for_space()
            self.pool.add(bytes(size()), 8)
            for _ in range(pause()):
                await asyncio.sleep(0)

    @property
    def served(self) -> int:
        return sum(self.received.values())

    async def close(self) -> None:
        """
        Stop every reader and check no byte went out twice or went missing.
        """
        for customer in list(self.readers):
            await self.leave(customer)
        stats = self.pool.stats()
        made = stats.blocks_out * BLOCK_BYTES
        assert made == self.served + stats.level + self.pool.bytes_discarded
        assert self.served == stats.bytes_out


def assert_shares(weights: dict[str, float], received: Counter[str]) -> None:
    """
    Each customer got its weight's share of ``received``, within TOLERANCE.
    """
    total = sum(received[name] for name in weights)
    expected = {name: w / sum(weights.values()) for name, w in weights.items()}
    actual = {name: received[name] / total for name in weights}
    for name, share in expected.items():
        assert pytest.approx(share, rel=TOLERANCE) == actual[name], actual


async def measure(
    weights: dict[str, float], size: Callable[[], int], pause: Callable[[], int]
) -> Counter[str]:
    """
    Bytes each customer received over MEASURED bytes, after a warm-up.
    """
    run = Run()
    for name, weight in weights.items():
        run.join(name, weight)
    await run.feed(2 * CAPACITY, size, pause)
    before = Counter(run.received)
    await run.feed(MEASURED, size, pause)
    await run.close()
    return run.received - before


@pytest.mark.parametrize("read_size", READ_SIZES)
@pytest.mark.parametrize(
    "weights",
    [{"light": 1, "heavy": 3}, {"a": 1, "b": 2, "c": 5}],
    ids=["1:3", "1:2:5"],
)
async def test_shares_hold_for_any_read_size(
    weights: dict[str, float], read_size: int
) -> None:
    """
    Whatever a source read releases, from two blocks to a hundred, each
    customer's share is its weight's share within 10 %.
    """
    received = await measure(weights, lambda: read_size, lambda: 20)
    assert_shares(weights, received)


@pytest.mark.parametrize("seed", [1, 2, 3])
@pytest.mark.parametrize(
    "weights",
    [{"light": 1, "heavy": 3}, {"a": 1, "b": 2, "c": 5}],
    ids=["1:3", "1:2:5"],
)
async def test_shares_hold_for_a_bursty_source(
    weights: dict[str, float], seed: int
) -> None:
    """
    A source writing random amounts (1 B to 4 KiB) at random intervals (0 to
    40 loop turns, so reads sometimes land back to back) still gives shares
    within 10 % of the weights.
    """
    rng = random.Random(seed)
    received = await measure(
        weights, lambda: rng.randint(1, 4096), lambda: rng.randint(0, 40)
    )
    assert_shares(weights, received)


@pytest.mark.parametrize("read_size", [*READ_SIZES, 0])
async def test_customer_arriving_and_leaving(read_size: int) -> None:
    """
    A customer arriving mid-run gets its weight's share at once, banking
    nothing for the time it was away; the others keep theirs; after it leaves
    they share by weight again, nothing being held for it. (Size 0: bursty.)
    """
    rng = random.Random(read_size)

    def size() -> int:
        return read_size or rng.randint(1, 4096)

    def pause() -> int:
        return 20 if read_size else rng.randint(0, 40)

    run = Run()
    run.join("light", 1)
    run.join("heavy", 3)
    await run.feed(MEASURED // 2, size, pause)
    mark = Counter(run.received)
    run.join("visitor", 2)
    await run.feed(MEASURED // 2, size, pause)
    with_visitor = run.received - mark
    await run.leave("visitor")
    mark = Counter(run.received)
    await run.feed(MEASURED // 2, size, pause)
    after = run.received - mark
    await run.close()
    assert_shares({"light": 1, "heavy": 3, "visitor": 2}, with_visitor)
    assert_shares({"light": 1, "heavy": 3}, after)


async def test_visitor_banks_nothing_while_away() -> None:
    """
    A customer that was served alone and then went away for a long time
    comes back level with the others, not owed what they got meanwhile.
    """
    run = Run()
    run.join("visitor", 1)
    await run.feed(8 * CAPACITY, lambda: 1024, lambda: 20)
    await run.leave("visitor")
    run.join("resident", 1)
    await run.feed(8 * CAPACITY, lambda: 1024, lambda: 20)
    mark = Counter(run.received)
    run.join("visitor", 1)
    await run.feed(4 * CAPACITY, lambda: 1024, lambda: 20)
    back = run.received - mark
    await run.close()
    assert_shares({"visitor": 1, "resident": 1}, back)


SOURCE_READ = 4096
SOURCE_EVERY = 0.0005
ROUND_TRIPS = [0.0002, 0.001, 0.01]
LARGE_REQUEST = 32 * 1024
"""What a remote reader asks for at a time: with REMOTE_READERS per customer,
more than the heavy customer's share of a 10 ms round trip (49 KB), so output
stays scarce."""
REMOTE_READERS = 4
REMOTE_MEASURED = 4_000_000
"""About 30 light requests: a request in flight skews a share by 3 %."""


@dataclass
class Remote:
    """
    Readers in other processes: each asks again a round trip after its answer.
    """

    round_trip: float
    clock: FakeClock = field(default_factory=FakeClock)
    pool: EntropyPool = field(init=False)
    received: Counter[str] = field(default_factory=Counter)
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.pool = EntropyPool(
            CAPACITY, chunk=CHUNK, waiters=WeightedWaitQueue(self.clock)
        )
        self.tasks.append(asyncio.create_task(self._source()))

    async def _source(self) -> None:
        while True:
            await self.pool.wait_for_space()
            self.pool.add(bytes(SOURCE_READ), 8)
            await self.clock.sleep(SOURCE_EVERY)

    def join(self, key: Key, *, blocking: bool = True) -> None:
        """
        Start a customer's readers, blocking or polling without blocking.
        """
        read = self._block if blocking else self._poll
        self.tasks += [asyncio.create_task(read(key)) for _ in range(REMOTE_READERS)]

    async def _block(self, key: Key) -> None:
        while True:
            data = await self.pool.read(LARGE_REQUEST, key=key)
            self.received[key.customer_id] += len(data)
            await self.clock.sleep(self.round_trip)

    async def _poll(self, key: Key) -> None:
        while True:
            data = self.pool.read_nowait(LARGE_REQUEST, key=key)
            self.received[key.customer_id] += len(data)
            await self.clock.sleep(self.round_trip)

    async def run(self, until: int) -> Counter[str]:
        """
        Bytes each customer received over the next ``until`` bytes received.
        """
        before = Counter(self.received)
        target = sum(before.values()) + until
        while sum(self.received.values()) < target:
            await self.clock.advance(SOURCE_EVERY)
        return self.received - before

    async def close(self) -> None:
        """
        Stop the source and every reader; no byte went out twice or missing.
        """
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        stats = self.pool.stats()
        served = sum(self.received.values())
        made = stats.blocks_out * BLOCK_BYTES
        assert made == served + stats.level + self.pool.bytes_discarded
        assert served == stats.bytes_out


async def measure_remote(
    round_trip: float, *, light_blocks: bool = True
) -> Counter[str]:
    """
    Bytes a light (weight 1) and a heavy (weight 3) customer received, after
    a warm-up, with readers a ``round_trip`` away.
    """
    remote = Remote(round_trip)
    remote.join(Key("light", 1), blocking=light_blocks)
    remote.join(Key("heavy", 3))
    await remote.run(4 * LARGE_REQUEST * REMOTE_READERS)
    received = await remote.run(REMOTE_MEASURED)
    await remote.close()
    return received


@pytest.mark.parametrize("round_trip", ROUND_TRIPS, ids=["200us", "1ms", "10ms"])
async def test_shares_hold_across_a_round_trip(round_trip: float) -> None:
    """
    Blocking readers that ask again only a round trip after each answer still
    get shares within 10 % of their weights: a customer that fell behind while
    its requests travelled catches up when they arrive.
    """
    received = await measure_remote(round_trip)
    assert pytest.approx(3.0, rel=TOLERANCE) == received["heavy"] / received["light"]


@pytest.mark.parametrize("round_trip", ROUND_TRIPS[:2], ids=["200us", "1ms"])
async def test_non_blocking_reader_gets_its_weight(round_trip: float) -> None:
    """
    A customer polling without blocking, against one blocked for output, gets
    its weight's share: its reads are charged, it takes bytes on its turn even
    while others wait, and bytes it is owed are kept for its next poll.
    """
    received = await measure_remote(round_trip, light_blocks=False)
    assert_shares({"light": 1, "heavy": 3}, received)
