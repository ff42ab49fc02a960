"""What `status` lists: views of the jobs asked for, the newest found by the store's indexes, so a listing
costs what it returns and not the length of the queue. Running jobs' views come from memory (their latest
progress); the views of the jobs most recently changed or read are kept, so the newest jobs, which are what
`whisperctl status` asks for, are listed without reading their rows again. The registry tells every change
(remember), so a view kept is never stale; a finished one may have been deleted by retention since, so the
store's ids decide which exist."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

from whisperd.errors import NotFound
from whisperd.jobs import JobState
from whisperd.protocol import MAX_STATUS_LIMIT, JobView
from whisperd.store import JobRow, Store

_KEPT_VIEWS = MAX_STATUS_LIMIT  # about 10 MB: the newest jobs a listing may ask for


class Listings:
    def __init__(self, store: Store, live: Mapping[int, JobRow], keep: bool = True) -> None:
        """live: the registry's running and retrying jobs (read, never written, here). keep: False with a
        store other hosts write too, whose changes reach this one by notifications that a lost connection
        may miss: every job not held here is then read from the store."""
        self._store = store
        self._live = live
        self._keep = keep
        self._kept: dict[int, JobView] = {}  # least recently changed or read first

    def remember(self, view: JobView) -> None:
        """A job's view as it is now, after each change the registry committed (or a read of the store)."""
        if not self._keep:
            return
        self._kept.pop(view.id, None)
        self._kept[view.id] = view
        if len(self._kept) > _KEPT_VIEWS:
            del self._kept[next(iter(self._kept))]

    def select(self, ids: Sequence[int], state: JobState | None, limit: int) -> list[JobView]:
        """What clients see of the jobs named (all of them, each must exist, in the order asked), else of the
        newest `limit`, oldest first; optionally of one state."""
        if ids:
            wanted = list(dict.fromkeys(ids))
            # Not a finished view kept: retention may have deleted its job since.
            found = self._views(wanted, lambda view: not view.state.terminal)
            missing = [i for i in ids if i not in found]
            if missing:
                raise NotFound(f"no job {', '.join(map(str, missing))}")
            return [v for v in (found[i] for i in wanted) if state is None or v.state is state]
        newest = self._store.newest_ids(state, limit)  # these exist: any view kept may serve them
        found = self._views(newest, lambda view: True)
        # .get: retention (in a thread) may have deleted a finished job between the two reads
        views = [found.get(i) for i in newest]
        return [v for v in views if v is not None and (state is None or v.state is state)]

    def _views(self, ids: Sequence[int], usable: Callable[[JobView], bool]) -> dict[int, JobView]:
        """Views of these jobs that exist: running ones from memory, else the kept ones `usable` allows,
        else from the store (one query, none if all were found). Those read are kept."""
        found: dict[int, JobView] = {}
        stored: list[int] = []
        for i in ids:
            if (job := self._live.get(i)) is not None:
                found[i] = job.view()
            elif self._keep and (view := self._kept.get(i)) is not None and usable(view):
                found[i] = view
            else:
                stored.append(i)
        if stored:
            for view in self._store.views(stored, None, len(stored)):
                found[view.id] = view
                self.remember(view)
        return found
