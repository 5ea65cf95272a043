"""
The HTTP sink: runs the API application (`sinks.http.app`) on its listen
addresses and implements the broker's `Sink` lifecycle.

Shutdown happens in three steps so a load balancer sees it coming:

1. `HttpSink.pre_shutdown` only flags the sink: ``/healthz`` and ``/readyz``
   answer 503 from then on, while the listeners stay open so that health probes
   get that explicit 503 rather than a refused connection.
2. `HttpSink.shutdown` stops accepting, answers requests blocked in ``?wait=``
   with 503 at once (another instance can serve them), and lets in-flight
   requests finish within the grace period.
3. Requests still running when the grace period ends are cancelled, and aiohttp
   closes the remaining connections.

The listeners are plain asyncio servers (so the config's ``backlog`` applies)
whose protocol factory is a `sinks.http.connections.ConnectionGuard`: it
enforces the connection caps and the header deadline and hands each admitted
connection to aiohttp's handler (`sinks.http.handler`), which answers
``GET /v1/entropy`` ahead of the application (`sinks.http.app.DirectEntropy`).

With ``tls_cert`` and ``tls_key`` every listener speaks HTTPS
(`sinks.http.tls`). The listeners still accept plain TCP: the guard counts a
connection against the caps at accept, refuses it before any TLS when over
one, and then runs the handshake itself within ``header_timeout``; the header
deadline starts again at the handshake's end. A reload
(`HttpSink.prepare_tls_reload`) re-reads the files for new handshakes only.

A listen address that matches an inherited listening socket (systemd socket
activation, or a takeover: `broker.inherited`) is served on that socket
instead of bound. On a takeover (`broker.handover`) `release_listeners` stops
accepting while the successor holds the sockets; requests in flight are then
answered by `shutdown` as in any stop.
"""

import asyncio
import socket
import time
from collections.abc import Callable
from typing import Any

import structlog
from aiohttp import web

from broker.configbase import ListenAddress
from broker.errors import BrokerError, ConfigError
from broker.inherited import InheritedListeners, Listening
from broker.ratelog import CountedLog
from broker.status import BrokerView, SinkStatus
from sinks.http.app import ENTROPY_KEY, DirectEntropy, create_app
from sinks.http.config import HttpSinkConfig
from sinks.http.connections import ConnectionGuard, Limits
from sinks.http.handler import QuietRequestHandler, bounded
from sinks.http.state import HttpSinkState
from sinks.http.tls import (
    EXPIRY_WARNING_DAYS,
    CertificateInfo,
    ServerTls,
    key_exposed,
)

log = structlog.get_logger("ebroker.sinks.http")

# Once the grace period is over and stragglers are cancelled, how long aiohttp
# may take to wind down each remaining connection.
_CLOSE_TIMEOUT = 1.0

# How long aiohttp keeps reading (and discarding) a request body nobody read
# before it closes the connection: enough for the client to see the answer.
_LINGER = 2.0

# How often a TLS sink looks again at its certificate's expiry.
_EXPIRY_CHECK_INTERVAL = 86400.0


class HttpSink:
    """
    The HTTP API sink (``kind = "http"``), listening on TCP addresses.

    Unix listen addresses are refused at start: the HTTP API is for load
    balancers, scrapers and browsers, which all speak TCP.
    """

    kind = "http"

    def __init__(
        self,
        config: HttpSinkConfig,
        broker: BrokerView,
        *,
        inherited: InheritedListeners | None = None,
    ) -> None:
        self.name = config.name or "http"
        self._inherited = inherited
        self._listening: list[str] = []
        """Per server: the configured address it serves."""
        self._config = config
        self._broker = broker
        self._state = HttpSinkState()
        self._runner: web.AppRunner | None = None
        self._servers: list[asyncio.Server] = []
        self._bound: list[str] = []
        self._log = log.bind(sink=self.name)
        self._refusals = CountedLog(self._log, "http_refused")
        self._guard: ConnectionGuard | None = None
        self._tls: ServerTls | None = None
        self._expiry_timer: asyncio.TimerHandle | None = None

    @property
    def tls(self) -> bool:
        """
        Whether this sink serves HTTPS.
        """
        return self._config.tls_files is not None

    async def _start_tls(self) -> None:
        files = self._config.tls_files
        if files is None:
            return
        try:
            self._tls = await asyncio.to_thread(ServerTls, files)
        except ConfigError as exc:
            raise ConfigError(f"sink {self.name!r}: {exc}") from None
        if key_exposed(files.key):
            self._log.warning(
                "tls_key_readable_by_others",
                path=str(files.key),
                hint="chmod 600 the key file",
            )
        self._certificate_loaded(self._tls.info)

    def _certificate_loaded(self, info: CertificateInfo) -> None:
        self._log.info(
            "tls_certificate_loaded",
            fingerprint=info.fingerprint,
            not_after=info.not_after_iso,
        )
        self._check_expiry()

    def _check_expiry(self) -> None:
        if self._expiry_timer is not None:
            self._expiry_timer.cancel()
        if self._tls is None:
            return
        info = self._tls.info
        now = time.time()  # certificates expire by the wall clock
        if info.expires_within(EXPIRY_WARNING_DAYS, now):
            self._log.warning(
                "tls_certificate_expiring",
                not_after=info.not_after_iso,
                days_left=round((info.not_after - now) / 86400.0, 1),
                path=str(self._tls.files.cert),
            )
        self._expiry_timer = asyncio.get_running_loop().call_later(
            _EXPIRY_CHECK_INTERVAL, self._check_expiry
        )

    async def prepare_tls_reload(self) -> Callable[[], None] | None:
        """
        Re-read the certificate, key and client CA for a reload, without
        using them yet.

        Returns:
            None for a plain-HTTP sink; otherwise a function that puts the new
            files in force for new handshakes (established connections keep
            theirs).

        Raises:
            ConfigError: the new files do not load; the ones in force stay.
        """
        tls = self._tls
        if tls is None:
            return None
        try:
            commit = await asyncio.to_thread(tls.prepare_reload)
        except ConfigError as exc:
            self._log.error(
                "tls_reload_refused", reason=str(exc), kept=tls.info.fingerprint
            )
            raise ConfigError(f"sink {self.name!r}: {exc}") from None

        def apply() -> None:
            previous = tls.info.fingerprint
            info = commit()
            if key_exposed(tls.files.key):
                self._log.warning("tls_key_readable_by_others", path=str(tls.files.key))
            self._log.info("tls_reloaded", previous=previous)
            self._certificate_loaded(info)

        return apply

    async def start(self) -> None:
        """
        Bind every listen address and start accepting.

        Raises:
            ConfigError: a listen address is not a TCP address.
            BrokerError: an address could not be bound (in use, no permission).
        """
        for address in self._config.listen:
            if address.scheme != "tcp":
                raise ConfigError(
                    f"sink {self.name!r}: the http sink listens on TCP only, "
                    f"not {address}"
                )
        await self._start_tls()
        app = create_app(self._config, self._broker, self._state)
        runner = web.AppRunner(
            app,
            handle_signals=False,
            handler_cancellation=True,
            shutdown_timeout=_CLOSE_TIMEOUT,
        )
        await runner.setup()
        self._runner = runner
        self._guard = self._make_guard(
            runner.server, DirectEntropy(app[ENTROPY_KEY], self._state, self._log)
        )
        try:
            for address in self._config.listen:
                await self._listen(runner, address)
        except BaseException:
            await self._close_runner()
            raise
        self._log.info("sink_started", addresses=self._bound, tls=self.tls)

    def _make_guard(
        self, server: web.Server | None, direct: DirectEntropy
    ) -> ConnectionGuard:
        if server is None:
            raise RuntimeError("aiohttp runner set up without a server")
        config = self._config
        loop = asyncio.get_running_loop()
        server.request_handler = bounded(
            server.request_handler,
            max_body_bytes=config.max_body_bytes,
            request_timeout=config.request_deadline,
            refusals=self._refusals,
            direct=direct,
        )
        handler_options: dict[str, Any] = {
            "loop": loop,
            "refusals": self._refusals,
            # Requests are logged through structlog by the app's middleware.
            "access_log": None,
            "keepalive_timeout": config.idle_timeout,
            "max_line_size": config.max_header_bytes,
            "max_field_size": config.max_header_bytes,
            "max_headers": config.max_headers,
            "lingering_time": _LINGER,
        }
        limits = Limits(
            max_connections=config.max_connections,
            max_connections_per_client=config.max_connections_per_client,
            header_timeout=config.header_timeout,
            write_timeout=config.request_deadline,
            trusted_proxies=config.trusted_proxies,
        )
        tls = self._tls
        return ConnectionGuard(
            limits,
            make_handler=lambda: QuietRequestHandler(server, **handler_options),
            refusals=self._refusals,
            tls=(lambda: tls.current) if tls is not None else None,
        )

    async def _listen(self, runner: web.AppRunner, address: ListenAddress) -> None:
        loop = asyncio.get_running_loop()
        if self._guard is None:
            raise RuntimeError("listening before the connection guard exists")
        taken = self._inherited.take(self.name, address) if self._inherited else None
        try:
            if taken is not None:
                # Already bound and listening: connections may wait in its backlog.
                server = await loop.create_server(
                    self._guard, sock=taken.sock, backlog=self._config.backlog
                )
            else:
                server = await loop.create_server(
                    self._guard,
                    address.host,
                    address.port,
                    backlog=self._config.backlog,
                    reuse_address=True,
                )
        except OSError as exc:
            raise BrokerError(
                f"sink {self.name!r}: cannot listen on {address}: {exc.strerror or exc}"
            ) from exc
        self._servers.append(server)
        self._listening.append(str(address))
        for sock in server.sockets:
            if sock.family in (socket.AF_INET, socket.AF_INET6):
                host, port = sock.getsockname()[:2]
                self._bound.append(str(ListenAddress("tcp", host=host, port=port)))

    def bound_addresses(self) -> list[str]:
        """
        The addresses actually bound, with real ports, e.g.
        ``["tcp://127.0.0.1:43211"]``; empty before `start`.
        """
        return list(self._bound)

    def listening(self) -> list[Listening]:
        """
        Every listener this sink serves on, for a successor to take over.
        """
        return [
            Listening(self.name, address, server.sockets[0], owned=False)
            for server, address in zip(self._servers, self._listening, strict=True)
            if server.sockets
        ]

    def release_listeners(self) -> None:
        """
        Stop accepting and leave the listeners to the successor that holds
        copies of them; requests in flight are still answered (`shutdown`).
        """
        self.pre_shutdown()
        servers, self._servers = self._servers, []
        self._listening.clear()
        for server in servers:
            server.close()

    @property
    def shutting_down(self) -> bool:
        return self._state.shutting_down

    def pre_shutdown(self) -> None:
        """
        Report 503 on ``/healthz`` and ``/readyz`` from now on; keep serving.
        """
        if not self._state.shutting_down:
            self._state.shutting_down = True
            self._log.info("sink_shutting_down")

    # The Sink protocol passes the grace period in; asyncio.timeout wraps it below.
    async def shutdown(self, timeout: float) -> None:
        """
        Stop accepting, let in-flight requests finish for up to ``timeout`` s,
        then cancel what is left and close every connection.
        """
        self.pre_shutdown()
        runner = self._runner
        if runner is None:
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        await self._stop_listening()
        self._state.draining.set()
        if self._state.in_flight:
            try:
                async with asyncio.timeout_at(deadline):
                    await self._state.idle.wait()
            except TimeoutError:
                stragglers = list(self._state.in_flight)
                self._log.warning("sink_grace_expired", requests=len(stragglers))
                for task in stragglers:
                    task.cancel(msg="http sink shutdown: grace period expired")
        await self._close_runner()
        self._log.info("sink_stopped")

    async def _stop_listening(self) -> None:
        servers, self._servers = self._servers, []
        for server in servers:
            server.close()
        # Connections that never got as far as a request are nobody's to finish.
        if self._guard is not None:
            self._guard.close_unserved()
        for server in servers:
            await server.wait_closed()

    async def _close_runner(self) -> None:
        if self._expiry_timer is not None:
            self._expiry_timer.cancel()
            self._expiry_timer = None
        await self._stop_listening()
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    def status(self) -> SinkStatus:
        guard = self._guard
        return SinkStatus(
            name=self.name,
            kind=self.kind,
            addresses=tuple(self._bound),
            connections=len(guard) if guard is not None else 0,
            connections_total=self._state.connections_total,
            bytes_out=self._state.bytes_out,
            requests=self._state.requests,
            refused=self._refusals.counts(),
        )
