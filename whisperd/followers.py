"""In-process followers of single jobs: the HTTP API waits for the job a request created, and streams its
changes, without a watch connection's fan-out of every job. The registry's publish feeds it; a job nobody
follows costs one dict lookup."""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Iterator

from whisperd.protocol import JobView

MAX_PENDING_VIEWS = 64  # per follower: a reader that fell behind keeps each state change, not each percent


class Follower:
    """The views of one job, in order. Progress within one state is coalesced (only the latest kept), so
    a slow reader holds at most one view per state change and never misses one."""

    def __init__(self, job_id: int) -> None:
        self.job_id = job_id
        self._views: deque[JobView] = deque()
        self._ready = asyncio.Event()

    def offer(self, view: JobView) -> None:
        if self._views and self._views[-1].state is view.state:
            self._views[-1] = view  # the same state, further on: only the latest matters
        else:
            if len(self._views) >= MAX_PENDING_VIEWS:
                self._views.popleft()  # bounded; cannot happen with the six states of a job and retries
            self._views.append(view)
        self._ready.set()

    async def next(self) -> JobView:
        """The next view of the job (waits for one)."""
        while not self._views:
            self._ready.clear()
            await self._ready.wait()
        return self._views.popleft()


class JobFollowers:
    def __init__(self) -> None:
        self._followers: dict[int, list[Follower]] = {}

    def publish(self, view: JobView) -> None:
        for follower in self._followers.get(view.id, ()):
            follower.offer(view)

    @contextlib.contextmanager
    def follow(self, job_id: int) -> Iterator[Follower]:
        follower = Follower(job_id)
        self._followers.setdefault(job_id, []).append(follower)
        try:
            yield follower
        finally:
            followers = self._followers[job_id]
            followers.remove(follower)
            if not followers:
                del self._followers[job_id]

    def __len__(self) -> int:
        return sum(len(f) for f in self._followers.values())
