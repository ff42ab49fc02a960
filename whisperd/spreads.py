"""One long job spread over several workers (batched mode).

While workers idle with nothing queued that they can take, a running job with enough audio left is shared:
its worker is asked (`ShareJob`) to keep the first part of the windows it has not decoded yet and to give up
the others (`Shared`), which go to the idle workers as parts of the same job (`JobSpec.windows`). The job
stays PROCESSING on its first worker; its progress counts every part, a cancel reaches every worker that runs
one, a part that fails is placed again on its own (the job fails once one part has failed more often than
the retry policy allows) and, when the last part is done, the parts' segments are stitched in time order
into the job's one transcript. A spread lives in memory only: a daemon that restarts runs the job again.

The decisions are pure functions over snapshots (`share_requests`, `place_parts`); `Spreads` holds what is
known of each job spread or being asked to be."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence, Set
from dataclasses import dataclass, field

import msgspec

from whisperd import workerproto as wp
from whisperd.gpupool import CPU
from whisperd.protocol import Transcript
from whisperd.scheduling import DeviceStatus, PlanSettings, WorkerSlot, reservation, taken

Span = wp.Span


class Running(msgspec.Struct, frozen=True, kw_only=True):
    """A part being decoded that could be shared: its job, its worker and the audio it has left."""

    job_id: int
    worker_id: str
    remaining_s: float
    busy_gpus: frozenset[str] = frozenset()  # GPUs decoding a part of the job already


class ShareRequest(msgspec.Struct, frozen=True, kw_only=True):
    job_id: int
    worker_id: str
    helpers: int


class WaitingPart(msgspec.Struct, frozen=True, kw_only=True):
    job_id: int
    index: int
    model: str
    busy_gpus: frozenset[str] = frozenset()  # GPUs decoding another part of the job: not for this one


class PartPlacement(msgspec.Struct, frozen=True, kw_only=True):
    job_id: int
    index: int
    worker_id: str
    device: str
    reserve_bytes: int
    chunk_batch: int


def helps(device: str, busy_gpus: Set[str]) -> bool:
    """Whether a worker on this device speeds a job up: any CPU worker, but only a GPU that decodes no part
    of the job yet. Two parts on one GPU were slower than one worker decoding both (bench/gpu_batching.py:
    231x realtime on one H200 worker, 167x over two), since one worker's calls already fill the device."""
    return device == CPU or device not in busy_gpus


def share_requests(running: Sequence[Running], idle: Sequence[str], min_part_s: float) -> list[ShareRequest]:
    """Which parts to share with how many idle workers (idle: their devices): the part with most audio left
    first, each helper taking at least min_part_s of it and being one that helps (`helps`), until the idle
    workers are all promised. A part named twice (its worker also decoded an earlier part of the job) is
    asked once: its worker keeps only one request."""
    if min_part_s <= 0:
        return []
    requests = []
    free = list(idle)
    asked: set[tuple[int, str]] = set()
    for part in sorted(running, key=lambda r: (-r.remaining_s, r.job_id)):
        usable = [device for device in free if helps(device, part.busy_gpus)]
        helpers = min(len(usable), int(part.remaining_s // min_part_s) - 1)
        if helpers < 1 or (part.job_id, part.worker_id) in asked:
            continue
        asked.add((part.job_id, part.worker_id))
        requests.append(ShareRequest(job_id=part.job_id, worker_id=part.worker_id, helpers=helpers))
        for device in usable[:helpers]:
            free.remove(device)
    return requests


def place_parts(
    parts: Sequence[WaitingPart],
    workers: Sequence[WorkerSlot],
    devices: Mapping[str, DeviceStatus],
    settings: PlanSettings,
) -> list[PartPlacement]:
    """Each waiting part, oldest job first, to an idle worker with room for its model (one that has the
    model loaded first), by the same memory rule as plan(), never on a GPU that decodes another part of the
    job (it waits for another device, or for that part to end)."""
    idle = [w for w in workers if w.idle]
    room = dict(devices)
    placements = []
    placed_on: dict[int, set[str]] = {}  # devices this call gave a part of the job
    for part in sorted(parts, key=lambda p: (p.job_id, p.index)):
        fitting = [
            (w, fit)
            for w in idle
            if w.device in room
            and helps(w.device, part.busy_gpus | placed_on.get(part.job_id, set()))
            and (fit := reservation(part.model, room[w.device], settings)) is not None
        ]
        if not fitting:
            continue
        worker, (reserve, chunk) = min(fitting, key=lambda wf: (part.model not in wf[0].models, wf[0].id))
        placements.append(
            PartPlacement(job_id=part.job_id, index=part.index, worker_id=worker.id, device=worker.device,
                          reserve_bytes=reserve, chunk_batch=chunk)
        )  # fmt: skip
        idle.remove(worker)
        room[worker.device] = taken(room[worker.device], reserve)
        placed_on.setdefault(part.job_id, set()).add(worker.device)  # its next part goes elsewhere
    return placements


@dataclass(eq=False)
class Part:
    """A time range of the job's audio and who decodes it."""

    start_s: float
    end_s: float
    windows: list[Span] | None  # None: the job's first run, whose worker cut the audio itself
    worker: str | None  # None: waiting for a worker
    device: str = CPU  # its worker's
    position_s: float = 0.0  # where its worker has got to
    transcript: Transcript | None = None
    processing_s: float = 0.0
    failures: int = 0
    asked: bool = False  # its worker was asked to share it once: never again
    promised: int = 0  # idle workers promised to that request until its answer

    @property
    def length_s(self) -> float:
        return self.end_s - self.start_s

    def let_go(self) -> None:
        """Its worker no longer runs it: it waits to be placed again, from its start."""
        self.worker, self.position_s, self.promised, self.asked = None, self.start_s, 0, False


@dataclass(eq=False)
class Spread:
    job_id: int
    model: str
    duration_s: float
    parts: list[Part]
    language: str | None = None  # the first worker's, once it answered
    errors: list[str] = field(default_factory=list)

    def part_on(self, worker_id: str) -> Part | None:
        return next((p for p in self.parts if p.worker == worker_id and p.transcript is None), None)

    def progress(self) -> float:
        """Percent of the job's audio decoded, all parts together."""
        done_s = sum(
            p.length_s if p.transcript else min(max(0.0, p.position_s - p.start_s), p.length_s)
            for p in self.parts
        )
        total_s = sum(p.length_s for p in self.parts)
        return min(99.9, 100.0 * done_s / total_s) if total_s > 0 else 0.0

    def busy_gpus(self) -> frozenset[str]:
        """The GPUs decoding a part of the job now."""
        return frozenset(
            p.device for p in self.parts if p.worker is not None and p.transcript is None and p.device != CPU
        )

    def complete(self) -> bool:
        return all(p.transcript is not None for p in self.parts)

    def stitched(self) -> Transcript:
        """The parts' segments in time order, numbered afresh, as one transcript."""
        parts = sorted(self.parts, key=lambda p: p.start_s)
        first = parts[0].transcript
        assert first is not None and all(p.transcript is not None for p in parts)
        segments = [
            msgspec.structs.replace(s, id=n)  # the decoder's figures kept
            for n, s in enumerate((s for p in parts for s in p.transcript.segments), start=1)  # type: ignore[union-attr]
        ]
        return Transcript(
            language=self.language or first.language, language_probability=first.language_probability,
            duration_s=max(self.duration_s, first.duration_s), text="".join(s.text for s in segments).strip(),
            segments=segments,
        )  # fmt: skip


class Spreads:
    """The jobs spread, or being asked to be: owned here, read by the daemon's loop and the outcomes."""

    def __init__(self) -> None:
        self._spreads: dict[int, Spread] = {}
        self._shareable: dict[int, str] = {}  # running jobs decoded in batched mode: id -> model

    def get(self, job_id: int) -> Spread | None:
        return self._spreads.get(job_id)

    def __iter__(self) -> Iterator[Spread]:
        return iter(list(self._spreads.values()))

    def dispatched(self, job_id: int, model: str) -> None:
        """The job went to a worker in batched mode: it may be shared."""
        self._shareable[job_id] = model

    def forget(self, job_id: int) -> None:
        self._spreads.pop(job_id, None)
        self._shareable.pop(job_id, None)

    def shareable(self) -> list[int]:
        return list(self._shareable)

    def promised(self) -> int:
        """Idle workers promised to requests not answered yet."""
        return sum(p.promised for s in self._spreads.values() for p in s.parts)

    def running(
        self, job_id: int, worker_id: str, duration_s: float, progress: float, device: str = CPU
    ) -> Running | None:
        """What a running job (or its part on that worker) has left, if it was never asked to share.
        device: the job's worker's, for a job not spread yet."""
        spread = self._spreads.get(job_id)
        if spread is None:
            remaining_s = duration_s * (1 - progress / 100)
            busy = frozenset() if device == CPU else frozenset({device})
            return Running(job_id=job_id, worker_id=worker_id, remaining_s=remaining_s, busy_gpus=busy)
        part = spread.part_on(worker_id)
        if part is None or part.asked:
            return None
        remaining_s = part.end_s - max(part.start_s, part.position_s)
        return Running(
            job_id=job_id, worker_id=worker_id, remaining_s=remaining_s, busy_gpus=spread.busy_gpus()
        )

    def asked(self, request: ShareRequest, duration_s: float, device: str = CPU) -> None:
        """device: the job's worker's, for a job not spread yet."""
        spread = self._spreads.get(request.job_id)
        if spread is None:
            model = self._shareable.get(request.job_id, "")
            whole = Part(start_s=0.0, end_s=duration_s, windows=None, worker=request.worker_id, device=device)
            spread = self._spreads[request.job_id] = Spread(request.job_id, model, duration_s, [whole])
        part = spread.part_on(request.worker_id)
        if part is not None:
            part.asked, part.promised = True, request.helpers

    def shared(self, spread: Spread, part: Part, answer: wp.Shared) -> None:
        """The worker kept `answer.kept` and gave away `answer.parts`: each becomes a part waiting for one."""
        part.promised = 0
        spread.language = spread.language or answer.language
        if not answer.parts:
            return
        part.end_s, part.windows = answer.kept.end_s, answer.kept.windows
        for given in answer.parts:
            spread.parts.append(
                Part(start_s=given.start_s, end_s=given.end_s, windows=given.windows, worker=None)
            )
        spread.parts.sort(key=lambda p: p.start_s)

    def waiting(self) -> list[WaitingPart]:
        return [
            WaitingPart(job_id=s.job_id, index=i, model=s.model, busy_gpus=s.busy_gpus())
            for s in self._spreads.values()
            for i, p in enumerate(s.parts)
            if p.worker is None
        ]

    def part(self, job_id: int, index: int) -> Part:
        return self._spreads[job_id].parts[index]
