"""A Unix datagram socket that collects what arrives, with arrival times, on a background thread: the
receiving end of sd_notify(3) and of the journal's native protocol in tests."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Generic, TypeVar

T = TypeVar("T")


class DatagramSink(Generic[T]):
    def __init__(self, path: Path, decode: Callable[[bytes], T]) -> None:
        self.path = path
        self._decode = decode
        self.received: list[tuple[float, T]] = []
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind(str(path))
        self._sock.settimeout(0.1)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._receive, daemon=True)
        self._thread.start()

    def _receive(self) -> None:
        while not self._stop.is_set():
            try:
                data = self._sock.recv(1 << 20)
            except TimeoutError:
                continue
            self.received.append((time.monotonic(), self._decode(data)))

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self._sock.close()
