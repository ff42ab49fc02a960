"""The watchers' backlog: bounded in messages and in bytes; a watcher beyond either bound is dropped, the
others keep their events."""

from __future__ import annotations

import asyncio

from whisperd import protocol as p
from whisperd.watchers import Watchers, WatchQueue


def _event(size: int) -> p.Error:
    return p.Error(error=p.ErrorBody(code="x", message="m" * size))


async def _drain(queue: WatchQueue, count: int) -> list[bytes]:
    """count lines, or fewer if the stream ends; never waits longer than a few seconds."""
    lines = []
    async with asyncio.timeout(5):
        while len(lines) < count and (line := await queue.get()):
            lines.append(line)
    return lines


def test_a_watcher_is_dropped_when_its_backlog_exceeds_its_bytes() -> None:
    async def scenario() -> tuple[bytes, int]:
        watchers = Watchers(backlog=10_000, backlog_bytes=10_000)
        slow = watchers.add()
        for _ in range(100):  # about 1 KB each: 100 KB, far fewer than 10,000 messages
            watchers.publish(_event(1000))
        return await slow.get(), len(watchers)

    first, left = asyncio.run(scenario())
    assert first == b"", "dropped: its stream ends"
    assert left == 0


def test_a_watcher_within_its_bounds_gets_every_event_in_order() -> None:
    async def scenario() -> list[bytes]:
        watchers = Watchers(backlog=100, backlog_bytes=100_000)
        queue = watchers.add()
        for i in range(50):
            watchers.publish(p.Error(error=p.ErrorBody(code="x", message=str(i))))
        watchers.publish(p.Error(error=p.ErrorBody(code="x", message="END")))
        return await _drain(queue, 51)

    lines = asyncio.run(scenario())
    assert len(lines) == 51
    assert [p.decode_reply(line) for line in lines][:2] == [
        p.Error(error=p.ErrorBody(code="x", message="0")),
        p.Error(error=p.ErrorBody(code="x", message="1")),
    ]


def test_a_slow_watcher_is_dropped_and_a_fast_one_is_not() -> None:
    async def scenario() -> tuple[bytes, int, int]:
        watchers = Watchers(backlog=10_000, backlog_bytes=5_000)
        slow, fast = watchers.add(), watchers.add()
        read = 0
        for _ in range(20):
            watchers.publish(_event(1000))
            await fast.get()
            read += 1
        return await slow.get(), len(watchers), read

    slow_first, left, read = asyncio.run(scenario())
    assert slow_first == b"" and left == 1 and read == 20


def test_the_message_count_still_bounds_the_backlog() -> None:
    async def scenario() -> bytes:
        watchers = Watchers(backlog=3, backlog_bytes=1_000_000)
        queue = watchers.add()
        for _ in range(4):
            watchers.publish(_event(1))
        return await queue.get()

    assert asyncio.run(scenario()) == b""
