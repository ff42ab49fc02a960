"""Wake-ups between hosts: PostgreSQL's LISTEN/NOTIFY on a connection of its own, so that an idle host starts
a job another host accepted (or stops one cancelled on another host) at once, not at its next tick.

A notification carries nothing a host relies on: it only says "look now"; the queue in the database stays
the truth, and the tick still reads it, so a notification lost while the connection was down costs at most
one tick. The connection is made again after a failure, waiting longer each time (up to backoff_max_s), and
each reconnection calls on_notify once, since whatever was sent meanwhile is unknown."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence

log = logging.getLogger("whisperd.store")


class Listener:
    def __init__(
        self,
        conninfo: str,
        channels: Sequence[str],
        on_notify: Callable[[str, str], None],
        backoff_s: float = 0.5,
        backoff_max_s: float = 30.0,
    ) -> None:
        """on_notify(channel, payload): called on the loop, so it must not block (it wakes the tick)."""
        self._conninfo = conninfo
        self._channels = tuple(channels)
        self._on_notify = on_notify
        self._backoff = (backoff_s, backoff_max_s)
        self.connected = asyncio.Event()
        self.reconnects = 0  # attempts after a failure, successful or not

    async def run(self) -> None:
        """Listen until cancelled."""
        import psycopg
        from psycopg import sql

        delay_s = self._backoff[0]
        while True:
            try:
                async with await psycopg.AsyncConnection.connect(self._conninfo, autocommit=True) as conn:
                    for channel in self._channels:
                        await conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channel)))
                    self.connected.set()
                    if self.reconnects:
                        self._on_notify("", "")  # what was sent while away is unknown: look now
                    delay_s = self._backoff[0]
                    async for notification in conn.notifies():
                        self._on_notify(notification.channel, notification.payload)
                reason = "the server closed the connection"
            except psycopg.Error as exc:
                reason = str(exc).strip() or type(exc).__name__
            if self.connected.is_set():
                log.warning("lost the job database's notifications (%s); reconnecting", reason)
            self.connected.clear()
            self.reconnects += 1
            await asyncio.sleep(delay_s)
            delay_s = min(2 * delay_s, self._backoff[1])
