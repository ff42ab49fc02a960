"""The daemon's own thread pools: bounded, in order, cancellable while waiting, and a thread stuck for ever in
a call does not keep the process from exiting (ThreadPoolExecutor's threads are joined at exit)."""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import pytest

from whisperd.threads import DaemonThreadPool


def test_at_most_its_threads_run_at_once_and_waiting_work_can_be_cancelled() -> None:
    pool = DaemonThreadPool(2, "test")
    release = threading.Event()
    running: list[int] = []
    lock = threading.Lock()

    def work(n: int) -> int:
        with lock:
            running.append(n)
        release.wait(30)
        return n * 10

    futures = [pool.submit(work, n) for n in range(4)]
    deadline = time.monotonic() + 10
    while len(running) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.1)  # a third thread, if there were one, would have started by now
    assert sorted(running) == [0, 1]
    assert futures[3].cancel(), "still waiting for a thread: cancellable"
    release.set()
    assert [f.result(10) for f in futures[:3]] == [0, 10, 20]
    assert futures[3].cancelled() and sorted(running) == [0, 1, 2]
    pool.shutdown()
    with pytest.raises(RuntimeError):
        pool.submit(work, 5)


def test_an_exception_reaches_the_future() -> None:
    pool = DaemonThreadPool(1, "test")

    def fail() -> None:
        raise OSError(5, "I/O error")

    with pytest.raises(OSError):
        pool.submit(fail).result(10)
    pool.shutdown()


STUCK = """
import threading
from {module} import {pool}
never = threading.Event()
pool = {pool}(1, "stuck") if "{pool}" == "DaemonThreadPool" else {pool}(1)
pool.submit(never.wait)
print("submitted", flush=True)
"""


@pytest.mark.parametrize(
    ("module", "pool", "exits"),
    [("whisperd.threads", "DaemonThreadPool", True), ("concurrent.futures", "ThreadPoolExecutor", False)],
    ids=["daemon-threads", "stdlib-pool-for-contrast"],
)
def test_a_thread_stuck_for_ever_does_not_keep_the_process_from_exiting(
    module: str, pool: str, exits: bool
) -> None:
    child = subprocess.Popen(
        [sys.executable, "-c", STUCK.format(module=module, pool=pool)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert child.stdout is not None and child.stdout.readline() == "submitted\n"
        try:
            child.wait(10 if exits else 2)
            exited = True
        except subprocess.TimeoutExpired:
            exited = False
        assert exited == exits
    finally:
        child.kill()
        child.wait()
