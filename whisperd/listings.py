"""What `status` lists: views of the jobs asked for, live ones from memory (their latest progress), the
others from the store, the newest found by the store's indexes, so a listing costs what it returns and not the
length of the queue. Views of finished jobs never change, so the latest read are kept for the next listing."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from whisperd.errors import NotFound
from whisperd.jobs import JobState
from whisperd.protocol import MAX_STATUS_LIMIT, JobView
from whisperd.store import JobRow, Store

_FINISHED_VIEWS = MAX_STATUS_LIMIT  # views of finished jobs kept for listings: about 5 MB


class Listings:
    def __init__(self, store: Store, live: Mapping[int, JobRow]) -> None:
        """live: the registry's live jobs (read, never written, here)."""
        self._store = store
        self._live = live
        self._finished: dict[int, JobView] = {}

    def select(self, ids: Sequence[int], state: JobState | None, limit: int) -> list[JobView]:
        """What clients see of the jobs named (all of them, each must exist, in the order asked), else of the
        newest `limit`, oldest first; optionally of one state. Live jobs come from memory (their latest
        progress), the others' views from the store; the newest are found by the store's indexes, so a
        listing costs what it returns, not the length of the queue."""
        live = self._live
        if ids:  # not from the views kept: retention may have deleted a finished job since
            wanted = list(dict.fromkeys(ids))
            found = self._stored_views(wanted, {})
            missing = [i for i in ids if i not in live and i not in found]
            if missing:
                raise NotFound(f"no job {', '.join(map(str, missing))}")
            views = [live[i].view() if i in live else found[i] for i in wanted]
            return [v for v in views if state is None or v.state is state]
        newest = self._store.newest_ids(state, limit)  # these exist: the views kept may serve them
        found = self._stored_views(newest, self._finished)
        # .get: retention (in a thread) may have deleted a finished job between the two reads
        newest_views = [live[i].view() if i in live else found.get(i) for i in newest]
        return [v for v in newest_views if v is not None and (state is None or v.state is state)]

    def _stored_views(self, ids: Sequence[int], kept: Mapping[int, JobView]) -> dict[int, JobView]:
        """Views of those of these jobs that are not live: from `kept`, else from the store (one query, none
        if all are live or kept). The finished ones read are kept for the next listing."""
        found = {i: kept[i] for i in ids if i in kept}
        stored = [i for i in ids if i not in self._live and i not in found]
        if stored:
            for view in self._store.views(stored, None, len(stored)):
                found[view.id] = view
                if view.state.terminal:
                    self._finished[view.id] = view
            while len(self._finished) > _FINISHED_VIEWS:  # the longest kept go first
                del self._finished[next(iter(self._finished))]
        return found
