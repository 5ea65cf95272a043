"""
Test mode of the kernel sink (``record = "PATH"``): a simulated, freshly
booted kernel that writes down what the sink would have sent to the real one.

Each write and reseed is one JSON line::

    {"time": 1767225600.5, "action": "add", "bytes": 64, "credit": 256,
     "semantics": "new", "reason": "seed", "ready": true, "entropy": 256}

``time`` is wall-clock seconds; ``action`` is ``add`` (RNDADDENTROPY) or
``reseed`` (RNDRESEEDCRNG); ``credit`` is the bits credited; ``ready`` and
``entropy`` are the simulated kernel's CRNG state and entropy count after
the call. No ioctl is made, so record mode needs no privilege and leaves the
host's kernel alone.

The simulation follows the driver generation's documented rules, so the
schedule meets the states it would meet at boot:

* new: the CRNG starts not ready; credit counts until 256 bits, then the CRNG
  is ready and the count stays at 256; a reseed before ready fails with
  ENODATA; a negative credit fails with EINVAL.
* classic: the count starts at 0 and rises asymptotically with credit, in
  steps of at most half the pool, each adding 3/4 x bits x (1 - count/4096),
  as credit_entropy_bits did; the CRNG is ready from 128 bits on.
"""

import errno
import json
import os
from pathlib import Path

from broker.clock import SYSTEM_CLOCK, Clock
from sinks.kernel.config import CLASSIC_POOL_BITS, CRNG_SEED_BITS
from sinks.kernel.plan import KernelState
from sinks.kernel.wire import Semantics, rand_pool_info

CLASSIC_READY_BITS = 128
"""Classic kernels initialised the CRNG from 128 bits of input."""


def classic_credit(count: int, bits: int, pool_bits: int = CLASSIC_POOL_BITS) -> int:
    """
    The classic input pool's count after crediting ``bits`` to ``count``.
    """
    value = float(count)
    remaining = float(bits)
    while remaining > 0 and value < pool_bits - 2:
        step = min(remaining, pool_bits / 2)
        value += (pool_bits - value) * step * 3 / (pool_bits * 4)
        remaining -= step
    return min(pool_bits, int(value))


class RecordingKernel:
    """
    A simulated random driver that appends each call to a JSON-lines file.
    """

    def __init__(
        self, path: Path, semantics: Semantics, clock: Clock = SYSTEM_CLOCK
    ) -> None:
        """
        Raises:
            OSError: the record file cannot be opened.
        """
        self.semantics = semantics
        self.description = f"record:{path}"
        self.path = path
        self._clock = clock
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = path.open("a", encoding="utf-8")
        self._count = 0

    @property
    def ready(self) -> bool:
        if self.semantics is Semantics.NEW:
            return self._count >= CRNG_SEED_BITS
        return self._count >= CLASSIC_READY_BITS

    def state(self) -> KernelState:
        return KernelState(ready=self.ready, entropy=self._count)

    def add(self, data: bytes, credit: int, reason: str) -> None:
        if credit < 0:
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
        # The same argument the real call gets: a bad layout fails here too.
        rand_pool_info(credit, data)
        if self.semantics is Semantics.CLASSIC:
            self._count = classic_credit(self._count, credit)
        elif not self.ready:
            self._count = min(CRNG_SEED_BITS, self._count + credit)
        self._record("add", len(data), credit, reason)

    def reseed(self, reason: str) -> None:
        if self.semantics is Semantics.NEW and not self.ready:
            raise OSError(errno.ENODATA, os.strerror(errno.ENODATA))
        self._record("reseed", 0, 0, reason)

    def drain(self, bits: int) -> None:
        """
        Classic: readers of /dev/random took ``bits`` from the count.
        """
        self._count = max(0, self._count - bits)

    def pollable_fd(self) -> int | None:
        return None

    def close(self) -> None:
        self._file.close()

    def _record(self, action: str, nbytes: int, credit: int, reason: str) -> None:
        line = {
            "time": self._clock.time(),
            "action": action,
            "bytes": nbytes,
            "credit": credit,
            "semantics": str(self.semantics),
            "reason": reason,
            "ready": self.ready,
            "entropy": self._count,
        }
        self._file.write(json.dumps(line) + "\n")
        self._file.flush()
