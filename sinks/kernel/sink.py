"""
The kernel sink's lifecycle: what the broker starts, reports and stops.

`start` opens the kernel (or the recording stand-in), checks the privilege,
opens the uevent socket and starts one feeding task; it never waits for the
pool, so a broker whose upstreams are unreachable still starts (and tells
systemd it is ready) at once. The task follows `sinks.kernel.plan.FeedPlan`:
look at the kernel, write what the plan says is due, else wait for its timer,
a VM generation change or (classic kernels) POLLOUT.

The sink draws from the pool directly, not through `broker.accounts`: it is
the machine itself, not a client, asks for a few dozen bytes a minute, and a
customer policy that denies unknown clients must not starve its own kernel. In
the pool's fair queue it is one customer of its own (`KERNEL_FLOW`).
"""

import asyncio
import contextlib
import socket
from dataclasses import dataclass
from typing import Any

import structlog

from broker.clock import SYSTEM_CLOCK, Clock
from broker.errors import BrokerError, PoolClosedError
from broker.status import BrokerView, SinkStatus
from sinks.kernel.config import KernelSinkConfig
from sinks.kernel.device import (
    Kernel,
    RandomDevice,
    detect_semantics,
    open_uevent_socket,
    receive_all,
)
from sinks.kernel.plan import FeedPlan, KernelState, PlanSettings, Write
from sinks.kernel.record import RecordingKernel
from sinks.kernel.wire import Semantics, parse_uevent

log = structlog.get_logger("ebroker.sinks.kernel")


@dataclass(frozen=True, slots=True)
class PoolFlow:
    """
    The kernel sink's key in the pool's fair queue: a customer of its own.
    """

    customer_id: str
    weight: float = 1.0


KERNEL_FLOW = PoolFlow("@kernel")


class KernelSink:
    """
    Feeds the local kernel from the pool.
    """

    kind = "kernel"

    def __init__(
        self,
        config: KernelSinkConfig,
        broker: BrokerView,
        *,
        clock: Clock = SYSTEM_CLOCK,
        kernel: Kernel | None = None,
        uevents: socket.socket | None = None,
    ) -> None:
        """
        Args:
            config: the sink's settings.
            broker: where the pool is.
            clock: time for the schedule (tests pass a fake one).
            kernel: the driver to feed instead of the one the config names.
            uevents: a socket to read uevents from instead of the kernel's.
        """
        self.name = config.name or "kernel"
        self._config = config
        self._broker = broker
        self._clock = clock
        self._kernel = kernel
        self._uevents = uevents
        self._log = log.bind(sink=self.name)
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._plan: FeedPlan | None = None
        self._watching_fd: int | None = None
        self._failing: str | None = None
        """The kernel's last refusal, while it lasts (logged once)."""
        self.bytes_out = 0
        self.writes = 0
        self.reseeds = 0

    # ---- Sink ------------------------------------------------------------------

    async def start(self) -> None:
        """
        Open the kernel and start feeding it.

        Raises:
            BrokerError: the kernel cannot be fed (no CAP_SYS_ADMIN, no
                /dev/random, an unknown driver generation, a record file
                that cannot be opened).
        """
        config = self._config
        kernel = self._kernel
        if kernel is None:
            kernel = self._kernel = self._open_kernel()
        plan = self._plan = FeedPlan(
            PlanSettings.from_config(config), kernel.semantics, self._clock.monotonic()
        )
        if self._uevents is None and config.uevents:
            self._uevents = self._open_uevents()
        loop = asyncio.get_running_loop()
        if self._uevents is not None:
            loop.add_reader(self._uevents.fileno(), self._on_uevents)
        state = kernel.state()
        self._log.info(
            "kernel_sink_started",
            target=kernel.description,
            semantics=str(kernel.semantics),
            crng_ready=state.ready,
            entropy_avail=state.entropy,
            credit_per_byte=plan.settings.credit,
            reseed_interval=plan.settings.reseed_interval,
            vmgenid_events=self._uevents is not None,
        )
        self._task = asyncio.create_task(
            self._feed(plan, kernel), name=f"sink:{self.name}"
        )
        self._task.add_done_callback(self._feeding_ended)

    def _feeding_ended(self, task: "asyncio.Task[None]") -> None:
        # The loop never returns: ending early is a bug, and the kernel is
        # no longer fed, which the operator must hear of.
        if task.cancelled():
            return
        error = task.exception()
        self._log.error(
            "kernel_sink_stopped_feeding",
            error=repr(error),
            exc_info=error,
        )

    def pre_shutdown(self) -> None:
        return None

    async def shutdown(self, timeout: float) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel(msg="kernel sink stopping")
            # wait, not await: a task a bug ended was reported when it ended.
            await asyncio.wait((task,))
        self._unwatch_pollout()
        if self._uevents is not None:
            with contextlib.suppress(ValueError, RuntimeError):
                # Already removed, or the loop is closing: nothing to undo.
                asyncio.get_running_loop().remove_reader(self._uevents.fileno())
            self._uevents.close()
        if self._kernel is not None:
            self._kernel.close()

    def status(self) -> SinkStatus:
        return SinkStatus(
            name=self.name,
            kind=self.kind,
            addresses=() if self._kernel is None else (self._kernel.description,),
            connections=0,
            connections_total=0,
            bytes_out=self.bytes_out,
            requests=self.writes,
        )

    def bound_addresses(self) -> list[str]:
        return []

    # ---- set-up ----------------------------------------------------------------

    def _open_kernel(self) -> Kernel:
        config = self._config
        if config.semantics == "auto":
            semantics = detect_semantics()
        else:
            semantics = Semantics(config.semantics)
        if config.record is None:
            return RandomDevice(semantics)
        path = config.record
        if not path.is_absolute():
            path = self._broker.state_dir / path
        try:
            kernel = RecordingKernel(path, semantics, self._clock)
        except OSError as exc:
            raise BrokerError(
                f"kernel sink: cannot open record file {path}: {exc.strerror or exc}"
            ) from exc
        self._log.warning(
            "kernel_sink_recording",
            path=str(path),
            hint="test mode: the real kernel is not fed",
        )
        return kernel

    def _open_uevents(self) -> socket.socket | None:
        try:
            return open_uevent_socket()
        except OSError as exc:
            self._log.info(
                "vmgenid_events_unavailable",
                error=exc.strerror or str(exc),
                consequence="reseeding on the timer only; a restored snapshot "
                "or clone is reseeded at the next interval",
            )
            return None

    # ---- feeding ---------------------------------------------------------------

    async def _feed(self, plan: FeedPlan, kernel: Kernel) -> None:
        starving_since: float | None = None
        while True:
            now = self._clock.monotonic()
            try:
                state = kernel.state()
            except OSError as exc:
                self._kernel_error("kernel_state_unreadable", exc)
                plan.failed(now)
                await self._wait(plan)
                continue
            was_ready = plan.seen_ready
            write = plan.due(now, state)
            if was_ready is False and state.ready:
                self._log.info("crng_ready", entropy_avail=state.entropy)
            if write is None:
                await self._wait(plan)
                continue
            data = await self._draw(write)
            if not data:
                plan.starved(self._clock.monotonic())
                if starving_since is None:
                    starving_since = now
                    self._log.warning(
                        "kernel_sink_pool_empty",
                        reason=str(write.reason),
                        wanted=write.nbytes,
                        hint="no upstream delivers: the kernel is fed as soon as "
                        "one does",
                    )
                continue
            if starving_since is not None:
                self._log.info(
                    "kernel_sink_pool_refilled",
                    waited=round(self._clock.monotonic() - starving_since, 3),
                )
                starving_since = None
            if write.credit_per_byte > 0:
                # The pool may have kept us waiting: credit only what the
                # kernel still counts.
                with contextlib.suppress(OSError):
                    # Unreadable now: the look before the draw stands.
                    state = kernel.state()
                write = plan.revise(write, state)
            self._write(kernel, plan, write, data, state)

    async def _draw(self, write: Write) -> bytes:
        """
        ``write.nbytes`` from the pool, or nothing if it has not got them
        within ``check_interval``.
        """
        pool = self._broker.pool
        interval = self._config.check_interval
        try:
            async with self._clock.timeout(interval):
                return await pool.read(write.nbytes, key=KERNEL_FLOW)
        except TimeoutError:
            return b""
        except PoolClosedError:
            # The broker is stopping; shutdown cancels this task next.
            await asyncio.Event().wait()
            raise AssertionError("unreachable") from None

    def _write(
        self,
        kernel: Kernel,
        plan: FeedPlan,
        write: Write,
        data: bytes,
        state: KernelState,
    ) -> None:
        now = self._clock.monotonic()
        credit = write.credit_for(len(data))
        try:
            kernel.add(data, credit, str(write.reason))
        except OSError as exc:
            plan.failed(now)
            self._kernel_error("kernel_write_failed", exc, reason=str(write.reason))
            return
        if self._failing is not None:
            self._log.info("kernel_write_recovered", after=self._failing)
            self._failing = None
        self.bytes_out += len(data)
        self.writes += 1
        plan.wrote(now, write, state)
        fields: dict[str, Any] = {
            "reason": str(write.reason),
            "bytes": len(data),
            "credit": credit,
        }
        if write.reseed:
            try:
                kernel.reseed(str(write.reason))
            except OSError as exc:
                self._kernel_error("kernel_reseed_failed", exc)
            else:
                self.reseeds += 1
                fields["reseeded"] = True
        # A boot seed and a VM clone are events worth a line; the routine
        # minute-by-minute feeding is not.
        routine = write.reason in ("periodic", "top_up")
        (self._log.debug if routine else self._log.info)("kernel_fed", **fields)

    def _kernel_error(self, event: str, exc: OSError, **fields: Any) -> None:
        # A kernel that keeps refusing is said once per kind of refusal, not
        # once per try.
        error = exc.strerror or str(exc)
        if self._failing == f"{event}: {error}":
            return
        self._failing = f"{event}: {error}"
        self._log.warning(event, error=error, **fields)

    async def _wait(self, plan: FeedPlan) -> None:
        delay = max(0.0, plan.get_timer() - self._clock.monotonic())
        if plan.wants_pollout():
            self._watch_pollout()
        with contextlib.suppress(TimeoutError):
            async with self._clock.timeout(delay):
                await self._wake.wait()
        self._wake.clear()
        self._unwatch_pollout()

    def _on_uevents(self) -> None:
        assert self._uevents is not None  # noqa: S101 - the reader is on it
        try:
            datagrams = receive_all(self._uevents)
        except OSError as exc:
            self._log.warning("uevent_read_failed", error=exc.strerror or str(exc))
            return
        for datagram in datagrams:
            event = parse_uevent(datagram)
            if event is not None and event.new_vm_generation and self._plan:
                self._log.info("vm_generation_changed", devpath=event.devpath)
                self._plan.vm_generation_changed(self._clock.monotonic())
                self._wake.set()

    def _watch_pollout(self) -> None:
        kernel = self._kernel
        fd = None if kernel is None else kernel.pollable_fd()
        if fd is None or self._watching_fd is not None:
            return
        asyncio.get_running_loop().add_writer(fd, self._on_pollout)
        self._watching_fd = fd

    def _unwatch_pollout(self) -> None:
        fd, self._watching_fd = self._watching_fd, None
        if fd is not None:
            with contextlib.suppress(ValueError, RuntimeError):
                # The loop is closing: nothing left to watch.
                asyncio.get_running_loop().remove_writer(fd)

    def _on_pollout(self) -> None:
        # One wake-up per arming: the level stays raised until we top up.
        self._unwatch_pollout()
        if self._plan is not None:
            self._plan.pollout_woke(self._clock.monotonic())
        self._wake.set()
