"""
What /healthz tells the load balancer, for each state of the broker.
"""

import dataclasses

import pytest

from broker.health_policy import HealthInputs, assess
from broker.status import Health

HEALTHY = HealthInputs(
    shutting_down=False,
    pool_level=100_000,
    low_watermark=4096,
    any_healthy_source=True,
    fallback_tier=None,
    store={"kind": "memory", "healthy": True},
)


def facts(**changes: object) -> HealthInputs:
    return dataclasses.replace(HEALTHY, **changes)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("inputs", "expected"),
    [
        pytest.param(HEALTHY, Health(True, "ok", ()), id="all-well"),
        pytest.param(
            facts(shutting_down=True),
            Health(False, "shutting_down", ("shutting down",)),
            id="shutting-down-wins",
        ),
        pytest.param(
            facts(pool_level=0),
            Health(True, "ok", ()),
            id="drained-pool-with-a-source-serves",
        ),
        pytest.param(
            facts(any_healthy_source=False),
            Health(True, "degraded", ("no healthy source",)),
            id="stocked-pool-without-source-serves-degraded",
        ),
        pytest.param(
            facts(any_healthy_source=False, pool_level=10),
            Health(
                False,
                "unhealthy",
                ("no healthy source", "pool level 10 below low watermark 4096"),
            ),
            id="no-source-and-low-pool-is-pulled",
        ),
        pytest.param(
            facts(fallback_tier=2),
            Health(True, "degraded", ("only fallback tier 2 feeds the pool",)),
            id="fallback-tier",
        ),
        pytest.param(
            facts(store={"kind": "redis", "healthy": False, "policy": "fail_open"}),
            Health(
                True,
                "degraded",
                ("budget store redis unreachable, serving fail_open",),
            ),
            id="budget-store-down",
        ),
        pytest.param(
            facts(unavailable=("hwrng: cannot open /dev/hwrng: permission denied",)),
            Health(
                True,
                "degraded",
                ("hwrng: cannot open /dev/hwrng: permission denied",),
            ),
            id="source-that-cannot-run-degrades",
        ),
        pytest.param(
            facts(
                fallback_tier=1,
                unavailable=("ekeys: no Entropy Key attached; waiting for one",),
            ),
            Health(
                True,
                "degraded",
                (
                    "only fallback tier 1 feeds the pool",
                    "ekeys: no Entropy Key attached; waiting for one",
                ),
            ),
            id="every-finding-is-listed",
        ),
        pytest.param(
            facts(
                any_healthy_source=False,
                pool_level=0,
                unavailable=("ekeys: no Entropy Key attached; waiting for one",),
            ),
            Health(
                False,
                "unhealthy",
                (
                    "no healthy source",
                    "pool level 0 below low watermark 4096",
                    "ekeys: no Entropy Key attached; waiting for one",
                ),
            ),
            id="pulled-broker-says-which-source-cannot-run",
        ),
    ],
)
def test_health_answers(inputs: HealthInputs, expected: Health) -> None:
    """
    Each broker state maps to the serving flag, status word and reasons a load
    balancer and an operator read.
    """
    assert expected == assess(inputs)
