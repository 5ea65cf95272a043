"""
Throwaway redis-servers for tests that need the real thing: one server, or a
primary with replicas watched by Redis Sentinels (``redis-server --sentinel``,
from the redis-server package) that fail it over when it dies.
"""

import subprocess
from collections.abc import Sequence
from pathlib import Path

import redis

from tests import system_tools
from tests.helpers import free_port, wait_until


class RedisServer:
    """
    A throwaway redis-server without persistence, restartable on one port.

    ``args`` are added to its command line (``--replicaof`` for a replica);
    ``sentinel_conf`` makes it a sentinel run from that file instead.
    """

    def __init__(
        self,
        directory: Path,
        args: Sequence[str] = (),
        *,
        sentinel_conf: Path | None = None,
    ) -> None:
        self.port = free_port()
        self.directory = directory
        self.args = list(args)
        self.sentinel_conf = sentinel_conf
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def command(self) -> list[str]:
        if self.sentinel_conf is not None:
            # The file first: a sentinel rewrites it with what it learns.
            return ["redis-server", str(self.sentinel_conf), "--sentinel"]
        return [
            "redis-server",
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(self.directory),
            *self.args,
        ]

    def start(self) -> None:
        system_tools.require(["redis-server"])
        self.process = subprocess.Popen(
            self.command(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        client = redis.Redis(port=self.port, socket_connect_timeout=1.0)

        def answers() -> bool:
            try:
                return bool(client.ping())
            except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError):
                # Not listening yet, or too slow to answer on a busy machine.
                return False

        try:
            wait_until(answers, timeout=60)
        finally:
            client.close()

    def kill(self) -> None:
        """
        Crash it (SIGKILL): no goodbye to connected clients, data gone.
        """
        if self.process is not None:
            self.process.kill()
            self.process.wait(timeout=10)
            self.process = None


class SentinelGroup:
    """
    A primary, its replicas and three sentinels on loopback, each on its own
    free port, with failover timings short enough for a test.

    `start` returns once every replica is in sync and every sentinel knows
    the primary, every replica and the other sentinels, so a failover can
    start as soon as the primary dies. `stop` kills every process.
    """

    SERVICE = "ebroker"

    def __init__(
        self,
        directory: Path,
        *,
        replicas: int = 1,
        sentinels: int = 3,
        down_after_ms: int = 500,
        failover_timeout_ms: int = 2000,
    ) -> None:
        self.directory = directory
        self.down_after_ms = down_after_ms
        self.failover_timeout_ms = failover_timeout_ms
        self.primary = RedisServer(self._dir("primary"))
        # Diskless sync without its default 5 s delay: a replica that must
        # resync after a failover does so at once.
        replica_args = ["--repl-diskless-sync-delay", "0"]
        self.replicas = [
            RedisServer(
                self._dir(f"replica{index}"),
                [*replica_args, "--replicaof", "127.0.0.1", str(self.primary.port)],
            )
            for index in range(replicas)
        ]
        self.primary.args += replica_args
        self.sentinels = [
            RedisServer(
                self._dir(f"sentinel{index}"),
                sentinel_conf=self._dir(f"sentinel{index}") / "sentinel.conf",
            )
            for index in range(sentinels)
        ]
        self.quorum = sentinels // 2 + 1

    def _dir(self, name: str) -> Path:
        path = self.directory / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    @property
    def addresses(self) -> list[str]:
        """
        ``HOST:PORT`` of every sentinel, as ``redis_sentinels`` takes them.
        """
        return [f"127.0.0.1:{sentinel.port}" for sentinel in self.sentinels]

    @property
    def data_nodes(self) -> list[RedisServer]:
        return [self.primary, *self.replicas]

    def start(self) -> None:
        try:
            self._start()
        except BaseException:
            self.stop()
            raise

    def _start(self) -> None:
        for node in self.data_nodes:
            node.start()
        wait_until(lambda: self._online_replicas(self.primary) == len(self.replicas))
        for sentinel in self.sentinels:
            assert sentinel.sentinel_conf is not None
            sentinel.sentinel_conf.write_text(
                f"port {sentinel.port}\n"
                "bind 127.0.0.1\n"
                f"dir {sentinel.directory}\n"
                f"sentinel monitor {self.SERVICE} 127.0.0.1 {self.primary.port} "
                f"{self.quorum}\n"
                f"sentinel down-after-milliseconds {self.SERVICE} "
                f"{self.down_after_ms}\n"
                f"sentinel failover-timeout {self.SERVICE} "
                f"{self.failover_timeout_ms}\n"
                f"sentinel parallel-syncs {self.SERVICE} {max(1, len(self.replicas))}\n"
            )
            sentinel.start()
        wait_until(self._sentinels_ready)

    def _sentinels_ready(self) -> bool:
        for sentinel in self.sentinels:
            state = _ask(sentinel.port, "SENTINEL", "MASTER", self.SERVICE)
            if not isinstance(state, dict):
                return False
            if int(state.get(b"num-slaves", 0)) != len(self.replicas):
                return False
            if int(state.get(b"num-other-sentinels", 0)) != len(self.sentinels) - 1:
                return False
        return True

    def _online_replicas(self, node: RedisServer) -> int:
        info = _ask(node.port, "INFO", "replication")
        if not isinstance(info, dict):
            return -1
        return sum(
            1
            for key, value in info.items()
            if key.startswith("slave")
            and isinstance(value, dict)
            and value.get("state") == "online"
        )

    def primary_port(self) -> int | None:
        """
        The primary's port as the first sentinel that answers names it.
        """
        for sentinel in self.sentinels:
            address = _primary_named_by(sentinel, self.SERVICE)
            if address is not None:
                return address
        return None

    def kill_primary(self) -> RedisServer:
        """
        SIGKILL the node the sentinels call primary; return it.
        """
        port = self.primary_port()
        node = next(node for node in self.data_nodes if node.port == port)
        node.kill()
        return node

    def promoted(self, old_port: int) -> bool:
        """
        Whether every sentinel names a primary other than ``old_port`` and
        that primary has all its remaining replicas in sync.
        """
        named: set[int] = set()
        for sentinel in self.sentinels:
            address = _primary_named_by(sentinel, self.SERVICE)
            if address is None:
                return False
            named.add(address)
        if len(named) != 1 or old_port in named:
            return False
        primary = next(node for node in self.data_nodes if node.port in named)
        alive = [node for node in self.data_nodes if node.process is not None]
        return self._online_replicas(primary) == len(alive) - 1

    def stop(self) -> None:
        for node in [*self.sentinels, *self.data_nodes]:
            node.kill()


def _primary_named_by(sentinel: RedisServer, service: str) -> int | None:
    reply = _ask(sentinel.port, "SENTINEL", "GET-MASTER-ADDR-BY-NAME", service)
    if isinstance(reply, list) and len(reply) == 2:
        return int(reply[1])
    return None


def _ask(port: int, *command: str) -> object:
    """
    One command to a local server, its reply unparsed (bytes, lists and, for
    SENTINEL MASTER, a dict of bytes); None if it does not answer.
    """
    client = redis.Redis(port=port, socket_timeout=2.0, socket_connect_timeout=2.0)
    try:
        reply: object = client.execute_command(*command)  # type: ignore[no-untyped-call]
        return reply
    except redis.exceptions.RedisError:
        # Not up yet, down on purpose, or not of the opinion asked for.
        return None
    finally:
        client.close()


def sentinel_accounts(
    group: SentinelGroup, policy: str, *, min_replicas: int = 0
) -> str:
    """
    An ``[accounts]`` section for brokers sharing the primary ``group`` watches.
    """
    sentinels = ", ".join(f'"{address}"' for address in group.addresses)
    return f"""
        [accounts]
        backend = "redis"
        redis_sentinels = [{sentinels}]
        redis_sentinel_service = "{group.SERVICE}"
        redis_min_replicas = {min_replicas}
        redis_replica_timeout = "2 s"
        on_redis_failure = "{policy}"
        # A dead primary refuses at once; a reply slowed by a busy machine
        # must not look like an outage.
        redis_timeout = "10 s"
        redis_retry_interval = "0.2 s"
        persist_interval = "0.2 s"
        """


def redis_accounts(url: str, policy: str) -> str:
    """
    An ``[accounts]`` section for brokers sharing the server at ``url``.
    """
    return f"""
        [accounts]
        backend = "redis"
        redis_url = "{url}"
        on_redis_failure = "{policy}"
        # Outages here are a killed server, refused at once; a reply slowed by
        # a busy machine must not look like one.
        redis_timeout = "10 s"
        redis_retry_interval = "0.2 s"
        persist_interval = "0.2 s"
        """
