"""The real worker loop (whisperd.worker) with a scripted transcriber in place of faster-whisper, to drive the
daemon through what a CPU cannot produce (CUDA out of memory) or produces too slowly to test.

The spooled audio file is the script, a few words:
  oom-once      fail with a CUDA out-of-memory error the first time (FAKE_WORKER_STATE remembers)
  crash-once    kill the worker process the first time
  crash-always  kill the worker process every time
  segments=N    decode N one-second segments (default 1)
  segment_s=S   take S seconds per segment (default 0)
  undecodable   raise as a file that does not decode
  huge=N        a transcript whose text is N bytes long
  nan           segment times and probabilities that are NaN or infinite
  garble        write a line the daemon cannot decode on the protocol stream, then go on
  hog=N         hold N bytes of memory (touched) while decoding the segments
  open=PATH     try to open PATH for reading; the transcript's text says what happened
  connect=PATH  try to connect to the Unix socket PATH; likewise
  tcp=PORT      try to connect to 127.0.0.1:PORT over TCP; likewise
The transcript's text is "job <id>", or what the probes above found."""

from __future__ import annotations

import os
import socket
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

from whisperd import workerproto as wp
from whisperd.protocol import Segment, Word
from whisperd.worker import AudioInfo, run_worker


class ScriptedTranscriber:
    def __init__(self, state_dir: Path, protocol_fd: int | None = None) -> None:
        self._state = state_dir
        self._protocol_fd = protocol_fd  # the daemon's end of our stdout, for "garble"
        self.loaded: list[str] = []

    def load_model(self, source: str) -> Any:
        self.loaded.append(source)
        return source

    def decode_audio(self, audio: BinaryIO, spec: wp.JobSpec) -> bytes:
        script = audio.read()
        if b"undecodable" in script:
            raise ValueError(f"Invalid data found when processing input: '{spec.audio_path}'")  # as PyAV says
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
        if "crash-always" in words:
            os._exit(3)
        if "garble" in words and self._protocol_fd is not None:
            os.write(self._protocol_fd, b'{"type":"progress","job_id":"not a number"}\n')
        count = int(options.get("segments", 1))
        segment_s = float(options.get("segment_s", 0))
        text = probe(options) or f"job {spec.job_id}"
        if "huge" in options:
            text = "x" * int(options["huge"])
        hog = bytearray(b"\x01" * int(options.get("hog", 0)))  # touched, so resident
        if "nan" in words:
            return _nan_segments(text), AudioInfo("en", float("nan"), float("inf"))
        return self._segments(text, count, segment_s, hog), AudioInfo("en", 1.0, float(count))

    @staticmethod
    def _segments(text: str, count: int, segment_s: float, hog: bytearray) -> Iterator[Segment]:
        for i in range(count):
            time.sleep(segment_s)
            yield Segment(id=i + 1, start=float(i), end=float(i + 1), text=text if i == 0 else "")
        del hog


def _nan_segments(text: str) -> Iterator[Segment]:
    nan, inf = float("nan"), float("inf")
    word = Word(start=nan, end=inf, word=text, probability=nan)
    yield Segment(id=1, start=0.0, end=nan, text=text, words=[word])
    yield Segment(id=2, start=nan, end=-inf, text="", words=None)


def probe(options: dict[str, str]) -> str:
    """What the sandbox let this worker do, in words: "opened", "connected" or the error."""
    try:
        if "open" in options:
            with open(options["open"], "rb"):
                return "opened"
        if "connect" in options:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.connect(options["connect"])
                return "connected"
        if "tcp" in options:
            with socket.create_connection(("127.0.0.1", int(options["tcp"])), timeout=5):
                return "connected"
    except OSError as exc:
        return f"refused: {exc.strerror or exc}"
    return ""


def main() -> None:
    state = Path(os.environ["FAKE_WORKER_STATE"])
    argv = sys.argv[1:]
    if "--sandbox" in argv:  # the scripts' markers live in the state dir
        argv += ["--sandbox-write", str(state)]
    protocol_fd = os.dup(1)  # before run_worker points fd 1 at stderr
    run_worker(argv, lambda args: ScriptedTranscriber(state, protocol_fd))


if __name__ == "__main__":
    main()
