"""
Wiring and lifecycle of the broker process.

Start-up order is pool → sources → sinks; shutdown is the reverse. SIGTERM
first drains: /healthz answers 503 for ``drain`` seconds while every request is
still served, so load balancers stop sending new clients. Then the broker
closes: stop accepting, answer the requests already accepted within
``shutdown_grace``, close connections and remove Unix sockets, stop sources,
close the pool. A second SIGTERM (or SIGINT) cuts the drain or the grace short.
"""

import asyncio
import contextlib
import gc
import hashlib
import json
import os
import signal
import socket
from collections.abc import Callable, Coroutine
from functools import partial
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol, Self

import structlog

from broker import __version__
from broker.accounts import STATE_FILE, Accounts, WeightedWaitQueue
from broker.clock import SYSTEM_CLOCK, Clock
from broker.config import Config, SinkConfig, SourceConfig, load_config
from broker.errors import BrokerError, ConfigError
from broker.fdlimit import needed_for, raise_soft_limit
from broker.handover import HandoverHooks, HandoverListener
from broker.health_policy import HealthInputs, assess
from broker.history import History
from broker.history_recorder import HistoryRecorder, configured_step
from broker.inherited import InheritedListeners
from broker.ownership import StateDirLock, file_problem, prepare_state_dir
from broker.pool import EntropyPool
from broker.sdnotify import Notifier
from broker.status import (
    ConfigStatus,
    Health,
    Phase,
    Sink,
    SinkStatus,
    SourceStatus,
    TierStatus,
)
from broker.supervisor import Supervisor
from broker.takeover import Takeover, adopt, take_over
from sinks.egd.config import EgdSinkConfig
from sinks.egd.server import EgdSink
from sinks.http.config import HttpSinkConfig
from sinks.http.server import HttpSink
from sinks.kernel.config import KernelSinkConfig
from sinks.kernel.sink import KernelSink
from sources.base import Source
from sources.device import DeviceSource, DeviceSourceConfig, may_skip
from sources.egd import EgdSource, EgdSourceConfig
from sources.entropykey.config import ANY_SERIAL, EntropyKeySourceConfig
from sources.entropykey.factory import (
    ClaimedSerials,
    SimulatedFleet,
    build_sources,
    stand_in,
    watch_for_keys,
)
from sources.getrandom import GetrandomSource, GetrandomSourceConfig
from sources.http import HttpSource, HttpSourceConfig

log = structlog.get_logger("ebroker.app")

LISTENERS_FILE = "listeners.json"
RELOAD_FILE = "reload.json"
"""The outcome of the last SIGHUP reload: pid, sequence, accepted, reason."""
ACCOUNTS_CLOSE_TIMEOUT = 15.0


class MayBeUnavailable(Protocol):
    """
    A source that can tell why it cannot run (a device it may not open, a key
    entry with no key), for the broker's health.
    """

    name: str

    @property
    def unavailable(self) -> str | None: ...


def _getrandom(config: SourceConfig, broker: "Broker") -> list[Source]:
    if not isinstance(config, GetrandomSourceConfig):
        raise TypeError(f"not a getrandom config: {config!r}")
    return [GetrandomSource(config)]


def _device(config: SourceConfig, broker: "Broker") -> list[Source]:
    if not isinstance(config, DeviceSourceConfig):
        raise TypeError(f"not a device config: {config!r}")
    source = DeviceSource(config)
    broker.unavailable_sources.append(source)
    return [source]


def _entropykey(config: SourceConfig, broker: "Broker") -> list[Source]:
    if not isinstance(config, EntropyKeySourceConfig):
        raise TypeError(f"not an entropykey config: {config!r}")
    sources = build_sources(config, usb_backend=broker.usb_backend, fleet=broker.fleet)
    if config.serial != ANY_SERIAL:
        return list(sources)
    if sources:
        broker.key_watches.append((config, {source.serial for source in sources}))
        return list(sources)
    # An entry with no key present still shows in status and health, with why.
    waiting = stand_in(config)
    broker.key_watches.append((config, ClaimedSerials(stand_in=waiting)))
    broker.unavailable_sources.append(waiting)
    return [waiting]


def _egd_upstream(config: SourceConfig, broker: "Broker") -> list[Source]:
    if not isinstance(config, EgdSourceConfig):
        raise TypeError(f"not an egd source config: {config!r}")
    return [EgdSource(config)]


def _http_upstream(config: SourceConfig, broker: "Broker") -> list[Source]:
    if not isinstance(config, HttpSourceConfig):
        raise TypeError(f"not an http source config: {config!r}")
    return [HttpSource(config)]


SOURCE_KINDS: dict[str, Callable[[SourceConfig, "Broker"], list[Source]]] = {
    "getrandom": _getrandom,
    "device": _device,
    "hwrng": _device,
    "entropykey": _entropykey,
    "egd": _egd_upstream,
    "http": _http_upstream,
}


def _egd(config: SinkConfig, broker: "Broker") -> Sink:
    if not isinstance(config, EgdSinkConfig):
        raise TypeError(f"not an egd config: {config!r}")
    return EgdSink(config, broker, inherited=broker.inherited)


def _http(config: SinkConfig, broker: "Broker") -> Sink:
    if not isinstance(config, HttpSinkConfig):
        raise TypeError(f"not an http config: {config!r}")
    return HttpSink(config, broker, inherited=broker.inherited)


def _kernel(config: SinkConfig, broker: "Broker") -> Sink:
    if not isinstance(config, KernelSinkConfig):
        raise TypeError(f"not a kernel config: {config!r}")
    return KernelSink(config, broker)


SINK_KINDS: dict[str, Callable[[SinkConfig, "Broker"], Sink]] = {
    "egd": _egd,
    "http": _http,
    "kernel": _kernel,
}


def fingerprint(config: Config, path: Path | None) -> str:
    """
    SHA-256 of the configuration file's bytes; without a file, of the
    validated settings.
    """
    if path is not None:
        with contextlib.suppress(OSError):
            return hashlib.sha256(path.read_bytes()).hexdigest()
    settings = json.dumps(config.model_dump(mode="json"), sort_keys=True)
    return hashlib.sha256(settings.encode()).hexdigest()


class Broker:
    """
    One running broker: pool, supervised sources and sinks. Implements
    `broker.status.BrokerView` for the sinks.
    """

    def __init__(
        self,
        config: Config,
        *,
        config_path: Path | None = None,
        usb_backend: Any = None,
        clock: Clock = SYSTEM_CLOCK,
        inherited: InheritedListeners | None = None,
    ) -> None:
        self.config = config
        self.inherited = inherited if inherited is not None else InheritedListeners()
        """Listening sockets handed to this process (`broker.inherited`)."""
        self.takeover: Takeover | None = None
        """What a predecessor handed over (`broker.handover`), set before start."""
        self.handed_over = asyncio.Event()
        """Set once a successor took the listeners and connections over."""
        self.clock = clock
        self.config_path = config_path
        self.state_dir = config.broker.state_dir.absolute()
        self.usb_backend = usb_backend
        self.fleet = SimulatedFleet()
        self.key_watches: list[tuple[EntropyKeySourceConfig, set[str]]] = []
        self._tasks: set[asyncio.Task[Any]] = set()
        self.accounts = Accounts(
            config.accounts,
            config.customers,
            state_path=self.state_dir / STATE_FILE,
            clock=clock,
        )
        self._pool = EntropyPool(
            config.broker.pool_size, waiters=WeightedWaitQueue(clock)
        )
        self.supervisor = Supervisor(
            self._pool, clock=clock, low_watermark=config.broker.low_watermark
        )
        self.unavailable_sources: list[MayBeUnavailable] = []
        for source_config in config.enabled_sources:
            for source in SOURCE_KINDS[source_config.kind](source_config, self):
                self.supervisor.add(
                    source,
                    optional=isinstance(source_config, DeviceSourceConfig)
                    and may_skip(source_config),
                    record_raw=source_config.record_raw,
                    health=source_config.health,
                    watchdog=source_config.watchdog,
                )
        self.sinks: list[Sink] = [
            SINK_KINDS[sink_config.kind](sink_config, self)
            for sink_config in config.sinks
        ]
        self._instance = socket.gethostname()
        self._started_at = clock.time()
        self._config_status = ConfigStatus(
            sha256=fingerprint(config, config_path),
            loaded_at=self._started_at,
            path=None if config_path is None else str(config_path),
        )
        self._phase = Phase.STARTING
        self._started = False
        """True once start-up completed: shutdown then has clients to answer."""
        self._drain_ends: float | None = None
        self.hurry = asyncio.Event()
        """Set by a second stop signal: end the drain or the grace at once."""
        self.notifier = Notifier()
        self._reloads = 0
        self._reload_refusal: str | None = None
        self._started_sinks: list[Sink] = []
        self._teardown = contextlib.AsyncExitStack()
        self._history = HistoryRecorder(
            self, self.state_dir, clock=clock, step=configured_step(os.environ)
        )

    # ---- BrokerView ---------------------------------------------------------------

    @property
    def pool(self) -> EntropyPool:
        return self._pool

    @property
    def instance(self) -> str:
        return self._instance

    @property
    def started_at(self) -> float:
        return self._started_at

    def config_status(self) -> ConfigStatus:
        return self._config_status

    @property
    def history(self) -> History:
        return self._history.history

    def sources_status(self) -> list[SourceStatus]:
        return self.supervisor.statuses()

    def sinks_status(self) -> list[SinkStatus]:
        return [sink.status() for sink in self.sinks]

    def ready(self) -> bool:
        return self._phase is Phase.SERVING

    def phase(self) -> Phase:
        return self._phase

    def tiers(self) -> TierStatus:
        supervisor = self.supervisor
        served, buffered = supervisor.tier_output()
        return TierStatus(
            active_tier=supervisor.active_tier,
            best_tier=supervisor.best_tier,
            degraded=supervisor.degraded,
            failovers=supervisor.failovers,
            tier_seconds=supervisor.tier_seconds(),
            served_by_tier=served,
            buffered_by_tier=buffered,
        )

    def health(self) -> Health:
        if self._phase is Phase.DRAINING and self._drain_ends is not None:
            left = max(0.0, self._drain_ends - self.clock.monotonic())
            return Health(
                False,
                "shutting_down",
                (f"draining: still serving, listeners close in {left:.1f} s",),
            )
        supervisor = self.supervisor
        return assess(
            HealthInputs(
                shutting_down=self._phase
                in (Phase.DRAINING, Phase.CLOSING, Phase.STOPPED),
                pool_level=self._pool.level,
                low_watermark=self.config.broker.low_watermark,
                any_healthy_source=supervisor.any_healthy(),
                fallback_tier=supervisor.active_tier if supervisor.degraded else None,
                store=self.accounts.backend.status(),
                unavailable=tuple(
                    f"{source.name}: {reason}"
                    for source in self.unavailable_sources
                    if (reason := source.unavailable) is not None
                ),
            )
        )

    # ---- lifecycle ----------------------------------------------------------------

    async def __aenter__(self) -> Self:
        # Each step registers its undo as soon as it succeeds, so a failed
        # start unwinds exactly what started, and shutdown is the same unwind.
        self._check_fd_budget()
        async with contextlib.AsyncExitStack() as stack:
            prepare_state_dir(self.state_dir)
            # First: a second broker on this directory stops here, before it
            # touches a listener, a socket file or the counters.
            stack.callback(StateDirLock(self.state_dir).acquire().release)
            await self.accounts.start()
            stack.push_async_callback(self._close_accounts)
            stack.callback(self._pool.close)
            self.supervisor.start()
            stack.push_async_callback(self.supervisor.stop)
            stack.push_async_callback(self._cancel_tasks)
            self._watch_for_keys()
            await stack.enter_async_context(self._history)
            stack.push_async_callback(self._stop_sinks)
            stack.callback(self.inherited.close_unclaimed)
            for sink in self.sinks:
                await sink.start()
                self._started_sinks.append(sink)
            if self.takeover is not None:
                stack.callback(self.takeover.close)
                await adopt(self.sinks, self.takeover)
            self.inherited.close_unclaimed()
            await stack.enter_async_context(
                HandoverListener(
                    self.state_dir,
                    self.sinks,
                    HandoverHooks(
                        serving=lambda: self._phase is Phase.SERVING,
                        committed=self._handing_over,
                        done=self.handed_over.set,
                        grace=self.config.broker.shutdown_grace,
                    ),
                )
            )
            self._write_runtime_files()
            stack.callback(self._remove_runtime_files)
            self._teardown = stack.pop_all()
        self._phase = Phase.SERVING
        self._started = True
        log.info(
            "broker_started",
            version=__version__,
            listeners=self.listeners(),
            sources=[runner.name for runner in self.supervisor.runners],
        )
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.shutdown()

    async def drain(self) -> None:
        """
        Keep serving with /healthz at 503 for ``drain`` seconds (or until
        `hurry` is set), so that load balancers take this broker out of
        rotation before it stops accepting.
        """
        if self._phase is not Phase.SERVING:
            return
        seconds = self.config.broker.drain
        self._drain_ends = self.clock.monotonic() + seconds
        self._phase = Phase.DRAINING
        self.notifier.stopping(f"draining: still serving for {seconds:g} s")
        log.info(
            "broker_draining",
            drain=seconds,
            hint="healthz answers 503 while serving; signal again to stop now",
        )
        if seconds <= 0 or self.hurry.is_set():
            return
        with contextlib.suppress(TimeoutError):
            async with self.clock.timeout(seconds):
                await self.hurry.wait()
            log.info("broker_drain_cut_short", reason="second stop signal")

    async def shutdown(self) -> None:
        """
        Stop accepting, let accepted requests be answered within
        ``shutdown_grace``, then stop everything in the reverse order of
        start-up.
        """
        if self._phase in (Phase.CLOSING, Phase.STOPPED):
            return
        self._phase = Phase.CLOSING
        self.notifier.stopping("closing: answering accepted requests")
        grace = self._grace() if self._started else 0.0
        log.info("broker_closing", grace=grace)
        begun = self.clock.monotonic()
        await self._teardown.aclose()
        self._phase = Phase.STOPPED
        log.info(
            "broker_stopped", closing_took=round(self.clock.monotonic() - begun, 3)
        )

    def _handing_over(self) -> None:
        # The successor speaks for the service from now on (it sends
        # MAINPID=): a STOPPING=1 from here would stop the unit under it.
        self.notifier.status("handing over to a successor")
        self.notifier = Notifier(environ={})

    def _grace(self) -> float:
        return 0.0 if self.hurry.is_set() else self.config.broker.shutdown_grace

    def _check_fd_budget(self) -> None:
        caps = [sink_config.max_connections for sink_config in self.config.sinks]
        budget = raise_soft_limit(needed_for(caps))
        if not budget.enough:
            log.warning(
                "fd_limit_below_connection_caps",
                open_files=budget.soft,
                needed=budget.needed,
                hint="raise LimitNOFILE (systemd) or ulimit -n, or lower "
                "max_connections",
            )

    def _watch_for_keys(self) -> None:
        for key_config, known in self.key_watches:
            self._spawn(
                watch_for_keys(
                    key_config,
                    usb_backend=self.usb_backend,
                    fleet=self.fleet,
                    known=known,
                    add=partial(
                        self.supervisor.add_running,
                        record_raw=key_config.record_raw,
                        health=key_config.health,
                        watchdog=key_config.watchdog,
                    ),
                ),
                name=f"watch:{key_config.name}",
            )

    async def _stop_sinks(self) -> None:
        sinks = self._started_sinks
        for sink in sinks:
            sink.pre_shutdown()
        # A start that failed half-way has no clients to wait for.
        grace = self._grace() if self._started else 0.0
        closing = asyncio.ensure_future(
            asyncio.gather(
                *(sink.shutdown(grace) for sink in sinks), return_exceptions=True
            )
        )
        hurry = asyncio.ensure_future(self.hurry.wait())
        await asyncio.wait((closing, hurry), return_when=asyncio.FIRST_COMPLETED)
        hurry.cancel()
        if not closing.done():
            log.info("broker_grace_cut_short", reason="second stop signal")
            closing.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await closing
            closing = asyncio.ensure_future(
                asyncio.gather(
                    *(sink.shutdown(0.0) for sink in sinks), return_exceptions=True
                )
            )
        for sink, result in zip(sinks, await closing, strict=True):
            if isinstance(result, BaseException):
                log.error("sink_shutdown_failed", sink=sink.name, error=repr(result))

    async def _close_accounts(self) -> None:
        # Pushing refunds to a shared store must not keep a stopping broker
        # alive forever: a store that stopped answering costs those refunds.
        try:
            async with asyncio.timeout(ACCOUNTS_CLOSE_TIMEOUT):
                await self.accounts.close()
        except TimeoutError:
            log.error("accounts_close_timed_out", timeout=ACCOUNTS_CLOSE_TIMEOUT)

    async def _cancel_tasks(self) -> None:
        reason = "broker shutting down" if self._started else "start-up failed"
        for task in list(self._tasks):
            task.cancel(msg=reason)
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def handle_hup(self) -> None:
        """
        SIGHUP: re-read customers and limits from the config file.
        """
        self.notifier.reloading()
        self._spawn(self._reload_and_record(), name="reload")

    def announce_ready(self) -> None:
        """
        Tell the service manager every listener accepts; keep its watchdog fed.
        """
        self.notifier.ready(self._serving_text())
        if self.notifier.watchdog_interval is not None:
            self._spawn(self.notifier.keep_watchdog_fed(), name="watchdog")

    def _serving_text(self) -> str:
        # A sink that listens nowhere (the kernel sink) names where it writes.
        addresses = [
            address
            for sink in self.sinks
            for address in sink.bound_addresses() or sink.status().addresses
        ]
        return "serving on " + ", ".join(addresses)

    async def _reload_and_record(self) -> None:
        # The outcome goes to a file too: `ebroker reload` waits for it, so its
        # exit status says whether the broker took the new file.
        accepted = await self.reload()
        if self._phase is Phase.SERVING:
            self.notifier.ready(self._serving_text())
        self._reloads += 1
        outcome = {
            "pid": os.getpid(),
            "sequence": self._reloads,
            "accepted": accepted,
            "reason": None if accepted else self._reload_refusal,
        }
        path = self.state_dir / RELOAD_FILE
        temporary = path.with_suffix(".tmp")
        try:
            temporary.write_text(json.dumps(outcome) + "\n")
            temporary.replace(path)
        except OSError as exc:
            log.error("reload_outcome_not_written", path=str(path), error=str(exc))

    async def reload(self) -> bool:
        """
        Re-read the config file and apply its customers and limits, and the
        HTTP sinks' TLS files (new handshakes only); live connections keep
        running under the new limits. A bad file, certificate or key is
        refused and the running configuration kept.

        Returns:
            True when the new customers and limits are in force.
        """
        if self.config_path is None:
            self._reload_refusal = "broker was not started from a file"
            log.warning("reload_refused", reason=self._reload_refusal)
            return False
        try:
            config = await asyncio.to_thread(load_config, self.config_path)
            # Every sink's new TLS files load before anything changes, so a
            # bad certificate refuses the whole reload.
            tls_commits = [
                commit
                for sink in self.sinks
                if isinstance(sink, HttpSink)
                and (commit := await sink.prepare_tls_reload()) is not None
            ]
            summary = self.accounts.reload(config.customers)
            self._config_status = ConfigStatus(
                sha256=fingerprint(config, self.config_path),
                loaded_at=self.clock.time(),
                path=str(self.config_path),
            )
        except ConfigError as exc:
            self._reload_refusal = str(exc)
            log.error("reload_refused", reason=str(exc), kept="previous configuration")
            return False
        for commit in tls_commits:
            commit()
        if config.model_dump(exclude={"customers"}) != self.config.model_dump(
            exclude={"customers"}
        ):
            log.warning(
                "reload_partial",
                reason="only [[customers]] apply without a restart; other changes "
                "take effect at the next start",
            )
        log.info(
            "reloaded",
            customers=summary.customers,
            added=list(summary.added),
            removed=list(summary.removed),
            changed=list(summary.changed),
        )
        return True

    def _spawn(self, coroutine: Coroutine[Any, Any, Any], name: str) -> None:
        task = asyncio.create_task(coroutine, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def simulator_control(self, serial: str, action: str) -> str:
        """
        Act on a simulated Entropy Key: unplug, replug, fail, heal.

        Raises:
            KeyError: no simulated key has that serial.
            ValueError: unknown action.
        """
        return self.fleet.control(serial, action)

    def listeners(self) -> dict[str, list[str]]:
        return {sink.name: sink.bound_addresses() for sink in self.sinks}

    def _write_runtime_files(self) -> None:
        # Written atomically so a watcher never reads half a file.
        listeners = self.state_dir / LISTENERS_FILE
        temporary = listeners.with_suffix(".tmp")
        temporary.write_text(json.dumps(self.listeners(), indent=2) + "\n")
        temporary.replace(listeners)

    def _remove_runtime_files(self) -> None:
        for name in (LISTENERS_FILE, RELOAD_FILE):
            with contextlib.suppress(FileNotFoundError):
                (self.state_dir / name).unlink()


GC_YOUNG_THRESHOLD = 20_000
"""Allocations between two young-generation collections (CPython's default
is 700): a connection's request allocates a few objects that die at once, and
collecting every 700 of them cost more than it freed."""


def settle_heap() -> None:
    """
    Move everything allocated at start-up out of the garbage collector's
    sight, and collect the young generation less often.

    Start-up leaves hundreds of thousands of long-lived objects (modules,
    config, pydantic models). A full collection walked all of them: with
    10,000 clients connected it paused the event loop for tens of
    milliseconds, which every client saw as latency.
    """
    # No collection first: start-up leaves next to no garbage, and a full
    # collection would delay the first client by tens of milliseconds.
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, older, oldest)


async def serve(
    config: Config,
    stop: asyncio.Event,
    *,
    config_path: Path | None = None,
    hurry: asyncio.Event | None = None,
    takeover: bool = False,
) -> None:
    """
    Run the broker until ``stop`` is set, then drain and close; setting
    ``hurry`` cuts the drain and the grace short. SIGHUP reloads customers and
    limits. Listening sockets from systemd are served (`broker.inherited`);
    ``takeover`` first takes the listeners and EGD connections over from the
    broker running on the same state_dir (`broker.handover`); a broker whose
    successor took over stops at once, without a drain.

    Raises:
        BrokerError: start-up failed (e.g. a listen address is in use).
    """
    try:
        broker = Broker(
            config, config_path=config_path, inherited=InheritedListeners.from_systemd()
        )
    except (OSError, ConfigError, ValueError) as exc:
        raise BrokerError(str(exc)) from exc
    if takeover:
        broker.takeover = await take_over(
            broker.state_dir,
            [(sink.name, sink.kind) for sink in broker.sinks],
            grace=config.broker.shutdown_grace,
        )
        if broker.takeover is not None:
            broker.inherited.absorb(broker.takeover.listeners)
    if hurry is not None:
        broker.hurry = hurry
    try:
        async with broker:
            loop = asyncio.get_running_loop()
            loop.add_signal_handler(signal.SIGHUP, broker.handle_hup)
            settle_heap()
            broker.announce_ready()
            stopping = asyncio.ensure_future(stop.wait())
            handed_over = asyncio.ensure_future(broker.handed_over.wait())
            await asyncio.wait(
                (stopping, handed_over), return_when=asyncio.FIRST_COMPLETED
            )
            stopping.cancel()
            handed_over.cancel()
            # A successor holds the listeners: nobody is left to drain for.
            if not broker.handed_over.is_set():
                await broker.drain()
    except OSError as exc:
        what = (
            file_problem(exc, Path(exc.filename), "file")
            if exc.filename
            else exc.strerror or str(exc)
        )
        raise BrokerError(f"cannot start: {what}") from exc
