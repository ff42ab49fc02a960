"""The real worker loop (whisperd.worker) with a scripted transcriber in place of faster-whisper, to drive the
daemon through what a CPU cannot produce (CUDA out of memory) or produces too slowly to test.

The spooled audio file is the script, a few words:
  oom-once      fail with a CUDA out-of-memory error the first time (FAKE_WORKER_STATE remembers)
  crash-once    kill the worker process the first time
  segments=N    decode N one-second segments (default 1)
  segment_s=S   take S seconds per segment (default 0)
  undecodable   raise as a file that does not decode
The transcript's text is "job <id>"."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from whisperd import workerproto as wp
from whisperd.protocol import Segment
from whisperd.worker import AudioInfo, run_worker


class ScriptedTranscriber:
    def __init__(self, state_dir: Path) -> None:
        self._state = state_dir
        self.loaded: list[str] = []

    def load_model(self, source: str) -> Any:
        self.loaded.append(source)
        return source

    def decode_audio(self, path: str) -> bytes:
        script = Path(path).read_bytes()
        if b"undecodable" in script:
            raise ValueError("Invalid data found when processing input")
        return script

    def _once(self, word: str, spec: wp.JobSpec) -> bool:
        marker = self._state / f"{word}-{spec.job_id}"
        if marker.exists():
            return False
        marker.touch()
        return True

    def transcribe(self, model: Any, audio: Any, spec: wp.JobSpec) -> tuple[Iterable[Segment], AudioInfo]:
        words = audio.decode(errors="replace").split()
        options = dict(w.split("=", 1) for w in words if "=" in w)
        if "oom-once" in words and self._once("oom", spec):
            raise RuntimeError("CUDA failed with error out of memory")
        if "crash-once" in words and self._once("crash", spec):
            os._exit(3)
        count = int(options.get("segments", 1))
        segment_s = float(options.get("segment_s", 0))
        return self._segments(spec.job_id, count, segment_s), AudioInfo("en", 1.0, float(count))

    @staticmethod
    def _segments(job_id: int, count: int, segment_s: float) -> Iterator[Segment]:
        for i in range(count):
            time.sleep(segment_s)
            text = f"job {job_id}" if i == 0 else ""
            yield Segment(id=i + 1, start=float(i), end=float(i + 1), text=text)


def main() -> None:
    state = Path(os.environ["FAKE_WORKER_STATE"])
    run_worker(sys.argv[1:], lambda args: ScriptedTranscriber(state))


if __name__ == "__main__":
    main()
