"""
Whether this broker should receive traffic: the answer behind ``/healthz``.

A load balancer pulls an instance that answers 503, so the policy errs towards
serving while serving is possible: a pool drained for a moment by eager clients
is no reason to pull a broker whose sources refill it, and a pool that still
holds ``low_watermark`` bytes can serve while its sources recover. ``degraded``
is still serving, but tells the operator something needs a look: only a
fallback tier feeds the pool, the shared budget store is unreachable, or a
configured source cannot run (a device the broker may not open, an Entropy Key
entry with no key attached). Every such finding is listed, not only the first.

An optional device that is simply absent is not a finding: ``optional = true``
says the operator expects that on some machines. One that is there but cannot
be opened is a misconfiguration, and is.
"""

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from broker.status import Health


@dataclass(frozen=True, slots=True)
class HealthInputs:
    """
    The facts the policy weighs, read from the running broker.
    """

    shutting_down: bool
    pool_level: int
    low_watermark: int
    any_healthy_source: bool
    fallback_tier: int | None
    """The active tier when it is not the best configured one, else None."""
    store: Mapping[str, Any]
    """The quota backend's status: ``healthy``, ``kind`` and ``policy``."""
    unavailable: tuple[str, ...] = field(default=())
    """Configured sources that cannot run, each as "name: why"."""


def assess(facts: HealthInputs) -> Health:
    """
    Returns:
        Whether to serve, the one-word status and the reasons behind it.
    """
    if facts.shutting_down:
        return Health(False, "shutting_down", ("shutting down",))
    reasons: list[str] = []
    if not facts.any_healthy_source:
        reasons.append("no healthy source")
    if facts.pool_level < facts.low_watermark:
        reasons.append(
            f"pool level {facts.pool_level} below low watermark {facts.low_watermark}"
        )
    if not facts.any_healthy_source and facts.pool_level < facts.low_watermark:
        return Health(False, "unhealthy", (*reasons, *facts.unavailable))
    findings: list[str] = []
    store = facts.store
    if not store.get("healthy", True):
        findings.append(
            f"budget store {store.get('kind')} unreachable, "
            f"serving {store.get('policy')}"
        )
    if facts.fallback_tier is not None:
        findings.append(f"only fallback tier {facts.fallback_tier} feeds the pool")
    findings.extend(facts.unavailable)
    if not facts.any_healthy_source:
        findings.extend(reasons)
    if findings:
        return Health(True, "degraded", tuple(findings))
    return Health(True, "ok", ())
