"""The queue's job runner: every SQLite call of the proxy's connection runs as a job here, in
order, each result delivered to the event loop before the next job's (invariants 7 and 9 in
``queue/__init__.py``).

Two ways to run them. On a writer thread (with ``synchronous = FULL``, and while opening and
closing): a plain thread fed by a SimpleQueue (a ThreadPoolExecutor costs several times more
per group commit). In loop mode (NORMAL, once open): on the event loop itself, all the jobs
queued in one loop callback; a job that finds the file locked runs again a moment later, the
jobs behind it waiting, as a thread waiting on SQLite's busy timeout would.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any, NamedTuple, TypeVar

from segproxy.queue.base import QueueError

log = logging.getLogger("segproxy.queue")

T = TypeVar("T")

BUSY_RETRY_FIRST = 0.001  # loop mode: a job that found the file locked runs again after this,
BUSY_RETRY_MAX = 0.05  # doubling up to this,
BUSY_GIVE_UP = 10.0  # and fails after this long (a thread would have waited the same)

Deliver = Callable[[Any, Any], None]  # (result, error): called on the loop, in job order
Job = tuple[Callable[..., Any], tuple[Any, ...], Deliver]


class Locked(QueueError):
    """A commit found the file locked by another connection (SQLITE_BUSY)."""


def is_busy(exc: BaseException) -> bool:
    """SQLITE_BUSY (the file is locked by another connection), raised as is or wrapped.

    (Wrapped by type, not found through ``__cause__``: compiled, ``raise ... from`` does not
    record the cause.)"""
    if isinstance(exc, Locked):
        return True
    if isinstance(exc, sqlite3.OperationalError):
        code = getattr(exc, "sqlite_errorcode", None)
        return code is not None and code & 0xFF == sqlite3.SQLITE_BUSY
    return False


class _Reply(NamedTuple):
    loop: asyncio.AbstractEventLoop
    deliver: Deliver


class JobRunner:
    """Runs jobs in order on the writer thread, or, once ``on_loop`` is set, on the loop."""

    def __init__(self) -> None:
        self.loop: asyncio.AbstractEventLoop | None = None
        self.on_loop = False  # loop mode (invariant 9): set by the queue once it is open
        self.restarting = False  # set by the checkpointer: the loop leaves the file alone
        self._threaded: queue.SimpleQueue[tuple[Callable[..., Any], tuple[Any, ...], _Reply] | None]
        self._threaded = queue.SimpleQueue()
        self._writer = threading.Thread(target=self._serve, name="segproxy-sqlite", daemon=True)
        self._queued: deque[Job] = deque()  # loop mode's jobs, oldest first
        self._scheduled = False  # a loop callback will run them
        self._busy_since = 0.0
        self._busy_delay = BUSY_RETRY_FIRST

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._writer.start()

    def running(self) -> bool:
        """The writer thread runs (False if it never started, or stopped)."""
        return self._writer.is_alive()

    def stop(self) -> None:
        """The writer thread ends after the jobs given to it so far (see :meth:`join`)."""
        self._threaded.put(None)

    def join(self, timeout: float) -> None:
        """Wait for the writer thread to end (blocks: off the loop, or before it runs)."""
        self._writer.join(timeout)

    def submit(self, fn: Callable[..., Any], args: tuple[Any, ...], deliver: Deliver) -> None:
        """Run ``fn(*args)`` after every job submitted before it; ``deliver(result, error)``
        then runs on the loop, before any later job's."""
        loop = self.loop or asyncio.get_running_loop()
        if self.on_loop:
            self._queued.append((fn, args, deliver))
            if not self._scheduled:
                self._scheduled = True
                loop.call_soon(self._run_queued)
            return
        self._threaded.put((fn, args, _Reply(loop, deliver)))

    def call(
        self, fn: Callable[..., T], args: tuple[Any, ...], then: Callable[[T], None] | None
    ) -> asyncio.Future[T]:
        """``fn(*args)`` as a job; ``then`` gets its result on the loop as it arrives, in job
        order (before any later job's result), which bookkeeping relies on (invariant 7).
        (Code after awaiting the future runs later: another job's result may come between.)"""
        loop = self.loop or asyncio.get_running_loop()
        fut: asyncio.Future[T] = loop.create_future()

        def deliver(result: Any, error: BaseException | None) -> None:
            if error is None and then is not None:
                then(result)
            if fut.done():
                return
            if error is not None:
                fut.set_exception(error)
            else:
                fut.set_result(result)

        self.submit(fn, args, deliver)
        return fut

    def _serve(self) -> None:
        while True:
            job = self._threaded.get()
            if job is None:
                return
            fn, args, reply = job
            try:
                result, error = fn(*args), None
            except BaseException as exc:  # handed to the caller on the loop
                result, error = None, exc
            try:
                reply.loop.call_soon_threadsafe(reply.deliver, result, error)
            except RuntimeError:  # the loop is closed: nobody is waiting any more
                return

    def _run_queued(self) -> None:
        """Loop mode: run the queued jobs in order, each result delivered before the next
        job runs. A job that finds the file locked (another process, or the checkpointer
        restarting the WAL) runs again a moment later, the jobs behind it still waiting."""
        self._scheduled = False
        jobs = self._queued
        while jobs:
            if self.restarting:  # the checkpointer is restarting the WAL: a moment
                self._scheduled = True
                assert self.loop is not None
                self.loop.call_later(BUSY_RETRY_FIRST, self._run_queued)
                return
            fn, args, deliver = jobs[0]
            try:
                result, error = fn(*args), None
            except BaseException as exc:
                if is_busy(exc) and self._retry_busy():
                    return
                result, error = None, exc
            self._busy_since = 0.0
            jobs.popleft()
            try:
                deliver(result, error)
            except Exception:  # one caller's failure must not stop the jobs behind it
                log.exception("queue job callback failed")

    def _retry_busy(self) -> bool:
        """Schedule the head job again (True), unless it has waited BUSY_GIVE_UP (False)."""
        assert self.loop is not None
        now = time.monotonic()
        if not self._busy_since:
            self._busy_since = now
            self._busy_delay = BUSY_RETRY_FIRST
        elif now - self._busy_since > BUSY_GIVE_UP:
            self._busy_since = 0.0
            return False
        else:
            self._busy_delay = min(self._busy_delay * 2, BUSY_RETRY_MAX)
        self._scheduled = True
        self.loop.call_later(self._busy_delay, self._run_queued)
        return True


class Worker:
    """A daemon thread that runs ``_serve`` until :meth:`stop` (the checkpointer, the
    journal's syncer): started once the queue's files are open, stopped and joined before
    they close. ``_serve`` waits on ``_stop`` between its rounds."""

    def __init__(self, name: str) -> None:
        self._stop = threading.Event()
        self._worker = threading.Thread(target=self._serve, name=name, daemon=True)

    def start(self) -> None:
        self._worker.start()

    def stop(self) -> None:
        self._stop.set()
        self._worker.join(timeout=10)

    def _serve(self) -> None:
        raise NotImplementedError
