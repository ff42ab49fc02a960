"""A stand-in worker process that speaks the real worker protocol but scripts its outcomes, to drive the
daemon through failures a CPU cannot produce (CUDA out of memory). Job ids listed in SCRIPTED_OOM_JOBS fail
with an out-of-memory error the first time they run (a marker file in SCRIPTED_STATE_DIR remembers)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from whisperd import workerproto as wp
from whisperd.protocol import Segment, Transcript


def main() -> None:
    oom_jobs = {int(x) for x in os.environ.get("SCRIPTED_OOM_JOBS", "").split(",") if x}
    state = Path(os.environ["SCRIPTED_STATE_DIR"])
    out = sys.stdout.buffer

    def send(message: wp.FromWorker) -> None:
        out.write(wp.encode(message))
        out.flush()

    send(wp.Ready(pid=os.getpid(), models=[]))
    cancelled: set[int] = set()
    for line in sys.stdin.buffer:
        command = wp.to_worker_decoder.decode(line)
        if isinstance(command, wp.CancelJob):
            cancelled.add(command.job_id)
            continue
        out_of_memory = False
        for spec in command.jobs:
            if out_of_memory:  # as the real worker: the rest of the batch goes back to the queue
                send(wp.Failed(job_id=spec.job_id, kind="requeue", error="batch stopped: out of memory"))
                continue
            send(wp.Started(job_id=spec.job_id))
            marker = state / f"oom-{spec.job_id}"
            if spec.job_id in oom_jobs and not marker.exists():
                marker.touch()
                send(wp.Failed(job_id=spec.job_id, kind="oom", error="CUDA failed with error out of memory"))
                out_of_memory = True
                continue
            transcript = Transcript(
                language="en", language_probability=1.0, duration_s=1.0, text=f"job {spec.job_id}",
                segments=[Segment(id=1, start=0.0, end=1.0, text=f"job {spec.job_id}")],
            )  # fmt: skip
            send(wp.Finished(job_id=spec.job_id, transcript=transcript, processing_s=0.01))
        send(wp.BatchDone(batch_id=command.batch_id, models=[spec.model for spec in command.jobs]))


if __name__ == "__main__":
    main()
