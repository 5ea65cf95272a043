"""
Test doubles for the EGD sink: a `BrokerView` around a real pool.
"""

from dataclasses import dataclass, field
from pathlib import Path

from broker.accounts import Accounts
from broker.pool import EntropyPool
from broker.status import (
    ConfigStatus,
    Health,
    Phase,
    SinkStatus,
    SourceStatus,
    TierStatus,
)


@dataclass
class View:
    """
    A `BrokerView` holding what the EGD sink uses: pool, accounts, state_dir.
    """

    state_dir: Path
    pool: EntropyPool = field(default_factory=lambda: EntropyPool(1 << 20))
    accounts: Accounts = field(default_factory=Accounts.unlimited)
    instance: str = "test"
    started_at: float = 0.0

    def sources_status(self) -> list[SourceStatus]:
        return []

    def sinks_status(self) -> list[SinkStatus]:
        return []

    def config_status(self) -> ConfigStatus:
        return ConfigStatus(sha256="0" * 64, loaded_at=0.0, path=None)

    def health(self) -> Health:
        return Health(serving=True, status="ok", reasons=())

    def ready(self) -> bool:
        return True

    def phase(self) -> Phase:
        return Phase.SERVING

    def tiers(self) -> TierStatus:
        return TierStatus(
            active_tier=0, best_tier=0, degraded=False, failovers=0, tier_seconds={}
        )

    async def reload(self) -> bool:
        return False

    def simulator_control(self, serial: str, action: str) -> str:
        raise KeyError(serial)
