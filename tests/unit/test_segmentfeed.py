"""The feed of segments as they are decoded (whisperd/segmentfeed.py): each subscriber reads a job's segments
in order, each place once, within its bound, and the whole transcript in the end whatever its pace; a job
no one follows keeps nothing."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

import pytest

from whisperd.jobs import JobState
from whisperd.protocol import JobView, Segment, Transcript
from whisperd.segmentfeed import SegmentFeed, SegmentSubscription

T = TypeVar("T")


def run(coroutine: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(asyncio.wait_for(coroutine, 5))


def seg(place: int, text: str | None = None) -> Segment:
    return Segment(
        id=place, start=float(place - 1), end=float(place), text=f" s{place}" if text is None else text
    )


def segs(*places: int) -> list[Segment]:
    return [seg(n) for n in places]


def transcript(count: int) -> Transcript:
    segments = segs(*range(1, count + 1))
    return Transcript("en", 1.0, float(count), "".join(s.text for s in segments).strip(), segments)


def ids(segments: list[Segment]) -> list[int]:
    return [s.id for s in segments]


async def read_all(sub: SegmentSubscription) -> list[int]:
    places: list[int] = []
    while batch := await sub.get():
        places += ids(batch)
    return places


def view(job_id: int, state: JobState) -> JobView:
    return JobView(
        id=job_id, state=state, progress=0.0, retries=0, device=None, worker=None, model="tiny.en",
        language=None, task="transcribe", priority=0, word_timestamps=False, error=None, filename="a.wav",
        owner_uid=1000, audio_duration_s=None, created_at=0.0, updated_at=0.0, started_at=None,
        finished_at=None,
    )  # fmt: skip


def test_a_job_no_one_follows_keeps_nothing() -> None:
    feed = SegmentFeed()
    feed.publish(1, segs(1, 2))
    feed.finish(1, transcript(2))
    feed.end(1)
    assert feed.subscriptions == 0

    async def later() -> list[Segment]:
        with feed.subscribe(1) as sub:
            feed.publish(1, segs(3))
            return await sub.get()

    assert ids(run(later())) == [3], "a subscriber is given only what is decoded after it came"


def test_segments_come_in_order_as_they_are_published() -> None:
    async def main() -> list[list[int]]:
        feed = SegmentFeed()
        batches: list[list[int]] = []
        with feed.subscribe(7) as sub:
            reader = asyncio.create_task(sub.get())
            await asyncio.sleep(0)
            assert not reader.done(), "get() waits for a segment"
            feed.publish(7, segs(1))
            batches.append(ids(await reader))
            feed.publish(7, segs(2, 3))
            feed.publish(7, segs(4))
            batches.append(ids(await sub.get()))
            feed.finish(7, transcript(4))
            assert await sub.get() == []
            assert sub.ended and sub.complete and not sub.overflowed
        assert feed.subscriptions == 0
        return batches

    assert run(main()) == [[1], [2, 3, 4]]


def test_each_place_is_given_once_even_after_a_retry() -> None:
    feed = SegmentFeed()
    sub = feed.subscribe(1)
    feed.publish(1, segs(1, 2, 3))
    feed.publish(1, segs(1, 2))  # the job's next run decodes from the start again
    feed.publish(1, segs(3, 4))
    feed.finish(1, transcript(5))
    assert run(read_all(sub)) == [1, 2, 3, 4, 5]


def test_jobs_and_subscribers_are_apart() -> None:
    feed = SegmentFeed()
    first, second, other = feed.subscribe(1), feed.subscribe(1), feed.subscribe(2)
    assert feed.subscriptions == 3
    feed.publish(1, segs(1, 2))
    feed.publish(2, segs(1))
    feed.finish(1, transcript(2))
    assert run(read_all(first)) == run(read_all(second)) == [1, 2]
    assert not other.ended and feed.subscriptions == 1
    assert ids(run(other.get())) == [1]


def test_a_reader_behind_overflows_and_gets_the_rest_from_the_transcript() -> None:
    feed = SegmentFeed(max_segments=3)
    sub = feed.subscribe(1)
    feed.publish(1, segs(1, 2))
    feed.publish(1, segs(3, 4, 5))
    assert sub.overflowed
    assert ids(run(sub.get())) == [1, 2, 3], "at most its bound queued"
    feed.publish(1, segs(6))  # room again, but after a gap: nothing more until the job completes
    assert not sub.ended
    feed.finish(1, transcript(7))
    assert run(read_all(sub)) == [4, 5, 6, 7]
    assert sub.complete


def test_the_bound_counts_text_too() -> None:
    feed = SegmentFeed(max_segments=100, max_text_chars=10)
    sub = feed.subscribe(1)
    feed.publish(1, [seg(1, "x" * 6), seg(2, "y" * 6)])
    assert sub.overflowed
    assert ids(run(sub.get())) == [1]
    feed.finish(1, transcript(3))
    assert run(read_all(sub)) == [2, 3]


def test_a_job_that_fails_or_is_cancelled_ends_its_subscribers() -> None:
    async def main() -> tuple[list[int], list[Segment]]:
        feed = SegmentFeed()
        sub = feed.subscribe(1)
        reader = asyncio.create_task(sub.get())
        await asyncio.sleep(0)
        feed.end(1)
        woken = await reader
        return ids(woken), await sub.get()

    assert run(main()) == ([], [])


def test_what_was_queued_is_read_before_the_end() -> None:
    feed = SegmentFeed()
    sub = feed.subscribe(1)
    feed.publish(1, segs(1, 2))
    feed.end(1)
    assert run(read_all(sub)) == [1, 2]
    assert sub.ended and not sub.complete


@pytest.mark.parametrize(
    ("state", "ends"),
    [
        (JobState.PENDING, False),
        (JobState.PROCESSING, False),
        (JobState.RETRYING, False),  # it runs again: its subscribers go on
        (JobState.COMPLETED, True),
        (JobState.FAILED, True),
        (JobState.CANCELLED, True),
    ],
)
def test_job_changes_end_the_feed_of_finished_jobs(state: JobState, ends: bool) -> None:
    feed = SegmentFeed()
    sub = feed.subscribe(3)
    feed.job_changed(view(3, state))
    assert sub.ended is ends
    assert feed.subscriptions == (0 if ends else 1)


def test_completion_after_the_transcript_gives_nothing_twice() -> None:
    feed = SegmentFeed()
    sub = feed.subscribe(1)
    feed.publish(1, segs(1))
    feed.finish(1, transcript(2))
    feed.job_changed(view(1, JobState.COMPLETED))  # the registry's transition, after finish()
    feed.publish(1, segs(3))  # a late report changes nothing
    assert run(read_all(sub)) == [1, 2]


def test_leaving_unsubscribes() -> None:
    feed = SegmentFeed()
    with feed.subscribe(1) as sub:
        feed.publish(1, segs(1))
    assert feed.subscriptions == 0 and sub.ended
    feed.publish(1, segs(2))
    assert run(sub.get()) == [], "what was queued is dropped with it"


def test_closing_the_feed_ends_everyone_now_and_later() -> None:
    feed = SegmentFeed()
    subs = [feed.subscribe(1), feed.subscribe(2)]
    feed.close()
    assert all(sub.ended for sub in subs) and feed.subscriptions == 0
    late = feed.subscribe(3)
    assert late.ended and feed.subscriptions == 0
    assert run(late.get()) == []
