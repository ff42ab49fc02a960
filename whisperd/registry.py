"""The job registry: live jobs in memory, every change written through to the store, every transition
timestamped, logged, counted and published to watchers. The only writer of job state."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections import Counter
from collections.abc import Callable, Container, Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import msgspec

from whisperd.errors import NotFound, StorageError, Superseded
from whisperd.jobs import JobEvent, JobState, retry_delay_s, transition
from whisperd.ledger import Ledger, UserFigures, spool_size
from whisperd.listings import Listings
from whisperd.protocol import JobView, Transcript, printable
from whisperd.scheduling import Lane, QueuedJob, Waiting
from whisperd.spool import Spool
from whisperd.store import JobRow, NewJob, SharedQueue, Store, UserTotal

log = logging.getLogger("whisperd.jobs")

Publish = Callable[[JobView], None]
TransitionHook = Callable[[JobRow, JobState, JobEvent], None]


class RetryPolicy(msgspec.Struct, frozen=True, kw_only=True):
    max_retries: int
    backoff_s: float
    backoff_max_s: float


class _Step(NamedTuple):
    """One transition taken in memory, waiting for its commit (or to be undone)."""

    job: JobRow
    before: JobRow  # a copy as it was
    old: JobState
    event: JobEvent
    transcript: Transcript | None
    spool: str | None  # the audio to discard once a terminal transition is committed


class _Deferred(NamedTuple):
    """A transition the store refused, to commit at a later round; the job stays as it was meanwhile."""

    from_state: JobState
    event: JobEvent
    transcript: Transcript | None
    changes: dict[str, Any]


class JobRegistry:
    def __init__(
        self,
        store: Store,
        spool: Spool,
        clock: Callable[[], float],
        policy: RetryPolicy,
        publish: Publish,
        on_transition: TransitionHook,
        discard: Callable[[str | None], None] | None = None,
        shared: SharedQueue | None = None,
        host_id: str | None = None,
        forget_audio: Callable[[int], None] | None = None,
    ) -> None:
        """publish: every change a watcher should see; on_transition: each committed transition; discard: a
        finished job's audio, once its last commit is durable (None: at once, spool.discard). shared: the
        store again when many hosts share it (several hosts, one queue), whose queue, counts and users'
        books change under this daemon's feet: they are read from it, not kept; host_id: this host's name;
        forget_audio: the local copy of another host's job's audio, once the job ended."""
        self._forget_audio = forget_audio
        self._store = store
        self._queue = shared
        self._shared = shared is not None
        self.host_id = host_id
        self._spool = spool
        self._discard = discard or spool.discard
        self._clock = clock
        self.policy = policy  # replaced on reload
        self._publish_watchers = publish
        self._on_transition = on_transition
        # Live jobs out of the queue (PROCESSING, RETRYING): the few that workers and backoffs hold, kept
        # whole. PENDING jobs live in the store; the ledger's lanes keep a few scalars of each for the plan,
        # so a queue of a million costs about 100 bytes a job here, and a dispatch reads its rows.
        self._live: dict[int, JobRow] = {}
        self._listings = Listings(store, self._live, keep=shared is None)
        self._counts: Counter[JobState] = Counter()  # kept as jobs move, so reading it costs nothing
        self._retrying: dict[int, JobRow] = {}  # so a round reads the few in backoff, not every live job
        self._avoid_devices: dict[int, frozenset[str]] = {}  # live job -> devices it ran out of memory on
        self._alone: set[int] = set()  # live jobs to dispatch in a batch of their own (suspects of a crash)
        self._deferred: dict[int, _Deferred] = {}  # live job -> its transition the store refused, in order
        self._store_failing = False  # to log a failing store once, and its recovery once
        self._ledger = Ledger(keep_lanes=not self._shared)  # per-user figures; the lanes the plan reads
        # With a shared store: the queue as last read (its oldest head, its models), and the jobs this host
        # held that another host took over or ended (the loop stops their workers: take_lost()).
        self._queue_heads: tuple[float | None, frozenset[str]] = (None, frozenset())
        # A shared store's submits committed by a thread and not yet announced (PENDING) on the loop: a
        # wake-up may dispatch such a job first, and its PENDING must still come before its PROCESSING.
        self._unannounced: dict[int, JobRow] = {}
        self._unannounced_lock = threading.Lock()
        self._lost: set[int] = set()

    # ---- start-up ------------------------------------------------------------------------------------

    def recover(self) -> int:
        """Load the live jobs; a job that was PROCESSING when the daemon stopped goes back to the queue.
        Reads the PENDING ones as lane entries only (one index-only scan), the others whole."""
        self._counts = Counter(self._store.count_by_state())
        # A shared queue is read at each round (lanes()), never kept: other hosts take from it too.
        self._ledger.load(self._store.user_totals(), () if self._shared else self._store.queue())
        interrupted = []
        for job in self._store.jobs_in((JobState.PROCESSING, JobState.RETRYING)):
            self._live[job.id] = job
            if job.state is JobState.PROCESSING:
                interrupted.append(job)
            else:
                self._retrying[job.id] = job
        try:  # after the waiting ones, whose places in the queue stay theirs; one commit for them all
            self.apply_many(interrupted, JobEvent.REQUEUE, error=None)
        except StorageError as exc:
            # A full disk must not stop the daemon from starting: they stay PROCESSING in memory (placed
            # nowhere) and the requeue is committed at a later round, before any of them is dispatched.
            self.note_store_error(exc)
            for job in interrupted:
                self._deferred[job.id] = _Deferred(job.state, JobEvent.REQUEUE, None, {"error": None})
        log.info("recovered %d live jobs (%d were processing)", self.live_count(), len(interrupted))
        return len(interrupted)

    def measure_spools(self) -> int:
        """Store the spool sizes an older release did not; blocking: in a thread, before recover()."""
        return self._store.measure_spools(spool_size)

    def remove_orphan_spools(self, before: float) -> int:
        """Spool files no live job needs, written before `before` (wall clock); blocking: in a thread."""
        names = self._store.spool_names_in_use()
        try:
            return self._spool.remove_orphans(names, before)
        finally:
            names.clear()

    # ---- reads ---------------------------------------------------------------------------------------

    def held(self) -> list[JobRow]:
        """The live jobs out of the queue (PROCESSING, RETRYING): the PENDING ones are in the store."""
        return list(self._live.values())

    def live_count(self) -> int:
        return sum(self._counts[s] for s in JobState if not s.terminal)

    def find_live(self, job_id: int) -> JobRow | None:
        """A PROCESSING or RETRYING job (None for any other)."""
        return self._live.get(job_id)

    def get(self, job_id: int) -> JobRow:
        """The job as it is now: from memory if held, else read from the store (a PENDING job's row is read
        afresh each time; apply it before the next await, as every caller does)."""
        job = self._live.get(job_id) or self._store.get(job_id)
        if job is None:
            raise NotFound(f"no job {job_id}")
        return job

    def queued(self, job_ids: Sequence[int]) -> list[JobRow]:
        """The rows of these jobs that are still PENDING, in that order (a dispatch's; read afresh, as get()).
        With a shared store, one another host took meanwhile is left out rather than raising."""
        if not self._shared:
            return [self.get(job_id) for job_id in job_ids]
        found = {j.id: j for j in self._store.select(job_ids, JobState.PENDING, len(job_ids))}
        return [found[job_id] for job_id in job_ids if job_id in found]

    def transcript(self, job_id: int) -> Transcript | None:
        return self._store.transcript(job_id)

    def select(self, ids: Sequence[int], state: JobState | None, limit: int) -> list[JobView]:
        """What clients see of the jobs named, else of the newest `limit`: see Listings.select."""
        return self._listings.select(ids, state, limit)

    def counts(self) -> dict[str, int]:
        return {s.value: self._counts[s] for s in JobState}

    def oldest_waiting_since(self) -> float | None:
        """When the job that has waited longest was queued or began its backoff (None when nothing waits);
        costs the number of lanes and of jobs in backoff, not the length of the queue."""
        heads = [j.updated_at for j in self._retrying.values()]
        pending = self._queue_heads[0] if self._shared else self._ledger.oldest_pending_since()
        if pending is not None:
            heads.append(pending)
        return min(heads, default=None)

    def models_in_use(self) -> set[str]:
        """Models of the live jobs: a model still queued or running stays served."""
        queued = self._queue_heads[1] if self._shared else self._ledger.pending_models()
        return set(queued) | {j.model for j in self._live.values()}

    def waiting_count(self) -> int:
        """Jobs waiting for a worker (PENDING or RETRYING): what the queue limit bounds."""
        return self._counts[JobState.PENDING] + self._counts[JobState.RETRYING]

    def avoided_devices(self, job_id: int) -> frozenset[str]:
        return self._avoid_devices.get(job_id, frozenset())

    def user_figures(self, uid: int) -> UserFigures:
        """One user's jobs waiting and running, spooled bytes, ...: what the per-user limits bound."""
        return self._ledger.user(uid)

    def users(self) -> dict[int, UserFigures]:
        return self._ledger.users()

    def waiting(self, take: int, models: Container[str]) -> Waiting:
        """What the plan sees of the PENDING jobs of the models served: lanes by (priority, owner, model),
        each with its length and first `take` jobs, and when each user was last served (the turns). With a
        shared store, the fleet's queue and turns as the store has them now."""
        if self._shared:
            assert self._queue is not None
            lanes_now, last_served = self._queue.lanes(take)
            heads = [first[0][1] for _key, _count, first in lanes_now if first]
            self._queue_heads = (min(heads, default=None), frozenset(key[2] for key, _c, _f in lanes_now))
        else:
            lanes_now, last_served = list(self._ledger.lanes(take)), self._ledger.last_served()
        lanes = tuple(
            Lane(priority=priority, owner_uid=uid, model=model, count=count, jobs=tuple(
                QueuedJob(id=job_id, model=model, priority=priority, queued_at=queued_at, owner_uid=uid,
                          avoid_devices=self.avoided_devices(job_id), alone=job_id in self._alone)
                for job_id, queued_at in first
            ))
            for (priority, uid, model), count, first in lanes_now
            if model in models
        )  # fmt: skip
        return Waiting(lanes=lanes, last_served=last_served)

    # ---- writes --------------------------------------------------------------------------------------

    async def submit(self, new_jobs: Sequence[NewJob]) -> list[JobRow]:
        """add(), with a shared store's insert (the audio copied into the database with the jobs) in a
        thread: it is network I/O."""
        if not self._shared:
            return self.add(new_jobs)

        inserted: list[int] = []

        def before_commit(records: list[JobRow]) -> None:
            with self._unannounced_lock:
                self._unannounced.update((job.id, job) for job in records)
            inserted.extend(job.id for job in records)

        try:
            records = await asyncio.to_thread(self._store.insert_jobs, new_jobs, self._clock(), before_commit)
        except BaseException:
            with self._unannounced_lock:  # the commit failed: none of its jobs exists to announce
                for job_id in inserted:
                    self._unannounced.pop(job_id, None)
            raise
        self._announce(job.id for job in records)
        return records

    def _announce(self, job_ids: Iterable[int]) -> None:
        """The jobs of a submit committed and not yet announced here: announced now (once)."""
        if not self._unannounced:
            return
        with self._unannounced_lock:
            records = [self._unannounced.pop(i) for i in job_ids if i in self._unannounced]
        self._added(records)

    def add(self, new_jobs: Sequence[NewJob]) -> list[JobRow]:
        records = self._store.insert_jobs(new_jobs, self._clock())
        self._added(records)
        return records

    def _added(self, records: Sequence[JobRow]) -> None:
        for job in records:
            self._counts[job.state] += 1
            self._ledger.moved(job, None, None)
            log.info("job %d PENDING: %s (model %s)", job.id, printable(job.filename), job.model,
                     extra={"JOB_ID": job.id, "JOB_STATE": job.state.value, "MODEL": job.model})  # fmt: skip
            self._publish(job.view())

    def run_alone(self, job_id: int) -> None:
        """Dispatch the job in a batch of its own from now on: its worker died while it was decoded
        together with others, and alone whatever happens is its own doing."""
        self._alone.add(job_id)

    def avoid_device(self, job_id: int, device: str) -> None:
        """The job (PROCESSING) ran out of memory there: place its retry elsewhere if anything else fits."""
        if job_id in self._live:
            self._avoid_devices[job_id] = self.avoided_devices(job_id) | {device}

    def release_due_retries(self, now: float) -> float | None:
        """RETRYING jobs whose backoff has elapsed go back to the queue; returns when the next one is due."""
        next_due: float | None = None
        due = []
        for job in self._retrying.values():
            if job.not_before is not None:
                if job.not_before <= now:
                    due.append(job)
                else:
                    next_due = job.not_before if next_due is None else min(next_due, job.not_before)
        try:
            self.apply_many(due, JobEvent.BACKOFF_ELAPSED)
        except StorageError as exc:  # they stay RETRYING, due, and are released at a later round
            self.note_store_error(exc)
        return next_due

    def apply(
        self, job: JobRow, event: JobEvent, transcript: Transcript | None = None, **changes: Any
    ) -> None:
        """Take one transition through the state machine (raising if illegal), then persist and publish. A
        commit the store refuses raises its StorageError and leaves the job exactly as it was."""
        self._commit([self._prepare(job, event, transcript, changes)])

    def apply_many(self, jobs: Sequence[JobRow], event: JobEvent, **changes: Any) -> None:
        """One event for each of these (distinct) jobs, in one commit: all of them or, raising, none."""
        steps: list[_Step] = []
        try:
            for job in jobs:
                steps.append(self._prepare(job, event, None, changes))
        except BaseException:
            self._undo(steps)
            raise
        self._commit(steps)

    def dispatch(self, jobs: Sequence[JobRow], **changes: Any) -> list[JobRow]:
        """The DISPATCH of these PENDING jobs, in one commit; returns those this daemon got. All of them with
        a store only it writes; with a shared one, those no other host took first (the others were claimed
        elsewhere meanwhile: they stay as they were here, and are not this host's to run)."""
        self._announce(job.id for job in jobs)
        steps: list[_Step] = []
        try:
            for job in jobs:
                if job.state is JobState.PENDING:  # read from a shared store: another host may hold it now
                    steps.append(self._prepare(job, JobEvent.DISPATCH, None, changes))
            won = set(self._store.claim([(s.job, s.old, s.event, s.transcript) for s in steps]))
        except BaseException:
            self._undo(steps)
            raise
        self._undo([s for s in steps if s.job.id not in won])
        for step in steps:
            if step.job.id in won:
                self._committed(step)
        return [s.job for s in steps if s.job.id in won]

    def apply_or_defer(
        self, job: JobRow, event: JobEvent, transcript: Transcript | None = None, **changes: Any
    ) -> bool:
        """apply(), except that a commit the store refuses (a full disk, a locked database) is kept, the job
        staying as it was in memory, and committed by retry_deferred() at a later round: a worker's result
        outlives a full disk, and its caller never sees the store's error. True if committed now."""
        transition(job.state, event, job.retries, self.policy.max_retries)  # an illegal event raises now
        if job.id in self._deferred:
            return False  # its earlier outcome still waits for its commit: that one stands
        if not self._deferred:  # else the store is failing: wait behind the others, not for the busy timeout
            try:
                self.apply(job, event, transcript, **changes)
                return True
            except Superseded:  # another host took the job over meanwhile: this outcome is void
                return False
            except StorageError as exc:
                self.note_store_error(exc)
        self._deferred[job.id] = _Deferred(job.state, event, transcript, dict(changes))
        return False

    def retry_deferred(self) -> bool:
        """Commit the transitions the store refused, all in one transaction; True when none waits any more.
        One overtaken meanwhile (its job cancelled by its user) is dropped."""
        if not self._deferred:
            return True
        steps: list[_Step] = []
        try:
            for job_id, deferred in list(self._deferred.items()):
                job = self._live.get(job_id)
                if job is None or job.state is not deferred.from_state:
                    del self._deferred[job_id]
                    continue
                steps.append(self._prepare(job, deferred.event, deferred.transcript, deferred.changes))
            self._commit(steps)
        except Superseded:  # those jobs are forgotten here now: the others are committed at the next round
            return False
        except StorageError as exc:
            self.note_store_error(exc)
            return False
        except BaseException:
            self._undo(steps)
            raise
        self._deferred.clear()
        if self._store_failing:
            self._store_failing = False
            log.warning("the job store takes commits again; %d transitions that waited are committed",
                        len(steps))  # fmt: skip
        return True

    def uncommitted(self) -> int:
        """Transitions waiting for the store to take their commit."""
        return len(self._deferred)

    def note_store_error(self, exc: StorageError) -> None:
        """The store refused a commit; what it refused is retried at later rounds. Logged once a spell."""
        if isinstance(exc, Superseded):  # not a failure: another host's change came first (see _commit)
            return
        if not self._store_failing:
            self._store_failing = True
            log.error("the job store refuses commits (%s): job changes wait in memory and are retried every "
                      "round", exc.message)  # fmt: skip

    def forget_finished(self, removed: Mapping[JobState, int]) -> None:
        """Finished jobs the retention deleted from the store: the counts follow."""
        for state, count in removed.items():
            self._counts[state] -= count

    def _prepare(
        self, job: JobRow, event: JobEvent, transcript: Transcript | None, changes: Mapping[str, Any]
    ) -> _Step:
        """Take the transition in memory (raising, with nothing changed, if it is illegal)."""
        old = job.state
        policy = self.policy
        new, retries = transition(old, event, job.retries, policy.max_retries)
        before = msgspec.structs.replace(job)  # to undo the change in memory if the store refuses it
        now = self._clock()
        job.state, job.retries, job.updated_at = new, retries, now
        for name, value in changes.items():
            setattr(job, name, value)
        if new is JobState.PROCESSING:
            job.started_at, job.progress, job.error = now, 0.0, None
            if self._shared:  # the new attempt's fencing token (the embedded store keeps neither)
                job.attempt, job.host = job.attempt + 1, self.host_id
        elif new is JobState.PENDING:
            job.queued_at, job.device, job.worker, job.host = now, None, None, None
            job.progress, job.not_before = 0.0, None
        elif new is JobState.RETRYING:
            job.not_before = now + retry_delay_s(retries, policy.backoff_s, policy.backoff_max_s)
        spool: str | None = None
        if new.terminal:
            job.finished_at = now
            if new is JobState.COMPLETED:
                job.progress = 100.0
            spool, job.spool_path = job.spool_path, None
        return _Step(job, before, old, event, transcript, spool)

    @staticmethod
    def _undo(steps: Sequence[_Step]) -> None:
        for step in reversed(steps):
            for name in step.job.__struct_fields__:
                setattr(step.job, name, getattr(step.before, name))

    def _commit(self, steps: Sequence[_Step]) -> None:
        """Persist the steps in one commit, then count, log and publish each; undo them all if refused."""
        if not steps:
            return
        try:
            if len(steps) == 1:
                self._store.save_transition(steps[0].job, steps[0].old, steps[0].event, steps[0].transcript)
            else:
                self._store.save_transitions([(s.job, s.old, s.event, s.transcript) for s in steps])
        except Superseded as exc:
            self._undo(steps)
            self._superseded(steps, exc.job_ids)
            raise
        except BaseException:
            self._undo(steps)
            raise
        for step in steps:
            self._committed(step)

    def _superseded(self, steps: Sequence[_Step], job_ids: frozenset[int]) -> None:
        """A shared store refused these jobs' changes: another host changed them since (took over a lease
        that expired while this one was cut off, or cancelled them). A result among them is a late one:
        recorded as refused. Those held here are no longer this host's."""
        for step in steps:
            if step.job.id in job_ids and step.event is JobEvent.COMPLETE:
                log.warning("job %d: the result of attempt %d comes too late: another host holds the job now",
                            step.job.id, step.job.attempt, extra={"JOB_ID": step.job.id})  # fmt: skip
                with contextlib.suppress(StorageError):
                    assert self._queue is not None  # Superseded comes from a shared store only
                    self._queue.note_stale_result(step.job.id, step.job.attempt, step.job.worker)
        self.release(job_ids)

    def release(self, job_ids: Iterable[int]) -> list[int]:
        """Forget jobs held here that a shared store says are no longer this host's (taken over after their
        lease expired, cancelled from another host): no commit, the store has their truth. Their workers
        are stopped by the loop (take_lost). Returns those that were held."""
        released = []
        for job_id in job_ids:
            job = self._live.pop(job_id, None)
            if job is None:
                continue
            self._retrying.pop(job_id, None)
            self._deferred.pop(job_id, None)
            self._avoid_devices.pop(job_id, None)
            self._alone.discard(job_id)
            self._counts[job.state] -= 1  # until the next refresh reads the store's counts
            self._lost.add(job_id)
            released.append(job_id)
            log.warning("job %d is no longer this host's (another host took it over or cancelled it)",
                        job_id, extra={"JOB_ID": job_id})  # fmt: skip
        return released

    def take_lost(self) -> set[int]:
        """The jobs released since the last call, whose workers the loop stops."""
        lost, self._lost = self._lost, set()
        return lost

    def held_ids(self) -> set[int]:
        return set(self._live)

    def refresh(self, counts: Mapping[JobState, int], totals: Iterable[UserTotal]) -> None:
        """A shared store's fleet-wide figures, read by the heartbeat: counts by state and users' books."""
        self._counts = Counter(counts)
        self._ledger.reload_totals(totals)

    def remote_change(self, view: JobView) -> bool:
        """Another host changed a job (a shared store's notification): shown to watchers; a job held here
        that it moved elsewhere is released (True: its workers must stop)."""
        self._announce((view.id,))
        self._publish(view)
        held = self._live.get(view.id)
        if held is not None and (view.state.terminal or view.host != self.host_id):
            return bool(self.release([view.id]))
        return False

    def _committed(self, step: _Step) -> None:
        job, old, event, spool = step.job, step.old, step.event, step.spool
        new = job.state
        self._deferred.pop(job.id, None)
        self._counts[old] -= 1
        self._counts[new] += 1
        self._ledger.moved(job, old, event)
        if new is JobState.RETRYING:
            self._retrying[job.id] = job
        else:
            self._retrying.pop(job.id, None)
        if new in (JobState.PROCESSING, JobState.RETRYING):
            self._live[job.id] = job
        else:  # back in the queue (the store and the lanes have it) or finished
            self._live.pop(job.id, None)
        if new.terminal:
            if job.submit_host in (None, self.host_id):  # another host's spool is that host's to clean
                self._discard(spool)  # only once the commit no longer needs it
            elif self._forget_audio is not None:
                self._forget_audio(job.id)
            self._avoid_devices.pop(job.id, None)
            self._alone.discard(job.id)
        self._log_transition(job, old, new, event)
        self._on_transition(job, old, event)
        self._publish(job.view())

    def set_progress(self, job: JobRow, progress: float, audio_duration_s: float) -> None:
        """Progress stays in memory (and reaches watchers); the store gets it with the next transition."""
        job.progress, job.audio_duration_s, job.updated_at = progress, audio_duration_s, self._clock()
        self._publish(job.view())

    def _publish(self, view: JobView) -> None:
        self._listings.remember(view)
        self._publish_watchers(view)

    @staticmethod
    def _log_transition(job: JobRow, old: JobState, new: JobState, event: JobEvent) -> None:
        level = logging.WARNING if new in (JobState.FAILED, JobState.RETRYING) else logging.INFO
        # escaped: a user's file name or its decoder's message must not forge log lines
        error = f": {printable(job.error)}" if job.error and new is not JobState.COMPLETED else ""
        fields = {
            "JOB_ID": job.id, "JOB_STATE": new.value, "MODEL": job.model, "DEVICE": job.device or "",
            "WORKER": job.worker or "", "RETRIES": job.retries,
        }  # fmt: skip
        log.log(level, "job %d %s -> %s (%s)%s", job.id, old, new, event, error, extra=fields)
