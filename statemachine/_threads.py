"""Thread hand-overs, counted, so that a test clock can tell "idle" from "a thread is working".

Blocking work leaves trio through :func:`run_in_thread`; a training thread comes back into trio
through :func:`call_from_thread`. Both keep :func:`busy_threads` up to date, and only ever change
it on the trio thread, at moments when the trio side is about to wait for a thread or has just
been handed the thread's result, so the count is never zero while a thread's result is still on
its way. :class:`statemachine.testing.ThreadAwareClock` reads it: it jumps virtual time only when
nothing is busy, which is what trio's ``MockClock(autojump_threshold=0)`` would do if it knew
about threads (it does not, and jumps straight past a thread that is still copying a file).
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import trio

T = TypeVar("T")

logger = logging.getLogger("statemachine")

_busy = 0
#: Callbacks queued by :func:`post` that trio has not run yet (changed under ``_posting_lock``).
_posting = 0
_posting_lock = threading.Lock()


#: Training threads of this process inside the part of ``report()`` that does its own work.
_reporting = 0
_reporting_lock = threading.Lock()


def reporting_started() -> None:
    global _reporting
    with _reporting_lock:
        _reporting += 1


def reporting_finished() -> None:
    global _reporting
    with _reporting_lock:
        _reporting -= 1


def reports_in_progress() -> int:
    """How many training threads are validating or snapshotting a report right now."""
    return _reporting


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


#: How long background work waits at most for the training threads inside ``report()``.
REPORT_GRACE_S = 0.02


async def yield_to_reports() -> None:
    """Wait (at most :data:`REPORT_GRACE_S`) while a training thread is inside ``report()``.

    An ASYNC upload or a NO_UPLOAD registration need not start the instant its ``report()``
    returned, and the Python work of starting one holds the GIL. When ranks report at the same
    step (every rank of a data-parallel job does), the first uploads used to start while the
    other ranks were still snapshotting, and their ``report()`` waited for the GIL: about 10 ms
    at p99 with 8 ranks of 16 MiB on 2 cores. A rank alone never waits here. Upload attempts
    that waited for a background copy slot (``upload.background_copy_slots``) yield here too.
    """
    if not reports_in_progress():
        return
    with trio.move_on_after(REPORT_GRACE_S):
        while reports_in_progress():
            await trio.sleep(0.0005)


#: Training threads waiting, outside ``call_from_thread``, for trio to finish their report.
_waiting_callers = 0


def caller_waits(delta: int) -> None:
    """A training thread starts (+1) or stops (-1) waiting on trio without ``call_from_thread``."""
    global _waiting_callers
    with _posting_lock:
        _waiting_callers += delta


def busy_threads() -> int:
    """Threads doing work for a trio run of this process (not counting ones waiting on trio),
    plus callbacks posted to trio that it has not run yet."""
    return _busy + _posting - _waiting_callers


async def run_in_thread(fn: Callable[..., T], *args: object, abandon_on_cancel: bool = False) -> T:
    """``trio.to_thread.run_sync`` that keeps the busy-thread count."""
    global _busy
    _busy += 1
    try:
        return await trio.to_thread.run_sync(fn, *args, abandon_on_cancel=abandon_on_cancel)
    finally:
        _busy -= 1


def call_from_thread(
    afn: Callable[..., Awaitable[T]], *args: object, trio_token: trio.lowlevel.TrioToken | None = None
) -> T:
    """Run ``afn`` in trio from a worker thread (``trio.from_thread.run``), keeping the count."""

    async def counted() -> T:
        global _busy
        _busy -= 1
        try:
            return await afn(*args)
        finally:
            _busy += 1

    return trio.from_thread.run(counted, trio_token=trio_token)


class _Poster:
    """One daemon thread that hands callbacks over to trio for threads that must not wait.

    ``TrioToken.run_sync_soon`` writes to trio's wake-up socket. The write releases the GIL, and
    the trio thread it wakes usually takes the GIL and runs before the writer gets it back:
    half a millisecond of an ASYNC ``report()`` on an idle machine here, and the whole of trio's
    work on a busy one. ``queue.SimpleQueue.put`` wakes this thread without releasing the GIL,
    so the caller returns at once and the write happens when it next lets go of the GIL.
    Callbacks are handed over in the order they were posted.
    """

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[
            tuple[trio.lowlevel.TrioToken, Callable[[], None], Callable[[BaseException], None], bool]
        ] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def start(self) -> None:
        """Start the thread if it is not running (``Thread.start`` waits for it to be scheduled)."""
        if self._thread is None:
            with self._lock:
                if self._thread is None:
                    thread = threading.Thread(target=self._main, name="statemachine-poster", daemon=True)
                    thread.start()
                    self._thread = thread

    def post(
        self,
        token: trio.lowlevel.TrioToken,
        fn: Callable[[], None],
        on_lost: Callable[[BaseException], None],
        defer: bool,
    ) -> None:
        global _posting
        self.start()
        with _posting_lock:
            _posting += 1
        self._queue.put((token, fn, on_lost, defer))

    def _main(self) -> None:
        while True:
            token, fn, on_lost, defer = self._queue.get()
            if defer and _reporting:
                _wait_for_reports()
            try:
                token.run_sync_soon(fn)
            except BaseException as error:  # noqa: BLE001 - the run ended: the owner must hear of it
                posted_done()
                try:
                    on_lost(error)
                except BaseException:  # never let the poster die
                    logger.exception("statemachine: a posted callback could not be handed over")

    def _after_fork(self) -> None:
        self._thread = None
        self._queue = queue.SimpleQueue()
        self._lock = threading.Lock()


_poster = _Poster()
os.register_at_fork(after_in_child=_poster._after_fork)


def start_poster() -> None:
    """Start the poster thread now, so that the first ``report()`` does not wait for it."""
    _poster.start()


def post(
    token: trio.lowlevel.TrioToken,
    fn: Callable[[], None],
    on_lost: Callable[[BaseException], None],
    defer: bool = False,
) -> None:
    """Have ``fn`` run in the trio run of ``token`` soon, without waiting (see :class:`_Poster`).

    ``fn`` must call :func:`posted_done` first thing and must not raise; ``on_lost`` is called,
    in the poster thread, when the run can no longer take callbacks (it has ended). ``defer``:
    nobody waits for ``fn``, so it is handed over only once no training thread is inside
    ``report()`` (or :data:`REPORT_GRACE_S` has passed), as :func:`yield_to_reports` does for
    background work. Callbacks are still handed over in the order they were posted.
    """
    _poster.post(token, fn, on_lost, defer)


def _wait_for_reports() -> None:
    """In the poster thread: wait (at most :data:`REPORT_GRACE_S`) while a training thread is
    inside ``report()``.

    When ranks report at the same step, trio accepting one rank's ASYNC report (its record, its
    upload task) took the GIL from the ranks still snapshotting theirs. Handing the callback
    over after them lowered the p99 of ``bench``'s 8 ranks x 16 MiB ASYNC row a little: median
    of 12 alternating runs 2.97 -> 2.76 ms, 5 of 12 runs under 2.5 ms against 2 of 12 (the row
    is noisy). Reports without a checkpoint are not deferred: a rank's next report waits for
    trio while the last one is still in transit, which made metrics-only loops slower.
    """
    deadline = time.monotonic() + REPORT_GRACE_S
    while _reporting and time.monotonic() < deadline:
        time.sleep(0.0002)


def posted_done() -> None:
    """Called by a posted callback when it runs: the clock may count it as handed over."""
    global _posting
    with _posting_lock:
        _posting -= 1
