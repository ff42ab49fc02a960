"""The pure decision of the heartbeat: which jobs a host held were taken from it."""

from __future__ import annotations

import pytest

from whisperd.fleetlink import lost_jobs


@pytest.mark.parametrize(
    ("before", "after", "in_store", "lost"),
    [
        ({1, 2}, {1, 2}, {1, 2}, set()),  # all still ours
        ({1, 2}, {1, 2}, {1}, {2}),  # 2 was requeued by another host or cancelled there
        ({1}, {1, 3}, {1}, set()),  # 3 was claimed during the round trip: not lost
        ({1, 2}, {1}, {1}, set()),  # 2 ended here during the round trip
        ({1, 2}, {1, 2}, set(), {1, 2}),  # stopped past the lease: everything went elsewhere
        (set(), set(), {7}, set()),  # the store still lists a job this host already let go
    ],
)
def test_a_job_is_lost_only_if_held_all_through_the_heartbeat(
    before: set[int], after: set[int], in_store: set[int], lost: set[int]
) -> None:
    assert lost_jobs(before, after, in_store) == lost
