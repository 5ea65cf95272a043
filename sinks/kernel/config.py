"""
Config model of the kernel sink.

The defaults follow what each generation of the Linux random driver needs
(`sinks.kernel.plan`): a boot seed of 64 bytes at 4
credited bits per byte is exactly the 256 bits a new kernel's CRNG needs to be
ready; afterwards 64 uncredited bytes and a reseed every 60 s, the kernel's own
reseed cadence; on classic kernels a top-up from below 1024 bits (ekeyd's
wake-up threshold) to 3072 (credit is asymptotic: 4096 is never reached).
"""

from pathlib import Path
from typing import Literal, Self

from pydantic import Field, model_validator

from broker.configbase import Duration, Listen, Name, StrictModel

CRNG_SEED_BITS = 256
"""Credited bits a new kernel's CRNG needs before it is ready."""
CLASSIC_POOL_BITS = 4096
"""The classic input pool's size: the count never reaches it."""
MAX_WRITE_BYTES = 512
"""Most bytes one RNDADDENTROPY carries (Python copies an ioctl argument into a
1 KiB buffer; more than this is never needed)."""


class KernelSinkConfig(StrictModel):
    """
    ``kind = "kernel"``: feed this machine's kernel (the VM agent).
    """

    kind: Literal["kernel"] = Field(description="sink type")
    name: Name | None = Field(
        default=None, description="optional name used in logs and status"
    )
    semantics: Literal["auto", "classic", "new"] = Field(
        default="auto",
        description="which random driver to feed: 'auto' reads "
        "/proc/sys/kernel/random/poolsize (4096: classic, 256: new); "
        "'classic' or 'new' forces one",
    )
    credit: float = Field(
        default=4.0,
        ge=0.0,
        le=8.0,
        description="entropy bits credited to the kernel per byte written, when "
        "the kernel still counts credit (never above the pool's 8)",
    )
    seed_bytes: int = Field(
        default=64,
        ge=16,
        le=MAX_WRITE_BYTES,
        description="bytes of the credited boot seed written while the CRNG is "
        "not ready (new kernels); seed_bytes x credit must reach 256 bits",
    )
    write_bytes: int = Field(
        default=64,
        ge=16,
        le=MAX_WRITE_BYTES,
        description="bytes per write after boot: each reseed (new kernels) or "
        "each top-up step (classic kernels)",
    )
    reseed_interval: Duration = Field(
        default=60.0,
        gt=0,
        description="new kernels: seconds between uncredited writes, each "
        "followed by RNDRESEEDCRNG",
    )
    watermark: int = Field(
        default=1024,
        ge=0,
        description="classic kernels: top up when entropy_avail is below this "
        "many bits",
    )
    target: int = Field(
        default=3072,
        gt=0,
        lt=CLASSIC_POOL_BITS,
        description="classic kernels: stop topping up at this many bits",
    )
    check_interval: Duration = Field(
        default=1.0,
        gt=0,
        description="seconds between looks at the kernel besides wake-ups "
        "(classic POLLOUT is unreliable), and between tries while the pool is "
        "empty",
    )
    uevents: bool = Field(
        default=True,
        description="listen for NEW_VMGENID kernel uevents (VM snapshot or "
        "clone) and reseed at once",
    )
    record: Path | None = Field(
        default=None,
        description="test mode: append what would be written to this file as "
        "JSON lines and feed a simulated freshly booted kernel, never the real one",
    )

    @model_validator(mode="after")
    def _seed_reaches_readiness(self) -> Self:
        if self.credit > 0 and self.seed_bytes * self.credit < CRNG_SEED_BITS:
            raise ValueError(
                f"seed_bytes x credit = {self.seed_bytes * self.credit:g} bits: "
                f"the boot seed must credit at least {CRNG_SEED_BITS} bits"
            )
        if self.watermark >= self.target:
            raise ValueError("watermark must be below target")
        return self

    @property
    def listen(self) -> list[Listen]:
        """
        The kernel sink listens nowhere.
        """
        return []

    @property
    def max_connections(self) -> int:
        return 0
