"""The Ray backend: every rank is a Ray actor; the controller stays in the driver.

Why it is shaped like this
==========================

A rank on Ray runs exactly the code it runs on the local backend: a
:class:`~statemachine.rank.RankRuntime` in a trio run. The difference is only where that trio
run lives (a thread of a Ray actor, in a worker process, maybe on another machine) and how its
hand-offs reach the controller (over Ray, instead of a method call).

Inside the actor, the runtime's sink puts every hand-off, every failed report and, at the end,
"this rank is finished" into one FIFO queue, in the order the runtime produced them. The driver
runs one trio task per rank that long-polls the actor (``next_events``: wait up to
``poll_timeout_s`` for the first event, then take all that are queued) and replays the events,
still in order, into the controller. Per-rank order is what the contract needs; across ranks the
controller's ledger already copes with any interleaving. The blocking ``ray.get`` of a poll runs
in a worker thread, so the driver's trio run is never blocked.

The actors are threaded (``max_concurrency``), so a poll that is waiting does not keep an
``abort`` or a ``reports`` call from running. ``abort`` enters the actor's trio run through its
trio token, the same way the training thread does.

What can go wrong, and what the user sees:

- The cluster cannot place the ranks (more CPUs asked than it has, a resource no node has): the
  ranks are placed through one placement group, and when it is not ready within
  ``placement_timeout_s`` the attempt fails with an error naming what was asked and what the
  cluster has. Nothing waits silently.
- An actor dies (``os._exit`` in the training function, ``ray.kill``, a lost node): the pending
  poll raises ``RayActorError``; the attempt fails naming the rank and its last handed-off
  report, and the trainer restarts it per ``FailureConfig`` like any other failure.
- An exception that does not survive pickling (a user class holding a lock, say) is replaced
  by :class:`RemoteRankError` with the same type name, message and the remote traceback, so
  the driver always gets something it can show.

Storage must be reachable from every actor with the same URL: a local path works when all
actors share the driver's file system (one machine, or a shared mount), any remote fsspec URL
works everywhere. ``memory://`` is one per process and is refused by the ``Trainer``.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import pickle
import queue
import threading
import traceback
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import fsspec
import ray
import trio
from fsspec.implementations.local import LocalFileSystem
from ray import cloudpickle
from ray.exceptions import GetTimeoutError, RayActorError
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from .. import _threads
from ..controller import Controller, RunFailure
from ..rank import HandOffMessage, RankRuntime
from ..result import ReportLog
from ..storage import RunStorage
from . import RunPlan

__all__ = ["RayBackend", "RemoteRankError", "RankActor"]

logger = logging.getLogger("statemachine")

#: Concurrent method calls per actor: one poll, plus ``abort`` and ``reports`` next to it.
_ACTOR_THREADS = 4
#: Extra seconds a poll's ``ray.get`` may take beyond the actor's own wait before it is waited for again.
_POLL_GRACE_S = 30.0
#: How long the clean-up after an attempt may spend collecting reports and removing actors.
_CLEANUP_S = 10.0


class RemoteRankError(RuntimeError):
    """An exception raised in a rank's actor that could not be sent to the driver as itself."""

    def __init__(self, type_name: str, message: str, remote_traceback: str) -> None:
        super().__init__(f"{type_name}: {message}")
        self.type_name = type_name
        self.message = message
        self.remote_traceback = remote_traceback

    def __reduce__(self) -> tuple[Any, ...]:
        return (RemoteRankError, (self.type_name, self.message, self.remote_traceback), self.__dict__)


def portable_error(error: BaseException | None, rank: int) -> BaseException | None:
    """``error`` itself when it survives a pickle round trip, else a :class:`RemoteRankError`.

    The remote traceback is attached as a note, because pickling drops ``__traceback__``.
    """
    if error is None:
        return None
    remote_traceback = "".join(traceback.format_exception(error))
    try:
        copy: BaseException = pickle.loads(cloudpickle.dumps(error))  # type: ignore[no-untyped-call]
    except Exception:  # noqa: BLE001 - any pickling failure means "send a stand-in"
        copy = RemoteRankError(type(error).__qualname__, str(error), remote_traceback)
    copy.add_note(f"raised on rank {rank} (Ray actor, pid {os.getpid()}):\n{remote_traceback}")
    return copy


def _absolute_storage_path(storage_path: str, options: Mapping[str, Any]) -> str:
    """A local path as an absolute ``file://`` URL, so that actors with another cwd agree."""
    fs, root = fsspec.core.url_to_fs(storage_path, **dict(options))
    if isinstance(fs, LocalFileSystem):
        return f"file://{os.path.abspath(root)}"
    return storage_path


# -- what travels from an actor to the driver ----------------------------------------------


@dataclass(frozen=True, slots=True)
class _HandedOff:
    message: HandOffMessage


@dataclass(frozen=True, slots=True)
class _ReportFailed:
    index: int
    error: BaseException


@dataclass(frozen=True, slots=True)
class _Finished:
    training_error: BaseException | None
    reports: ReportLog


_RankEvent = _HandedOff | _ReportFailed | _Finished


def _portable_reports(log: ReportLog, rank: int) -> ReportLog:
    log.map_errors(lambda error: portable_error(error, rank) or error)
    return log


class RankActor:
    """The body of one rank's Ray actor: a :class:`RankRuntime` in a trio run of its own thread."""

    def __init__(self, plan: RunPlan, rank: int) -> None:
        self.plan = plan
        self.rank = rank
        self._events: queue.Queue[_RankEvent] = queue.Queue()
        self._lock = threading.Lock()
        self._runtime: RankRuntime | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._abort: BaseException | None = None
        self._thread: threading.Thread | None = None

    # -- called by the driver ---------------------------------------------------------------

    def start(self) -> int:
        """Start the rank; return the actor's process id (for logs)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._main, name=f"statemachine-rank-{self.rank}", daemon=True)
            self._thread.start()
        return os.getpid()

    def next_events(self, timeout_s: float) -> list[_RankEvent]:
        """Wait up to ``timeout_s`` for the next event; return it and every one queued after it."""
        try:
            events = [self._events.get(timeout=timeout_s)]
        except queue.Empty:
            return []
        while True:
            try:
                events.append(self._events.get_nowait())
            except queue.Empty:
                return events

    def abort(self, message: str) -> None:
        """Make the rank's next ``report()`` raise ``RunAbortedError``."""
        error = RuntimeError(message)
        with self._lock:
            if self._abort is None:
                self._abort = error
            runtime, token = self._runtime, self._token
        if runtime is not None and token is not None:
            try:
                trio.from_thread.run_sync(runtime.abort, error, trio_token=token)
            except trio.RunFinishedError:
                pass

    def reports(self) -> ReportLog:
        """The rank's reports so far (read inside its trio run while that is running)."""
        with self._lock:
            runtime, token = self._runtime, self._token
        if runtime is None:
            return ReportLog(self.rank, self.plan.first_index)
        log: ReportLog
        try:
            log = trio.from_thread.run_sync(runtime.report_log, trio_token=token) if token else runtime.report_log()
        except trio.RunFinishedError:
            log = runtime.report_log()
        return _portable_reports(log, self.rank)

    # -- RankSink: called inside the actor's trio run ----------------------------------------

    def hand_off(self, message: HandOffMessage) -> None:
        if message.error is not None:
            message = dataclasses.replace(message, error=portable_error(message.error, message.rank))
        self._events.put(_HandedOff(message))

    def report_failed(self, rank: int, index: int, error: BaseException) -> None:
        portable = portable_error(error, rank)
        assert portable is not None
        self._events.put(_ReportFailed(index, portable))

    # -- the rank's own thread ---------------------------------------------------------------

    def _main(self) -> None:
        try:
            trio.run(self._run)
        except BaseException as error:  # noqa: BLE001 - the driver must hear about any crash
            self._events.put(_Finished(portable_error(error, self.rank), ReportLog(self.rank, self.plan.first_index)))

    async def _run(self) -> None:
        plan = self.plan
        storage = RunStorage(plan.storage_path, plan.name, plan.storage_options)
        runtime = RankRuntime(
            rank=self.rank,
            world_size=plan.world_size,
            storage=storage,
            upload=plan.upload,
            first_index=plan.first_index,
            sink=self,
            start_checkpoint=storage.open_checkpoint(plan.start_checkpoint) if plan.start_checkpoint else None,
            protected_dirs=(storage.root,) if storage.is_local else (),
        )
        with self._lock:
            self._runtime = runtime
            self._token = trio.lowlevel.current_trio_token()
            if self._abort is not None:
                runtime.abort(self._abort)
        try:
            await runtime.run(plan.train_fn, plan.config)
        finally:
            storage.close()
        error = portable_error(runtime.training_error, self.rank)
        self._events.put(_Finished(error, _portable_reports(runtime.report_log(), self.rank)))


# -- the driver side -----------------------------------------------------------------------


class RayBackend:
    """Runs each rank as a Ray actor; feeds the controller from the driver's trio run.

    ``address`` joins an existing cluster (``"auto"``, ``"ray://host:10001"``, ...) when this
    process is not connected to Ray yet; without it, ``ray.init()`` starts a local cluster (or
    follows ``RAY_ADDRESS``). A process already connected keeps its connection.
    ``placement_timeout_s`` bounds the wait for the cluster to place every rank.
    ``init_options`` go to ``ray.init`` as they are.
    """

    def __init__(
        self,
        *,
        address: str | None = None,
        placement_timeout_s: float = 60.0,
        poll_timeout_s: float = 1.0,
        init_options: Mapping[str, Any] | None = None,
    ) -> None:
        if address is not None and not isinstance(address, str):
            raise TypeError(f"RayBackend address must be a str or None, got {address!r}")
        for label, value in (("placement_timeout_s", placement_timeout_s), ("poll_timeout_s", poll_timeout_s)):
            if not isinstance(value, int | float) or value <= 0:
                raise ValueError(f"RayBackend {label} must be a number > 0, got {value!r}")
        self.address = address
        self.placement_timeout_s = float(placement_timeout_s)
        self.poll_timeout_s = float(poll_timeout_s)
        self.init_options = dict(init_options or {})
        self.actors: list[Any] = []
        self._reports: dict[int, ReportLog] = {}
        self._first_index = 0
        self._last_index: dict[int, int] = {}
        self._abort_message: str | None = None

    # -- Backend ------------------------------------------------------------------------------

    async def run(self, plan: RunPlan, controller: Controller) -> None:
        self._first_index = plan.first_index
        if not ray.is_initialized():
            # ray.init installs signal handlers, which only the main thread may do; it runs
            # before any rank exists, so blocking the driver's trio run here delays nobody.
            try:
                ray.init(address=self.address, **self.init_options)
            except Exception as error:  # noqa: BLE001 - a cluster we cannot join ends the attempt clearly
                where = f"the Ray cluster at {self.address!r}" if self.address else "a local Ray cluster"
                controller.fail(RunFailure(f"could not connect to {where}: {error!r}", error))
                return
        bundle = {key: float(value) for key, value in plan.resources_per_worker.items() if value}
        if not bundle:
            controller.fail(RunFailure("ScalingConfig.resources_per_worker must ask for some resource on Ray", None))
            return
        group = placement_group([dict(bundle) for _ in range(plan.world_size)], strategy="PACK")
        try:
            if not await self._wait_placed(group, plan, bundle, controller):
                return
            try:
                self._start_actors(plan, group, bundle)
            except Exception as error:  # noqa: BLE001 - e.g. a training function cloudpickle cannot ship
                controller.fail(RunFailure(f"could not start the ranks as Ray actors: {error!r}", error))
                return
            # Polls wait most of their time; their own limiter keeps them from taking every
            # thread of trio's default one, which the controller needs to write commits.
            limiter = trio.CapacityLimiter(len(self.actors))
            async with trio.open_nursery() as nursery:
                for rank, actor in enumerate(self.actors):
                    nursery.start_soon(self._follow, rank, actor, controller, limiter)
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(_CLEANUP_S):
                await _threads.run_in_thread(self._clean_up, group, abandon_on_cancel=True)

    def report_logs(self) -> list[ReportLog]:
        return [self._reports[rank] for rank in sorted(self._reports)]

    def abort(self, error: BaseException) -> None:
        self._abort_message = str(error)
        for actor in self.actors:
            actor.abort.remote(self._abort_message)

    # -- steps --------------------------------------------------------------------------------

    async def _wait_placed(
        self, group: PlacementGroup, plan: RunPlan, bundle: dict[str, float], controller: Controller
    ) -> bool:
        ready, _ = await _threads.run_in_thread(
            lambda: ray.wait([group.ready()], timeout=self.placement_timeout_s), abandon_on_cancel=True
        )
        if ready:
            return True
        total = ray.cluster_resources()  # type: ignore[no-untyped-call]
        free = ray.available_resources()  # type: ignore[no-untyped-call]
        controller.fail(
            RunFailure(
                f"Ray could not place {plan.world_size} ranks with {bundle} each within "
                f"{self.placement_timeout_s:g} s (cluster resources: {_resources(total)}, "
                f"available: {_resources(free)}); ask for less in "
                "ScalingConfig.resources_per_worker / num_workers, or add nodes",
                None,
            )
        )
        return False

    def _start_actors(self, plan: RunPlan, group: PlacementGroup, bundle: dict[str, float]) -> None:
        storage_path = _absolute_storage_path(plan.storage_path, plan.storage_options)
        custom = {key: value for key, value in bundle.items() if key not in ("CPU", "GPU")}
        actor_class = ray.remote(RankActor)
        # What every actor gets, pickled once per actor at creation: the plan with a storage
        # path that means the same in every process.
        shipped = dataclasses.replace(plan, storage_path=storage_path, storage_options=dict(plan.storage_options))
        for rank in range(plan.world_size):
            actor: Any = actor_class.options(
                num_cpus=bundle.get("CPU", 0.0),
                num_gpus=bundle.get("GPU", 0.0),
                resources=custom,
                max_concurrency=_ACTOR_THREADS,
                max_restarts=0,
                name=None,
                scheduling_strategy=PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=rank),
            ).remote(shipped, rank)
            self.actors.append(actor)
            if self._abort_message is not None:
                actor.abort.remote(self._abort_message)
            actor.start.remote()

    async def _follow(self, rank: int, actor: Any, controller: Controller, limiter: trio.CapacityLimiter) -> None:
        """Replay one rank's events into the controller, in order, until the rank is finished."""
        pending: Any = None
        while True:
            # One poll in flight per rank, and a poll whose wait timed out is waited for again
            # rather than replaced: the events it took from the actor's queue must not be lost.
            if pending is None:
                pending = actor.next_events.remote(self.poll_timeout_s)
            try:
                events: list[_RankEvent] = await trio.to_thread.run_sync(
                    functools.partial(ray.get, pending, timeout=self.poll_timeout_s + _POLL_GRACE_S),
                    abandon_on_cancel=True,
                    limiter=limiter,
                )
            except GetTimeoutError:
                continue
            except RayActorError as error:
                last = self._last_index.get(rank)
                # Reports queued in the actor but not yet polled die with it, hence "received".
                where = (
                    f"after the controller received its report {last}"
                    if last is not None
                    else "before the controller received any report of it"
                )
                summary = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
                controller.fail(
                    RunFailure(f"rank {rank} died {where} (its Ray actor was lost: {summary})", error, rank, last)
                )
                return
            pending = None
            for event in events:
                if isinstance(event, _HandedOff):
                    self._last_index[rank] = event.message.index
                    controller.hand_off(event.message)
                elif isinstance(event, _ReportFailed):
                    controller.report_failed(rank, event.index, event.error)
                else:
                    self._reports[rank] = event.reports
                    controller.rank_finished(rank, event.training_error)
                    return

    def _clean_up(self, group: PlacementGroup) -> None:
        """Collect the reports of ranks that did not finish, then remove the actors and the group."""
        missing = {rank: actor for rank, actor in enumerate(self.actors) if rank not in self._reports}
        refs = {rank: actor.reports.remote() for rank, actor in missing.items()}
        for rank, ref in refs.items():
            try:
                self._reports[rank] = ray.get(ref, timeout=_CLEANUP_S / 2)
            except (RayActorError, GetTimeoutError) as error:
                logger.warning("rank %d: its reports are lost with its Ray actor (%s)", rank, error)
                self._reports[rank] = ReportLog(rank, self._first_index)
        for actor in self.actors:
            ray.kill(actor, no_restart=True)
        remove_placement_group(group)


def _resources(resources: Mapping[str, float]) -> dict[str, float]:
    """Only the resources a user asks for (Ray also lists one per node and memory in bytes)."""
    return {key: value for key, value in resources.items() if not key.startswith("node:") and "memory" not in key}
