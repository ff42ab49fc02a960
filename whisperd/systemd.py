"""systemd integration: sd_notify (READY, STATUS, WATCHDOG, STOPPING), socket activation and the journal.
Uses systemd-python when it is installed and falls back to the plain protocols otherwise; outside systemd
(no NOTIFY_SOCKET, no LISTEN_FDS, no JOURNAL_STREAM) all of it is silent and the daemon works the same."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Mapping

log = logging.getLogger("whisperd.systemd")
SD_LISTEN_FDS_START = 3

try:  # optional for a plain pip install; `make run`, `make test` and CI install it
    import systemd.daemon as sd_daemon
    import systemd.journal as sd_journal
except ImportError:  # pragma: no cover - exercised where systemd-python is absent
    sd_daemon = None
    sd_journal = None


def _notify_fallback(message: str, environ: Mapping[str, str]) -> bool:
    address = environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]  # abstract namespace
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        sock.sendto(message.encode(), address)
    return True


class Notifier:
    """sd_notify(3): one datagram per state change to $NOTIFY_SOCKET; nothing at all outside systemd."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        self._environ = os.environ if environ is None else environ
        self.enabled = bool(self._environ.get("NOTIFY_SOCKET"))
        self._last_status = ""

    def notify(self, message: str) -> None:
        if not self.enabled:
            return
        try:
            if sd_daemon is not None and self._environ is os.environ:
                sd_daemon.notify(message)
            else:
                _notify_fallback(message, self._environ)
        except OSError as exc:
            log.warning("sd_notify failed: %s", exc)

    def ready(self, status: str) -> None:
        self.notify(f"READY=1\nSTATUS={status}\nMAINPID={os.getpid()}")

    def status(self, status: str) -> None:
        if status != self._last_status:
            self._last_status = status
            self.notify(f"STATUS={status}")

    def stopping(self, status: str) -> None:
        self.notify(f"STOPPING=1\nSTATUS={status}")

    def watchdog_interval_s(self) -> float | None:
        """Half of WATCHDOG_USEC, as sd_watchdog_enabled(3) advises; None when no watchdog is set for us."""
        usec = self._environ.get("WATCHDOG_USEC")
        pid = self._environ.get("WATCHDOG_PID")
        if not self.enabled or not usec or not usec.isdigit() or (pid and pid != str(os.getpid())):
            return None
        return int(usec) / 2 / 1_000_000

    async def watchdog(self, interval_s: float) -> None:
        """Runs on the event loop itself: a loop that is wedged stops petting the watchdog, and systemd
        kills and restarts the daemon."""
        while True:
            self.notify("WATCHDOG=1")
            await asyncio.sleep(interval_s)


def listen_socket(environ: Mapping[str, str] | None = None) -> socket.socket | None:
    """The control socket systemd passed us (whisperd.socket), or None to bind our own."""
    environ = os.environ if environ is None else environ
    if environ.get("LISTEN_PID") != str(os.getpid()) or not environ.get("LISTEN_FDS", "").isdigit():
        return None
    count = int(environ["LISTEN_FDS"])
    if count < 1:
        return None
    if count > 1:
        log.warning("systemd passed %d sockets; whisperd uses the first", count)
    for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(name, None)  # not for the workers
    sock = socket.socket(fileno=SD_LISTEN_FDS_START)
    if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
        raise OSError(f"the socket systemd passed is {sock.family!r}/{sock.type!r}, not a Unix stream socket")
    return sock


def under_journald(environ: Mapping[str, str] | None = None) -> bool:
    """True when our stderr is connected to the journal (systemd sets JOURNAL_STREAM to its dev:inode)."""
    environ = os.environ if environ is None else environ
    stream = environ.get("JOURNAL_STREAM", "")
    dev, _, ino = stream.partition(":")
    if not dev.isdigit() or not ino.isdigit():
        return False
    try:
        st = os.fstat(2)
    except OSError:
        return False
    return (st.st_dev, st.st_ino) == (int(dev), int(ino))


def journal_handler() -> logging.Handler | None:
    """A handler that sends each record with its structured fields (JOB_ID, JOB_STATE, GPU_INDEX, MODEL,
    DEVICE, WORKER, ...) given as `extra`; None without systemd-python."""
    if sd_journal is None:
        return None
    handler: logging.Handler = sd_journal.JournalHandler(SYSLOG_IDENTIFIER="whisperd")
    return handler
