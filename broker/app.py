"""
Wiring and lifecycle of the broker process.

Start-up order is pool → sources → sinks; shutdown is the reverse: report 503
on /healthz, stop accepting, let in-flight requests finish within the grace
period, close connections and remove Unix sockets, stop sources, close the pool.
"""

import asyncio
import contextlib
import json
import os
import signal
import socket
import time
from collections.abc import Callable, Coroutine
from functools import partial
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import structlog

from broker import __version__
from broker.accounts import STATE_FILE, Accounts, WeightedWaitQueue
from broker.config import Config, SinkConfig, SourceConfig, load_config
from broker.errors import BrokerError, ConfigError
from broker.pool import EntropyPool
from broker.status import Health, Sink, SinkStatus, SourceStatus, TierStatus
from broker.supervisor import Supervisor
from sinks.egd.config import EgdSinkConfig
from sinks.egd.server import EgdSink
from sinks.http.config import HttpSinkConfig
from sinks.http.server import HttpSink
from sources.base import Source
from sources.device import DeviceSource, DeviceSourceConfig
from sources.entropykey.config import ANY_SERIAL, EntropyKeySourceConfig
from sources.entropykey.factory import SimulatedFleet, build_sources, watch_for_keys
from sources.getrandom import GetrandomSource, GetrandomSourceConfig

log = structlog.get_logger("ebroker.app")

LISTENERS_FILE = "listeners.json"
PID_FILE = "ebroker.pid"


def _getrandom(config: SourceConfig, broker: "Broker") -> list[Source]:
    if not isinstance(config, GetrandomSourceConfig):
        raise TypeError(f"not a getrandom config: {config!r}")
    return [GetrandomSource(config)]


def _device(config: SourceConfig, broker: "Broker") -> list[Source]:
    if not isinstance(config, DeviceSourceConfig):
        raise TypeError(f"not a device config: {config!r}")
    return [DeviceSource(config)]


def _entropykey(config: SourceConfig, broker: "Broker") -> list[Source]:
    if not isinstance(config, EntropyKeySourceConfig):
        raise TypeError(f"not an entropykey config: {config!r}")
    sources = build_sources(config, usb_backend=broker.usb_backend, fleet=broker.fleet)
    if config.serial == ANY_SERIAL:
        broker.key_watches.append((config, {source.serial for source in sources}))
    return list(sources)


SOURCE_KINDS: dict[str, Callable[[SourceConfig, "Broker"], list[Source]]] = {
    "getrandom": _getrandom,
    "device": _device,
    "hwrng": _device,
    "entropykey": _entropykey,
}


def _egd(config: SinkConfig, broker: "Broker") -> Sink:
    if not isinstance(config, EgdSinkConfig):
        raise TypeError(f"not an egd config: {config!r}")
    return EgdSink(config, broker.pool, broker.state_dir, broker.accounts)


def _http(config: SinkConfig, broker: "Broker") -> Sink:
    if not isinstance(config, HttpSinkConfig):
        raise TypeError(f"not an http config: {config!r}")
    return HttpSink(config, broker)


SINK_KINDS: dict[str, Callable[[SinkConfig, "Broker"], Sink]] = {
    "egd": _egd,
    "http": _http,
}


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
    ) -> None:
        self.config = config
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
        )
        self._pool = EntropyPool(config.broker.pool_size, waiters=WeightedWaitQueue())
        self.supervisor = Supervisor(self._pool)
        for source_config in config.enabled_sources:
            for source in SOURCE_KINDS[source_config.kind](source_config, self):
                self.supervisor.add(
                    source,
                    optional=getattr(source_config, "optional", False),
                    record_raw=source_config.record_raw,
                    health=source_config.health,
                    watchdog=source_config.watchdog,
                )
        self.sinks: list[Sink] = [
            SINK_KINDS[sink_config.kind](sink_config, self)
            for sink_config in config.sinks
        ]
        self._instance = socket.gethostname()
        self._started_at = time.time()
        self._ready = False
        self._shutting_down = False

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

    def sources_status(self) -> list[SourceStatus]:
        return self.supervisor.statuses()

    def sinks_status(self) -> list[SinkStatus]:
        return [sink.status() for sink in self.sinks]

    def ready(self) -> bool:
        return self._ready and not self._shutting_down

    def tiers(self) -> TierStatus:
        supervisor = self.supervisor
        return TierStatus(
            active_tier=supervisor.active_tier,
            best_tier=supervisor.best_tier,
            degraded=supervisor.degraded,
            failovers=supervisor.failovers,
            tier_seconds=supervisor.tier_seconds(),
        )

    def health(self) -> Health:
        if self._shutting_down:
            return Health(False, "shutting_down", ("shutting down",))
        level = self._pool.level
        low = self.config.broker.low_watermark
        has_source = self.supervisor.any_healthy()
        reasons: list[str] = []
        if not has_source:
            reasons.append("no healthy source")
        if level < low:
            reasons.append(f"pool level {level} below low watermark {low}")
        # A healthy source refills the pool, so a pool drained for a moment by
        # eager clients is no reason for a load balancer to pull the instance.
        serving = has_source or level >= low
        if not serving:
            return Health(False, "unhealthy", tuple(reasons))
        store = self.accounts.backend.status()
        if not store.get("healthy", True):
            return Health(
                True,
                "degraded",
                (
                    f"budget store {store.get('kind')} unreachable, "
                    f"serving {store.get('policy')}",
                ),
            )
        if self.supervisor.degraded:
            tier = self.supervisor.active_tier
            return Health(
                True, "degraded", (f"only fallback tier {tier} feeds the pool",)
            )
        if not has_source:
            return Health(True, "degraded", tuple(reasons))
        return Health(True, "ok", ())

    # ---- lifecycle ----------------------------------------------------------------

    async def __aenter__(self) -> Self:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        await self.accounts.start()
        self.supervisor.start()
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
        started: list[Sink] = []
        try:
            for sink in self.sinks:
                await sink.start()
                started.append(sink)
        except BaseException:
            for sink in reversed(started):
                await sink.shutdown(0)
            for task in list(self._tasks):
                task.cancel(msg="start-up failed")
            await asyncio.gather(*self._tasks, return_exceptions=True)
            await self.supervisor.stop()
            self._pool.close()
            await self.accounts.close()
            raise
        self._write_runtime_files()
        self._ready = True
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

    async def shutdown(self) -> None:
        if self._shutting_down:
            return
        self._shutting_down = True
        grace = self.config.broker.shutdown_grace
        log.info("broker_stopping", grace=grace)
        for sink in self.sinks:
            sink.pre_shutdown()
        results = await asyncio.gather(
            *(sink.shutdown(grace) for sink in self.sinks), return_exceptions=True
        )
        for sink, result in zip(self.sinks, results, strict=True):
            if isinstance(result, BaseException):
                log.error("sink_shutdown_failed", sink=sink.name, error=repr(result))
        for task in list(self._tasks):
            task.cancel(msg="broker shutting down")
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.supervisor.stop()
        self._pool.close()
        await self.accounts.close()
        self._remove_runtime_files()
        log.info("broker_stopped")

    def handle_hup(self) -> None:
        """
        SIGHUP: re-read customers and limits from the config file.
        """
        self._spawn(self.reload(), name="reload")

    async def reload(self) -> bool:
        """
        Re-read the config file and apply its customers and limits; live
        connections keep running under the new limits. A bad file is refused
        and the running configuration kept.

        Returns:
            True when the new customers and limits are in force.
        """
        if self.config_path is None:
            log.warning("reload_refused", reason="broker was not started from a file")
            return False
        try:
            config = await asyncio.to_thread(load_config, self.config_path)
            self.accounts.reload(config.customers)
        except ConfigError as exc:
            log.error("reload_refused", reason=str(exc), kept="previous configuration")
            return False
        if config.model_dump(exclude={"customers"}) != self.config.model_dump(
            exclude={"customers"}
        ):
            log.warning(
                "reload_partial",
                reason="only [[customers]] apply without a restart; other changes "
                "take effect at the next start",
            )
        log.info("reloaded", customers=len(config.customers))
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
        from sources.entropykey.wire import FailureMode

        key = self.fleet.keys[serial]
        if action == "unplug":
            key.unplug()
        elif action == "replug":
            key.replug()
        elif action == "fail":
            key.fail(FailureMode.RAW_XOR_BAD)
        elif action == "heal":
            key.heal()
        else:
            raise ValueError(f"unknown action {action!r} (unplug, replug, fail, heal)")
        log.warning("simulated_key_control", serial=serial, action=action)
        return action

    def listeners(self) -> dict[str, list[str]]:
        return {
            sink.name: list(getattr(sink, "bound_addresses", list)())
            for sink in self.sinks
        }

    def _write_runtime_files(self) -> None:
        # Written atomically so a watcher never reads half a file.
        listeners = self.state_dir / LISTENERS_FILE
        temporary = listeners.with_suffix(".tmp")
        temporary.write_text(json.dumps(self.listeners(), indent=2) + "\n")
        temporary.replace(listeners)
        (self.state_dir / PID_FILE).write_text(f"{os.getpid()}\n")

    def _remove_runtime_files(self) -> None:
        for name in (LISTENERS_FILE, PID_FILE):
            with contextlib.suppress(FileNotFoundError):
                (self.state_dir / name).unlink()


async def serve(
    config: Config, stop: asyncio.Event, *, config_path: Path | None = None
) -> None:
    """
    Run the broker until ``stop`` is set; SIGHUP reloads customers and limits.

    Raises:
        BrokerError: start-up failed (e.g. a listen address is in use).
    """
    try:
        broker = Broker(config, config_path=config_path)
    except (OSError, ConfigError) as exc:
        raise BrokerError(str(exc)) from exc
    try:
        async with broker:
            loop = asyncio.get_running_loop()
            loop.add_signal_handler(signal.SIGHUP, broker.handle_hup)
            await stop.wait()
    except OSError as exc:
        raise BrokerError(f"cannot start: {exc.strerror or exc}") from exc
