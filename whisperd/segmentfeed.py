"""Segments as they are decoded, for whoever follows a running job (the HTTP API's streams). The outcomes
publish the segments each Progress of a job brings, and its transcript once it completes; each subscriber
reads them in order, each once, from a bounded queue of its own. A job no one follows costs a dict lookup:
nothing is kept for it. Everything here runs on the loop.

A segment is known by its place in the job's transcript (`Segment.id`, from 1, as the worker numbers them),
so a subscriber is never given a place twice: after a retry, whose run decodes from the start again, it
skips what it was given already. A subscriber that falls behind stops receiving as the job runs
(`overflowed`) and is given the rest from the transcript when the job completes: what it reads is the whole
transcript, in order, whatever its pace, and costs at most its bound while the job runs."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Sequence
from types import TracebackType

from whisperd.protocol import JobView, Segment, Transcript

MAX_SEGMENTS = 10_000  # per subscriber, not yet read
MAX_TEXT_CHARS = 4 * 1024 * 1024  # per subscriber, not yet read: a segment's size is mostly its text


class SegmentSubscription:
    """One follower of one job. A context manager: leaving it unsubscribes."""

    def __init__(self, feed: SegmentFeed, job_id: int, max_segments: int, max_text_chars: int) -> None:
        self.job_id = job_id
        self.overflowed = False  # fell behind: given nothing more until the job completes
        self.ended = False  # nothing more will be queued
        self.complete = False  # ended with the job's transcript: every segment of it was queued
        self._feed = feed
        self._max_segments = max_segments
        self._max_text_chars = max_text_chars
        self._queue: deque[Segment] = deque()
        self._text_chars = 0
        self._next = 1  # the place of the first segment not queued yet
        self._ready = asyncio.Event()

    def __enter__(self) -> SegmentSubscription:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    async def get(self) -> list[Segment]:
        """The segments queued and not read yet, in order, waiting for one; [] once the subscription ended
        and every segment was read (then `complete` says whether they were the whole transcript)."""
        while not self._queue:
            if self.ended:
                return []
            self._ready.clear()
            await self._ready.wait()
        segments = list(self._queue)
        self._queue.clear()
        self._text_chars = 0
        return segments

    def close(self) -> None:
        """Unsubscribe; what was queued is dropped."""
        self._feed._unsubscribe(self)
        self._queue.clear()
        self._end()

    def _offer(self, segments: Sequence[Segment]) -> None:
        for segment in segments:
            if segment.id < self._next:
                continue  # given already, by an earlier run of the job
            if self.overflowed:
                return
            chars = len(segment.text)
            if len(self._queue) >= self._max_segments or self._text_chars + chars > self._max_text_chars:
                self.overflowed = True  # the rest comes from the transcript
                return
            self._queue.append(segment)
            self._text_chars += chars
            self._next = segment.id + 1
        self._ready.set()

    def _finish(self, transcript: Transcript) -> None:
        # The transcript's own segments, not copies: a reader behind holds no more than the job's result.
        rest = transcript.segments[self._next - 1 :]
        self._queue.extend(rest)
        self._next += len(rest)
        self.complete = True
        self._end()

    def _end(self) -> None:
        self.ended = True
        self._ready.set()


class SegmentFeed:
    def __init__(self, max_segments: int = MAX_SEGMENTS, max_text_chars: int = MAX_TEXT_CHARS) -> None:
        self._subscriptions: dict[int, set[SegmentSubscription]] = {}
        self._max_segments = max_segments
        self._max_text_chars = max_text_chars
        self._closed = False

    @property
    def subscriptions(self) -> int:
        """How many are open (not __len__: an empty feed must not read as false)."""
        return sum(len(subs) for subs in self._subscriptions.values())

    def subscribe(self, job_id: int) -> SegmentSubscription:
        """Follow a job from now on. Subscribe before reading the job's state: a job that ended before its
        subscription never ends it (its transcript is in the store)."""
        subscription = SegmentSubscription(self, job_id, self._max_segments, self._max_text_chars)
        if self._closed:
            subscription._end()
        else:
            self._subscriptions.setdefault(job_id, set()).add(subscription)
        return subscription

    def publish(self, job_id: int, segments: Sequence[Segment]) -> None:
        """Segments of a running job, just decoded, in order."""
        for subscription in self._subscriptions.get(job_id, ()):
            subscription._offer(segments)

    def finish(self, job_id: int, transcript: Transcript) -> None:
        """The job completed with this transcript: each subscriber is given what it lacks of it, and ends."""
        for subscription in self._subscriptions.pop(job_id, ()):
            subscription._finish(transcript)

    def end(self, job_id: int) -> None:
        """The job ended without a transcript (failed, cancelled): its subscribers end."""
        for subscription in self._subscriptions.pop(job_id, ()):
            subscription._end()

    def job_changed(self, view: JobView) -> None:
        """Every job change the registry publishes: a job that reached a final state is followed no more."""
        if view.state.terminal:
            self.end(view.id)

    def close(self) -> None:
        """The daemon stops: every subscriber ends, and later ones end at once."""
        self._closed = True
        for job_id in list(self._subscriptions):
            self.end(job_id)

    def _unsubscribe(self, subscription: SegmentSubscription) -> None:
        subscriptions = self._subscriptions.get(subscription.job_id)
        if subscriptions is not None:
            subscriptions.discard(subscription)
            if not subscriptions:
                del self._subscriptions[subscription.job_id]
