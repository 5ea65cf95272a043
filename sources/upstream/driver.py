"""
The life of an upstream source (``egd``, ``http``), whatever it speaks: open
on the first endpoint that answers, read from the one in use, fail over
inside a read when it fails, fail back between reads, and close.

A driver supplies what is particular to its protocol, for one endpoint at a
time: `UpstreamSource._connect` (open it and check that it answers),
`UpstreamSource._receive` (one read from it), and, where it has them,
`UpstreamSource._drop` (release it), `UpstreamSource._pending` (bytes the
connect already brought), `UpstreamSource._setup` and
`UpstreamSource._teardown` (what every endpoint shares, from open to close).
"""

import random
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import Any, Generic, Self, TypeVar

from broker.errors import SourceError
from sources.upstream.config import UpstreamConfigBase, failover_budget
from sources.upstream.endpoints import Endpoints
from sources.upstream.failover import closed, fail_back, fail_over, open_first

E = TypeVar("E")
"""An endpoint, as the driver's config names it."""
C = TypeVar("C")
"""What `UpstreamSource._connect` gives for one endpoint: its connection."""


class UpstreamSource(ABC, Generic[E, C]):
    """
    A source that reads from the first of its endpoints that answers.

    Args:
        config: the source's settings.
        endpoints: ``config``'s endpoints, in order of preference.
        log: the driver's logger (bound here to the source).
        rng: jitter for endpoint backoff, a float in [0, 1).
    """

    kind: str

    def __init__(
        self,
        config: UpstreamConfigBase,
        endpoints: Sequence[E],
        *,
        log: Any,
        rng: Callable[[], float] = random.random,
    ) -> None:
        self.name = config.name
        self.priority = config.priority
        self.credit = config.credit
        self._timeout = config.connect_timeout
        self._budget = failover_budget(config.watchdog)
        self._endpoints: Endpoints[E] = Endpoints(
            endpoints,
            backoff_max=config.endpoint_backoff,
            failback=config.failback,
            rng=rng,
        )
        self._connection: C | None = None
        self._log = log.bind(source=config.name, kind=self.kind)

    @property
    def nominal_rate(self) -> float | None:
        return None

    @property
    def endpoints(self) -> Endpoints[E]:
        return self._endpoints

    @abstractmethod
    async def _connect(self, endpoint: E) -> C:
        """
        Open ``endpoint`` and check that it answers, leaving nothing open when
        this raises or is cancelled.

        Raises:
            UpstreamRefused: it answered, and refused.
            SourceError: it answered badly.
            OSError: it could not be reached.
        """

    @abstractmethod
    async def _receive(self, endpoint: E, connection: C) -> bytes:
        """
        The next bytes from ``endpoint`` (never empty).

        Raises:
            SourceError: the endpoint failed; the read fails over.
        """

    def _drop(self, connection: C) -> None:
        """
        Release one endpoint's connection, at once (it may be mid-request).
        """

    def _pending(self, connection: C) -> bytes:
        """
        Bytes that connecting brought and no read has returned yet, taken
        once (b"": none).
        """
        return b""

    async def _setup(self) -> None:
        """
        What every endpoint shares, made at each open before any connects.
        """

    async def _teardown(self) -> None:
        """
        Release what `_setup` made; also after an open that failed.
        """

    def _details(self) -> dict[str, Any]:
        """
        The driver's own facts for the status page.
        """
        return {}

    async def __aenter__(self) -> Self:
        await self._setup()
        try:
            _, self._connection = await open_first(
                self._endpoints, self._connect, self._timeout, self._log
            )
        except BaseException:
            await self._teardown()
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            self._drop(connection)
        await self._teardown()
        closed(self._endpoints, exc, self._log)

    async def read(self) -> bytes:
        # The watchdog runs from about here: the failover budget does too.
        deadline = time.monotonic() + self._budget
        await self._failback()
        while True:
            connection = self._connection
            endpoint = self._endpoints.current
            if connection is None or endpoint is None:
                raise SourceError(f"{self.kind} source is not open")
            pending = self._pending(connection)
            if pending:
                return pending
            try:
                data = await self._receive(endpoint, connection)
            except SourceError as exc:
                # Dropped before the failover awaits anything: a read
                # cancelled meanwhile leaves nothing open behind it.
                self._connection = None
                self._drop(connection)
                _, self._connection = await fail_over(
                    self._endpoints,
                    endpoint,
                    exc,
                    self._connect,
                    self._timeout,
                    deadline,
                    self._log,
                )
                continue
            self._endpoints.delivered(time.monotonic())
            return data

    async def _failback(self) -> None:
        moved = await fail_back(
            self._endpoints, self._connect, self._timeout, self._log
        )
        if moved is None:
            return
        old, self._connection = self._connection, moved[1]
        if old is not None:
            self._drop(old)

    def details(self) -> dict[str, Any]:
        return self._endpoints.details(time.monotonic()) | self._details()
