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
  hold=NAME     once the first segment (or window) is decoded, wait until a file NAME exists in
                FAKE_WORKER_STATE (30 s at most) before decoding the others
  echo-options  the transcript's text is the job's decoding options, as its spec gave them:
                "prompt=<repr> temperature=<repr>" (in batched mode, each window's segment says them)
The transcript's text is "job <id>", or what the probes above found.

With FAKE_WORKER_BATCHED set, the transcriber is also a window decoder (batched mode), and scripts may say:
  windows=N           N windows, one each 10 s (audio of 10*N s), window k decoded to one segment " w<k>"
  window_s=S          take S seconds per window
  part-fails-once     a part of a spread job (spec.part given) fails the first time one is decoded
  part-fails-always   every part fails
  part-crashes-once   the worker decoding a part dies, the first time"""

from __future__ import annotations

import os
import socket
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, BinaryIO

from whisperd import workerproto as wp
from whisperd.batching import AudioInfo
from whisperd.protocol import Segment, Word
from whisperd.worker import run_worker


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
        try:  # atomic: the parts of one job run in several workers at once
            os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
        except FileExistsError:
            return False
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
        if "echo-options" in words:
            text = echo_options(spec)
        if "huge" in options:
            text = "x" * int(options["huge"])
        hog = bytearray(b"\x01" * int(options.get("hog", 0)))  # touched, so resident
        if "nan" in words:
            return _nan_segments(text), AudioInfo("en", float("nan"), float("inf"))
        hold = self._state / options["hold"] if "hold" in options else None
        return self._segments(text, count, segment_s, hog, hold), AudioInfo("en", 1.0, float(count))

    @staticmethod
    def _segments(
        text: str, count: int, segment_s: float, hog: bytearray, hold: Path | None = None
    ) -> Iterator[Segment]:
        for i in range(count):
            time.sleep(segment_s)
            if i == 1 and hold is not None:
                _wait_for(hold)
            yield Segment(id=i + 1, start=float(i), end=float(i + 1), text=text if i == 0 else "")
        del hog


class ScriptedWindowDecoder(ScriptedTranscriber):
    """The scripted transcriber with batched decoding (whisperd.batching.WindowDecoder)."""

    @staticmethod
    def _options(audio: bytes) -> dict[str, str]:
        return dict(w.split("=", 1) for w in audio.decode(errors="replace").split() if "=" in w)

    max_window_s = 9.5  # each window its own

    def audio_duration_s(self, audio: bytes) -> float:
        return 10.0 * int(self._options(audio).get("windows", 1))

    def language(self, model: Any, audio: bytes, spec: wp.JobSpec) -> tuple[str, float]:
        return spec.language or "en", 1.0

    def speech(self, audio: bytes, start_s: float, end_s: float) -> list[tuple[float, float]]:
        count = int(self._options(audio).get("windows", 1))
        return [(10.0 * k, 10.0 * k + 9.0) for k in range(count) if start_s <= 10.0 * k < end_s]

    def quietest_s(self, audio: bytes, start_s: float, end_s: float) -> float:
        return (start_s + end_s) / 2

    def decode_windows(
        self,
        model: Any,
        windows: Sequence[tuple[Any, float, float]],
        spec: wp.JobSpec,
        language: str,
        chunk_batch: int,
    ) -> Iterator[tuple[int, list[Segment]]]:
        script = windows[0][0].decode(errors="replace").split() if windows else []
        if spec.part is not None:
            if "part-crashes-once" in script and self._once("part-crash", spec):
                os._exit(3)
            fails_once = "part-fails-once" in script and self._once("part-fail", spec)
            if fails_once or "part-fails-always" in script:
                raise RuntimeError("the decoder broke")
        window_s = float(self._options(windows[0][0]).get("window_s", 0)) if windows else 0.0
        echo = " " + echo_options(spec) if "echo-options" in script else ""
        hold_name = self._options(windows[0][0]).get("hold") if windows else None
        for index, (_audio, start, end) in enumerate(windows):
            time.sleep(window_s)
            if start > 0 and hold_name is not None:
                _wait_for(self._state / hold_name)
            yield index, [Segment(id=1, start=start, end=end, text=f" w{int(start // 10)}{echo}")]


def echo_options(spec: wp.JobSpec) -> str:
    return f"prompt={spec.prompt!r} temperature={spec.temperature!r}"


def _wait_for(path: Path, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not path.exists() and time.monotonic() < deadline:
        time.sleep(0.01)


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
    kind = ScriptedWindowDecoder if os.environ.get("FAKE_WORKER_BATCHED") else ScriptedTranscriber
    run_worker(argv, lambda args: kind(state, protocol_fd))


if __name__ == "__main__":
    main()
