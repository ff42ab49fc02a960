"""Fan-out of job events and periodic snapshots to `watch` connections. A watcher that cannot keep up is
dropped rather than letting its backlog grow without bound."""

from __future__ import annotations

import asyncio
import logging

import msgspec

from whisperd.protocol import encode_line

log = logging.getLogger("whisperd.watch")
_CLOSED = b""


class Watchers:
    def __init__(self, backlog: int = 10_000) -> None:
        self._queues: set[asyncio.Queue[bytes]] = set()
        self._backlog = backlog

    def __len__(self) -> int:
        return len(self._queues)

    def add(self) -> asyncio.Queue[bytes]:
        queue: asyncio.Queue[bytes] = asyncio.Queue(self._backlog)
        self._queues.add(queue)
        return queue

    def remove(self, queue: asyncio.Queue[bytes]) -> None:
        self._queues.discard(queue)

    def publish(self, message: msgspec.Struct) -> None:
        if not self._queues:
            return
        line = encode_line(message)
        for queue in list(self._queues):
            try:
                queue.put_nowait(line)
            except asyncio.QueueFull:
                log.warning("a watcher fell %d events behind: disconnecting it", self._backlog)
                self._queues.discard(queue)
                self._close(queue)

    @staticmethod
    def _close(queue: asyncio.Queue[bytes]) -> None:
        while not queue.empty():
            queue.get_nowait()
        queue.put_nowait(_CLOSED)

    def close(self) -> None:
        for queue in self._queues:
            self._close(queue)
        self._queues.clear()
