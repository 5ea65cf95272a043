"""
The Lua scripts `RedisBackend` runs: each is one atomic step on one customer's
keys, so two brokers charging the same customer never both pass its quota.

They read no server clock (the caller passes ``now``) so that replicas and a
promoted replica compute what the primary did.
"""

import math
from dataclasses import dataclass

from broker.accounts.backend import BucketLimit

# Quota keys outlive their period a little so status can still read them.
_QUOTA_KEY_GRACE = 3600

# KEYS[1] customer bucket (hash: tokens, ts), KEYS[2] quota counter,
# KEYS[3] the customer's epoch.
# ARGV: amount, now, rate (<0: no bucket), burst, limit (<0: no quota),
#       quota key ttl (s), bucket ttl (s). TTLs are relative so that the Redis
#       server's clock never decides when a quota period ends.
#       ARGV[8]: the customer's epoch as this broker last saw it; with a quota,
#       a missing or different epoch changes nothing and returns grant -1 so
#       the broker restores that customer first.
TAKE = """
if tonumber(ARGV[5]) >= 0 and redis.call('GET', KEYS[3]) ~= ARGV[8] then
  return {-1, '-1', 0}
end
local amount = tonumber(ARGV[1])
local now = tonumber(ARGV[2])
local rate = tonumber(ARGV[3])
local burst = tonumber(ARGV[4])
local limit = tonumber(ARGV[5])
local grant = amount
local tokens = -1
local ts = now
if rate >= 0 then
  local state = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
  tokens = tonumber(state[1])
  ts = tonumber(state[2])
  if tokens == nil or ts == nil then
    tokens = burst
    ts = now
  elseif now > ts then
    -- another broker's clock may be ahead: never refill backwards
    tokens = tokens + (now - ts) * rate
    ts = now
  end
  if tokens > burst then tokens = burst end
  grant = math.min(grant, math.floor(tokens))
end
local used = 0
if limit >= 0 then
  used = tonumber(redis.call('GET', KEYS[2]) or '0')
  grant = math.min(grant, limit - used)
end
if grant < 0 then grant = 0 end
if rate >= 0 then
  tokens = tokens - grant
  redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'ts', tostring(ts))
  redis.call('EXPIRE', KEYS[1], tonumber(ARGV[7]))
end
if limit >= 0 and grant > 0 then
  used = redis.call('INCRBY', KEYS[2], grant)
  redis.call('EXPIRE', KEYS[2], tonumber(ARGV[6]))
end
return {grant, tostring(tokens), used}
"""

# KEYS[1] bucket, KEYS[2] quota, KEYS[3] the customer's epoch. ARGV: amount,
# burst (<0: no bucket), '1' if there is a quota, the epoch this broker last
# saw (as in TAKE: -1 back and nothing changed when it is missing or differs).
GIVE_BACK = """
if ARGV[3] == '1' and redis.call('GET', KEYS[3]) ~= ARGV[4] then
  return -1
end
local amount = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
if burst >= 0 then
  local tokens = tonumber(redis.call('HGET', KEYS[1], 'tokens'))
  if tokens ~= nil then
    redis.call('HSET', KEYS[1], 'tokens', tostring(math.min(burst, tokens + amount)))
  end
end
local used = 0
if ARGV[3] == '1' then
  local current = tonumber(redis.call('GET', KEYS[2]) or '0')
  local back = math.min(amount, current)
  if back > 0 then
    used = redis.call('DECRBY', KEYS[2], back)
  else
    used = current
  end
end
return used
"""

# KEYS[1] quota counter, KEYS[2] the customer's epoch: both read at once, so a
# count is always read together with the epoch it belongs to.
READ = """
return {redis.call('GET', KEYS[1]), redis.call('GET', KEYS[2])}
"""

# One customer's restore and resync. KEYS[1] the customer's epoch, then per
# counter two keys: the counter and its restore marker. ARGV: the epoch this
# broker last saw ('' if none), a fresh epoch to set if the key is missing,
# then per counter three values: the count this broker knows, its local
# charges to add (resync after an outage), the key ttl (s).
# If the epoch is not the one this broker saw, its known counts were never
# part of this epoch: each adds what passes the marker (the most any broker
# has restored into this counter in this epoch) and raises the marker, so a
# count is restored once whoever restores it, and charges made since the loss
# stay on top. Returns {epoch, count after, ...}.
SYNC = """
local epoch = redis.call('GET', KEYS[1])
local foreign = epoch ~= ARGV[1]
if not epoch then
  epoch = ARGV[2]
  redis.call('SET', KEYS[1], epoch)
  for i = 3, #KEYS, 2 do redis.call('DEL', KEYS[i]) end
end
local out = {epoch}
for i = 2, #KEYS, 2 do
  local at = 3 + (i - 2) / 2 * 3
  local known = tonumber(ARGV[at])
  local add = tonumber(ARGV[at + 1])
  local ttl = tonumber(ARGV[at + 2])
  if foreign then
    local done = tonumber(redis.call('GET', KEYS[i + 1]) or '0')
    if known > done then
      add = add + known - done
      redis.call('SET', KEYS[i + 1], string.format('%d', known), 'EX', ttl)
    end
  end
  local current = tonumber(redis.call('GET', KEYS[i]) or '0')
  if add ~= 0 then
    current = math.max(0, current + add)
    redis.call('SET', KEYS[i], string.format('%d', current), 'EX', ttl)
  end
  out[#out + 1] = current
end
return out
"""


@dataclass(frozen=True, slots=True)
class RedisKeys:
    """
    The names of one fleet's keys. A customer's keys share a ``{customer}``
    hash tag, so they live in one Cluster slot, which a multi-key script needs.
    """

    prefix: str

    def bucket(self, customer_id: str) -> str:
        return f"{self.prefix}{{{customer_id}}}:bucket"

    def quota(self, customer_id: str, period_key: str) -> str:
        return f"{self.prefix}{{{customer_id}}}:quota:{period_key}"

    def marker(self, customer_id: str, period_key: str) -> str:
        return f"{self.prefix}{{{customer_id}}}:restored:{period_key}"

    def customer_epoch(self, customer_id: str) -> str:
        return f"{self.prefix}{{{customer_id}}}:epoch"

    @property
    def fleet_epoch(self) -> str:
        return f"{self.prefix}epoch"


_LONGEST_TTL = 400 * 86400  # longer than any calendar period


def text(raw: object) -> str:
    return raw.decode() if isinstance(raw, bytes) else str(raw)


def quota_ttl(end: float, now: float) -> int:
    if math.isinf(end):
        return _LONGEST_TTL
    return min(_LONGEST_TTL, max(1, math.ceil(end - now)) + _QUOTA_KEY_GRACE)


def bucket_ttl(bucket: BucketLimit | None) -> int:
    # A bucket left alone long enough to refill is the same as no key at all.
    if bucket is None or bucket.rate <= 0:
        return 86400
    return max(60, math.ceil(2 * bucket.burst / bucket.rate) + 60)
