"""Wake-ups between hosts through LISTEN/NOTIFY (whisperd/pg_notify.py) on a real PostgreSQL: a notification
from another connection arrives, and after the server crashes and comes back the listener reconnects, says
so once (whatever was sent meanwhile is unknown), and hears the next ones."""

from __future__ import annotations

import asyncio
import itertools

import psycopg
import pytest

from tests.support.postgres import Cluster
from whisperd.pg_notify import Listener

_names = itertools.count()
CHANNEL = "whisperd_jobs"


def notify(dsn: str, payload: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("SELECT pg_notify(%s, %s)", (CHANNEL, payload))


async def until(condition: object, timeout_s: float = 20.0) -> None:
    async with asyncio.timeout(timeout_s):
        while not condition():  # type: ignore[operator]
            await asyncio.sleep(0.01)


def test_notifications_arrive_and_survive_a_server_crash(postgres: Cluster) -> None:
    dsn = postgres.create_database(f"notify_{next(_names)}")
    heard: list[tuple[str, str]] = []

    async def scenario() -> None:
        listener = Listener(dsn, [CHANNEL], lambda ch, payload: heard.append((ch, payload)), backoff_s=0.1)
        task = asyncio.create_task(listener.run())
        try:
            await asyncio.wait_for(listener.connected.wait(), 20)
            await asyncio.to_thread(notify, dsn, "42")
            await until(lambda: (CHANNEL, "42") in heard)
            await asyncio.to_thread(postgres.restart)
            await until(lambda: listener.reconnects >= 1 and listener.connected.is_set())
            await until(lambda: ("", "") in heard)  # told to look, once back
            await asyncio.to_thread(notify, dsn, "43")
            await until(lambda: (CHANNEL, "43") in heard)
        finally:
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

    asyncio.run(scenario())
    assert heard == [(CHANNEL, "42"), ("", ""), (CHANNEL, "43")], (
        "one 'look now' for the one time it came back"
    )
