"""
When the kernel sink writes to the kernel, how much, and with what credit.

Theory of operation
-------------------
`FeedPlan` is the sink's whole schedule and does no I/O: the driver
(`sinks.kernel.sink`) tells it what the kernel looks like now
(`KernelState`: CRNG ready, entropy count) and what happened (a VM
generation change, a POLLOUT wake-up, a write done, a pool that had nothing),
always with ``now``; the plan answers with the next `Write` to make, if any,
and `get_timer` says when to look again.

New kernels (poolsize 256, Linux 5.18+ and the 2022 stable backports):

* While the CRNG is not ready, every look answers a credited *seed*:
  ``seed_bytes`` at ``credit`` bits per byte, at least 256 bits, which is what
  the kernel needs to become ready. Nothing else happens before ready. A seed
  that did not make the kernel ready (credit 0, or another writer raced us) is
  written again no sooner than ``check_interval`` later. A seed whose bytes
  arrive after the CRNG became ready by other means goes uncredited
  (`revise`): nothing is credited after ready.
* Once ready, nothing is credited any more (the kernel ignores credit after
  ready anyway; crediting nothing keeps the sink honest). A *start* write
  (``write_bytes``, credit 0, then RNDRESEEDCRNG) folds outside input in at
  once when the kernel was already ready when the sink started; then a
  *periodic* one every ``reseed_interval``, the kernel's own reseed cadence.
  A seed that made the kernel ready counts as the start write.
* A VM generation change (NEW_VMGENID uevent: snapshot restore or clone)
  makes a *vmgenid* write due at once, whatever the timer says.

Classic kernels (poolsize 4096):

* Below ``watermark`` bits a *top-up* burst begins: ``write_bytes`` at
  ``credit`` bits per byte per write, each followed by a fresh look, until the
  count reaches ``target``. Credit is asymptotic (each write adds about
  3/4 x credit x (1 - count/4096)), so the target stays below 4096. A write
  that did not raise the count ends the burst: the kernel does not take our
  credit, and writing on would only drain the pool.
* Wake-ups come from POLLOUT on /dev/random and from a timer every
  ``check_interval``, because POLLOUT is not reliable. POLLOUT stays raised
  while the count is below the kernel's own ``write_wakeup_threshold``; a
  POLLOUT wake-up that found nothing to do (the threshold is above our
  watermark) is not armed again until the next timer, so it cannot spin.
* A VM generation change is handled as on new kernels (RNDRESEEDCRNG exists
  from 4.17).

Either generation: a write the pool could not fill (`starved`) or the kernel
refused (`failed`) is retried no sooner than ``check_interval`` later, so an
empty pool (brokers unreachable at boot) costs one look per interval, never a
busy loop. Credit is ``floor(credit x bytes)``, at most 8 bits per byte: the
pool's output is full-entropy by construction (it releases 256 bits only
against 320 credited), and ``credit`` (default 4) stays below that.
"""

import enum
import math
from dataclasses import dataclass

from sinks.kernel.config import CRNG_SEED_BITS, KernelSinkConfig
from sinks.kernel.wire import Semantics

MAX_CREDIT_PER_BYTE = 8.0


class Reason(enum.StrEnum):
    """
    Why a write is made; recorded and logged with it.
    """

    SEED = "seed"
    START = "start"
    PERIODIC = "periodic"
    VMGENID = "vmgenid"
    TOP_UP = "top_up"


def credit_bits(nbytes: int, per_byte: float) -> int:
    """
    Whole bits credited for ``nbytes`` at ``per_byte``, never more than 8 per
    byte and never negative.
    """
    per_byte = min(max(per_byte, 0.0), MAX_CREDIT_PER_BYTE)
    return math.floor(nbytes * per_byte)


@dataclass(frozen=True, slots=True)
class Write:
    """
    One write to make: draw ``nbytes`` from the pool, RNDADDENTROPY them with
    ``credit_per_byte``, then RNDRESEEDCRNG when ``reseed``.
    """

    nbytes: int
    credit_per_byte: float
    reseed: bool
    reason: Reason

    def credit_for(self, nbytes: int) -> int:
        """
        Bits to credit for the ``nbytes`` actually drawn.
        """
        return credit_bits(nbytes, self.credit_per_byte)


@dataclass(frozen=True, slots=True)
class KernelState:
    """
    What the kernel looks like now.
    """

    ready: bool
    """The CRNG is initialised (getrandom with GRND_NONBLOCK succeeds)."""
    entropy: int
    """RNDGETENTCNT: classic, the input pool's count (0-4096); new, the bits
    credited before ready (0-256, pinned at 256 once ready)."""


@dataclass(frozen=True, slots=True)
class PlanSettings:
    """
    The numbers the plan works with, from `KernelSinkConfig`.
    """

    credit: float = 4.0
    seed_bytes: int = 64
    write_bytes: int = 64
    reseed_interval: float = 60.0
    watermark: int = 1024
    target: int = 3072
    check_interval: float = 1.0

    @classmethod
    def from_config(cls, config: KernelSinkConfig) -> "PlanSettings":
        return cls(
            credit=min(config.credit, MAX_CREDIT_PER_BYTE),
            seed_bytes=config.seed_bytes,
            write_bytes=config.write_bytes,
            reseed_interval=config.reseed_interval,
            watermark=config.watermark,
            target=config.target,
            check_interval=config.check_interval,
        )

    @property
    def seed_nbytes(self) -> int:
        """
        Bytes of the boot seed: ``seed_bytes``, or more if the credit per byte
        is too low for 256 bits.
        """
        if self.credit <= 0:
            return self.seed_bytes
        return max(self.seed_bytes, math.ceil(CRNG_SEED_BITS / self.credit))


class FeedPlan:
    """
    The kernel sink's schedule for one kernel generation. See the module
    docstring.
    """

    def __init__(self, settings: PlanSettings, semantics: Semantics, now: float):
        self.settings = settings
        self.semantics = semantics
        self._pending: Reason | None = (
            Reason.START if semantics is Semantics.NEW else None
        )
        self._next_reseed = now + settings.reseed_interval
        self._not_before = now
        """No write before this (after a starved, failed or fruitless write)."""
        self._looked_at = now
        self._burst_last: int | None = None
        """Classic: the count seen before the burst's last write; None outside
        a burst."""
        self._pollout_armed = True
        self.seen_ready: bool | None = None
        """The CRNG's readiness as last seen (None before the first look)."""

    # ---- events ----------------------------------------------------------------

    def vm_generation_changed(self, now: float) -> None:
        """
        The VM was restored from a snapshot or cloned: write and reseed at once.
        """
        self._pending = Reason.VMGENID
        self._not_before = min(self._not_before, now)

    def pollout_woke(self, now: float) -> None:
        """
        Classic: POLLOUT on /dev/random woke the driver. It is armed again only
        after a look that finds work, or after the next timer.
        """
        self._pollout_armed = False

    def wrote(self, now: float, write: Write, state_before: KernelState) -> None:
        """
        ``write`` went to the kernel.
        """
        if write.reason is Reason.SEED:
            # Readiness is checked at the next look; a seed that did not make
            # the kernel ready is not repeated at once.
            self._not_before = now + self.settings.check_interval
            self._pending = None
            self._next_reseed = now + self.settings.reseed_interval
        elif write.reason is Reason.TOP_UP:
            self._burst_last = state_before.entropy
        else:
            self._pending = None
            self._next_reseed = now + self.settings.reseed_interval

    def starved(self, now: float) -> None:
        """
        The pool had too little for the write; try again after ``check_interval``.
        """
        self._not_before = now + self.settings.check_interval

    def failed(self, now: float) -> None:
        """
        The kernel refused the write; try again after ``check_interval``.
        """
        self._not_before = now + self.settings.check_interval
        self._burst_last = None

    # ---- decisions -------------------------------------------------------------

    def due(self, now: float, state: KernelState) -> Write | None:
        """
        The write to make now, given what the kernel looks like, or None.
        """
        if self._looked_at + self.settings.check_interval <= now:
            self._pollout_armed = True  # a timer passed: POLLOUT may wake us again
        self._looked_at = now
        self.seen_ready = state.ready
        if now < self._not_before:
            return None
        if self.semantics is Semantics.NEW:
            return self._due_new(now, state)
        return self._due_classic(now, state)

    def _due_new(self, now: float, state: KernelState) -> Write | None:
        settings = self.settings
        if not state.ready:
            return Write(settings.seed_nbytes, settings.credit, False, Reason.SEED)
        if self._pending is None and now >= self._next_reseed:
            self._pending = Reason.PERIODIC
        if self._pending is None:
            return None
        return Write(settings.write_bytes, 0.0, True, self._pending)

    def _due_classic(self, now: float, state: KernelState) -> Write | None:
        settings = self.settings
        if self._pending is not None:
            return Write(settings.write_bytes, 0.0, True, self._pending)
        if self._burst_last is not None:
            if state.entropy >= settings.target or state.entropy <= self._burst_last:
                # Full, or the kernel took no credit: rest until the next look.
                self._burst_last = None
                self._not_before = now + settings.check_interval
                return None
        elif state.entropy >= settings.watermark:
            return None
        self._pollout_armed = True
        return Write(settings.write_bytes, settings.credit, False, Reason.TOP_UP)

    def revise(self, write: Write, state: KernelState) -> Write:
        """
        ``write`` as it should go now that the kernel looks like ``state``
        (looked at again after waiting for the pool): a seed for a CRNG that
        became ready meanwhile (virtio-rng, RDSEED) goes uncredited, as a
        start write with a reseed.
        """
        if write.reason is Reason.SEED and state.ready:
            return Write(write.nbytes, 0.0, True, Reason.START)
        return write

    def in_burst(self) -> bool:
        """
        Classic: a top-up burst is under way.
        """
        return self._burst_last is not None

    def wants_pollout(self) -> bool:
        """
        Whether the driver should also wake on POLLOUT (classic only).
        """
        return self.semantics is Semantics.CLASSIC and self._pollout_armed

    def get_timer(self) -> float:
        """
        When to look at the kernel again at the latest.
        """
        settings = self.settings
        look = self._looked_at + settings.check_interval
        if self._not_before > self._looked_at:
            return self._not_before
        if self.semantics is Semantics.NEW and self.seen_ready:
            return self._next_reseed if self._pending is None else self._looked_at
        return look
