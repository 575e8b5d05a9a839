"""``Trainer``: runs the ranks of a training function on a backend and returns a ``Result``.

One *attempt* starts the ranks from the latest committed checkpoint of the run folder, feeds
their hand-offs to a fresh :class:`~statemachine.controller.Controller`, and ends when every
rank is finished and every decided commit is written. When an attempt fails, the ranks are told
to stop (their next ``report()`` raises), uploads already running are given
``UploadConfig.drain_timeout_s`` to finish so that completed work can still be committed, and
then everything left is cancelled. ``FailureConfig(max_failures=n)`` starts up to *n* new
attempts, each resuming from what was committed.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import trio

from . import _threads
from .backends import RunPlan, make_backend
from .config import RunConfig, ScalingConfig
from .controller import Controller, RunFailure
from .errors import TrainingFailedError
from .progress import RunProgress
from .result import Reports, Result
from .stats import format_stats, run_stats
from .storage import CommittedCheckpoint, RunStorage
from .verify import verify_checkpoint

__all__ = ["Trainer", "load_committed"]

logger = logging.getLogger("statemachine")


def load_committed(storage: RunStorage, verify: bool = True) -> tuple[list[CommittedCheckpoint], int]:
    """The committed checkpoints of a run folder (oldest first) and the next report index.

    A folder counts only with its marker; the run state file is read too, for folders with a
    custom ``checkpoint_dir_name``, but a marker written just before a crash (and before the
    run state) is found by the folder scan, so nothing committed is ever forgotten.

    With ``verify``, the latest checkpoints are checked against their manifests (a quick check:
    listings and sizes, see :mod:`statemachine.verify`), newest first until one is valid; a
    checkpoint whose files no longer match is left out, with a warning, so the run resumes from
    the newest one that is whole. Its folder is left in place for ``inspect`` to show, and its
    index is not reused: the next index still follows the highest committed one.
    """
    state = storage.read_run_state() or {}
    paths = {relative for _, relative in storage.checkpoint_folders()}
    paths.update(str(entry["path"]) for entry in state.get("checkpoints", ()))
    committed = [m for m in (storage.read_marker(p) for p in sorted(paths)) if m is not None]
    committed.sort(key=lambda c: c.index)
    next_index = max([int(state.get("next_index", 0))] + [c.index + 1 for c in committed])
    while verify and committed:
        check = verify_checkpoint(storage, committed[-1])
        if check.ok:
            break
        logger.warning(
            "not resuming from %s: its files do not match its manifest (%s); trying the previous checkpoint",
            storage.url(committed[-1].path),
            "; ".join(check.problems[:3]) + (f"; {len(check.problems) - 3} more" if len(check.problems) > 3 else ""),
        )
        committed.pop()
    return committed, next_index


class Trainer:
    """Runs ``train_loop_per_worker`` once per rank and reports what was committed."""

    def __init__(
        self,
        train_loop_per_worker: Callable[..., Any],
        *,
        train_loop_config: Mapping[str, Any] | None = None,
        scaling_config: ScalingConfig | None = None,
        run_config: RunConfig | None = None,
        backend: str = "local",
        backend_options: Mapping[str, Any] | None = None,
        callbacks: Sequence[object] = (),
    ) -> None:
        if not callable(train_loop_per_worker):
            raise TypeError(f"Trainer needs a callable training function, got {train_loop_per_worker!r}")
        if train_loop_config is not None and not isinstance(train_loop_config, Mapping):
            raise TypeError(f"train_loop_config must be a dict or None, got {type(train_loop_config).__name__}")
        if backend not in ("local", "ray"):
            raise ValueError(f"unknown backend {backend!r}; use 'local' or 'ray'")
        self.train_fn = train_loop_per_worker
        self.config = train_loop_config
        self.scaling_config = scaling_config or ScalingConfig()
        self.run_config = run_config or RunConfig()
        if backend == "ray" and str(self.run_config.storage_path).startswith("memory://"):
            raise ValueError(
                f"backend='ray' cannot use storage_path={self.run_config.storage_path!r}: memory:// is private to "
                "each process, so the ranks (Ray actors) would not see each other's files; use a folder every "
                "actor can reach or a remote fsspec URL such as s3://"
            )
        self.backend_name = backend
        self.backend_options = dict(backend_options or {})
        self.callbacks = list(callbacks)
        self._display: RunProgress | None = None
        self.name = self.run_config.name or datetime.datetime.now().strftime("run_%Y%m%d-%H%M%S-%f")

    def fit(self) -> Result:
        """Run to the end; return the :class:`Result` or raise :class:`TrainingFailedError`."""
        return trio.run(self.fit_async)

    async def fit_async(self) -> Result:
        """:meth:`fit` for a caller that already runs trio."""
        display: RunProgress | None = None
        own = [*self.callbacks, *self.run_config.callbacks]
        if self.run_config.upload_config.show_progress and not any(isinstance(c, RunProgress) for c in own):
            display = RunProgress(world_size=self.scaling_config.num_workers)
        self._display = display
        with display if display is not None else contextlib.nullcontext():
            result = await self._fit_attempts()
        return result

    async def _fit_attempts(self) -> Result:
        failures: list[BaseException] = []
        max_failures = self.run_config.failure_config.max_failures
        while True:
            result, failure = await self._attempt()
            if failure is None:
                result.failures = failures
                return result
            error = TrainingFailedError(failure.message, result)
            error.__cause__ = failure.cause
            failures.append(error)
            if max_failures == -1 or len(failures) <= max_failures:
                logger.warning(
                    "attempt %d failed (%s); restarting from the latest committed checkpoint",
                    len(failures),
                    failure.message,
                )
                continue
            result.error = error
            result.failures = failures
            raise error

    async def _attempt(self) -> tuple[Result, RunFailure | None]:
        started = time.perf_counter()
        run = self.run_config
        storage = RunStorage(run.storage_path, self.name, run.storage_options)
        committed, first_index = await _threads.run_in_thread(load_committed, storage)
        removed = await _threads.run_in_thread(storage.remove_uncommitted, first_index)
        if removed:
            logger.warning("removed uncommitted checkpoint folders left by an earlier attempt: %s", removed)
        start = storage.checkpoint(committed[-1]).url if committed else None
        controller = Controller(
            storage=storage,
            world_size=self.scaling_config.num_workers,
            first_index=first_index,
            upload=run.upload_config,
            committed=committed,
            callbacks=[*self.callbacks, *run.callbacks, *([self._display] if self._display else [])],
            checkpoint_config=run.checkpoint_config,
        )
        backend = make_backend(self.backend_name, self.backend_options)
        plan = RunPlan(
            train_fn=self.train_fn,
            config=self.config,
            world_size=self.scaling_config.num_workers,
            storage_path=str(run.storage_path),
            name=self.name,
            storage_options=run.storage_options,
            upload=run.upload_config,
            first_index=first_index,
            start_checkpoint=start,
            resources_per_worker=self.scaling_config.resources_per_worker,
        )
        ranks_scope = trio.CancelScope()

        def end_attempt(failure: RunFailure) -> None:
            backend.abort(RuntimeError(failure.message))
            ranks_scope.deadline = min(ranks_scope.deadline, trio.current_time() + run.upload_config.drain_timeout_s)

        controller.on_failure = end_attempt
        async with trio.open_nursery() as nursery:
            nursery.start_soon(controller.run)
            try:
                with ranks_scope:
                    await backend.run(plan, controller)
                if ranks_scope.cancelled_caught:
                    logger.error("ranks did not finish within the drain timeout; their open reports were aborted")
            finally:
                controller.close()
        reports = Reports(backend.report_logs())
        checkpoints = controller.checkpoints
        result = Result(
            metrics=controller.last_metrics,
            checkpoint=storage.checkpoint(checkpoints[-1]) if checkpoints else None,
            best_checkpoints=[(storage.checkpoint(c), c.metrics) for c in checkpoints],
            reports=reports,
            path=storage.url(),
            committed_indices=list(controller.committed_indices),
        )
        result.stats = run_stats(
            reports,
            commits=len(controller.committed_indices),
            checkpoints_kept=len(checkpoints),
            checkpoints_deleted=controller.deleted,
            elapsed_s=time.perf_counter() - started,
        )
        logger.info("run %s attempt finished:\n  %s", self.name, format_stats(result.stats))
        return result, controller.failure
