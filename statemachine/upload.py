"""One report's upload: attempts, retries with back-off, and a per-attempt timeout.

Why it is shaped like this
==========================

An upload is blocking file I/O, so each attempt runs in a worker thread. A thread cannot be
killed, only abandoned: when an attempt takes longer than ``RetryPolicy.attempt_timeout_s`` (or
the run is ending) the trio side stops waiting for it at once (``trio.move_on_after`` around
``to_thread.run_sync(..., abandon_on_cancel=True)``) and the thread is left to run out on its
own. That is only safe if the abandoned thread can do no harm, which two rules ensure:

* Every attempt writes into its own staging folder (``RunStorage.upload_part``) and checks its
  :class:`_Attempt` guard before each file and each chunk, so an abandoned attempt stops at the
  next chunk and clears its staging folder.
* Moving the staged part into place happens under :meth:`_Attempt.publish`, which refuses an
  abandoned attempt and holds a lock shared by every attempt that targets the same part folder
  in this process (all retries of the report, and the reports of later run attempts that redo
  its index after a restart). An attempt that was abandoned while it was already moving
  finishes that move (a complete part) before a newer attempt may start its own, so the newest
  attempt always moves last; nothing half-written or older lands over a newer part.

Retries use tenacity (``AsyncRetrying`` with trio's sleep): exponential back-off with jitter,
``RetryPolicy.should_retry`` to tell transient errors from hopeless ones. (stamina wraps the
same engine, but its process-wide switches, ``set_testing`` and ``set_active``, would silently
change how a run retries; the policy here is the run's own.) A timed-out attempt
raises :class:`AttemptTimeoutError`, a ``TimeoutError``, which the default policy retries.
Anything that is not an ``Exception`` (``KeyboardInterrupt``, ``SystemExit``, an injected
crash, trio's ``Cancelled``) is never retried and propagates to the rank, which marks the
report FAILED: nothing raised here can leave a report without a terminal state.

Custom upload functions (``report(..., checkpoint_upload_fn=fn)``) take the place of the
built-in copy inside the same attempt loop, so they get the same upload slots, ordering,
retries and timeouts. ``fn(checkpoint, checkpoint_dir_name)`` must return a
:class:`~statemachine.Checkpoint` inside the run folder; its files are then registered in place,
exactly like a NO_UPLOAD checkpoint. A timed-out call is abandoned, not stopped, so a custom
function should be safe to run twice at once: wait on a save that writes each file once, or
write under temporary names and rename into place. Registering a NO_UPLOAD checkpoint is also
retried and timed out here, since it reads from the same storage.
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TypeVar

import outcome
import tenacity
import trio

from . import _threads
from .checkpoint import Checkpoint
from .config import RetryPolicy
from .result import ReportTimings
from .storage import LinkStats, PartManifest, ProgressCallback, RunStorage

__all__ = [
    "AttemptAbandonedError",
    "AttemptTimeoutError",
    "FirstAttempt",
    "UploadFn",
    "UploadJob",
    "register_part",
    "upload_report",
    "wait_for_attempt_threads",
]

logger = logging.getLogger("statemachine")

T = TypeVar("T")

#: ``fn(checkpoint, checkpoint_dir_name) -> Checkpoint``: a user's replacement for the built-in copy.
UploadFn = Callable[[Checkpoint, str], Checkpoint]


class AttemptTimeoutError(TimeoutError):
    """An upload attempt did not finish within ``RetryPolicy.attempt_timeout_s``."""


class AttemptAbandonedError(Exception):
    """Raised inside an abandoned attempt's thread to stop it; nobody waits for it any more."""


class _PublishLock:
    """The lock of one part folder (a class, so that it can live in a ``WeakValueDictionary``)."""

    __slots__ = ("__weakref__", "lock")

    def __init__(self) -> None:
        self.lock = threading.Lock()


_publish_locks: weakref.WeakValueDictionary[str, _PublishLock] = weakref.WeakValueDictionary()
_publish_locks_guard = threading.Lock()


def _publish_lock(url: str) -> _PublishLock:
    with _publish_locks_guard:
        found = _publish_locks.get(url)
        if found is None:
            found = _publish_locks[url] = _PublishLock()
        return found


class _Attempt:
    """The guard of one attempt (``storage.AttemptGuard``): a cancel flag and the publish gate."""

    def __init__(self, publish_lock: _PublishLock) -> None:
        self._publish_lock = publish_lock
        self._lock = threading.Lock()
        self._abandoned = False

    def check(self) -> None:
        if self._abandoned:
            raise AttemptAbandonedError("this upload attempt was abandoned")

    @contextlib.contextmanager
    def publish(self) -> Iterator[None]:
        with self._publish_lock.lock:
            with self._lock:
                self.check()
            yield

    def abandon(self) -> None:
        with self._lock:
            self._abandoned = True


@dataclass(frozen=True, slots=True)
class UploadJob:
    """What one report uploads, and where."""

    storage: RunStorage
    rank: int
    index: int
    policy: RetryPolicy
    #: The checkpoint folder, relative to the run folder.
    checkpoint_dir: str
    #: The local folder the built-in upload copies (the ASYNC snapshot, or the caller's folder).
    source: str | None = None
    #: What a custom upload function is given.
    checkpoint: Checkpoint | None = None
    upload_fn: UploadFn | None = None
    #: Told the bytes of each chunk as it is written (called in the upload thread).
    progress: ProgressCallback | None = None
    #: Snapshot-time stats of hard-linked files (see ``storage.snapshot_directory``).
    linked: LinkStats | None = None
    #: Someone waits for this upload (SYNC): copy files with helper threads too.
    spread: bool = False
    #: Held by each attempt while it runs (see :func:`background_copy_slots`); None: no bound.
    copy_slots: trio.CapacityLimiter | None = None


_Work = Callable[["_Attempt", list[int]], PartManifest]


class FirstAttempt:
    """Attempt 1 of a SYNC upload, made by the reporting thread itself.

    A SYNC ``report()`` blocks its thread for the whole upload anyway. When nothing else of the
    rank is open (so the upload slot is free and the report is handed off as soon as it is
    uploaded) and attempts have no timeout (a thread that is the caller cannot be abandoned),
    the rank lets the caller copy the files at once instead of waiting for trio to start a
    worker thread and wake it again afterwards: two thread hand-overs fewer, a third of the
    fixed cost of a SYNC report (see ``RankRuntime.report_from_thread``). Everything else is
    unchanged: trio applies the same events to the same lifecycle, waits for this outcome in
    place of the first worker thread (abandoning the guard if it stops waiting, as for a
    worker), and retries a failed first attempt in worker threads with back-off.
    """

    def __init__(self, job: UploadJob) -> None:
        self.job = job
        self.guard = _Attempt(_publish_lock(job.storage.url(job.storage.part_relpath(job.checkpoint_dir, job.rank))))
        self.written = [0]
        self.started = 0.0
        self._outcome: outcome.Outcome[PartManifest] | None = None
        self._arrived: trio.Event | None = None

    def run(self) -> None:
        """In the reporting thread: make the attempt and keep its outcome."""
        self.started = time.perf_counter()
        self._outcome = outcome.capture(upload_work(self.job), self.guard, self.written)

    def deliver(self) -> None:
        """In trio, once :meth:`run` returned."""
        if self._arrived is not None:
            self._arrived.set()

    async def wait(self) -> PartManifest:
        """In trio: the outcome of :meth:`run`; the guard is abandoned if the wait is cancelled."""
        finished = False
        try:
            if self._outcome is None:
                self._arrived = trio.Event()
                await self._arrived.wait()
            assert self._outcome is not None
            finished = True
            return self._outcome.unwrap()
        finally:
            if not finished:
                self.guard.abandon()


def upload_work(job: UploadJob) -> _Work:
    """The blocking function one attempt of ``job`` runs (in a worker thread, or see :class:`FirstAttempt`)."""
    part_relpath = job.storage.part_relpath(job.checkpoint_dir, job.rank)
    if job.upload_fn is not None:
        upload_fn = job.upload_fn
        checkpoint = job.checkpoint
        if checkpoint is None:
            raise ValueError("checkpoint_upload_fn needs a checkpoint")

        def work(attempt: _Attempt, written: list[int]) -> PartManifest:
            return _call_upload_fn(job.storage, job.rank, upload_fn, checkpoint, job.checkpoint_dir, attempt)

    elif job.source is not None:
        source = job.source

        def work(attempt: _Attempt, written: list[int]) -> PartManifest:
            def count(n: int) -> None:
                written[0] += n
                if job.progress is not None:
                    job.progress(n)

            return job.storage.upload_part(
                source, part_relpath, job.rank, progress=count, attempt=attempt, linked=job.linked, spread=job.spread
            )

    else:
        raise ValueError(f"rank {job.rank}, report {job.index}: nothing to upload")
    return work


async def upload_report(job: UploadJob, timings: ReportTimings, first: FirstAttempt | None = None) -> PartManifest:
    """Upload one report's checkpoint under ``job.policy``; return the part's manifest.

    Records the number of retries in ``timings.retries``; raises the last attempt's error
    when the attempts are exhausted or the error is not worth retrying. ``first``: attempt 1
    was made by the reporting thread (see :class:`FirstAttempt`).
    """
    work = upload_work(job)
    part_relpath = job.storage.part_relpath(job.checkpoint_dir, job.rank)
    return await _with_retries(
        job.rank,
        job.index,
        job.policy,
        "upload",
        work,
        timings,
        _publish_lock(job.storage.url(part_relpath)),
        first,
        job.copy_slots,
    )


#: The background copy slots of one trio run (all the ranks of a local run share them).
_COPY_SLOTS: trio.lowlevel.RunVar[trio.CapacityLimiter] = trio.lowlevel.RunVar("statemachine_copy_slots")


def default_background_copies() -> int:
    """One fewer than the CPUs this process may run on, at least one."""
    return max(1, _threads.usable_cpus() - 1)


def background_copy_slots(limit: int | None) -> trio.CapacityLimiter:
    """The limiter ASYNC uploads to a local disk hold while they copy (see
    ``UploadConfig.background_local_copies``); made by the first caller of the trio run.

    Only the attempt holds it, never the wait for it: a queued upload is not timed out by
    ``RetryPolicy.attempt_timeout_s``."""
    try:
        return _COPY_SLOTS.get()
    except LookupError:
        slots = trio.CapacityLimiter(limit or default_background_copies())
        _COPY_SLOTS.set(slots)
        return slots


async def register_part(
    storage: RunStorage, rank: int, index: int, part_relpath: str, policy: RetryPolicy, timings: ReportTimings
) -> PartManifest:
    """Build the manifest of a NO_UPLOAD part already in storage, retried and timed out like an upload."""

    def work(attempt: _Attempt, written: list[int]) -> PartManifest:
        return storage.scan_part(part_relpath, rank)

    return await _with_retries(rank, index, policy, "registration", work, timings, _PublishLock())


def _call_upload_fn(
    storage: RunStorage, rank: int, fn: UploadFn, checkpoint: Checkpoint, dir_name: str, attempt: _Attempt
) -> PartManifest:
    returned = fn(checkpoint, dir_name)
    if not isinstance(returned, Checkpoint):
        raise TypeError(f"checkpoint_upload_fn must return a statemachine.Checkpoint, got {type(returned).__name__}")
    relative = storage.relative_to_run(returned.url)
    if relative is None:
        raise ValueError(
            f"checkpoint_upload_fn returned {returned.url}, which is outside the run folder {storage.url()}; "
            f"put rank {rank}'s files under {storage.url(storage.part_relpath(dir_name, rank))}"
        )
    attempt.check()
    return storage.scan_part(relative, rank)


async def _with_retries(
    rank: int,
    index: int,
    policy: RetryPolicy,
    what: str,
    work: Callable[[_Attempt, list[int]], PartManifest],
    timings: ReportTimings,
    publish_lock: _PublishLock,
    first: FirstAttempt | None = None,
    slots: trio.CapacityLimiter | None = None,
) -> PartManifest:
    def log_back_off(state: tenacity.RetryCallState) -> None:
        wait = state.next_action.sleep if state.next_action is not None else 0.0
        logger.info("rank %d, report %d: retrying the %s in %.3f s", rank, index, what, wait)

    retrying = tenacity.AsyncRetrying(
        sleep=trio.sleep,
        stop=tenacity.stop_after_attempt(policy.max_attempts),
        wait=tenacity.wait_exponential_jitter(
            multiplier=policy.initial_backoff_s, max=policy.max_backoff_s, jitter=policy.jitter
        ),
        retry=tenacity.retry_if_exception(policy.should_retry),
        before_sleep=log_back_off,
        reraise=True,
    )
    part: PartManifest | None = None
    number = 0
    try:
        async for attempt in retrying:
            with attempt:
                number = attempt.retry_state.attempt_number
                made = first if number == 1 else None
                part = await _one_attempt(rank, index, policy, what, number, work, publish_lock, made, slots)
    finally:
        timings.retries = float(max(number - 1, 0))
    if part is None:
        raise RuntimeError(f"rank {rank}, report {index}: the {what} ended without a result")
    return part


async def _one_attempt(
    rank: int,
    index: int,
    policy: RetryPolicy,
    what: str,
    number: int,
    work: Callable[[_Attempt, list[int]], PartManifest],
    publish_lock: _PublishLock,
    first: FirstAttempt | None = None,
    slots: trio.CapacityLimiter | None = None,
) -> PartManifest:
    guard = _Attempt(publish_lock) if first is None else first.guard
    written = [0] if first is None else first.written
    started = time.perf_counter() if first is None else first.started
    try:
        if first is not None:
            part = await first.wait()
        elif slots is not None:
            async with slots:
                await _threads.yield_to_reports()  # a slot frees at any moment, even mid-report
                started = time.perf_counter()
                part = await _bounded(lambda: work(guard, written), guard, policy.attempt_timeout_s)
        else:
            part = await _bounded(lambda: work(guard, written), guard, policy.attempt_timeout_s)
    except BaseException as error:
        logger.warning(
            "rank %d, report %d: %s attempt %d/%d failed after %d bytes in %.3f s: %r",
            rank,
            index,
            what,
            number,
            policy.max_attempts,
            written[0],
            time.perf_counter() - started,
            error,
        )
        raise
    logger.info(
        "rank %d, report %d: %s attempt %d/%d succeeded: %d bytes in %.3f s",
        rank,
        index,
        what,
        number,
        policy.max_attempts,
        part.bytes,
        time.perf_counter() - started,
    )
    return part


_attempt_threads = 0
_attempt_threads_changed = threading.Condition()


def wait_for_attempt_threads(timeout_s: float) -> bool:
    """Wait until no upload attempt runs in a thread of this process, abandoned ones included.

    For tests and tools that inspect storage after a run: an abandoned attempt may still be
    stopping (and clearing its staging folder) after the run ended. Returns False on timeout.
    """
    deadline = time.monotonic() + timeout_s
    with _attempt_threads_changed:
        while _attempt_threads:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            _attempt_threads_changed.wait(remaining)
    return True


def _counted(fn: Callable[[], T]) -> Callable[[], T]:
    def run() -> T:
        global _attempt_threads
        with _attempt_threads_changed:
            _attempt_threads += 1
        try:
            return fn()
        finally:
            with _attempt_threads_changed:
                _attempt_threads -= 1
                _attempt_threads_changed.notify_all()

    return run


async def _bounded(fn: Callable[[], T], guard: _Attempt, timeout_s: float | None) -> T:
    """Run ``fn`` in a thread; stop waiting after ``timeout_s`` or on cancellation, abandoning it."""
    finished = False
    try:
        with trio.move_on_after(math.inf if timeout_s is None else timeout_s):
            result = await _threads.run_in_thread(_counted(fn), abandon_on_cancel=True)
            finished = True
            return result
        raise AttemptTimeoutError(f"the attempt did not finish within {timeout_s} s")
    finally:
        if not finished:
            guard.abandon()
