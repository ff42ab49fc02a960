"""A stand-in for journald's native socket: receives what sd_journal_sendv(3) sends and decodes it.

Run a daemon in a mount namespace where /run/systemd is this folder, and its journal records land here.
"""

from __future__ import annotations

import struct
from pathlib import Path

from tests.support.datagrams import DatagramSink


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


class FakeJournal(DatagramSink[dict[str, str]]):
    def __init__(self, run_systemd: Path) -> None:
        (run_systemd / "journal").mkdir(parents=True)
        super().__init__(run_systemd / "journal" / "socket", decode)

    @property
    def records(self) -> list[dict[str, str]]:
        return [record for _, record in self.received]
