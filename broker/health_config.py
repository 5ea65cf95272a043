"""
The per-source health-test settings (``health = {...}`` in a source entry).

A leaf module: a driver's config can name these settings without importing the
health machinery itself.
"""

from typing import Annotated

from pydantic import Field, model_validator

from broker.configtypes import Duration, StrictModel

AlphaLog2 = Annotated[float, Field(ge=-100, le=-10)]


class HealthConfig(StrictModel):
    """
    Per-source health tests (``health = {...}`` in a source entry).
    """

    enabled: bool = Field(
        default=True,
        description="run the health tests; false credits every byte untested",
    )
    alpha_log2: AlphaLog2 = Field(
        default=-30.0,
        description="log2 of the false-alarm probability of one RCT decision "
        "(intermittent failure); the RCT runs on 64-bit words",
    )
    apt_alpha_log2: AlphaLog2 = Field(
        default=-40.0,
        description="log2 of the false-alarm probability of one APT window "
        "(512 bytes); -40 keeps a 4 KiB/s source free of false alarms for "
        "centuries, -30 would give about one a year",
    )
    permanent_alpha_log2: AlphaLog2 | None = Field(
        default=None,
        description="log2 alpha of permanent cut-offs (jitterentropy uses -60): "
        "reaching one fails the source at once. Unset, a source fails only after "
        "permanent_failures failures within failure_window, so a feeder glitch "
        "costs a quarantine, not the source",
    )
    repeats: bool = Field(
        default=True,
        description="fail output that repeats itself at any period up to 64 KiB "
        "(a counter, a replayed buffer); keeps the last 66 KiB of the source",
    )
    fips: bool = Field(
        default=False, description="also run the FIPS 140-2 tests on 2500-byte blocks"
    )
    fips_max_failures: int = Field(
        default=40,
        ge=1,
        le=10_000,
        description="failed FIPS blocks (less one per 1000 good blocks) that "
        "quarantine the source",
    )
    permanent_failures: int = Field(
        default=3,
        ge=1,
        description="failures within failure_window that fail the source for good",
    )
    quarantine_limit: Duration = Field(
        default=600.0,
        description="a quarantined source that is still failing its tests after "
        "this many seconds is failed for good",
    )
    failure_window: Duration = Field(
        default=3600.0,
        gt=0,
        description="seconds over which failures are counted, e.g. '1 h'",
    )

    @model_validator(mode="after")
    def _permanent_is_rarer(self) -> "HealthConfig":
        permanent = self.permanent_alpha_log2
        if permanent is not None and permanent >= min(
            self.alpha_log2, self.apt_alpha_log2
        ):
            raise ValueError(
                "permanent_alpha_log2 must be below alpha_log2 and apt_alpha_log2"
            )
        return self
