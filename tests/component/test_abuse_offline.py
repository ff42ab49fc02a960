"""The abuse cases that need no whisperd process: whisperctl against a server that drops its connection, and
the daemon's log lines (the control server's on a failure repeated at will, the registry's for names and
errors chosen to forge lines)."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from tests.support.daemon import short_socket_dir
from whisperd import protocol as p
from whisperd.jobs import JobEvent
from whisperd.registry import JobRegistry, RetryPolicy
from whisperd.server import ControlServer, bind_socket
from whisperd.spool import Spool
from whisperd.sqlite_store import SqliteStore
from whisperd.store import NewJob
from whisperd.watchers import Watchers

AUDIO = b"RIFF not really audio, but no worker will ever decode it"


# ---- whisperctl when the connection drops -------------------------------------------------------------


class FakeServer:
    """A Unix socket that accepts and then misbehaves: closes at once, or after half a reply."""

    def __init__(self, behaviour: str) -> None:
        self.path = short_socket_dir() / "fake.sock"
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.bind(str(self.path))
        self._sock.listen(8)
        self._behaviour = behaviour
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            with conn:
                if self._behaviour == "mid-reply":
                    conn.recv(65536)
                    conn.sendall(b'{"reply":"jobs","ok":true,"jobs":[{"id":1,')
                elif self._behaviour == "after-request":
                    conn.recv(65536)

    def close(self) -> None:
        self._sock.close()


@pytest.mark.parametrize("behaviour", ["at-once", "after-request", "mid-reply"])
@pytest.mark.parametrize("command", [["status"], ["ping"], ["watch"], ["cancel", "1"]])
def test_whisperctl_on_a_dropped_connection_says_so_and_exits_4(behaviour: str, command: list[str]) -> None:
    server = FakeServer(behaviour)
    try:
        out = subprocess.run(
            [sys.executable, "-m", "whisperctl", *command],
            env={**os.environ, "WHISPERD_SOCKET": str(server.path)},
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    finally:
        server.close()
    assert out.returncode == 4, out.stderr
    assert "Traceback" not in out.stderr
    assert out.stderr.startswith("whisperctl: ") and out.stderr.count("\n") == 1
    assert "closed the connection" in out.stderr


# ---- an unexpected failure, repeated at will ----------------------------------------------------------


class FailingHandlers:
    """Handlers with a bug: every request raises."""

    async def handle(self, request: p.Request, caller: object, fds: list[int]) -> p.Reply:
        raise RuntimeError("a bug\nERROR forged line")


def test_an_unexpected_error_per_request_logs_one_traceback_a_minute(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async def scenario() -> list[dict[str, Any]]:
        server = ControlServer(FailingHandlers(), Watchers(), lambda: [], 1 << 20)  # type: ignore[arg-type]
        path = short_socket_dir() / "s.sock"
        await server.start(bind_socket(path, 0o600))
        try:
            reader, writer = await asyncio.open_unix_connection(str(path))
            writer.write(b'{"op":"ping"}\n' * 50)
            replies = [json.loads(await reader.readline()) for _ in range(50)]
            writer.close()
            return replies
        finally:
            await server.close()

    with caplog.at_level(logging.INFO, logger="whisperd.server"):
        replies = asyncio.run(scenario())
    assert {r["error"]["code"] for r in replies} == {"internal"}
    assert "\n" not in replies[0]["error"]["message"]
    records = [r for r in caplog.records if r.name == "whisperd.server"]
    assert len(records) == 50, "one line per failed request"
    assert len([r for r in records if r.exc_info]) == 1, "one traceback, not fifty"
    assert all("\n" not in r.getMessage() for r in records if not r.exc_info)


# ---- the daemon's log --------------------------------------------------------------------------------


def test_the_job_log_escapes_names_and_errors(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A job of an older daemon (or one added by any path but the decoder) named to forge log lines."""
    spool = Spool(tmp_path / "spool")
    source = tmp_path / "clip.wav"
    source.write_bytes(AUDIO)
    fd = os.open(source, os.O_RDONLY)
    try:
        spooled, _ = spool.copy_from_fd(fd, 1 << 20)
    finally:
        os.close(fd)
    registry = JobRegistry(
        SqliteStore(tmp_path / "jobs.sqlite3"), spool, time.time,
        RetryPolicy(max_retries=0, backoff_s=1.0, backoff_max_s=1.0), lambda view: None, lambda *_: None,
    )  # fmt: skip
    name = "a.wav\n2024-01-01 00:00:00 INFO    whisperd.jobs: job 1 COMPLETED\x1b[2K"
    with caplog.at_level(logging.INFO, logger="whisperd.jobs"):
        [job] = registry.add([
            NewJob(spool_path=spooled, spool_bytes=1, filename=name, owner_uid=1000, model="tiny.en",
                   language=None, task="transcribe", priority=0, word_timestamps=False),
        ])  # fmt: skip
        registry.apply(job, JobEvent.DISPATCH, device="cpu", worker="cpu0")
        registry.apply(job, JobEvent.FAIL_FATAL, error=f"cannot decode {name}: bad\ndata")
    messages = [r.getMessage() for r in caplog.records if r.name == "whisperd.jobs"]
    assert len(messages) == 3
    assert not [m for m in messages if "\n" in m or "\x1b" in m]
    assert "a.wav\\x0a2024-01-01" in messages[0] and "bad\\x0adata" in messages[2]
