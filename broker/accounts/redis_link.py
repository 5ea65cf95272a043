"""
How `RedisBackend` reaches Redis: one server named by URL, or whichever
server Redis Sentinel currently calls the primary; and, optionally, a wait for
replicas after each quota write.

Failover. With sentinels, each new connection first asks them where the
primary is (redis-py's ``SentinelConnectionPool``). When the primary dies, the
next command fails at once (refused, reset) or after the Redis timeout (a
silent host); the backend marks Redis down, applies ``on_redis_failure`` and
tries again every retry interval. Until the sentinels agree the primary is
down and promote a replica, they either still name the dead server or name
none (``MasterNotFoundError``); both count as Redis still down. The first try
after the promotion connects to the new primary and the backend recovers by
itself: nothing else to restart. A primary demoted while it was cut off
answers writes ``READONLY``; redis-py then drops the connection, which is one
more failure and the same path. Nothing here retries: the backend's retry
interval paces reconnects, so an outage flips to the fallback at once rather
than stalling every withdrawal.

Durability. Replication is asynchronous: a write the primary acknowledged but
had not yet sent to a replica is gone when that replica is promoted. With
``min_replicas`` > 0 every quota write is pipelined with ``WAIT min_replicas
timeout`` on the same connection (WAIT counts that connection's writes) and
fewer acknowledgements raise `ReplicasLagging`, a Redis failure like any
other. Sentinel promotes the replica with the largest replication offset, so a
write that reached one live replica survives the failover.

redis-py is imported when a link is built, not with this module: a broker on
the memory backend never pays for it at start-up.
"""

from __future__ import annotations

import os
import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from broker.accounts.config import AccountsConfig, split_sentinel
from broker.errors import ConfigError

if TYPE_CHECKING:
    from redis.asyncio import Redis
    from redis.commands.core import AsyncScript


class StoreFailure(Exception):
    """
    Redis answered, but not well enough to trust the answer.
    """


class ReplicasLagging(StoreFailure):
    """
    Fewer replicas than ``redis_min_replicas`` acknowledged a write in time.
    """


@dataclass(frozen=True, slots=True)
class RedisTarget:
    """
    Where Redis is and how to log in; passwords never appear in a repr.
    """

    url: str
    sentinels: tuple[tuple[str, int], ...] = ()
    service: str | None = None
    password: str | None = field(default=None, repr=False)
    sentinel_password: str | None = field(default=None, repr=False)
    min_replicas: int = 0
    replica_timeout: float = 0.1


def target_from_config(config: AccountsConfig) -> RedisTarget:
    """
    The `RedisTarget` an ``[accounts]`` table describes, its password read
    from the file or environment variable it names.

    Raises:
        ConfigError: the password file cannot be read or the variable is unset.
    """
    password = _read_password(config)
    return RedisTarget(
        url=config.redis_url,
        sentinels=tuple(split_sentinel(entry) for entry in config.redis_sentinels),
        service=config.redis_sentinel_service,
        password=password,
        sentinel_password=password if config.redis_sentinel_auth else None,
        min_replicas=config.redis_min_replicas,
        replica_timeout=config.redis_replica_timeout,
    )


def _read_password(config: AccountsConfig) -> str | None:
    if config.redis_password_file is not None:
        path = config.redis_password_file
        try:
            text = path.read_text()
        except OSError as exc:
            # The path is config, not a secret; the file's content never
            # reaches a message.
            raise ConfigError(
                f"accounts.redis_password_file: cannot read {path}: {exc.strerror}"
            ) from None
        password = text.rstrip("\r\n")
        if not password:
            raise ConfigError(f"accounts.redis_password_file: {path} is empty")
        return password
    if config.redis_password_env is not None:
        name = config.redis_password_env
        value = os.environ.get(name)
        if not value:
            raise ConfigError(
                f"accounts.redis_password_env: environment variable {name} is "
                "unset or empty"
            )
        return value
    return None


class RedisLink:
    """
    One client to the current primary, with the errors that mean "Redis is
    not answering properly right now".
    """

    def __init__(self, target: RedisTarget, *, timeout: float) -> None:
        from redis.asyncio import Redis
        from redis.asyncio.retry import Retry
        from redis.asyncio.sentinel import Sentinel
        from redis.backoff import NoBackoff
        from redis.exceptions import RedisError

        self.target = target
        self.errors: tuple[type[BaseException], ...] = (
            RedisError,
            OSError,
            TimeoutError,
            StoreFailure,
        )
        self._sentinel: Sentinel | None = None
        # No client-side retries: an outage should flip the backend to its
        # fallback at once, not stall every withdrawal through a backoff.
        common: dict[str, Any] = {
            "socket_timeout": timeout,
            "socket_connect_timeout": timeout,
            "retry": Retry(NoBackoff(), 0),
        }
        if not target.sentinels:
            if target.password is not None:
                common["password"] = target.password
            self.client: Redis = Redis.from_url(target.url, **common)
            return
        url = urllib.parse.urlsplit(target.url)
        tls = url.scheme == "rediss"
        sentinel_kwargs = dict(common, ssl=tls)
        if target.sentinel_password is not None:
            sentinel_kwargs["password"] = target.sentinel_password
        # redis-py leaves Sentinel's constructor unannotated.
        self._sentinel = Sentinel(  # type: ignore[no-untyped-call]
            list(target.sentinels),
            sentinel_kwargs=sentinel_kwargs,
            **common,
        )
        self.client = self._sentinel.master_for(
            target.service or "",
            redis_class=Redis,
            db=_database(url),
            password=target.password,
            ssl=tls,
        )

    def register(self, script: str) -> AsyncScript:
        return self.client.register_script(script)

    async def write(
        self,
        script: AsyncScript,
        keys: Sequence[str],
        args: Sequence[str | int],
        *,
        counts: bool = True,
    ) -> Any:
        """
        Run a script that changes state; if it changes quota ``counts`` and
        ``min_replicas`` is set, return only once that many replicas have it.

        Raises:
            ReplicasLagging: fewer replicas acknowledged it in time (the write
                may still have happened on the primary).
            RedisError, OSError, TimeoutError: Redis did not answer.
        """
        wanted = self.target.min_replicas
        if not wanted or not counts:
            return await script(keys=keys, args=args)
        async with self.client.pipeline(transaction=False) as pipe:
            await script(keys=keys, args=args, client=pipe)
            # Staged, not sent: the pipeline returns itself, run by execute().
            _ = pipe.wait(wanted, _milliseconds(self.target.replica_timeout))
            reply, acknowledged = await pipe.execute()
        if int(acknowledged) < wanted:
            raise ReplicasLagging(
                f"{acknowledged} of {wanted} replicas acknowledged a write within "
                f"{self.target.replica_timeout:g} s"
            )
        return reply

    async def check_replicas(self) -> None:
        """
        Raise unless ``min_replicas`` replicas are connected and caught up
        with this connection (a fresh connection has written nothing, so
        WAIT counts the replicas attached to the primary).

        Raises:
            ReplicasLagging: too few replicas.
            RedisError, OSError, TimeoutError: Redis did not answer.
        """
        wanted = self.target.min_replicas
        if not wanted:
            return
        acknowledged = await self.client.wait(
            wanted, _milliseconds(self.target.replica_timeout)
        )
        if int(acknowledged) < wanted:
            raise ReplicasLagging(
                f"{acknowledged} of {wanted} replicas attached to the primary"
            )

    def describe(self) -> dict[str, Any]:
        """
        Where this link points, for status (never a password).
        """
        if not self.target.sentinels:
            return {"mode": "single"}
        from redis.asyncio.sentinel import SentinelConnectionPool

        pool = self.client.connection_pool
        primary = (
            pool.master_address if isinstance(pool, SentinelConnectionPool) else None
        )
        return {
            "mode": "sentinel",
            "service": self.target.service,
            "sentinels": len(self.target.sentinels),
            "primary": f"{primary[0]}:{primary[1]}" if primary else None,
            "min_replicas": self.target.min_replicas,
        }

    async def close(self) -> None:
        await self.client.aclose()
        if self._sentinel is not None:
            await self._sentinel.aclose()


def _database(url: urllib.parse.SplitResult) -> int:
    path = url.path.strip("/")
    return int(path) if path.isdigit() else 0


def _milliseconds(seconds: float) -> int:
    return max(1, round(seconds * 1000))
