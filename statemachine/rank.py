"""The trio runtime of one rank: its training function, its uploads, and its reports.

Why it is shaped like this
==========================

One nursery per rank owns everything the rank started: the training thread (or the ``async``
training function) and one task per report. Trio does not let a nursery exit while a child is
running, so "the rank is finished" and "every report of the rank is terminal" are the same
statement; there is no flush step that an exception could skip (the reference skipped it when
the training function raised). An exception from the training function is caught in the nursery
body and kept, so the uploads it left behind still finish and are committed.

The state of each report lives only in :class:`~statemachine.lifecycle.RankLifecycle`. This
module applies events to it and carries out the effects it returns: a ``ReleaseSlot`` gives the
``trio.CapacityLimiter`` token back, a ``HandOff`` sends the report to the controller. Waiters
(a SYNC ``report()``, a ``report()`` held back by ``max_pending_reports``) sleep on one
``trio.Event`` that is replaced after every applied event, and re-check the lifecycle.

The training thread calls in through :func:`statemachine._threads.call_from_thread`; the
validation of its arguments and the ASYNC snapshot run in the training thread itself, before
the call, so bad input raises at the call and consumes no report index.

A report that need not wait for anything (ASYNC, NO_UPLOAD, or metrics only with nothing of the
rank still open) does not make that round trip: the thread posts the request to trio through
:func:`statemachine._threads.post` and returns (:meth:`RankRuntime.report_from_thread`).
Waiting for trio to wake up, run, and wake the thread again was most of the time such a
``report()`` blocked, and all of its tail on a busy machine; even waking trio directly gave it
the GIL ahead of the reporting thread. Posted requests reach trio in the order they were
posted. Until trio has accepted it, a posted request counts "in transit": the pending bound and
``next_index`` add it, under a lock, so that neither ever sees it missing; a report that makes
the round trip (``accept``) waits until nothing is in transit, so that it cannot overtake an
earlier posted one, and the rank does not finish while anything is in transit.

A SYNC report with a checkpoint waits anyway. When nothing else of the rank is open or in
transit, its thread posts the request the same way and then makes the first upload attempt
itself (:class:`~statemachine.upload.FirstAttempt`; :meth:`RankRuntime._report_sync_here`),
instead of waiting for trio to hand the copy to a worker thread and back.
"""

from __future__ import annotations

import functools
import inspect
import json
import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, cast

import trio

from . import _threads
from .checkpoint import Checkpoint
from .config import CheckpointUploadMode, UploadConfig
from .errors import ReportFailedError, RunAbortedError
from .lifecycle import Event, HandOff, RankLifecycle, ReleaseSlot, ReportState
from .result import ReportLog, ReportTimings
from .storage import (
    LinkStats,
    PartManifest,
    RunStorage,
    SnapshotFolders,
    checkpoint_dir_name,
    delete_local_directory,
    snapshot_directory,
    validate_dir_name,
)
from .upload import (
    FirstAttempt,
    UploadFn,
    UploadJob,
    background_copy_slots,
    register_part,
    upload_report,
)

__all__ = ["HandOffMessage", "RankRuntime", "RankSink", "ReportRequest"]

logger = logging.getLogger("statemachine")


@dataclass(slots=True)
class HandOffMessage:
    """A report handed to the controller, in the rank's report order."""

    rank: int
    index: int
    state: ReportState
    metrics: dict[str, Any]
    #: The checkpoint folder relative to the run folder (None: metrics only).
    checkpoint_dir: str | None
    part: PartManifest | None
    error: BaseException | None


class RankSink(Protocol):
    """Where a rank sends what the controller must know. Calls never block."""

    def hand_off(self, message: HandOffMessage) -> None: ...

    def report_failed(self, rank: int, index: int, error: BaseException) -> None: ...


@dataclass(slots=True)
class ReportRequest:
    """A validated ``report()`` call, ready to be accepted."""

    metrics: dict[str, Any]
    mode: CheckpointUploadMode
    #: Local folder to upload (the ASYNC snapshot, or the caller's folder for SYNC).
    upload_source: str | None = None
    #: The caller's own folder, deleted after a successful upload when ``delete_local``.
    original_dir: str | None = None
    delete_local: bool = False
    #: NO_UPLOAD: the part folder relative to the run folder.
    registered_part: str | None = None
    #: Snapshot-time stats of hard-linked files, to catch a file rewritten in place.
    linked: LinkStats | None = None
    #: ``upload_source`` is a snapshot folder taken from :class:`SnapshotFolders`.
    snapshot: bool = False
    dir_name: str | None = None
    upload_fn: UploadFn | None = None
    #: What a custom upload function is given (the ASYNC snapshot when the checkpoint is local).
    checkpoint: Checkpoint | None = None
    has_checkpoint: bool = False
    #: The record's timings; ``report()`` adds ``blocked_s`` once it returns.
    timings: ReportTimings = field(default_factory=ReportTimings)
    #: SYNC, uploaded by the calling thread (see ``RankRuntime._report_sync_here``).
    first: FirstAttempt | None = None
    waiter: _CallerWait | None = None
    expected_index: int | None = None


class _CallerWait:
    """A SYNC ``report()`` waiting in its own thread (not through trio) for its report to end."""

    __slots__ = ("_counted", "_lock", "error", "event", "state")

    def __init__(self) -> None:
        self.event = threading.Event()
        self.state: ReportState | None = None
        self.error: BaseException | None = None
        self._counted = False
        self._lock = threading.Lock()

    def waiting(self) -> None:
        """In trio: the caller made its attempt and now only waits (a test clock may jump)."""
        with self._lock:
            if not self.event.is_set() and not self._counted:
                self._counted = True
                _threads.caller_waits(+1)

    def release(self, state: ReportState | None, error: BaseException | None) -> None:
        with self._lock:
            if self.event.is_set():
                return
            self.state, self.error = state, error
            if self._counted:
                self._counted = False
                _threads.caller_waits(-1)
            self.event.set()


@dataclass(slots=True, eq=False)
class _Record:
    """Runtime data of one report. Its *state* is in the lifecycle, never here."""

    ordinal: int
    index: int
    mode: CheckpointUploadMode
    request: ReportRequest | None
    checkpoint_dir: str | None
    part: PartManifest | None = None
    error: BaseException | None = None
    timings: ReportTimings = field(default_factory=ReportTimings)


#: Values that come back from a JSON round trip as they went in (exact types: a subclass such
#: as ``numpy.float64`` or an ``IntEnum`` goes through the round trip and comes back plain).
_JSON_SCALARS = frozenset({int, float, str, bool, type(None)})


def _check_metrics(metrics: object) -> dict[str, Any]:
    """A copy of ``metrics`` as JSON gives it back; ``TypeError`` naming what JSON cannot hold."""
    if type(metrics) is dict and all(type(k) is str and type(v) in _JSON_SCALARS for k, v in metrics.items()):
        # The usual metrics (names to numbers): the round trip below would give an equal copy,
        # at 25-30 us of the 130 us of an ASYNC report() on an idle machine.
        return dict(metrics)
    if not isinstance(metrics, Mapping):
        raise TypeError(f"report() metrics must be a dict, got {type(metrics).__name__}")
    for key in metrics:
        if not isinstance(key, str):
            raise TypeError(f"report() metric names must be str, got {key!r}")
    try:
        text = json.dumps(dict(metrics), allow_nan=True)
    except (TypeError, ValueError) as error:
        raise TypeError(f"report() metrics must be JSON-serialisable: {error}") from None
    result: dict[str, Any] = json.loads(text)
    return result


class RankRuntime:
    """One rank: training function, report records, upload slots, hand-off to the controller."""

    def __init__(
        self,
        *,
        rank: int,
        world_size: int,
        storage: RunStorage,
        upload: UploadConfig,
        first_index: int,
        sink: RankSink,
        start_checkpoint: Checkpoint | None = None,
        protected_dirs: tuple[str, ...] = (),
    ) -> None:
        self.rank = rank
        self.world_size = world_size
        self.storage = storage
        self.upload = upload
        self.first_index = first_index
        self.sink = sink
        self.start_checkpoint = start_checkpoint
        self.protected_dirs = protected_dirs
        self.lifecycle = RankLifecycle(upload.max_concurrent_uploads, upload.max_pending_reports)
        self.limiter = trio.CapacityLimiter(upload.max_concurrent_uploads)
        #: The reports not handed off yet, by ordinal; handed-off ones are in ``log``.
        self.records: dict[int, _Record] = {}
        self.log = ReportLog(rank, first_index)
        self.training_error: BaseException | None = None
        self.aborted: BaseException | None = None
        self._changed = trio.Event()
        self._nursery: trio.Nursery | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        #: Guards ``_in_transit`` together with ``lifecycle.accept`` (see the module docstring).
        self._transit_lock = threading.Lock()
        self._in_transit = 0
        self._snapshot_root = os.path.join(
            tempfile.gettempdir(), "statemachine-snapshots", f"{os.getpid()}-{id(self):x}", f"rank_{rank}"
        )
        self._snapshot_folders = SnapshotFolders(self._snapshot_root)
        self._refilling = False
        #: SYNC reports whose thread waits outside trio (see ``_report_sync_here``).
        self._waiters: set[_CallerWait] = set()

    # -- running ---------------------------------------------------------------------------

    async def run(self, train_fn: Callable[..., Any], config: Mapping[str, Any] | None) -> None:
        """Run the training function; return once it returned and every report is terminal."""
        from . import context

        self._token = trio.lowlevel.current_trio_token()
        token = context.enter_rank(self)
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                self._refill_snapshot_folders()  # the first ASYNC report should not wait either
                _threads.start_poster()
                try:
                    if inspect.iscoroutinefunction(train_fn):
                        await _call_train_fn_async(train_fn, config)
                    else:
                        await _threads.run_in_thread(_call_train_fn, train_fn, config, abandon_on_cancel=True)
                except trio.Cancelled:
                    raise
                except BaseException as error:  # noqa: BLE001 - any error of user code ends in a clear failure
                    if not isinstance(error, RunAbortedError):
                        self.training_error = error
                # Reports the training thread posted may still be on their way (see ``accept``).
                while self._in_transit:
                    await self._wait_changed()
        finally:
            self._nursery = None
            context.leave_rank(token)
            self._snapshot_folders.discard()
            for waiter in list(self._waiters):  # a training thread abandoned while it waited
                waiter.release(None, None)
            if not self.log.has_errors and not any(r.error for r in self.records.values()):
                # Failed uploads keep their snapshot (nothing is lost); otherwise it is all ours.
                shutil.rmtree(self._snapshot_root, ignore_errors=True)

    def abort(self, error: BaseException) -> None:
        """Stop accepting reports: the next ``report()`` raises :class:`RunAbortedError`."""
        if self.aborted is None:
            self.aborted = error
            self._notify()

    def report_log(self) -> ReportLog:
        """A copy of the rank's reports so far, those not handed off yet in their current state."""
        log = self.log.copy()
        for ordinal in sorted(self.records):
            r = self.records[ordinal]
            log.add(r.index, r.mode, self.lifecycle.state(ordinal), r.error, r.timings, r.checkpoint_dir)
        return log

    # -- the calls made by report() ----------------------------------------------------------

    @property
    def next_index(self) -> int:
        with self._transit_lock:
            return self.first_index + len(self.lifecycle) + self._in_transit

    def next_checkpoint_path(self) -> str:
        return self.storage.url(self.storage.part_relpath(checkpoint_dir_name(self.next_index), self.rank))

    def prepare(
        self,
        metrics: object,
        checkpoint: object,
        mode: object,
        delete_local: object,
        upload_fn: object,
        dir_name: object,
    ) -> ReportRequest:
        """Validate a ``report()`` call (in the caller's thread); raise at the call if it is bad."""
        if not isinstance(mode, CheckpointUploadMode):
            raise ValueError(
                f"checkpoint_upload_mode must be a CheckpointUploadMode (SYNC, ASYNC or NO_UPLOAD), got {mode!r}"
            )
        clean_metrics = _check_metrics(metrics)
        if delete_local is not None and not isinstance(delete_local, bool):
            raise TypeError(f"delete_local_checkpoint_after_upload must be a bool or None, got {delete_local!r}")
        if upload_fn is not None and not callable(upload_fn):
            raise TypeError(f"checkpoint_upload_fn must be callable, got {upload_fn!r}")
        clean_dir = validate_dir_name(dir_name) if dir_name is not None else None
        request = ReportRequest(clean_metrics, mode, dir_name=clean_dir)
        if checkpoint is None:
            if upload_fn is not None:
                raise ValueError("checkpoint_upload_fn was given without a checkpoint to upload")
            return request
        if not isinstance(checkpoint, Checkpoint):
            raise TypeError(f"checkpoint must be a statemachine.Checkpoint or None, got {type(checkpoint).__name__}")
        request.has_checkpoint = True
        request.upload_fn = cast(UploadFn | None, upload_fn)
        if mode is CheckpointUploadMode.NO_UPLOAD:
            if upload_fn is not None:
                raise ValueError("checkpoint_upload_fn cannot be used with NO_UPLOAD: nothing is uploaded")
            if delete_local:
                raise ValueError("delete_local_checkpoint_after_upload=True makes no sense with NO_UPLOAD")
            relative = self.storage.relative_to_run(checkpoint.url)
            if relative is None:
                raise ValueError(
                    f"NO_UPLOAD checkpoint {checkpoint.url} is outside the run folder "
                    f"{self.storage.url()}; write it at get_context().next_checkpoint_path() "
                    "or use SYNC/ASYNC to upload it"
                )
            request.registered_part = relative
            return request
        if upload_fn is not None and self.storage.relative_to_run(checkpoint.url) is not None:
            # Already where it belongs (for example a framework's own save is writing it there):
            # the function is handed the checkpoint as it is; nothing to snapshot or delete.
            request.checkpoint = checkpoint
            request.upload_source = request.original_dir = checkpoint.path
            return request
        if not checkpoint.is_local and upload_fn is None:
            raise ValueError(f"{mode.name} uploads a local directory, but checkpoint {checkpoint.url} is not local")
        if checkpoint.is_local and not os.path.isdir(checkpoint.path):
            raise ValueError(f"checkpoint directory does not exist: {checkpoint.path}")
        request.original_dir = checkpoint.path
        request.delete_local = mode.default_delete_local if delete_local is None else delete_local
        # A remote checkpoint (given to a custom upload function) is no local folder to delete.
        request.delete_local = request.delete_local and checkpoint.is_local
        if mode is CheckpointUploadMode.ASYNC and checkpoint.is_local:
            request.upload_source, request.linked = snapshot_directory(
                checkpoint.path, self._snapshot_folders.take(), self.upload.snapshot
            )
            request.snapshot = True
        else:
            request.upload_source = checkpoint.path
        if upload_fn is not None:
            request.checkpoint = Checkpoint.from_directory(request.upload_source) if checkpoint.is_local else checkpoint
        return request

    def report_from_thread(self, request: ReportRequest) -> ReportTimings:
        """From the training thread: hand ``request`` over; return its timings.

        Posts without waiting when the report must not wait for anything (see the module
        docstring); otherwise makes the round trip of :meth:`report_sync`.
        """
        token = self._token
        if token is None:
            return self.report_sync(request).timings
        if request.mode is CheckpointUploadMode.SYNC and request.has_checkpoint:
            if request.upload_fn is None and self.upload.retry.attempt_timeout_s is None:
                return self._report_sync_here(token, request)
            return self.report_sync(request).timings
        with self._transit_lock:
            # ``open_reports`` only falls behind our back (trio finishing reports), so a stale
            # read can only send us down the slow path, never past the bound.
            open_reports = self.lifecycle.open_reports + self._in_transit
            if request.mode is CheckpointUploadMode.SYNC:
                postable = open_reports == 0  # metrics only: nothing earlier to wait for
            else:
                bound = self.lifecycle.max_pending
                postable = bound is None or open_reports < bound
            if postable:
                self._raise_if_aborted()
                self._in_transit += 1
        if not postable:
            return self.report_sync(request).timings
        if self._nursery is None:
            with self._transit_lock:
                self._in_transit -= 1
            raise RunAbortedError(f"rank {self.rank}: the run is over; report() is no longer possible")
        _threads.post(
            token,
            functools.partial(self._accept_posted, request),
            functools.partial(self._posted_lost, request),
            defer=request.has_checkpoint,
        )
        return request.timings

    def _report_sync_here(self, token: trio.lowlevel.TrioToken, request: ReportRequest) -> ReportTimings:
        """From the training thread: a SYNC report whose first upload attempt this thread makes.

        Only when nothing of the rank is open or in transit: the report then gets the next
        index, a free upload slot, and its hand-off as soon as it is uploaded, so the thread can
        start copying at once (see :class:`~statemachine.upload.FirstAttempt`). Trio accepts the
        posted request and drives the record as usual, taking this thread's attempt as attempt
        1; the thread then waits for the record to end, as a round trip would.
        """
        with self._transit_lock:
            here = not self.lifecycle.open_reports and not self._in_transit and self._nursery is not None
            if here:
                self._raise_if_aborted()
                index = self.first_index + len(self.lifecycle)
                self._in_transit += 1
        if not here:
            return self.report_sync(request).timings
        checkpoint_dir = request.dir_name or checkpoint_dir_name(index)
        first = FirstAttempt(self._upload_job(index, checkpoint_dir, request))
        waiter = _CallerWait()
        request.first, request.waiter, request.expected_index = first, waiter, index
        self._waiters.add(waiter)
        _threads.post(
            token, functools.partial(self._accept_posted, request), functools.partial(self._posted_lost, request)
        )
        first.run()
        try:
            token.run_sync_soon(self._first_attempt_made, request)
        except trio.RunFinishedError:
            waiter.release(None, None)
        waiter.event.wait()
        self._waiters.discard(waiter)
        if waiter.state is None or not waiter.state.terminal:
            raise RunAbortedError(f"rank {self.rank}: the run is over; report() is no longer possible")
        if (
            waiter.state is ReportState.FAILED
            and self.upload.on_failure == "raise"
            and not isinstance(waiter.error, RunAbortedError)
        ):
            raise ReportFailedError(
                f"rank {self.rank}, report {index}: {waiter.error!r}", self.rank, index
            ) from waiter.error
        return request.timings

    def _first_attempt_made(self, request: ReportRequest) -> None:
        """In trio: the calling thread finished its attempt and now waits for the report to end."""
        if request.waiter is not None:
            request.waiter.waiting()
        if request.first is not None:
            request.first.deliver()

    def _posted_lost(self, request: ReportRequest, error: BaseException) -> None:
        """In the poster thread: the run ended before a posted request reached it."""
        with self._transit_lock:
            self._in_transit -= 1
        if request.waiter is not None:
            request.waiter.release(None, error)
        logger.warning("rank %d: a report posted as the run ended was dropped (%r)", self.rank, error)

    def _accept_posted(self, request: ReportRequest) -> None:
        """In trio: accept a request posted by :meth:`report_from_thread` (never raises)."""
        _threads.posted_done()
        with self._transit_lock:
            record = self._new_record(request)
            self._in_transit -= 1
        self._notify()  # ``run`` and ``accept`` wait for the posted requests to arrive
        nursery = self._nursery
        if nursery is None:
            # Cannot happen while the training thread runs (the nursery waits for it); kept so
            # that a posted report still ends in a terminal state rather than vanishing.
            error: BaseException = RunAbortedError(f"rank {self.rank}: the rank is finished")
        elif request.expected_index is not None and request.expected_index != record.index:
            # The calling thread uploaded for the index it foresaw; a different one is a bug.
            error = RuntimeError(f"rank {self.rank}: report {record.index} was uploaded as {request.expected_index}")
        else:
            nursery.start_soon(self._drive, record)
            return
        self._fail(record, error, Event.ABORTED)
        if request.waiter is not None:
            request.waiter.release(self.lifecycle.state(record.ordinal), record.error)

    def report_sync(self, request: ReportRequest) -> _Record:
        """From the training thread: accept ``request`` (waiting as its mode says)."""
        record: _Record = self._from_thread(self.accept, request)
        return record

    def report_sync_wait_for_capacity(self) -> None:
        """From the training thread: wait until ``max_pending_reports`` lets one more in."""
        self._from_thread(self.wait_for_capacity)

    def _from_thread(self, afn: Callable[..., Any], *args: Any) -> Any:
        if self._token is None:
            raise RuntimeError("this rank is not running")
        try:
            return _threads.call_from_thread(afn, *args, trio_token=self._token)
        except (trio.RunFinishedError, trio.Cancelled):
            raise RunAbortedError(f"rank {self.rank}: the run is over; report() is no longer possible") from None

    async def wait_for_capacity(self) -> None:
        while not self.lifecycle.can_accept():
            self._raise_if_aborted()
            await self._wait_changed()

    async def accept(self, request: ReportRequest) -> _Record:
        """Create the record, start its task, and for SYNC wait until it is terminal."""
        while True:
            await self.wait_for_capacity()
            if not self._in_transit:
                break
            # An earlier report of this thread was posted and is still on its way: it goes first.
            await self._wait_changed()
        self._raise_if_aborted()
        if self._nursery is None:
            raise RuntimeError("report() was called after the training function returned")
        with self._transit_lock:
            record = self._new_record(request)
        ordinal, index = record.ordinal, record.index
        self._nursery.start_soon(self._drive, record)
        if request.mode is CheckpointUploadMode.SYNC:
            while not self.lifecycle.state(ordinal).terminal:
                await self._wait_changed()
            if (
                self.lifecycle.state(ordinal) is ReportState.FAILED
                and self.upload.on_failure == "raise"
                and not isinstance(record.error, RunAbortedError)
            ):
                raise ReportFailedError(
                    f"rank {self.rank}, report {index}: {record.error!r}", self.rank, index
                ) from record.error
        return record

    def _new_record(self, request: ReportRequest) -> _Record:
        ordinal = self.lifecycle.accept()
        index = self.first_index + ordinal
        checkpoint_dir = None
        if request.has_checkpoint:
            checkpoint_dir = request.dir_name or checkpoint_dir_name(index)
        record = _Record(ordinal, index, request.mode, request, checkpoint_dir, timings=request.timings)
        self.records[ordinal] = record
        return record

    # -- driving one record ----------------------------------------------------------------

    async def _drive(self, record: _Record) -> None:
        request = record.request
        assert request is not None
        try:
            await self._drive_record(record, request)
        finally:
            if request.waiter is not None:
                request.waiter.release(self.lifecycle.state(record.ordinal), record.error)

    async def _drive_record(self, record: _Record, request: ReportRequest) -> None:
        ordinal = record.ordinal
        if request.snapshot:
            self._refill_snapshot_folders()
        try:
            if request.snapshot or request.registered_part is not None:
                await _threads.yield_to_reports()
            if request.upload_source is None:
                if request.registered_part is not None:
                    record.part = await register_part(
                        self.storage,
                        self.rank,
                        record.index,
                        request.registered_part,
                        self.upload.retry,
                        record.timings,
                    )
                self._apply(record, Event.NOTHING_TO_UPLOAD)
                return
            await self.limiter.acquire_on_behalf_of(record)
            self._apply(record, Event.SLOT_ACQUIRED)
            started = request.first.started if request.first is not None else time.perf_counter()
            try:
                record.part = await self._upload(record, request)
            except trio.Cancelled:
                raise
            except BaseException as error:  # noqa: BLE001 - a failed upload must end in FAILED
                self._fail(record, error, Event.UPLOAD_FAILED)
                return
            upload_s = record.timings.upload_s = time.perf_counter() - started
            record.timings.bytes = float(record.part.bytes)
            logger.info(
                "rank %d, report %d: uploaded %d bytes in %.3f s (%.1f MiB/s)",
                self.rank,
                record.index,
                record.part.bytes,
                upload_s,
                record.part.bytes / 2**20 / max(upload_s, 1e-9),
            )
            if request.snapshot or request.delete_local:
                # Before the report counts as uploaded, so that a SYNC report() returns with its
                # folder gone; in a thread, since removing files is blocking I/O.
                await _threads.run_in_thread(self._clean_up_after_upload, request)
            self._apply(record, Event.UPLOAD_SUCCEEDED)
        except trio.Cancelled as cancelled:
            if not self.lifecycle.state(ordinal).terminal:
                self._fail(
                    record, RunAbortedError(f"rank {self.rank}, report {record.index}: cancelled"), Event.ABORTED
                )
            raise cancelled
        except BaseException as error:  # noqa: BLE001 - registration errors included
            if not self.lifecycle.state(ordinal).terminal:
                self._fail(record, error, Event.ABORTED)

    def _refill_snapshot_folders(self) -> None:
        """Have the next ASYNC snapshots' folders made in a thread, outside ``report()``."""
        if self._refilling or self._nursery is None or not self._snapshot_folders.needs_refill():
            return
        self._refilling = True

        async def refill() -> None:
            try:
                await _threads.run_in_thread(self._snapshot_folders.refill)
            except OSError as error:  # report() makes its own folder then, and fails if it cannot
                logger.warning("rank %d: cannot make snapshot folders ahead: %r", self.rank, error)
            finally:
                self._refilling = False

        self._nursery.start_soon(refill)

    async def _upload(self, record: _Record, request: ReportRequest) -> PartManifest:
        assert request.upload_source is not None and record.checkpoint_dir is not None
        if request.first is not None:
            return await upload_report(request.first.job, record.timings, request.first)
        return await upload_report(self._upload_job(record.index, record.checkpoint_dir, request), record.timings)

    def _upload_job(self, index: int, checkpoint_dir: str, request: ReportRequest) -> UploadJob:
        # A sink may follow the bytes of each upload as they are written (called in the upload thread).
        listener = getattr(self.sink, "upload_progress", None)
        return UploadJob(
            storage=self.storage,
            rank=self.rank,
            index=index,
            policy=self.upload.retry,
            checkpoint_dir=checkpoint_dir,
            source=request.upload_source,
            checkpoint=request.checkpoint,
            upload_fn=request.upload_fn,
            progress=functools.partial(listener, self.rank, index) if listener is not None else None,
            linked=request.linked,
            spread=request.mode is CheckpointUploadMode.SYNC,
            copy_slots=background_copy_slots(self.upload.background_local_copies)
            if request.mode is CheckpointUploadMode.ASYNC and request.upload_fn is None and self.storage.is_local
            else None,
        )

    def _clean_up_after_upload(self, request: ReportRequest) -> None:
        """Recycle the snapshot folder, and drop the caller's folder when asked; only after a good
        upload. Blocking: runs in a thread."""
        if request.snapshot and request.upload_source is not None:
            try:
                self._snapshot_folders.recycle(request.upload_source)
            except OSError:
                shutil.rmtree(request.upload_source, ignore_errors=True)
        if request.delete_local and request.original_dir is not None and os.path.isdir(request.original_dir):
            if not delete_local_directory(request.original_dir, self.protected_dirs):
                logger.warning("rank %d: not deleting protected folder %s", self.rank, request.original_dir)

    def _fail(self, record: _Record, error: BaseException, event: Event) -> None:
        record.error = error
        if not isinstance(error, RunAbortedError):
            kept = ""
            if record.request is not None and record.request.upload_source:
                kept = f"; the local copy is kept at {record.request.upload_source}"
            logger.error("rank %d, report %d failed: %r%s", self.rank, record.index, error, kept)
            self.sink.report_failed(self.rank, record.index, error)
        self._apply(record, event)

    def _apply(self, record: _Record, event: Event) -> None:
        for effect in self.lifecycle.apply(record.ordinal, event):
            if isinstance(effect, ReleaseSlot):
                self.limiter.release_on_behalf_of(self.records[effect.index])
            elif isinstance(effect, HandOff):
                self._hand_off(self.records[effect.index], effect.state)
        self._notify()

    def _hand_off(self, record: _Record, state: ReportState) -> None:
        request = record.request
        assert request is not None
        self.sink.hand_off(
            HandOffMessage(
                rank=self.rank,
                index=record.index,
                state=state,
                metrics=request.metrics,
                checkpoint_dir=record.checkpoint_dir if state is ReportState.REPORTED else None,
                part=record.part,
                error=record.error,
            )
        )
        # Metrics and paths are the controller's now; what ``Result.reports`` needs goes to the log.
        record.request = None
        del self.records[record.ordinal]
        self.log.add(record.index, record.mode, state, record.error, record.timings, record.checkpoint_dir)

    # -- waiting ---------------------------------------------------------------------------

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def _wait_changed(self) -> None:
        await self._changed.wait()

    def _raise_if_aborted(self) -> None:
        if self.aborted is not None:
            raise RunAbortedError(f"rank {self.rank}: the run is ending ({self.aborted!r})")


def _call_train_fn(train_fn: Callable[..., Any], config: Mapping[str, Any] | None) -> Any:
    return train_fn(config) if _takes_config(train_fn) else train_fn()


async def _call_train_fn_async(train_fn: Callable[..., Any], config: Mapping[str, Any] | None) -> Any:
    return await (train_fn(config) if _takes_config(train_fn) else train_fn())


def _takes_config(train_fn: Callable[..., Any]) -> bool:
    try:
        parameters = inspect.signature(train_fn).parameters
    except (TypeError, ValueError):
        return True
    return len(parameters) > 0
