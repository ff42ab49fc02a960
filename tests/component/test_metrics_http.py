"""The metrics endpoint: its routes, limits and timeouts in-process (an aiohttp server on the test's loop),
then against a real daemon: a header flood is refused early with the daemon's memory bounded, a taken port
does not keep the daemon down, and port 0 is logged as the port bound."""

from __future__ import annotations

import asyncio
import re
import socket
import urllib.error
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, Counter

from tests.support.daemon import DaemonProcess, free_port, scrape
from whisperd.config import MetricsConfig
from whisperd.metrics_http import HttpServer, metrics_server

MIB = 1024 * 1024
QUIET_DAEMON: dict[str, dict[str, Any]] = {"workers": {"cpu_workers": 0}, "gpu": {"enabled": False}}


def registry(name: str) -> CollectorRegistry:
    made = CollectorRegistry()
    Counter(name, "a test counter", registry=made).inc(3)
    return made


@asynccontextmanager
async def serving(**settings: Any) -> AsyncIterator[HttpServer]:
    server = metrics_server(
        {"/metrics": registry("system_things"), "/metrics/gpu": registry("gpu_things")},
        MetricsConfig(**settings),
    )
    await server.start("127.0.0.1:0")
    try:
        yield server
    finally:
        await server.close()


def port_of(server: HttpServer) -> int:
    assert server.bound is not None
    return server.bound[1]


async def exchange(port: int, request: bytes) -> bytes:
    """Send one request (which should close the connection) and read the whole answer."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        await writer.drain()
        return await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()


def get(path: str, method: str = "GET", keep_alive: bool = False) -> bytes:
    connection = "" if keep_alive else "Connection: close\r\n"
    return f"{method} {path} HTTP/1.1\r\nHost: test\r\n{connection}\r\n".encode()


def status(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1])


async def response(reader: asyncio.StreamReader) -> bytes:
    """One whole response on a kept-alive connection."""
    async with asyncio.timeout(10):
        head = await reader.readuntil(b"\r\n\r\n")
        length = int(re.search(rb"Content-Length: (\d+)", head).group(1))  # type: ignore[union-attr]
        return head + await reader.readexactly(length)


# ---- in-process ----------------------------------------------------------------------------------------


def test_routes_get_head_404_and_405() -> None:
    async def scenario() -> None:
        async with serving() as server:
            port = port_of(server)
            system = await exchange(port, get("/metrics"))
            assert status(system) == 200 and b"system_things_total 3.0" in system
            assert b"text/plain; version=" in system.split(b"\r\n\r\n")[0]
            gpu = await exchange(port, get("/metrics/gpu"))
            assert status(gpu) == 200 and b"gpu_things_total 3.0" in gpu and b"system_things" not in gpu
            head = await exchange(port, get("/metrics", "HEAD"))
            assert status(head) == 200 and head.endswith(b"\r\n\r\n"), "HEAD: headers only"
            assert status(await exchange(port, get("/nothing"))) == 404
            assert status(await exchange(port, get("/metrics", "POST"))) == 405
            assert status(await exchange(port, get("/metrics", "DELETE"))) == 405

    asyncio.run(scenario())


def test_idle_connections_are_closed_after_the_timeout() -> None:
    """Before a first request (a client that connects and says nothing) and between keep-alive requests."""

    async def scenario() -> None:
        async with serving(idle_timeout_s=0.5) as server:
            port = port_of(server)
            silent_reader, silent = await asyncio.open_connection("127.0.0.1", port)
            kept_reader, kept = await asyncio.open_connection("127.0.0.1", port)
            kept.write(get("/metrics", keep_alive=True))
            assert status(await response(kept_reader)) == 200
            assert await asyncio.wait_for(silent_reader.read(), 10) == b"", "closed by the server"
            assert await asyncio.wait_for(kept_reader.read(), 10) == b""
            silent.close()
            kept.close()
            await until_open(server, 0)

    asyncio.run(scenario())


async def until_open(server: HttpServer, count: int) -> None:
    async with asyncio.timeout(10):
        while server.open_connections != count:
            await asyncio.sleep(0.01)


def test_the_connection_cap_holds_and_frees_up() -> None:
    async def scenario() -> None:
        async with serving(max_connections=3) as server:
            port = port_of(server)
            held = [await asyncio.open_connection("127.0.0.1", port) for _ in range(3)]
            await until_open(server, 3)
            for _ in range(5):  # refused at once, and never counted
                assert status(await exchange(port, get("/metrics"))) == 503
            assert server.open_connections == 3
            reader, writer = held[0]  # those held are served
            writer.write(get("/metrics", keep_alive=True))
            assert status(await response(reader)) == 200
            for _, writer in held[1:]:
                writer.close()
            await until_open(server, 1)
            assert status(await exchange(port, get("/metrics"))) == 200
            held[0][1].close()

    asyncio.run(scenario())


# ---- a real daemon -------------------------------------------------------------------------------------


def vm_kib(pid: int, field: str) -> int:
    """VmRSS (now) or VmHWM (peak) of a process, in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} for {pid}")


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[DaemonProcess]:
    started = DaemonProcess(tmp_path / "state", QUIET_DAEMON).start()
    yield started
    started.stop()


def test_a_header_flood_is_refused_early_and_memory_stays_bounded(daemon: DaemonProcess) -> None:
    """The hand-written server gathered header lines without limit: 300 MiB of them took the daemon from
    36 MB to 2.19 GB. Now the request is refused after a few dozen lines and the daemon's peak RSS stays
    where it was."""
    assert daemon.proc is not None
    scrape(daemon.metrics_port, "/metrics")  # everything a scrape needs is loaded before the baseline
    before_kib = vm_kib(daemon.proc.pid, "VmRSS")
    line = b"X-Flood: " + b"a" * 1000 + b"\r\n"
    chunk = line * 1024  # about 1 MiB
    sent = 0
    with socket.create_connection(("127.0.0.1", daemon.metrics_port), timeout=10) as conn:
        conn.sendall(b"GET /metrics HTTP/1.1\r\nHost: test\r\n")
        try:
            while sent < 100 * MIB:
                conn.sendall(chunk)
                sent += len(chunk)
        except OSError:  # reset by the daemon, or it stopped reading: refused either way
            pass
    peak_kib = vm_kib(daemon.proc.pid, "VmHWM")
    print(f"header flood: {sent / MIB:.1f} MiB accepted before refusal; RSS {before_kib / 1024:.1f} MiB "
          f"before, peak {peak_kib / 1024:.1f} MiB")  # fmt: skip
    assert sent < 32 * MIB, "refused long before 100 MiB"
    assert peak_kib - before_kib < 32 * 1024, "memory stays bounded"
    assert "whisperd_" in scrape(daemon.metrics_port, "/metrics"), "still serving"
    daemon.client.ping()
    assert "Traceback" not in daemon.log()


def test_a_daemon_whose_metrics_port_is_taken_starts_and_serves_once_it_is_free(tmp_path: Path) -> None:
    port = free_port()
    holder = socket.socket()
    holder.bind(("127.0.0.1", port))
    holder.listen()
    try:
        config = {**QUIET_DAEMON, "metrics": {"bind_retry_interval_s": 0.2}}
        daemon = DaemonProcess(tmp_path / "state", config, env={"WHISPERD_METRICS_ADDR": f"127.0.0.1:{port}"})
        daemon.start()
        daemon.client.ping()
        with socket.create_connection(("127.0.0.1", port), timeout=10):
            accepted, _ = holder.accept()  # the port is the holder's, not the daemon's
        # The client closes first: a TIME_WAIT left on the holder's side would keep the port for a minute.
        accepted.recv(1)
        accepted.close()
    finally:
        holder.close()
    try:
        daemon.wait_for(lambda: serves(port), timeout_s=30, what="metrics served once the port is free")
        daemon.client.ping()
    finally:
        assert daemon.stop() == 0


def serves(port: int) -> bool:
    try:
        return "whisperd_" in scrape(port, "/metrics")
    except (urllib.error.URLError, ConnectionError):
        return False


def test_port_0_logs_the_port_bound(tmp_path: Path) -> None:
    daemon = DaemonProcess(tmp_path / "state", QUIET_DAEMON, env={"WHISPERD_METRICS_ADDR": "127.0.0.1:0"})
    daemon.start()
    try:
        [port] = [int(p) for p in re.findall(r"http://127\.0\.0\.1:(\d+)/metrics", daemon.log())]
        assert port != 0
        assert serves(port), "the logged port is the one serving"
    finally:
        daemon.stop()
