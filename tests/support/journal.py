"""A stand-in for journald's native socket: receives what sd_journal_sendv(3) sends and decodes it.

Run a daemon in a mount namespace where /run/systemd is this folder, and its journal records land here.
"""

from __future__ import annotations

import socket
import struct
import threading
from pathlib import Path


def decode(datagram: bytes) -> dict[str, str]:
    """The native protocol: KEY=value lines, or KEY, newline, 64-bit little-endian length, data, newline."""
    fields: dict[str, str] = {}
    rest = datagram
    while rest:
        head, newline, tail = rest.partition(b"\n")
        if b"=" in head:
            key, _, value = head.partition(b"=")
            fields[key.decode()] = value.decode(errors="replace")
            rest = tail
        else:
            (size,) = struct.unpack("<Q", tail[:8])
            fields[head.decode()] = tail[8 : 8 + size].decode(errors="replace")
            rest = tail[8 + size + 1 :]
        if not newline:
            break
    return fields


class FakeJournal:
    def __init__(self, run_systemd: Path) -> None:
        (run_systemd / "journal").mkdir(parents=True)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(run_systemd / "journal" / "socket"))
        self.sock.settimeout(0.2)
        self.records: list[dict[str, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._receive, daemon=True)
        self._thread.start()

    def _receive(self) -> None:
        while not self._stop.is_set():
            try:
                self.records.append(decode(self.sock.recv(1 << 20)))
            except TimeoutError:
                continue

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.sock.close()
