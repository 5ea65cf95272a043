"""
Weighted fair order for blocked withdrawals: a drop-in for `broker.waiters.WaitQueue`.

Theory of operation
-------------------
Waiters are grouped by customer (a *flow*), and inside a customer by client.
Each flow carries a virtual time: the bytes it has been served divided by its
weight. The next turn goes to the backlogged flow with the smallest virtual time
(start-time fair queuing), so while every customer is backlogged each is served
bytes in proportion to its weight, whatever the number of its clients or
waiters. Inside a flow, clients take turns round-robin: a client served goes to
the back of its customer's line; a client's own waiters stay first in, first out.

A flow whose last waiter was just served is *resting*, not idle: its clients'
next requests are on their way, and for a client in another process that takes
a network round trip. Rest is measured on the injected clock, not in event-loop
turns (an idle loop turns in microseconds, far quicker than any client can ask
again). For ``REST_GRACE`` seconds a resting flow keeps its own virtual time:

* When it asks again within the grace it resumes from its own virtual time, so
  a customer that fell behind while its requests travelled is served first
  until its share is restored (*catch-up*). What it can claim is bounded: it
  resumes no further back than the queue's virtual clock was ``REST_GRACE``
  seconds ago, so a customer that keeps asking for less than its share banks
  at most one grace period's worth.
* Output is never held back waiting for it: waiters of other customers are
  served at once. Only bytes already buffered beyond what the queued waiters
  take are *reserved* (`reserved`): as many as the resting customer is owed
  against the customer about to be served, so that a burst larger than the
  queued requests is not handed out first come, first served. Reserved bytes
  stay in the buffer; the reserve lapses when the grace ends (`release_in`
  says when), and the pool bounds it (see `broker.pool`).

A flow resting longer than the grace, one whose last waiter gave up (`remove`)
and a new one all join at no less than the queue's virtual clock (the start tag
of the turn last served), so idling banks no credit, while a customer that was
just served a lot cannot shed its debt by idling for a moment.

Non-blocking reads take bytes outside the queue. The pool asks `turn_for` first:
a non-blocking reader may take only while no queued customer is behind it in
virtual time (its customer's turn, which it takes at once or loses), and never
what `reserved` keeps for a resting customer. A non-blocking customer rests
after each read like a served one, so bytes are reserved for it in turn while
its next poll travels. The pool reports what it took with ``charge_key(key,
n)``, counted against the customer's share like any turn.

Nobody is skipped forever: a backlogged flow's virtual time only grows when it
is served, so the smallest one is always served next, and a client moves to the
front of its flow after at most (clients - 1) turns of that flow.

The pool must report each turn's size: after taking ``n`` bytes for the waiter
returned by `peek`, it calls ``charge(waiter, n)`` (before or after
`pop`/`requeue`, either works), and ``charge(waiter, -n)`` when ``n`` bytes
taken for a waiter that then gave up go back to the buffer. Without it virtual
times never advance and the order degrades to round-robin across customers.

Waiter keys: anything with ``customer_id`` (str) and ``weight`` (float > 0),
like `broker.accounts.Client`. Other keys (None, a connection) count as clients
of one customer named ``default`` with weight 1. Weights are read from the key
on each push, so a config reload takes effect at the next turn.

`peek`/`pop` cost O(backlogged customers), `reserved` O(resting customers);
hundreds are fine.
"""

import math
from collections import OrderedDict, deque
from collections.abc import Hashable
from typing import Protocol, cast, runtime_checkable

from broker.clock import SYSTEM_CLOCK, Clock
from broker.waiters import Waiter

DEFAULT_FLOW = "default"
REST_GRACE = 0.050
"""Seconds a served customer keeps its own virtual time while its next request
travels. A client on the same host or LAN asks again well within a millisecond
or two; 50 ms covers a slow or busy client and a WAN hop, while bounding what a
customer that stays away can claim when it returns to one grace period."""


class _Flow:
    __slots__ = ("clients", "customer_id", "order", "rested_at", "vtime", "weight")

    def __init__(self, customer_id: str, weight: float) -> None:
        self.customer_id = customer_id
        self.weight = weight
        self.vtime = 0.0
        self.order = 0
        """When this flow last became backlogged; breaks virtual-time ties."""
        self.clients: OrderedDict[Hashable, deque[Waiter]] = OrderedDict()
        self.rested_at: float | None = None
        """When this flow was last served (monotonic), while it keeps its place."""


@runtime_checkable
class FlowKey(Protocol):
    """
    A waiter key that names its customer's flow (an accounts `Client`).
    """

    @property
    def customer_id(self) -> str: ...

    @property
    def weight(self) -> float: ...


def _identity(key: Hashable) -> tuple[str, float]:
    # The pool hands over any hashable key; only a FlowKey has a customer.
    # getattr, not isinstance: a runtime Protocol check walks the protocol's
    # members on every call, and this runs on every withdrawal.
    customer_id = getattr(key, "customer_id", None)
    if not isinstance(customer_id, str):
        return DEFAULT_FLOW, 1.0
    weight = float(cast(FlowKey, key).weight)
    # NaN and non-positive weights would stall or invert the virtual clock.
    return customer_id, weight if weight > 0 else 1.0


class WeightedWaitQueue:
    """
    Weighted fair queuing across customers, round-robin across each customer's
    clients. Same interface as `broker.waiters.WaitQueue`.
    """

    def __init__(self, clock: Clock = SYSTEM_CLOCK) -> None:
        """
        Args:
            clock: measures how long a served customer has been resting.
        """
        self._clock = clock
        self._flows: dict[str, _Flow] = {}
        self._backlogged: dict[str, _Flow] = {}
        self._resting: dict[str, _Flow] = {}
        self._length = 0
        self._vclock = 0.0
        self._marks: deque[tuple[float, float]] = deque([(-math.inf, 0.0)])
        """(time, virtual clock) when it moved, back to REST_GRACE ago."""
        self._activations = 0
        self._head: _Flow | None = None
        self._head_start = 0.0

    def __len__(self) -> int:
        return self._length

    def _flow_for(self, key: Hashable) -> _Flow:
        customer_id, weight = _identity(key)
        flow = self._flows.get(customer_id)
        if flow is None:
            flow = self._flows[customer_id] = _Flow(customer_id, weight)
        flow.weight = weight
        return flow

    # ---- virtual clock ------------------------------------------------------------

    def _advance(self, start: float, now: float) -> None:
        if start <= self._vclock:
            return
        self._vclock = start
        if self._marks[-1][0] == now:
            self._marks[-1] = (now, start)
        else:
            self._marks.append((now, start))
        self._floor(now)

    def _floor(self, now: float) -> float:
        """
        The virtual clock as it was REST_GRACE seconds ago.
        """
        marks = self._marks
        while len(marks) > 1 and marks[1][0] <= now - REST_GRACE:
            marks.popleft()
        return marks[0][1]

    def _resting_within(self, flow: _Flow, now: float) -> bool:
        rested_at = flow.rested_at
        if rested_at is None:
            return False
        if now - rested_at < REST_GRACE:
            return True
        flow.rested_at = None
        self._resting.pop(flow.customer_id, None)
        return False

    def _start(self, flow: _Flow, now: float) -> float:
        """
        The virtual time ``flow`` resumes from if it became backlogged now.
        """
        if self._resting_within(flow, now):
            return max(flow.vtime, self._floor(now))
        return max(flow.vtime, self._vclock)

    def _rest(self, flow: _Flow, now: float) -> None:
        flow.rested_at = now
        self._resting[flow.customer_id] = flow

    # ---- queue ----------------------------------------------------------------------

    def push(self, waiter: Waiter) -> None:
        """
        Queue a new waiter behind its client's earlier ones.
        """
        flow = self._flow_for(waiter.key)
        if flow.customer_id not in self._backlogged:
            flow.vtime = self._start(flow, self._clock.monotonic())
            flow.rested_at = None
            self._resting.pop(flow.customer_id, None)
            self._activations += 1
            flow.order = self._activations
            self._backlogged[flow.customer_id] = flow
        line = flow.clients.get(waiter.key)
        if line is None:
            line = flow.clients[waiter.key] = deque()
        line.append(waiter)
        self._length += 1
        self._head = None

    def requeue(self, waiter: Waiter) -> None:
        """
        Put back a waiter that needs more after its turn (its client is at the
        back of its customer's line by now).
        """
        self.push(waiter)

    def _select(self) -> _Flow:
        if self._head is None:
            if not self._backlogged:
                raise IndexError("peek from an empty queue")
            self._head = min(
                self._backlogged.values(), key=lambda flow: (flow.vtime, flow.order)
            )
            self._head_start = self._head.vtime
        return self._head

    def peek(self) -> Waiter:
        """
        The waiter whose turn is next.

        Raises:
            IndexError: the queue is empty.
        """
        flow = self._select()
        return next(iter(flow.clients.values()))[0]

    def pop(self) -> Waiter:
        """
        Remove and return the waiter `peek` returns; its client goes to the back
        of its customer's line.

        Raises:
            IndexError: the queue is empty.
        """
        flow = self._select()
        key, line = next(iter(flow.clients.items()))
        waiter = line.popleft()
        if line:
            flow.clients.move_to_end(key)
        else:
            del flow.clients[key]
        now = self._clock.monotonic()
        if not flow.clients:
            del self._backlogged[flow.customer_id]
            self._rest(flow, now)
        self._advance(self._head_start, now)
        self._length -= 1
        self._head = None
        return waiter

    def charge(self, waiter: Waiter, nbytes: int) -> None:
        """
        Record that ``waiter`` was just served ``nbytes`` bytes in one turn, or
        with ``nbytes`` negative, that bytes taken for it went back unserved.
        """
        flow = self._flow_for(waiter.key)
        # The cached head stays: the pool may charge between peek and pop, and
        # pop must return the waiter peek did.
        flow.vtime += nbytes / flow.weight
        if nbytes < 0 and flow.customer_id not in self._backlogged:
            # Its last waiter gave up after being served: it has left, and
            # nothing is kept for it.
            flow.rested_at = None
            self._resting.pop(flow.customer_id, None)

    def charge_key(self, key: Hashable, nbytes: int) -> None:
        """
        Record that a non-blocking reader with ``key`` asked and took
        ``nbytes`` bytes (maybe none).
        """
        flow = self._flow_for(key)
        now = self._clock.monotonic()
        if flow.customer_id not in self._backlogged:
            flow.vtime = self._start(flow, now)
            # It asked, and polls again: like a served customer, it keeps its
            # place for a grace, and is owed output if it fell behind.
            self._rest(flow, now)
        if nbytes > 0:
            start = flow.vtime
            if start > self._vclock:
                self._advance(start, now)
            flow.vtime = start + nbytes / flow.weight

    def turn_for(self, key: Hashable) -> bool:
        """
        Whether a non-blocking reader with ``key`` may take bytes now: no queued
        customer is behind its customer in virtual time.
        """
        if not self._backlogged:
            return True
        flow = self._flow_for(key)
        if flow.customer_id in self._backlogged:
            return False  # its own blocked readers come first
        return self._start(flow, self._clock.monotonic()) <= self._select().vtime

    def reserved(self, key: Hashable) -> int:
        """
        Buffered bytes a reader with ``key`` must leave for resting customers
        that are owed output against it (behind it in virtual time).
        """
        resting = self._resting
        if not resting:
            return 0
        flow = self._flow_for(key)
        if len(resting) == 1 and flow.customer_id in resting:
            return 0  # only its own customer rests: nobody else is owed
        now = self._clock.monotonic()
        if flow.customer_id in self._backlogged:
            reference = flow.vtime
        else:
            reference = self._start(flow, now)
        owed = 0.0
        for other in list(resting.values()):
            if other is flow or not self._resting_within(other, now):
                continue
            behind = reference - max(other.vtime, self._floor(now))
            if behind > 0:
                owed += behind * other.weight
        return math.ceil(owed)

    def release_in(self) -> float | None:
        """
        Seconds until the first resting customer's grace ends (None: nobody
        rests), when what `reserved` keeps for it lapses.
        """
        if not self._resting:
            return None
        now = self._clock.monotonic()
        ends = [
            flow.rested_at + REST_GRACE
            for flow in self._resting.values()
            if flow.rested_at is not None
        ]
        return max(0.0, min(ends) - now) if ends else None

    def remove(self, waiter: Waiter) -> None:
        """
        Drop a waiter that gave up; a waiter no longer queued is ignored.
        """
        customer_id, _ = _identity(waiter.key)
        flow = self._flows.get(customer_id)
        if flow is None:
            return
        line = flow.clients.get(waiter.key)
        if line is None:
            return
        try:
            line.remove(waiter)
        except ValueError:
            return  # already served: the dispatcher got there first
        if not line:
            del flow.clients[waiter.key]
        if not flow.clients:
            # A customer whose last waiter gave up has left: nothing is kept
            # for it, and it rejoins as any idle customer does.
            self._backlogged.pop(flow.customer_id, None)
            flow.rested_at = None
        self._length -= 1
        self._head = None

    def drain(self) -> list[Waiter]:
        """
        Remove and return every waiter.
        """
        waiters = [
            waiter
            for flow in self._backlogged.values()
            for line in flow.clients.values()
            for waiter in line
        ]
        for flow in self._backlogged.values():
            flow.clients.clear()
        self._backlogged.clear()
        for flow in self._resting.values():
            flow.rested_at = None
        self._resting.clear()
        self._length = 0
        self._head = None
        return waiters

    def shares(self) -> dict[str, float]:
        """
        Virtual time of each customer seen so far (bytes served / weight), for
        status and tests.
        """
        return {customer_id: flow.vtime for customer_id, flow in self._flows.items()}
