"""whisperctl's terminal views against a real daemon: `top` as plain text and on a real pseudo-terminal, and
submit --wait's progress bars on a terminal, its plain lines off one."""

from __future__ import annotations

import fcntl
import os
import re
import signal
import struct
import subprocess
import sys
import termios
import threading
import time
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.support.daemon import DaemonProcess, to_toml
from tests.support.gpus import GIB, Gpus, gpu
from whisperctl import cli
from whisperd.jobs import JobState

pytestmark = pytest.mark.e2e

ESCAPES = re.compile(rb"\x1b(\[[0-9;?]*[ -/]*[@-~]|\][^\x07\x1b]*(\x07|\x1b\\)|[()][0-9A-Za-z]|[=>78])")


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProcess]:
    """One CPU worker; the system snapshot every second so counts move while a test watches."""
    config: dict[str, dict[str, object]] = {
        "daemon": {"socket_mode": 0o666},
        "workers": {"cpu_workers": 1},
        "scheduler": {"performance_monitor_interval_s": 1.0, "gpu_monitor_interval_s": 1.0},
    }
    proc = DaemonProcess(tmp_path_factory.mktemp("top-daemon"), config).start()
    yield proc
    proc.stop()


class Terminal:
    """A child on a real pseudo-terminal (its stdin, stdout and stderr unless told otherwise), 120x40, what
    it writes read by a thread."""

    def __init__(self, argv: list[str], env: dict[str, str], **popen: object) -> None:
        self.master, self.slave = os.openpty()
        fcntl.ioctl(self.slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
        self.settings = termios.tcgetattr(self.slave)
        streams = {"stdin": self.slave, "stdout": self.slave, "stderr": self.slave, **popen}
        self.proc = subprocess.Popen(
            argv, env={**env, "TERM": "xterm-256color", "COLUMNS": "120", "LINES": "40"},
            start_new_session=True, **streams,  # type: ignore[call-overload]
        )  # fmt: skip
        self.raw = bytearray()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while True:
            try:
                chunk = os.read(self.master, 65536)
            except OSError:  # EIO once the last holder of the slave has gone
                return
            if not chunk:
                return
            self.raw += chunk

    @property
    def text(self) -> str:
        """What was written, escape sequences taken out."""
        return ESCAPES.sub(b"", bytes(self.raw)).decode(errors="replace")

    def wait_for(self, predicate: Callable[[str], bool], what: str, timeout_s: float = 60) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if predicate(self.text):
                return
            if self.proc.poll() is not None:
                time.sleep(0.2)  # what it wrote last
                if predicate(self.text):
                    return
                break
            time.sleep(0.05)
        raise AssertionError(f"{what} not shown within {timeout_s}s; screen text:\n{self.text[-3000:]}")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        os.close(self.slave)
        self._reader.join(5)
        os.close(self.master)


def whisperctl(*args: str) -> list[str]:
    return [sys.executable, "-m", "whisperctl", *args]


def test_top_once_without_a_terminal_prints_devices_workers_and_the_queue(
    daemon: DaemonProcess, speech: dict[str, Path]
) -> None:
    [job] = daemon.client.submit([str(speech["fox"])])
    daemon.wait_terminal([job.id])
    done = daemon.ctl("top", "--once")
    assert done.returncode == 0, done.stderr
    assert "\x1b" not in done.stdout
    rows = [line.split() for line in done.stdout.splitlines()]
    assert ["DEVICE", "MEMORY", "USED/TOTAL", "UTIL", "TEMP", "WORKERS"] in rows
    assert ["cpu", "-", "-", "-", "-", "1"] in rows
    assert any(row[:2] == ["cpu0", "cpu"] for row in rows)
    assert re.search(r"queue: PENDING \d+  PROCESSING \d+  RETRYING \d+  COMPLETED [1-9]", done.stdout)
    assert any(row[:1] == ["root"] for row in rows)  # the queue by user, by name
    # The job that just completed counts in the last minute, at a measured realtime factor.
    assert re.search(r"last minute: [1-9]\d* jobs/min, realtime \d+\.\dx", done.stdout), done.stdout


def test_top_marks_the_placement_threshold_on_each_gpu(gpus: Gpus, tmp_path: Path) -> None:
    gpus.set(gpu(0, used=40 * GIB), gpu(1))
    default = gpus.daemon.ctl("top", "--once")
    assert default.returncode == 0, default.stderr
    [row] = [line for line in default.stdout.splitlines() if line.startswith("cuda:0")]
    assert re.search(r"#+\.*\|\.+ +40\.0/80\.0 GiB \(limit 72\.0\) +10% +40C", row), row
    # The daemon's running config moves the mark (it reports each GPU's threshold): a reload that keeps a
    # quarter free leaves 60 of 80 GiB.
    text = gpus.daemon.config_path.read_text()
    config = tomllib.loads(text)
    config.setdefault("scheduler", {})["memory_safety_margin"] = 0.25
    gpus.daemon.config_path.write_text(to_toml(config))
    gpus.daemon.proc.send_signal(signal.SIGHUP)  # type: ignore[union-attr]
    try:
        gpus.daemon.wait_for(
            lambda: "40.0/80.0 GiB (limit 60.0)" in gpus.daemon.ctl("top", "--once").stdout,
            timeout_s=30, what="the reloaded threshold shown",
        )  # fmt: skip
        assert "cuda:1" in gpus.daemon.ctl("top", "--once").stdout
    finally:
        gpus.daemon.config_path.write_text(text)
        gpus.daemon.proc.send_signal(signal.SIGHUP)  # type: ignore[union-attr]


def test_top_on_a_terminal_shows_a_running_job_and_quits_on_q(
    daemon: DaemonProcess, speech: dict[str, Path]
) -> None:
    term = Terminal(whisperctl("top", "--interval", "0.5"), daemon.env)
    try:
        term.wait_for(lambda s: "DEVICE" in s and "cpu0" in s and "q quits" in s, "the first screen")
        [job] = daemon.client.submit([str(speech["long"])])
        try:
            daemon.wait_state(job.id, JobState.PROCESSING)
            # Its worker's row names it, then its progress and audio position once the audio is read.
            term.wait_for(lambda s: "long.wav" in s, "the running job's file")
            term.wait_for(lambda s: re.search(r"\d+%\s+\d+:\d\d/\d+:\d\d", s) is not None, "its progress")
        finally:
            daemon.client.cancel([job.id])
        os.write(term.master, b"q")
        assert term.proc.wait(15) == 0
        raw = bytes(term.raw)
        assert b"\x1b[?1049h" in raw and raw.rfind(b"\x1b[?1049l") > raw.rfind(b"\x1b[?1049h")  # screen back
        assert termios.tcgetattr(term.slave) == term.settings  # echo and line mode back
    finally:
        term.close()


def test_top_restores_the_terminal_on_ctrl_c(daemon: DaemonProcess) -> None:
    term = Terminal(whisperctl("top"), daemon.env)
    try:
        term.wait_for(lambda s: "q quits" in s, "the first screen")
        os.killpg(term.proc.pid, signal.SIGINT)
        assert term.proc.wait(15) == 130
        assert termios.tcgetattr(term.slave) == term.settings
        assert bytes(term.raw).rfind(b"\x1b[?1049l") > bytes(term.raw).rfind(b"\x1b[?1049h")
    finally:
        term.close()


def test_top_says_when_the_daemon_goes_away(idle_daemon: DaemonProcess) -> None:
    top = subprocess.Popen(
        whisperctl("top", "--interval", "0.2"), env=idle_daemon.env, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert top.stdout is not None
        assert top.stdout.readline().startswith("whisperd on ")  # the first block has begun
        idle_daemon.stop()
        _, err = top.communicate(timeout=30)
        assert top.returncode == cli.EXIT_DROPPED
        assert "went away" in err and "Traceback" not in err
    finally:
        if top.poll() is None:
            top.kill()
            top.wait()


def test_top_without_a_daemon_is_unreachable(tmp_path: Path) -> None:
    done = subprocess.run(
        whisperctl("--socket", str(tmp_path / "none.sock"), "top", "--once"),
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == cli.EXIT_UNREACHABLE and "Traceback" not in done.stderr


def test_submit_wait_on_a_terminal_draws_a_bar(daemon: DaemonProcess, speech: dict[str, Path]) -> None:
    # stderr on the terminal, the transcript on a pipe
    term = Terminal(whisperctl("submit", str(speech["medium"]), "--wait"), daemon.env, stdout=subprocess.PIPE)
    try:
        transcript, _ = term.proc.communicate(timeout=300)
        assert term.proc.returncode == 0
        assert b"morning" in transcript.lower()
        term.wait_for(lambda s: "COMPLETED" in s, "the final state")
        text = term.text
        assert re.search(r"job \d+ medium\.wav", text)
        assert "100%" in text and re.search(r"(\d+:\d\d)/\1", text)  # the whole audio, e.g. 0:23/0:23
        assert "ETA" in text  # shown while it ran
        assert not re.search(r"^job \d+ PENDING", text, re.MULTILINE)  # no plain lines
    finally:
        term.close()


def test_submit_wait_without_a_terminal_prints_the_plain_lines(
    daemon: DaemonProcess, speech: dict[str, Path]
) -> None:
    done = daemon.ctl("submit", str(speech["fox"]), "--wait")
    assert done.returncode == 0, done.stderr
    lines = done.stderr.splitlines()
    line = re.compile(r"job \d+ (PENDING|PROCESSING|RETRYING|COMPLETED) \d+% \S+ fox\.wav")
    assert lines and all(line.fullmatch(x) for x in lines), lines
    assert lines[-1].split()[2:4] == ["COMPLETED", "100%"]
    assert "\x1b" not in done.stderr
    quiet = daemon.ctl("submit", str(speech["fox"]), "--wait", "--quiet")
    assert quiet.returncode == 0 and quiet.stderr == "" and quiet.stdout.strip()


def test_wait_on_a_terminal_shows_the_eta_then_why_a_job_did_not_complete(
    daemon: DaemonProcess, speech: dict[str, Path]
) -> None:
    [job] = daemon.client.submit([str(speech["long"])])
    term = Terminal(whisperctl("wait", str(job.id)), daemon.env)
    try:
        term.wait_for(lambda s: re.search(r"PROCESSING\s+ETA \d+:\d\d", s) is not None, "a running job's ETA")
        daemon.client.cancel([job.id])
        assert term.proc.wait(60) == cli.EXIT_JOB_FAILED
        term.wait_for(lambda s: f"job {job.id} CANCELLED" in s, "the line saying it was cancelled")
    finally:
        term.close()
        daemon.client.cancel([job.id])
