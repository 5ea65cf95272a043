"""
Weighted fair wait queue: shares track weights under scarcity, clients of one
customer take turns, and nobody waits forever.
"""

import asyncio
from collections import Counter
from collections.abc import Hashable
from dataclasses import dataclass

from hypothesis import given, settings
from hypothesis import strategies as st

from broker.accounts.fairqueue import (
    DEFAULT_FLOW,
    REST_GRACE,
    WeightedWaitQueue,
    _identity,
)
from broker.pool import EntropyPool, Waiter
from tests.fakeclock import FakeClock

CHUNK = 256
FOREVER = 1 << 40


@dataclass(eq=False)
class Key:
    """
    A stand-in for `Client`: a customer id and a weight.
    """

    customer_id: str
    weight: float
    name: str = ""


def new_waiter(key: Hashable, wanted: int = FOREVER, partial: bool = False) -> Waiter:
    """
    A waiter as the pool makes it.
    """
    future: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
    return Waiter(wanted, partial, future, key)


def serve(queue: WeightedWaitQueue, supply: int) -> list[Waiter]:
    """
    Run the pool's turn loop over ``supply`` bytes: each turn gives the head at
    most CHUNK bytes, charges it, and requeues it if it needs more.
    """
    order: list[Waiter] = []
    while len(queue) and supply:
        waiter = queue.peek()
        n = min(waiter.remaining, CHUNK, supply)
        supply -= n
        if waiter.collected is None:
            waiter.collected = bytearray()
        waiter.collected += bytes(n)
        assert waiter is queue.pop()
        queue.charge(waiter, n)
        order.append(waiter)
        if waiter.remaining:
            queue.requeue(waiter)
    return order


async def test_shares_track_weights() -> None:
    """
    With weights 1:3 and both customers always backlogged, bytes served are
    1:3 within 5 %, however many clients each customer has.
    """
    queue = WeightedWaitQueue()
    light = [Key("light", 1, f"l{i}") for i in range(5)]
    heavy = [Key("heavy", 3, f"h{i}") for i in range(2)]
    for key in light + heavy:
        queue.push(new_waiter(key))
    served: Counter[str] = Counter()
    for waiter in serve(queue, 4 * 1024 * 1024):
        served[waiter.key.customer_id] += CHUNK  # type: ignore[attr-defined]
    ratio = served["heavy"] / served["light"]
    assert abs(ratio - 3.0) <= 0.15


async def test_clients_of_one_customer_take_turns() -> None:
    """
    A customer's clients are served round-robin, one turn each.
    """
    queue = WeightedWaitQueue()
    keys = [Key("c", 1, name) for name in "abc"]
    for key in keys:
        queue.push(new_waiter(key))
        queue.push(new_waiter(key))  # a second reader of the same client waits
    order = [w.key.name for w in serve(queue, 9 * CHUNK)]  # type: ignore[attr-defined]
    assert list("abcabcabc") == order


async def test_idle_customer_banks_no_credit() -> None:
    """
    A customer arriving late is served promptly but cannot claim the bytes it
    did not ask for while idle.
    """
    queue = WeightedWaitQueue()
    queue.push(new_waiter(Key("early", 1)))
    serve(queue, 100 * CHUNK)
    late = Key("late", 1)
    queue.push(new_waiter(late))
    order = serve(queue, 10 * CHUNK)
    late_turns = [i for i, w in enumerate(order) if w.key is late]
    assert late_turns[0] <= 1
    assert 5 == len(late_turns)


async def test_tiny_weight_is_not_starved() -> None:
    """
    A weight-0.01 customer is still served while heavy ones stay backlogged.
    """
    queue = WeightedWaitQueue()
    for i in range(3):
        queue.push(new_waiter(Key(f"big{i}", 100)))
    small = new_waiter(Key("small", 0.01), wanted=CHUNK)
    queue.push(small)
    serve(queue, 20 * CHUNK)
    assert 0 == small.remaining


async def test_plain_keys_share_one_default_customer() -> None:
    """
    Keys that are not clients (None, strings) queue first come, first served
    in one default customer, like the pool's own WaitQueue.
    """
    queue = WeightedWaitQueue()
    waiters = [new_waiter(None, wanted=CHUNK) for _ in range(3)]
    for waiter in waiters:
        queue.push(waiter)
    assert waiters == serve(queue, 10 * CHUNK)


async def test_remove_and_drain() -> None:
    """
    Removing a waiter (twice is harmless) and draining keep the length right.
    """
    queue = WeightedWaitQueue()
    a, b, c = (new_waiter(Key(name, 1)) for name in "abc")
    for waiter in (a, b, c):
        queue.push(waiter)
    queue.remove(b)
    queue.remove(b)
    queue.remove(new_waiter(Key("unknown", 1)))
    assert 2 == len(queue)
    assert {id(a), id(c)} == {id(w) for w in queue.drain()}
    assert 0 == len(queue)


async def test_peek_and_pop_agree_when_charged_in_between() -> None:
    """
    The pool may charge between peek and pop; pop still returns the peeked one.
    """
    queue = WeightedWaitQueue()
    first, second = new_waiter(Key("x", 1)), new_waiter(Key("y", 1))
    queue.push(first)
    queue.push(second)
    head = queue.peek()
    queue.charge(head, 10 * CHUNK)
    assert head is queue.pop()


@settings(max_examples=50, deadline=None)
@given(
    ops=st.lists(
        st.tuples(
            st.sampled_from(["push", "serve", "remove"]),
            st.integers(0, 3),
            st.integers(1, 3 * CHUNK),
        ),
        max_size=60,
    )
)
def test_every_waiter_is_eventually_served(ops: list[tuple[str, int, int]]) -> None:
    """
    Under any mix of pushes, turns and removals, the length stays right and
    serving enough bytes completes every waiter still queued.
    """

    async def scenario() -> None:
        queue = WeightedWaitQueue()
        keys = [Key(f"c{i % 2}", 1 + i, str(i)) for i in range(4)]
        queued: list[Waiter] = []
        for op, index, size in ops:
            if op == "push":
                waiter = new_waiter(keys[index], wanted=size)
                queue.push(waiter)
                queued.append(waiter)
            elif op == "serve":
                serve(queue, size)
            elif queued:
                queue.remove(queued[index % len(queued)])
            queued = [w for w in queued if w.remaining and _inside(queue, w)]
            assert len(queued) == len(queue)
        serve(queue, sum(w.remaining for w in queued) + 1)
        assert 0 == len(queue)
        assert all(0 == w.remaining for w in queued)

    asyncio.run(scenario())


def _inside(queue: WeightedWaitQueue, waiter: Waiter) -> bool:
    """
    Whether ``waiter`` is still queued (looks inside, read-only).
    """
    return any(
        waiter is w
        for flow in queue._backlogged.values()
        for line in flow.clients.values()
        for w in line
    )


async def test_works_inside_the_real_pool() -> None:
    """
    Swapped into `EntropyPool`, the queue serves every blocked reader once.
    """
    pool = EntropyPool(4096, chunk=32, waiters=WeightedWaitQueue())
    keys = [Key("a", 1), Key("b", 3)]
    reads = [asyncio.ensure_future(pool.read(64, key=keys[i % 2])) for i in range(6)]
    await asyncio.sleep(0)
    assert 6 == pool.waiters
    pool.add(bytes(range(256)) * 4, 8)
    results = await asyncio.gather(*reads)
    assert [64] * 6 == [len(data) for data in results]
    assert 0 == pool.waiters


def test_keys_that_are_not_clients_weigh_one() -> None:
    """
    A waiter whose key is not a client (None, a connection) joins the default
    flow with weight 1.
    """
    assert (DEFAULT_FLOW, 1.0) == _identity(None)


async def served_once(clock: FakeClock) -> tuple[WeightedWaitQueue, Key, Key]:
    """
    A queue where a light and a heavy customer were each served one turn and
    both now rest: light at CHUNK, heavy at CHUNK / 3 in virtual time.
    """
    queue = WeightedWaitQueue(clock)
    light, heavy = Key("light", 1), Key("heavy", 3)
    queue.push(new_waiter(light, wanted=CHUNK, partial=True))
    queue.push(new_waiter(heavy, wanted=CHUNK, partial=True))
    assert [light, heavy] == [w.key for w in serve(queue, 2 * CHUNK)]
    return queue, light, heavy


async def test_resting_customer_catches_up_within_the_grace() -> None:
    """
    A customer whose next request arrives a round trip after its last answer
    resumes from its own virtual time, so it is served first until it has
    caught up with what the others got meanwhile.
    """
    clock = FakeClock()
    queue, light, heavy = await served_once(clock)
    queue.push(new_waiter(light))
    serve(queue, 4 * CHUNK)  # light alone while heavy's request travels
    await clock.advance(0.010)
    returning = new_waiter(heavy, wanted=CHUNK)
    queue.push(returning)
    assert CHUNK / 3 == queue.shares()["heavy"]
    assert returning is queue.peek()


async def test_customer_resting_past_the_grace_rejoins_level() -> None:
    """
    A customer away longer than REST_GRACE banks nothing: it rejoins at the
    queue's virtual clock, the start of the turn last served.
    """
    clock = FakeClock()
    queue, light, heavy = await served_once(clock)
    queue.push(new_waiter(light))
    serve(queue, 4 * CHUNK)
    await clock.advance(REST_GRACE)
    queue.push(new_waiter(heavy, wanted=CHUNK))
    assert queue.shares()["light"] - CHUNK == queue.shares()["heavy"]


async def test_catch_up_is_bounded_to_one_grace() -> None:
    """
    A customer that keeps returning within the grace but asks for less than
    its share cannot bank the difference: it resumes no further back than the
    virtual clock was REST_GRACE seconds ago.
    """
    clock = FakeClock()
    queue, light, heavy = await served_once(clock)
    step = REST_GRACE / 5
    starts: list[float] = []
    for turn in range(8):
        await clock.advance(step)
        starts.append(queue.shares()["light"])
        queue.push(new_waiter(light, wanted=CHUNK))
        serve(queue, CHUNK)
        if turn == 3:  # heavy comes back once, takes a little, and rests
            queue.push(new_waiter(heavy, wanted=1))
            serve(queue, 1)
    queue.push(new_waiter(heavy, wanted=1))
    # Now 8 steps in; REST_GRACE ago was just before light's 4th turn.
    assert starts[2] == queue.shares()["heavy"]


async def test_customer_that_gave_up_rejoins_level() -> None:
    """
    A customer whose last waiter timed out or was cancelled has left: nothing
    is kept for it, and it rejoins at the virtual clock however soon it asks.
    """
    clock = FakeClock()
    queue = WeightedWaitQueue(clock)
    light, heavy = Key("light", 1), Key("heavy", 3)
    queue.push(new_waiter(light))
    gives_up = new_waiter(heavy)
    queue.push(gives_up)
    serve(queue, CHUNK)
    queue.remove(gives_up)
    assert 0 == queue.reserved(light)
    assert light is queue.peek().key
    serve(queue, 4 * CHUNK)
    queue.push(new_waiter(heavy))
    assert queue.shares()["light"] - CHUNK == queue.shares()["heavy"]


async def test_reserve_keeps_what_a_resting_customer_is_owed() -> None:
    """
    While a customer behind in virtual time rests, a reader of a customer
    ahead must leave its due in the buffer; the reserve lapses with the grace.
    """
    clock = FakeClock()
    queue, light, heavy = await served_once(clock)
    queue.push(new_waiter(light))
    # heavy is CHUNK - CHUNK / 3 behind light in virtual time, at weight 3
    assert 2 * CHUNK == queue.reserved(light)
    assert 0 == queue.reserved(heavy)
    assert REST_GRACE == queue.release_in()
    await clock.advance(REST_GRACE)
    assert 0 == queue.reserved(light)
    assert queue.release_in() is None


async def test_non_blocking_reads_are_charged_and_take_turns() -> None:
    """
    Bytes taken without blocking count against the customer's share, and a
    non-blocking reader may take only while nobody queued is behind it.
    """
    clock = FakeClock()
    queue = WeightedWaitQueue(clock)
    light, heavy = Key("light", 1), Key("heavy", 3)
    assert queue.turn_for(light)
    queue.charge_key(light, 3 * CHUNK)
    assert 3 * CHUNK == queue.shares()["light"]
    queue.push(new_waiter(heavy))
    assert not queue.turn_for(light)  # heavy rejoined level, light is ahead
    assert not queue.turn_for(heavy)  # its own blocked readers come first
    serve(queue, 9 * CHUNK)
    assert queue.turn_for(light)


async def test_bytes_given_back_are_charged_back() -> None:
    """
    A negative charge (bytes a waiter took but never got) undoes the charge.
    """
    queue = WeightedWaitQueue(FakeClock())
    waiter = new_waiter(Key("a", 2), wanted=CHUNK)
    queue.push(waiter)
    serve(queue, CHUNK)
    queue.charge(waiter, -CHUNK)
    assert 0 == queue.shares()["a"]
    assert 0 == queue.reserved(Key("b", 1))


@settings(max_examples=50, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 3 * CHUNK), min_size=1, max_size=6),
    rest=st.sampled_from([0.0, REST_GRACE / 2, 2 * REST_GRACE]),
)
async def test_charging_turns_outside_the_queue_equals_queued_turns(
    sizes: list[int], rest: float
) -> None:
    """
    A read answered at once while nobody is queued is charged per turn with
    ``charge_key``; that leaves the queue exactly as pushing the read and
    serving it turn by turn would: same shares, same reserve for a resting
    customer, same start for a newcomer.
    """
    clock = FakeClock()
    turned, charged = WeightedWaitQueue(clock), WeightedWaitQueue(clock)
    other, me, late = Key("other", 1), Key("me", 2), Key("late", 1)
    for queue in (turned, charged):
        queue.push(new_waiter(other, wanted=CHUNK, partial=True))
        serve(queue, CHUNK)
    for size in sizes:
        await clock.advance(rest)
        turned.push(new_waiter(me, wanted=size))
        serve(turned, size)
        for turn in range(0, size, CHUNK):
            charged.charge_key(me, min(CHUNK, size - turn))
        assert turned.shares() == charged.shares()
        assert turned.reserved(other) == charged.reserved(other)
        assert turned.reserved(me) == charged.reserved(me)
    for queue in (turned, charged):
        queue.push(new_waiter(late, wanted=CHUNK, partial=True))
        serve(queue, CHUNK)
    assert turned.shares() == charged.shares()
