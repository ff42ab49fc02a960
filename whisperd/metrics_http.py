"""The HTTP endpoint: an aiohttp application on the daemon's own event loop, so that collectors read the
daemon's state in the thread that owns it. GET (and HEAD) /metrics (queue and system, scraped every 30 s)
and /metrics/gpu (every 5 s); other paths 404, other methods 405. More routes can join the same application.

Limits, against clients that are slow, idle or hostile:
- request line and each header at most 8190 bytes, at most 64 headers (aiohttp's own parser enforces them;
  its defaults for the sizes, fewer headers than its 128): a longer request is answered 400 and closed;
- at most metrics.max_connections open connections: one more is answered 503 and closed at once;
- metrics.idle_timeout_s: a connection that sends no request for this long, before its first one or between
  keep-alive requests, is closed (aiohttp's keepalive_timeout; from aiohttp 3.14.4 it also covers the time
  before the first request).
A taken address is not fatal: the daemon runs on without metrics and retries the bind in the background."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from whisperd.errors import ConfigError

log = logging.getLogger("whisperd.metrics")


class _NoClientMistakes(logging.Filter):
    """aiohttp logs each malformed request (too many headers, a bad request line) as an error with its
    traceback: a client's mistake, answered 400, is not worth a line of log, and a flood of them must not
    flood the log. Errors of our own (a collector that raised) still are logged."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and isinstance(record.exc_info[1], HttpProcessingError))


_protocol_log = logging.getLogger("whisperd.metrics.http")
_protocol_log.addFilter(_NoClientMistakes())

MAX_LINE_BYTES = 8190  # request line (aiohttp's default)
MAX_FIELD_BYTES = 8190  # one header (aiohttp's default)
MAX_HEADERS = 64  # aiohttp's default is 128; a scrape sends a handful
_REFUSED = b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
_REFUSAL_LOG_INTERVAL_S = 60.0


def parse_address(address: str) -> tuple[str, int]:
    """'host:port' or '[v6]:port'."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise ConfigError(f"metrics address {address!r} is not host:port")
    return host.strip("[]"), int(port)


def format_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def metrics_app(routes: dict[str, CollectorRegistry]) -> web.Application:
    """GET and HEAD of each path: its registry in Prometheus's text format."""
    app = web.Application()
    add_metrics_routes(app, routes)
    return app


def add_metrics_routes(app: web.Application, routes: dict[str, CollectorRegistry]) -> None:
    """The metrics paths on an application (the HTTP API's too, when both share an address)."""

    def serve(registry: CollectorRegistry) -> Callable[[web.Request], Awaitable[web.Response]]:
        async def handler(request: web.Request) -> web.Response:
            return web.Response(body=generate_latest(registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

        return handler

    for path, registry in routes.items():
        app.router.add_get(path, serve(registry))  # HEAD too


class _Refused(asyncio.Protocol):
    """A connection over the cap: told so, and closed."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        transport.write(_REFUSED)
        transport.close()


class _CountedHandler(web.RequestHandler):
    """aiohttp's protocol, telling the server when its connection ends, for the connection cap."""

    def __init__(self, on_lost: Callable[[], None], manager: web.Server, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._on_lost = on_lost

    def connection_lost(self, exc: BaseException | None) -> None:
        try:
            super().connection_lost(exc)
        finally:
            self._on_lost()


class ServerLimits(Protocol):
    """What a server's section of the configuration says of its connections ([metrics], [http])."""

    @property
    def max_connections(self) -> int: ...
    @property
    def idle_timeout_s(self) -> float: ...
    @property
    def bind_retry_interval_s(self) -> float: ...


class HttpServer:
    """Serves an aiohttp application with the limits above; owns the listening socket and its retries.
    name: what it serves, for its log lines; handler_cancellation: a request's handler is cancelled when
    its client goes away (the API cancels the client's job then; a scrape has nothing to undo)."""

    def __init__(
        self,
        app: web.Application,
        settings: ServerLimits,
        name: str = "metrics",
        handler_cancellation: bool = False,
    ) -> None:
        self._app = app
        self._settings = settings
        self.name = name
        self._runner = web.AppRunner(
            app, access_log=None, shutdown_timeout=1.0, handler_cancellation=handler_cancellation
        )
        self._server: asyncio.Server | None = None
        self._retry: asyncio.Task[None] | None = None
        self._open = 0  # connections accepted and not yet lost
        self._last_refusal_log = -_REFUSAL_LOG_INTERVAL_S
        self._set_up = False
        self.bound: tuple[str, int] | None = None  # the address actually bound (port 0 gets a real one)

    async def start(self, address: str) -> None:
        """Bind now if the address is free; else log, run on, and retry in the background. Raises only for
        an address that is not host:port."""
        host, port = parse_address(address)
        await self._runner.setup()
        self._set_up = True
        try:
            await self._bind(host, port)
        except OSError as exc:
            log.warning(
                "cannot serve %s on %s: %s; whisperd runs on without it and tries again every %g s%s",
                self.name, address, exc.strerror or exc, self._settings.bind_retry_interval_s,
                " (the scrape fails meanwhile, so Prometheus's WhisperdDown alert fires)"
                if self.name == "metrics" else "",
            )  # fmt: skip
            self._retry = asyncio.create_task(self._retry_bind(host, port))

    async def _bind(self, host: str, port: int) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(self._protocol, host, port, reuse_address=True)
        bound_host, bound_port = self._server.sockets[0].getsockname()[:2]
        self.bound = (bound_host, bound_port)
        where = format_address(bound_host, bound_port)
        paths = sorted({r.resource.canonical for r in self._app.router.routes() if r.resource is not None})
        log.info("%s on http://%s%s", self.name, where, " and ".join(paths[:8]))  # tests read the port

    async def _retry_bind(self, host: str, port: int) -> None:
        while True:
            await asyncio.sleep(self._settings.bind_retry_interval_s)
            try:
                await self._bind(host, port)
                return
            except OSError as exc:
                log.debug("%s address %s still unavailable: %s", self.name, format_address(host, port), exc)

    def _protocol(self) -> asyncio.BaseProtocol:
        manager = self._runner.server
        if manager is None or self._open >= self._settings.max_connections:
            self._note_refusal()
            return _Refused()
        self._open += 1  # counted from here, not from connection_made: accepts can come in bursts
        return _CountedHandler(
            self._lost, manager, loop=asyncio.get_running_loop(), access_log=None, logger=_protocol_log,
            keepalive_timeout=self._settings.idle_timeout_s, max_line_size=MAX_LINE_BYTES,
            max_field_size=MAX_FIELD_BYTES, max_headers=MAX_HEADERS,
        )  # fmt: skip

    def _lost(self) -> None:
        self._open -= 1

    def _note_refusal(self) -> None:
        now = time.monotonic()
        if now - self._last_refusal_log >= _REFUSAL_LOG_INTERVAL_S:
            self._last_refusal_log = now
            log.warning("%s: %d connections open, the most allowed (%s.max_connections): refusing more",
                        self.name, self._open, "metrics" if self.name == "metrics" else "http")  # fmt: skip

    def stop_accepting(self) -> None:
        """No new connections (a drain); the open ones are answered until close()."""
        if self._retry is not None:
            self._retry.cancel()
        if self._server is not None:
            self._server.close()

    @property
    def open_connections(self) -> int:
        return self._open

    async def close(self) -> None:
        if self._retry is not None:
            self._retry.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._retry
        if self._server is not None:
            self._server.close()
        if self._set_up:
            await self._runner.cleanup()  # closes the open connections
        if self._server is not None:
            with contextlib.suppress(Exception):
                await self._server.wait_closed()


def metrics_server(routes: dict[str, CollectorRegistry], settings: ServerLimits) -> HttpServer:
    return HttpServer(metrics_app(routes), settings)
