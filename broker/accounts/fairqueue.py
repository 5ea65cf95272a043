"""
Weighted fair order for blocked withdrawals: a drop-in for `broker.pool.WaitQueue`.

Theory of operation
-------------------
Waiters are grouped by customer (a *flow*), and inside a customer by client.
Each flow carries a virtual time: the bytes it has been served divided by its
weight. The next turn goes to the backlogged flow with the smallest virtual time
(start-time fair queuing), so while every customer is backlogged each is served
bytes in proportion to its weight, whatever the number of its clients or
waiters. Inside a flow, clients take turns round-robin: a client served goes to
the back of its customer's line; a client's own waiters stay first in, first out.

A flow whose last waiter was just served is *resting*, not idle: its
clients' next requests are on their way (an EGD connection asks again a few
event-loop turns after each answer), but a source read can release more output
than the waiters already queued want, and the pool hands it out in one pass.
If the customer behind in virtual time has nobody queued at that moment, its
share would go to whoever is queued. So while a resting flow has a smaller
virtual time than the head, the queue *holds*: `holding` says so, and the pool
keeps the output until that flow's next request arrives, when the flow resumes
from its own virtual time, neither gaining nor losing. A resting flow that has
not come back after ``HOLD_TURNS`` held turns of the event loop (`tick`) is
taken as gone, as is one whose last waiter gave up (`remove`).

A flow joining from idle (new, or gone as above) starts at no less than the
queue's virtual clock (the start tag of the turn last served), so idling banks
no credit, while a customer that was just served a lot cannot shed its debt by
idling for a moment.

Nobody is skipped forever: a backlogged flow's virtual time only grows when it
is served, so the smallest one is always served next, a hold lasts at most
``HOLD_TURNS`` ticks, and a client moves to the front of its flow after at most
(clients - 1) turns of that flow.

The pool must report each turn's size: after taking ``n`` bytes for the waiter
returned by `peek`, it calls ``charge(waiter, n)`` (before or after
`pop`/`requeue`, either works). Without it virtual times never advance and the
order degrades to round-robin across customers. It must also ask `holding`
before each turn, and `tick` once per event-loop turn while a hold keeps it
from serving; a pool that never asks hands out everything it has at once, and
shares then depend on how much each source read releases.

Waiter keys: anything with ``customer_id`` (str) and ``weight`` (float > 0),
like `broker.accounts.Client`. Other keys (None, a connection) count as clients
of one customer named ``default`` with weight 1. Weights are read from the key
on each push, so a config reload takes effect at the next turn.

`peek`/`pop` cost O(backlogged customers); hundreds are fine.
"""

from collections import OrderedDict, deque
from collections.abc import Hashable
from typing import Protocol, runtime_checkable

from broker.pool import Waiter

DEFAULT_FLOW = "default"
HOLD_TURNS = 8
"""Event-loop turns output waits for a resting customer before taking it as gone:
an EGD connection asks again one to three turns after each answer."""


class _Flow:
    __slots__ = ("clients", "customer_id", "order", "rested", "vtime", "weight")

    def __init__(self, customer_id: str, weight: float) -> None:
        self.customer_id = customer_id
        self.weight = weight
        self.vtime = 0.0
        self.order = 0
        """When this flow last became backlogged; breaks virtual-time ties."""
        self.clients: OrderedDict[Hashable, deque[Waiter]] = OrderedDict()
        self.rested = 0
        """Held turns since this flow's last waiter was served."""


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
    if not isinstance(key, FlowKey) or not isinstance(key.customer_id, str):
        return DEFAULT_FLOW, 1.0
    weight = float(key.weight)
    # NaN and non-positive weights would stall or invert the virtual clock.
    return key.customer_id, weight if weight > 0 else 1.0


class WeightedWaitQueue:
    """
    Weighted fair queuing across customers, round-robin across each customer's
    clients. Same interface as `broker.pool.WaitQueue`, plus `charge`.
    """

    def __init__(self) -> None:
        self._flows: dict[str, _Flow] = {}
        self._backlogged: dict[str, _Flow] = {}
        self._resting: dict[str, _Flow] = {}
        self._length = 0
        self._vclock = 0.0
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

    def push(self, waiter: Waiter) -> None:
        """
        Queue a new waiter behind its client's earlier ones.
        """
        flow = self._flow_for(waiter.key)
        if flow.customer_id not in self._backlogged:
            if self._resting.pop(flow.customer_id, None) is None:
                flow.vtime = max(flow.vtime, self._vclock)
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
        if not flow.clients:
            del self._backlogged[flow.customer_id]
            flow.rested = 0
            self._resting[flow.customer_id] = flow
        self._vclock = max(self._vclock, self._head_start)
        self._length -= 1
        self._head = None
        return waiter

    def holding(self) -> bool:
        """
        Whether the next turn must wait: a resting customer is behind the head
        in virtual time, and its next request has not arrived yet.
        """
        if not self._backlogged or not self._resting:
            return False
        head = self._select().vtime
        return any(flow.vtime < head for flow in self._resting.values())

    def tick(self) -> None:
        """
        Count one event-loop turn spent holding; a resting customer that has
        not asked again within ``HOLD_TURNS`` of them is taken as gone.
        """
        for customer_id, flow in list(self._resting.items()):
            flow.rested += 1
            if flow.rested >= HOLD_TURNS:
                del self._resting[customer_id]

    def charge(self, waiter: Waiter, nbytes: int) -> None:
        """
        Record that ``waiter`` was just served ``nbytes`` bytes in one turn.
        """
        if nbytes <= 0:
            return
        flow = self._flow_for(waiter.key)
        # The cached head stays: the pool may charge between peek and pop, and
        # pop must return the waiter peek did.
        flow.vtime += nbytes / flow.weight

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
            # A customer whose last waiter gave up has left: nothing is held
            # for it, and it rejoins as any idle customer does.
            self._backlogged.pop(flow.customer_id, None)
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
