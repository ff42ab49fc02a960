"""A small HTTP endpoint on the daemon's own event loop, so that collectors read the daemon's state in the
thread that owns it: GET /metrics (queue and system, scraped every 30 s) and GET /metrics/gpu (every 5 s)."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from whisperd.errors import ConfigError

log = logging.getLogger("whisperd.metrics")
_MAX_REQUEST_BYTES = 16 * 1024


def parse_address(address: str) -> tuple[str, int]:
    """'host:port' or '[v6]:port'."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise ConfigError(f"metrics address {address!r} is not host:port")
    return host.strip("[]"), int(port)


class MetricsServer:
    def __init__(self, routes: dict[str, CollectorRegistry]) -> None:
        self._routes = routes
        self._server: asyncio.Server | None = None

    async def start(self, address: str) -> None:
        host, port = parse_address(address)
        try:
            self._server = await asyncio.start_server(self._serve, host, port, limit=_MAX_REQUEST_BYTES)
        except OSError as exc:
            raise ConfigError(f"cannot serve metrics on {address}: {exc.strerror}") from exc
        log.info("metrics on http://%s/metrics and /metrics/gpu", address)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:  # keep-alive, as Prometheus uses it
                request_line = await reader.readline()
                if not request_line:
                    return
                headers = []
                while (line := await reader.readline()) not in (b"\r\n", b"\n", b""):
                    headers.append(line)
                method, _, rest = request_line.decode("latin-1").partition(" ")
                path = rest.split(" ", 1)[0].split("?", 1)[0]
                status, body, content_type = self._respond(method, path)
                writer.write(
                    f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\n"
                    f"Content-Length: {len(body)}\r\n\r\n".encode()
                    + (body if method != "HEAD" else b"")
                )
                await writer.drain()
        except (ConnectionError, asyncio.LimitOverrunError, ValueError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    def _respond(self, method: str, path: str) -> tuple[str, bytes, str]:
        if method not in ("GET", "HEAD"):
            return "405 Method Not Allowed", b"only GET\n", "text/plain"
        registry = self._routes.get(path.rstrip("/") or "/")
        if registry is None:
            return "404 Not Found", b"try /metrics or /metrics/gpu\n", "text/plain"
        return "200 OK", generate_latest(registry), CONTENT_TYPE_LATEST
