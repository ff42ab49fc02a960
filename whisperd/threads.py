"""Thread pools of daemon threads, for blocking calls the event loop hands off: spooling (a bounded pool of
its own) and NVML (one thread). Apart from the loop's default pool, so that reads that never return (a FUSE
file system that hangs, a GPU that fell off the bus) hold only threads of their own kind.

Unlike concurrent.futures.ThreadPoolExecutor, whose threads the interpreter joins at exit, a thread stuck in
such a read here does not keep the daemon from exiting: Python cannot interrupt a thread blocked in a system
call, so at exit it is left behind."""

from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Executor, Future
from typing import Any, ParamSpec, TypeVar

P = ParamSpec("P")
T = TypeVar("T")

_WorkItem = tuple["Future[Any]", Callable[..., Any], tuple[Any, ...], dict[str, Any]]


class DaemonThreadPool(Executor):
    """At most `threads` threads, started as work arrives; work beyond them waits in order."""

    def __init__(self, threads: int, name: str) -> None:
        if threads < 1:
            raise ValueError("a pool needs at least one thread")
        self._max_threads = threads
        self._name = name
        self._work: queue.SimpleQueue[_WorkItem | None] = queue.SimpleQueue()
        self._idle = threading.Semaphore(0)
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._shut_down = False

    def submit(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> Future[T]:
        with self._lock:
            if self._shut_down:
                raise RuntimeError(f"the {self._name} pool is shut down")
            future: Future[T] = Future()
            self._work.put((future, fn, args, kwargs))
            if not self._idle.acquire(timeout=0) and len(self._threads) < self._max_threads:
                thread = threading.Thread(
                    target=self._run, name=f"{self._name}-{len(self._threads)}", daemon=True
                )
                self._threads.append(thread)
                thread.start()
            return future

    def _run(self) -> None:
        while (item := self._work.get()) is not None:
            future, fn, args, kwargs = item
            if future.set_running_or_notify_cancel():  # False: cancelled while it waited
                try:
                    result = fn(*args, **kwargs)
                except BaseException as exc:
                    future.set_exception(exc)
                else:
                    future.set_result(result)
            del item, future  # drop references before waiting for more
            self._idle.release()

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """wait=True joins the threads, so it waits for a stuck one for ever: the daemon passes False."""
        with self._lock:
            self._shut_down = True
            if cancel_futures:
                with contextlib.suppress(queue.Empty):
                    while (item := self._work.get_nowait()) is not None:
                        item[0].cancel()
            for _ in self._threads:
                self._work.put(None)
        if wait:
            for thread in self._threads:
                thread.join()
