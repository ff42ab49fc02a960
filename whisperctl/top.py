"""`whisperctl top`: a live view of devices, workers, the queue and the last minute's throughput, following
the watch stream. On a terminal it redraws in place on the alternate screen and quits on `q`; otherwise (or
with --once) it prints a plain block every interval. What it shows is topview's, from a model; here are
the reading, the keys and the drawing."""

from __future__ import annotations

import contextlib
import os
import queue
import select
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType

from whisperctl.client import Client, Dropped, NoReply, Unreachable
from whisperctl.topview import PlacementRule, TopModel, TopState, plain_text, rich_view
from whisperd import protocol as p
from whisperd.errors import WhisperdError
from whisperd.jobs import JobState

TICK_S = 0.1  # how often keys and events are looked at while nothing else is due
RECENT_LIMIT = 1000  # completed jobs read at start for the first minute's figures (the newest ids)
READY_TIMEOUT_S = 30.0  # the daemon sends its snapshots first: far more than it takes


class _Feed:
    """The watch stream, read by a thread of its own (the socket blocks) into a queue the loop drains."""

    def __init__(self, events: Iterator[p.Reply], path: Path) -> None:
        self._replies: queue.Queue[p.Reply | WhisperdError] = queue.Queue()
        self._path = path
        threading.Thread(target=self._read, args=(events,), name="watch", daemon=True).start()

    def _read(self, events: Iterator[p.Reply]) -> None:
        try:
            for reply in events:
                self._replies.put(reply)
        except WhisperdError as exc:
            self._replies.put(exc)
        except OSError:
            self._replies.put(Dropped("the watch connection failed"))

    def drain(self, state: TopState, timeout_s: float) -> bool:
        """Apply what has arrived, waiting up to timeout_s for the first; True if anything did. Raises
        Dropped once the daemon has gone away."""
        changed = False
        block = timeout_s > 0
        while True:
            try:
                reply = self._replies.get(block, timeout_s) if block else self._replies.get_nowait()
            except queue.Empty:
                return changed
            block = False
            if isinstance(reply, Dropped):
                raise Dropped(f"whisperd on {self._path} went away: the watch stream closed")
            if isinstance(reply, WhisperdError):
                raise reply
            state.apply(reply)
            changed = True


class _Top:
    def __init__(
        self, client: Client, interval_s: float, rule: PlacementRule, user_name: Callable[[int], str | None]
    ) -> None:
        self.client, self.interval_s, self.rule, self.user_name = client, interval_s, rule, user_name
        self.state = TopState()
        # Stats come with the stream every 30 s; asked for at each interval, the counts stay current.
        self._poll = Client(str(client.path), timeout_s=10.0)

    def refresh(self) -> None:
        try:
            self.state.stats = self._poll.stats()
        except (Unreachable, Dropped, NoReply) as exc:
            raise Dropped(f"whisperd on {self.client.path} went away: {exc.message}") from None

    def model_text(self) -> str:
        return plain_text(self._model())

    def _model(self) -> TopModel:
        return self.state.model(time.time(), f"whisperd on {self.client.path}", self.rule, self.user_name)

    def start(self, feed: _Feed) -> None:
        """Wait for the daemon's first snapshots, then learn the jobs already running and those completed
        within the window (the stream tells only of changes)."""
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not self.state.ready:
            left = deadline - time.monotonic()
            if left <= 0:
                raise NoReply(
                    f"whisperd on {self.client.path} sent no snapshot within {READY_TIMEOUT_S:.0f} s"
                )
            feed.drain(self.state, min(left, 1.0))
        for job in self.client.status(state=JobState.PROCESSING.value):
            self.state.running.setdefault(job.id, job)
        for job in self.client.status(state=JobState.COMPLETED.value, limit=RECENT_LIMIT):
            self.state.recent.add(job)

    def plain(self, feed: _Feed, once: bool) -> int:
        while True:
            sys.stdout.write(self.model_text() + "\n")
            sys.stdout.flush()
            if once:
                return 0
            deadline = time.monotonic() + self.interval_s
            while (left := deadline - time.monotonic()) > 0:
                feed.drain(self.state, left)
            self.refresh()

    def live(self, feed: _Feed) -> int:
        from rich.console import Console
        from rich.live import Live

        console = Console()
        keys = sys.stdin.fileno() if sys.stdin.isatty() else None
        with _exit_on_sigterm(), _cbreak(keys), Live(
            console=console, screen=True, auto_refresh=False, redirect_stdout=False, redirect_stderr=False
        ) as live:  # fmt: skip
            next_poll = time.monotonic() + self.interval_s
            drawn_at, drawn_size = 0.0, None
            dirty = True
            while True:
                now = time.monotonic()
                if now >= next_poll:
                    self.refresh()
                    next_poll, dirty = now + self.interval_s, True
                dirty |= feed.drain(self.state, 0.0)
                # Redrawn on news, on a resize, and each second (ages and ETAs move).
                if dirty or console.size != drawn_size or now - drawn_at >= 1.0:
                    live.update(rich_view(self._model()), refresh=True)
                    drawn_at, drawn_size, dirty = now, console.size, False
                if _quit_pressed(keys, TICK_S):
                    return 0


def _quit_pressed(keys: int | None, timeout_s: float) -> bool:
    if keys is None:
        time.sleep(timeout_s)
        return False
    ready, _, _ = select.select([keys], [], [], timeout_s)
    return bool(ready) and any(c in os.read(keys, 64) for c in (b"q", b"Q"))


@contextlib.contextmanager
def _cbreak(fd: int | None) -> Iterator[None]:
    """Keys one at a time without echo, the terminal's settings put back on any exit (Ctrl-C still
    interrupts: cbreak keeps signals)."""
    if fd is None:
        yield
        return
    import termios
    import tty

    saved = termios.tcgetattr(fd)
    tty.setcbreak(fd, termios.TCSANOW)
    try:
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


@contextlib.contextmanager
def _exit_on_sigterm() -> Iterator[None]:
    """SIGTERM unwinds like Ctrl-C, so the screen and the terminal are restored on a kill too."""

    def stop(signum: int, frame: FrameType | None) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run(
    client: Client,
    interval_s: float,
    once: bool,
    user_name: Callable[[int], str | None],
) -> int:
    """Exit 0 on `q` (or after one block with once); raises Unreachable when whisperd is not there and
    Dropped when it goes away meanwhile."""
    # the daemon says each GPU's threshold; the built-in rule marks it for a daemon older than that
    top = _Top(client, interval_s, PlacementRule(), user_name)
    with client.watch() as events:
        feed = _Feed(events, client.path)
        top.start(feed)
        if once or not sys.stdout.isatty() or os.environ.get("TERM") == "dumb":
            return top.plain(feed, once)
        return top.live(feed)
