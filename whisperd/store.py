"""The store's interface and its row types. The registry, handlers and tests speak only this; SQLite is one
backend behind it (sqlite_store.py), and a shared database for many hosts can be another."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator, Sequence
from collections.abc import Set as AbstractSet
from typing import Protocol

import msgspec

from whisperd.jobs import JobEvent, JobState
from whisperd.protocol import JobView, Task, Transcript


class JobRow(msgspec.Struct, kw_only=True, gc=False):
    """One job as stored, without its transcript (fetched on its own: listings never decode it). Scalars
    only, hence gc=False: a queue of 100,000 jobs adds nothing to the garbage collector's rounds."""

    id: int
    state: JobState
    progress: float  # 0..100
    retries: int
    device: str | None
    worker: str | None
    model: str
    language: str | None
    task: Task
    priority: int
    word_timestamps: bool
    error: str | None
    filename: str
    owner_uid: int
    audio_duration_s: float | None
    spool_path: str | None
    spool_bytes: int | None  # the size of its spooled audio (None: queued by a release that did not store it)
    created_at: float
    updated_at: float
    queued_at: float  # FIFO key: set at submit and whenever a job goes back to the tail
    started_at: float | None
    finished_at: float | None
    not_before: float | None  # a RETRYING job waits until then
    prompt: str | None = None  # decoding options, as submitted (None: faster-whisper's default)
    temperature: float | None = None
    # Kept by the shared store only (several hosts, one queue; see pg_store.py): the embedded one has a
    # single host and stores none of them.
    attempt: int = 0  # raised at each dispatch: the fencing token a shared store checks at every write
    host: str | None = None  # the host holding the job (PROCESSING, RETRYING)
    submit_host: str | None = None  # the host that accepted it (its spool_path is a file there)

    def view(self) -> JobView:
        """What clients see of the job: the one conversion from the row to the wire (spelled out: a listing
        of live jobs makes one per job, and this is twice as fast as a loop over the fields)."""
        return JobView(
            id=self.id, state=self.state, progress=self.progress, retries=self.retries, device=self.device,
            worker=self.worker, model=self.model, language=self.language, task=self.task,
            priority=self.priority, word_timestamps=self.word_timestamps, error=self.error,
            filename=self.filename, owner_uid=self.owner_uid, audio_duration_s=self.audio_duration_s,
            created_at=self.created_at, updated_at=self.updated_at, started_at=self.started_at,
            finished_at=self.finished_at, host=self.host, temperature=self.temperature,
        )  # fmt: skip


SHARED_ONLY_COLUMNS = frozenset({"attempt", "host", "submit_host"})
# What the embedded store keeps of a job: every field but the shared store's own.
JOB_COLUMNS: tuple[str, ...] = tuple(f for f in JobRow.__struct_fields__ if f not in SHARED_ONLY_COLUMNS)
# Fixed at submit; everything else may change with a transition.
IMMUTABLE_COLUMNS = frozenset(
    {"id", "model", "language", "task", "filename", "owner_uid", "spool_bytes", "created_at"}
    | {"prompt", "temperature"}
)
MUTABLE_COLUMNS: tuple[str, ...] = tuple(c for c in JOB_COLUMNS if c not in IMMUTABLE_COLUMNS)


class NewJob(msgspec.Struct, kw_only=True):
    spool_path: str
    spool_bytes: int
    filename: str
    owner_uid: int
    model: str
    language: str | None
    task: Task
    priority: int
    word_timestamps: bool
    prompt: str | None = None
    temperature: float | None = None


class EventRow(msgspec.Struct, frozen=True, kw_only=True):
    """One transition in a job's history (from_state is None for the submit)."""

    at: float
    from_state: JobState | None
    to_state: JobState
    event: str
    worker: str | None
    error: str | None


class Names(AbstractSet[str]):
    """A set of many names, in many small sets (by hash): none ever grows big, so no resize of a million
    entries holds the interpreter for tens of milliseconds while the loop, in another thread, waits for it."""

    _SHARDS = 1024

    def __init__(self, names: Iterable[str] = ()) -> None:
        self._shards: list[set[str]] = [set() for _ in range(self._SHARDS)]
        for name in names:
            self._shards[hash(name) % self._SHARDS].add(name)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name in self._shards[hash(name) % self._SHARDS]

    def __iter__(self) -> Iterator[str]:
        return itertools.chain.from_iterable(self._shards)

    def __len__(self) -> int:
        return sum(map(len, self._shards))

    def clear(self) -> None:
        """Shard by shard: freeing a million strings at once would hold the interpreter for 50 ms."""
        for shard in self._shards:
            shard.clear()


# What the scheduler's lanes keep of a PENDING job: (id, priority, owner_uid, model, queued_at). A plain
# tuple, as the database returns it: a million of them are read at start, and each object counts.
QueueEntry = tuple[int, int, int, str, float]


class UserTotal(msgspec.Struct, frozen=True, kw_only=True):
    """One user's live jobs in one state, and the bytes of their spooled audio: the books at start."""

    owner_uid: int
    state: JobState
    jobs: int
    spool_bytes: int


class SharedQueue(Protocol):
    """What a store many hosts share (PostgreSQL, pg_store.py) adds for the registry: its queue changes
    under the daemon's feet, so the daemon reads the lanes at each round instead of keeping them; and its
    insert_jobs does network I/O (the registry runs it in a thread)."""

    def lanes(
        self, take: int
    ) -> tuple[list[tuple[tuple[int, int, str], int, list[tuple[int, float]]]], dict[int, int]]:
        """The PENDING lanes ((priority, owner, model), length, first `take` (id, queued_at)) and the
        fleet's fair-share turns by uid."""
        ...

    def note_stale_result(self, job_id: int, attempt: int, worker: str | None) -> None:
        """Record in the job's history that a result of an attempt no longer this host's was refused."""
        ...


# (the job as it is now, the state it left, the event, the result if any): one transition to save
SavedTransition = tuple[JobRow, JobState, JobEvent, Transcript | None]


class Store(Protocol):
    """Durable jobs, their results and their history. Every method commits before it returns; a commit is
    durable once sync() has run after it (the daemon acknowledges a submit only then: durability.py). A
    write the backend cannot make raises a StorageError (StorageFull, StorageBusy, StorageUnavailable,
    Superseded) and leaves nothing changed."""

    def claim(self, transitions: Sequence[SavedTransition]) -> list[int]:
        """The DISPATCH of PENDING jobs, in one commit: of those still queued and not being taken by another
        host, the ids this call took (every one of them in a store only this daemon writes)."""
        ...

    def insert_jobs(
        self,
        new_jobs: Sequence[NewJob],
        now: float,
        before_commit: Callable[[list[JobRow]], None] | None = None,
    ) -> list[JobRow]:
        """All of a submit's jobs in one transaction: either every file is queued or none. before_commit gets
        the rows once inserted, before anyone else can see them (a shared store's other readers)."""
        ...

    def save_transition(
        self, job: JobRow, from_state: JobState, event: JobEvent, transcript: Transcript | None = None
    ) -> None:
        """The job's new state, its history row and any result, in one commit."""
        ...

    def save_transitions(self, transitions: Sequence[SavedTransition]) -> None:
        """Many transitions in one commit (a cancel of many jobs, the requeue at start-up): all or none."""
        ...

    def get(self, job_id: int) -> JobRow | None: ...

    def select(self, ids: Sequence[int], state: JobState | None, limit: int) -> list[JobRow]:
        """The jobs named (or all), optionally of one state: the newest `limit`, oldest first."""
        ...

    def views(self, ids: Sequence[int], state: JobState | None, limit: int) -> list[JobView]:
        """What clients see of the jobs named (or all), optionally of one state: the newest `limit`, oldest
        first. Reads only a view's columns (never a transcript or a spool path) and builds no JobRow."""
        ...

    def newest_ids(self, state: JobState | None, limit: int) -> list[int]:
        """Ids of the newest `limit` jobs (optionally of one state), oldest first: what a listing of the
        newest jobs costs is what it returns, not the number of jobs stored."""
        ...

    def live_jobs(self) -> list[JobRow]:
        """Every job not in a terminal state, by id."""
        ...

    def jobs_in(self, states: Sequence[JobState]) -> list[JobRow]:
        """Every job in these states, by id (at start: the few PROCESSING and RETRYING ones)."""
        ...

    def queue(self) -> Iterator[Sequence[QueueEntry]]:
        """The PENDING jobs, oldest first (by queued_at, then id), in chunks."""
        ...

    def user_totals(self) -> list[UserTotal]:
        """Live jobs and their spooled bytes by owner and state."""
        ...

    def measure_spools(self, size_of: Callable[[str], int]) -> int:
        """Store the spool size of live jobs that have none (queued by an older release); returns how many.
        Blocking and on a connection of its own: run in a thread, before recovery."""
        ...

    def count_by_state(self) -> dict[JobState, int]: ...

    def transcript(self, job_id: int) -> Transcript | None: ...

    def history(self, job_id: int) -> list[EventRow]: ...

    def spool_names_in_use(self) -> Names:
        """File names of the spooled audio that live jobs still need; safe to call from a thread."""
        ...

    def sync(self) -> None:
        """Make every commit so far durable; blocking, run it in a thread. A StorageError if it cannot."""
        ...

    def checkpoint(self) -> bool:
        """Fold the commits into the database file, so that the log of them stays short (for a backend that
        keeps one; else nothing), on a connection of its own; blocking, run it in a thread. True when the log
        is past its limit and only restart_log() can shorten it."""
        ...

    def restart_log(self) -> None:
        """On the store's own connection (the loop), right after a checkpoint() that returned True: what is
        left of the log folded in, so that it starts over. Brief, and rare: see sqlite_wal.py."""
        ...

    def close(self) -> None: ...
