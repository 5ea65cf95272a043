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
    HOLD_TURNS,
    WeightedWaitQueue,
    _identity,
)
from broker.pool import EntropyPool, Waiter

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


async def test_resting_customer_keeps_its_place() -> None:
    """
    A customer whose only waiter was just served, and which is behind in
    virtual time, makes the queue hold; when its next request arrives it
    resumes from its own virtual time and goes first.
    """
    queue = WeightedWaitQueue()
    light, heavy = Key("light", 1), Key("heavy", 3)
    queue.push(new_waiter(light, wanted=CHUNK, partial=True))
    queue.push(new_waiter(heavy, wanted=CHUNK, partial=True))
    assert [light, heavy] == [w.key for w in serve(queue, 2 * CHUNK)]
    queue.push(new_waiter(light, wanted=CHUNK, partial=True))
    assert queue.holding()
    returning = new_waiter(heavy, wanted=CHUNK, partial=True)
    queue.push(returning)
    assert not queue.holding()
    assert returning is queue.peek()
    assert CHUNK / 3 == queue.shares()["heavy"]


async def test_hold_ends_when_a_resting_customer_stays_away() -> None:
    """
    After HOLD_TURNS held turns a resting customer counts as gone: the others
    are served, and when it comes back it is owed nothing for its absence.
    """
    queue = WeightedWaitQueue()
    light, heavy = Key("light", 1), Key("heavy", 3)
    queue.push(new_waiter(light, wanted=CHUNK, partial=True))
    queue.push(new_waiter(heavy, wanted=CHUNK, partial=True))
    serve(queue, 2 * CHUNK)
    queue.push(new_waiter(light))
    for _ in range(HOLD_TURNS - 1):
        queue.tick()
        assert queue.holding()
    queue.tick()
    assert not queue.holding()
    serve(queue, 10 * CHUNK)
    queue.push(new_waiter(heavy, wanted=CHUNK))
    assert queue.shares()["heavy"] == queue.shares()["light"] - CHUNK


async def test_customer_that_gave_up_is_not_waited_for() -> None:
    """
    A customer whose last waiter timed out or was cancelled has left: the
    queue does not hold output for it.
    """
    queue = WeightedWaitQueue()
    light, heavy = Key("light", 1), Key("heavy", 3)
    queue.push(new_waiter(light))
    gives_up = new_waiter(heavy)
    queue.push(gives_up)
    serve(queue, CHUNK)
    queue.remove(gives_up)
    assert not queue.holding()
    assert light is queue.peek().key


async def test_nothing_is_held_with_nobody_queued() -> None:
    """
    With no waiter queued there is no turn to hold, whoever is resting.
    """
    queue = WeightedWaitQueue()
    queue.push(new_waiter(Key("a", 1), wanted=CHUNK, partial=True))
    serve(queue, CHUNK)
    assert not queue.holding()
    queue.drain()
    queue.push(new_waiter(Key("b", 1)))
    assert not queue.holding()
