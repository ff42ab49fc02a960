"""Fan-out of job events and periodic snapshots to `watch` connections. A watcher that cannot keep up is
dropped rather than letting its backlog grow without bound: the backlog is bounded in messages and in
bytes (a message's size depends on what users named their files)."""

from __future__ import annotations

import asyncio
import logging
from collections import deque

import msgspec

from whisperd.protocol import encode_line

log = logging.getLogger("whisperd.watch")
_CLOSED = b""

BACKLOG_MESSAGES = 10_000
BACKLOG_BYTES = 8 * 1024 * 1024


class WatchQueue:
    """One watcher's backlog: encoded lines in order; get() returns b"" once the watcher is closed."""

    def __init__(self, max_messages: int, max_bytes: int) -> None:
        self._lines: deque[bytes] = deque()
        self._bytes = 0
        self._max_messages = max_messages
        self._max_bytes = max_bytes
        self._closed = False
        self._ready = asyncio.Event()

    @property
    def backlog_bytes(self) -> int:
        return self._bytes

    def offer(self, line: bytes) -> bool:
        """Queue the line; False when it does not fit the backlog (nothing is queued then)."""
        if len(self._lines) >= self._max_messages or self._bytes + len(line) > self._max_bytes:
            return False
        self._lines.append(line)
        self._bytes += len(line)
        self._ready.set()
        return True

    def close(self) -> None:
        self._lines.clear()
        self._bytes = 0
        self._closed = True
        self._ready.set()

    async def get(self) -> bytes:
        while not self._lines:
            if self._closed:
                return _CLOSED
            self._ready.clear()
            await self._ready.wait()
        line = self._lines.popleft()
        self._bytes -= len(line)
        return line


class Watchers:
    def __init__(self, backlog: int = BACKLOG_MESSAGES, backlog_bytes: int = BACKLOG_BYTES) -> None:
        self._queues: set[WatchQueue] = set()
        self._backlog = backlog
        self._backlog_bytes = backlog_bytes

    def __len__(self) -> int:
        return len(self._queues)

    def add(self) -> WatchQueue:
        queue = WatchQueue(self._backlog, self._backlog_bytes)
        self._queues.add(queue)
        return queue

    def remove(self, queue: WatchQueue) -> None:
        self._queues.discard(queue)

    def publish(self, message: msgspec.Struct) -> None:
        if not self._queues:
            return
        line = encode_line(message)
        for queue in list(self._queues):
            if not queue.offer(line):
                log.warning("a watcher fell behind (%d messages or %d bytes buffered): disconnecting it",
                            self._backlog, self._backlog_bytes)  # fmt: skip
                self._queues.discard(queue)
                queue.close()

    def close(self) -> None:
        for queue in self._queues:
            queue.close()
        self._queues.clear()
