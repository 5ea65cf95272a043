"""
The stand-in for a ``serial = "*"`` entry while none of its keys is attached.

Without it such an entry builds no source at all, and a broker started with no
key plugged in (or no keyring) looks exactly like one that was never asked for
keys: status lists nothing and health says ``ok``. The stand-in is a source
named after the entry. Its first open fails with the reason, so status and the
log say "no Entropy Key attached; waiting for one"; later opens wait instead of
failing, so the wait costs no restarts and no log lines. The entry's rescan
(`sources.entropykey.factory.watch_for_keys`) hands it the first key it finds
(`adopt`); from then on the stand-in is that key's driver under the entry's
name, and keys found later get sources of their own, as always.
"""

import asyncio
from collections.abc import Mapping
from types import TracebackType
from typing import Any, Self

from broker.errors import SourceError

from .config import EntropyKeySourceConfig
from .driver import EntropyKeySource

WAITING = "no Entropy Key attached; waiting for one"


class AwaitedKey:
    """
    A wildcard entry's source before its first key arrives, and that key's
    driver after.

    Args:
        config: the ``serial = "*"`` entry.
        reason: why no key is usable, starting with `WAITING`.
        nominal_rate: the rate its keys deliver, so the supervisor's watchdog
            is the one a key's own source gets.
    """

    def __init__(
        self, config: EntropyKeySourceConfig, *, reason: str, nominal_rate: float
    ) -> None:
        self.name = config.name
        self.kind = "entropykey"
        self.priority = config.priority
        self.credit = config.credit
        self.reason = reason
        self._nominal_rate = nominal_rate
        self._driver: EntropyKeySource | None = None
        self._arrived = asyncio.Event()
        self._told = False

    @property
    def nominal_rate(self) -> float | None:
        return self._nominal_rate

    @property
    def waiting(self) -> bool:
        return self._driver is None

    @property
    def unavailable(self) -> str | None:
        """
        Why this entry has no key yet; None once one is attached.
        """
        return self.reason if self._driver is None else None

    def adopt(self, driver: EntropyKeySource) -> None:
        """
        Become ``driver``'s key: the first one found for this entry.

        Raises:
            RuntimeError: a key was adopted already.
        """
        if self._driver is not None:
            raise RuntimeError(f"{self.name} already drives {self._driver.serial}")
        self._driver = driver
        self._arrived.set()

    async def __aenter__(self) -> Self:
        if self._driver is None:
            if not self._told:
                # The supervisor shows a reason only for an open that fails.
                self._told = True
                raise SourceError(self.reason)
            await self._arrived.wait()
        await self._key().__aenter__()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._driver is not None:
            await self._driver.__aexit__(exc_type, exc, tb)

    def _key(self) -> EntropyKeySource:
        if self._driver is None:
            raise SourceError(self.reason)
        return self._driver

    async def read(self) -> bytes:
        return await self._key().read()

    def details(self) -> Mapping[str, Any]:
        if self._driver is None:
            return {"attachment": "none", "session": "closed"}
        return self._driver.details()
