"""
The keys every upstream source (``egd``, ``http``) has, and the share of its
watchdog that one read may spend failing over between its endpoints.
"""

from pydantic import Field

from broker.configbase import Duration, SourceConfigBase
from broker.runner import derive_watchdog

FAILOVER_SHARE = 0.5
"""Share of a source's watchdog one read may spend failing over."""


def failover_budget(watchdog: float | None) -> float:
    """
    Seconds one read may spend failing over to another endpoint: half the
    source's ``watchdog`` (unset: the supervisor's default for a source of
    unknown rate, as an upstream is), the other half left for the endpoint
    moved to to deliver.
    """
    if watchdog is None:
        watchdog = derive_watchdog(None)
    return FAILOVER_SHARE * watchdog


class UpstreamConfigBase(SourceConfigBase):
    """
    Keys every upstream source has (``egd`` and ``http``).
    """

    connect_timeout: Duration = Field(
        default=5.0,
        gt=0,
        le=300,
        description="seconds an endpoint may take to connect and answer the first "
        "request of an open before the next endpoint is tried",
    )
    endpoint_backoff: Duration = Field(
        default=30.0,
        gt=0,
        le=3600,
        description="longest an endpoint that failed is skipped (its delay starts "
        "at 0.5 s and doubles with each failure in a row, half of it random)",
    )
    failback: Duration | None = Field(
        default=60.0,
        gt=0,
        description="after this long on a less preferred endpoint, try the "
        "preferred ones again between reads, without interrupting the supply; "
        "unset: stay on the endpoint that works until it fails",
    )
