"""
Accounts: who is asking for entropy, and how much they may have.

Theory of operation
-------------------
*Customers* come from ``[[customers]]`` in the config. Each owns *clients* by
network (CIDR, most specific prefix wins), Unix uid or HTTP bearer token (kept
in the config only as ``sha256:<hex>``). A *client* is one connection identity:
a source IP (EGD/TCP and HTTP), a peer uid (Unix sockets), or a token (HTTP).
A customer named ``default`` catches every client no other customer matches;
with ``deny = true`` it refuses them. Without a ``default`` entry, unmatched
clients are served without limits by an implicit, unlimited ``default``.

Three limits apply to every withdrawal, and only through `Accounts` (sinks have
none of their own):

1. the client's token bucket (``client_rate``/``client_burst``), per broker;
2. the customer's token bucket (``rate``/``burst``), shared by its clients;
3. the customer's quota per calendar period in UTC (``quota = "200 MiB/day"``;
   hour, day, ISO week from Monday, month).

2 and 3 live in a `QuotaBackend`: `MemoryBackend` (one broker; quota counters
in ``state_dir/accounts.json``, written before a grant passes what the file
counts, a reservation ahead, so a crash never hands quota out again and costs
a customer at most one reservation: see `broker.accounts.reservations`) or
`RedisBackend` (brokers share them; every check-and-charge is one atomic Lua
script). If Redis goes away the broker logs ``redis_unavailable``, shows
``healthy: false`` in the snapshot, and either serves under local limits
(``fail_open``) or grants nothing (``fail_closed``); when Redis answers again
local charges are pushed to it (``redis_resynced``). If Redis lost its data
(restarted without persistence), every broker writes back the counts it knows
(``redis_restored``).

Sinks call ``identify(peer)`` per connection, then ``grant`` (non-blocking: what
is allowed now, maybe 0, with ``retry_after``/``limit``/``reset_at`` for HTTP)
or ``wait_grant`` (blocking: waits, returns >= 1 byte) before each pool read,
and ``refund`` for granted bytes they did not serve.

Under scarcity the pool's blocked readers are ordered by `WeightedWaitQueue`:
weighted fair across customers by bytes served, round-robin across a
customer's clients.

Every wait, refill, quota period and persistence interval runs on the `Clock`
given to `Accounts` (``clock=``; the system clock by default).

Modules: ``accounts`` (the facade and housekeeping), ``customers`` (identity to
customer, reload), ``grants`` (take, wait, refund), ``reporting`` (status
snapshot), ``clients`` (client and customer state, `Grant`), ``backend`` and
``redis_backend`` (shared counters), ``reservations`` (durable counts),
``bucket``, ``periods``, ``identity``, ``config``, ``fairqueue``.
"""

from broker.accounts.accounts import STATE_FILE, Accounts
from broker.accounts.backend import (
    BucketLimit,
    Charge,
    MemoryBackend,
    QuotaBackend,
    QuotaLimit,
)
from broker.accounts.bucket import TokenBucket
from broker.accounts.clients import AccessDenied, Client, Denied, Grant, LimitName
from broker.accounts.config import (
    DEFAULT_CUSTOMER,
    AccountsConfig,
    CustomerConfig,
    validate_customers,
)
from broker.accounts.customers import ReloadSummary
from broker.accounts.fairqueue import WeightedWaitQueue
from broker.accounts.identity import IdentityMap, Peer, hash_token
from broker.accounts.periods import (
    Quota,
    QuotaSpec,
    parse_quota,
    period_bounds,
    period_key,
)
from broker.accounts.redis_backend import RedisBackend

__all__ = [
    "DEFAULT_CUSTOMER",
    "STATE_FILE",
    "AccessDenied",
    "Accounts",
    "AccountsConfig",
    "BucketLimit",
    "Charge",
    "Client",
    "CustomerConfig",
    "Denied",
    "Grant",
    "IdentityMap",
    "LimitName",
    "MemoryBackend",
    "Peer",
    "Quota",
    "QuotaBackend",
    "QuotaLimit",
    "QuotaSpec",
    "RedisBackend",
    "ReloadSummary",
    "TokenBucket",
    "WeightedWaitQueue",
    "hash_token",
    "parse_quota",
    "period_bounds",
    "period_key",
    "validate_customers",
]
