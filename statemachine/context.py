"""The functions a training function calls: ``report``, ``areport``, ``get_context``, ``get_checkpoint``.

They find their rank through a context variable that the rank's runtime sets before it starts
the training function; trio copies context variables into the training thread, so each rank's
thread sees its own rank even though all ranks share one process on the local backend.
"""

from __future__ import annotations

import contextvars
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from . import _threads
from .checkpoint import Checkpoint
from .config import CheckpointUploadMode

if TYPE_CHECKING:
    from .rank import RankRuntime

__all__ = ["TrainContext", "areport", "get_checkpoint", "get_context", "report"]

_current: contextvars.ContextVar[RankRuntime | None] = contextvars.ContextVar("statemachine_rank", default=None)


def enter_rank(runtime: RankRuntime) -> contextvars.Token[RankRuntime | None]:
    return _current.set(runtime)


def leave_rank(token: contextvars.Token[RankRuntime | None]) -> None:
    _current.reset(token)


def _runtime(caller: str) -> RankRuntime:
    runtime = _current.get()
    if runtime is None:
        raise RuntimeError(f"statemachine.{caller}() can only be called inside a training function run by a Trainer")
    return runtime


@dataclass(frozen=True, slots=True)
class TrainContext:
    """Facts about the rank that runs the training function."""

    world_rank: int
    world_size: int
    run_name: str
    #: The run folder, as a URL.
    storage_path: str
    _runtime: RankRuntime

    def next_checkpoint_path(self) -> str:
        """Where this rank's next checkpoint is committed: write there and report with NO_UPLOAD."""
        return self._runtime.next_checkpoint_path()


def get_context() -> TrainContext:
    runtime = _runtime("get_context")
    return TrainContext(runtime.rank, runtime.world_size, runtime.storage.name, runtime.storage.url(), runtime)


def get_checkpoint() -> Checkpoint | None:
    """The latest committed checkpoint when this run attempt started (None on a fresh run).

    As in Ray Train, this is the checkpoint to resume from; it does not change while the
    training function runs.
    """
    return _runtime("get_checkpoint").start_checkpoint


def report(
    metrics: dict[str, Any],
    checkpoint: Checkpoint | None = None,
    checkpoint_upload_mode: CheckpointUploadMode = CheckpointUploadMode.SYNC,
    delete_local_checkpoint_after_upload: bool | None = None,
    checkpoint_upload_fn: Callable[[Checkpoint, str], Checkpoint] | None = None,
    checkpoint_dir_name: str | None = None,
) -> None:
    """Report metrics, and optionally a checkpoint, from a (synchronous) training function.

    SYNC returns when this report has been handed to the controller in order (its upload done
    and every earlier report of the rank terminal); ASYNC returns once the checkpoint is
    snapshotted and the report accepted; NO_UPLOAD registers files already in the run folder
    and returns at once. Bad arguments raise ``ValueError``/``TypeError`` here and use no
    report index. ``report()`` blocks while ``UploadConfig.max_pending_reports`` reports of the
    rank are not terminal.
    """
    runtime = _runtime("report")
    started = time.perf_counter()
    if not runtime.lifecycle.can_accept():
        runtime.report_sync_wait_for_capacity()
    _threads.reporting_started()
    try:
        request = runtime.prepare(
            metrics,
            checkpoint,
            checkpoint_upload_mode,
            delete_local_checkpoint_after_upload,
            checkpoint_upload_fn,
            checkpoint_dir_name,
        )
    finally:
        _threads.reporting_finished()
    timings = runtime.report_from_thread(request)
    timings.blocked_s = time.perf_counter() - started


async def areport(
    metrics: dict[str, Any],
    checkpoint: Checkpoint | None = None,
    checkpoint_upload_mode: CheckpointUploadMode = CheckpointUploadMode.SYNC,
    delete_local_checkpoint_after_upload: bool | None = None,
    checkpoint_upload_fn: Callable[[Checkpoint, str], Checkpoint] | None = None,
    checkpoint_dir_name: str | None = None,
) -> None:
    """``report()`` for an ``async def`` training function (same arguments and behaviour)."""
    runtime = _runtime("areport")
    started = time.perf_counter()
    await runtime.wait_for_capacity()
    request = runtime.prepare(
        metrics,
        checkpoint,
        checkpoint_upload_mode,
        delete_local_checkpoint_after_upload,
        checkpoint_upload_fn,
        checkpoint_dir_name,
    )
    record = await runtime.accept(request)
    record.timings.blocked_s = time.perf_counter() - started
