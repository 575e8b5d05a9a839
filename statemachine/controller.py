"""The controller: takes hand-offs from every rank, decides commits in order, writes them.

The commit rule itself is the pure :class:`~statemachine.lifecycle.CommitLedger`. The
controller feeds it the hand-offs as they arrive (a cheap, synchronous call that never blocks a
rank), and one task writes the decided commits one after another, each through
``trio.to_thread``: the marker of index *i* is written before index *i + 1* is looked at, so
commits reach storage in increasing order even when their uploads finished out of order.

Failures take two roads. A failed report is known to the controller at once
(:meth:`Controller.report_failed`), so under ``on_failure="raise"`` the run starts ending
without waiting for earlier reports; and it also arrives in order as a ``FAILED`` hand-off, so
that the ledger skips its index instead of committing it.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from array import array
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import trio

from . import _threads
from .config import CheckpointConfig, UploadConfig
from .lifecycle import CommitDecision, CommitLedger
from .rank import HandOffMessage
from .retention import plan_retention
from .storage import CommittedCheckpoint, RunStorage

__all__ = ["Callback", "Controller", "RunFailure"]

logger = logging.getLogger("statemachine")


class Callback(Protocol):
    """Observer of a run (``RunConfig(callbacks=[...])``). Methods are optional."""


@dataclass(frozen=True, slots=True)
class RunFailure:
    """Why a run attempt failed: a message naming rank and index, and the original error."""

    message: str
    cause: BaseException | None
    rank: int | None = None
    index: int | None = None


@dataclass(slots=True)
class _Commit:
    decision: CommitDecision
    messages: list[HandOffMessage] = field(default_factory=list)


class Controller:
    """Collects hand-offs from ranks; commits checkpoints atomically and in order."""

    def __init__(
        self,
        *,
        storage: RunStorage,
        world_size: int,
        first_index: int,
        upload: UploadConfig,
        committed: Sequence[CommittedCheckpoint] = (),
        callbacks: Sequence[object] = (),
        checkpoint_config: CheckpointConfig | None = None,
    ) -> None:
        self.storage = storage
        self.world_size = world_size
        self.upload = upload
        self.ledger = CommitLedger(world_size, first_index)
        self.checkpoints: list[CommittedCheckpoint] = [dataclasses.replace(c, parts=()) for c in committed]
        #: Committed report indices in commit order; 8 bytes each (one per report of a long run).
        self.committed_indices = array("q")
        self.last_metrics: dict[str, Any] | None = committed[-1].metrics if committed else None
        self.failure: RunFailure | None = None
        self.on_failure: Callable[[RunFailure], None] | None = None
        self.callbacks = list(callbacks)
        self.checkpoint_config = checkpoint_config or CheckpointConfig()
        #: How many checkpoints retention deleted in this attempt (a count: a list of their
        #: names grew by one name per checkpoint over a long run, for the run's statistics alone).
        self.deleted = 0
        self._waiting: dict[int, list[HandOffMessage]] = {}
        #: Commits written whose retention, run state and announcement are due (see _settle).
        self._unsettled: list[CommittedCheckpoint] = []
        self._send, self._receive = trio.open_memory_channel[_Commit](math.inf)

    # -- RankSink ---------------------------------------------------------------------------

    def hand_off(self, message: HandOffMessage) -> None:
        self._waiting.setdefault(message.index, []).append(message)
        self._emit("on_report", message)
        for decision in self.ledger.hand_off(message.rank, message.index, message.state):
            messages = sorted(self._waiting.pop(decision.index), key=lambda m: m.rank)
            self._send.send_nowait(_Commit(decision, messages))
        self._check_counts()

    def upload_progress(self, rank: int, index: int, nbytes: int) -> None:
        """``nbytes`` more of an upload are written; called in the upload thread after each chunk.

        Forwarded to callbacks with ``on_upload_progress(rank, index, nbytes)``, in that thread:
        such a callback must be thread-safe and quick.
        """
        for callback in self.callbacks:
            handler = getattr(callback, "on_upload_progress", None)
            if handler is None:
                continue
            try:
                handler(rank, index, nbytes)
            except Exception:
                logger.exception("callback %r.on_upload_progress failed", callback)

    def report_failed(self, rank: int, index: int, error: BaseException) -> None:
        if self.upload.on_failure == "raise":
            self.fail(RunFailure(f"rank {rank}, report {index} failed: {error!r}", error, rank, index))

    def rank_finished(self, rank: int, training_error: BaseException | None) -> None:
        """A rank's training function returned (or raised) and all its reports are terminal."""
        self.ledger.rank_finished(rank)
        if training_error is not None:
            last = self.ledger.expected(rank) - 1
            where = f"after report {last}" if last >= self.ledger.first_index else "before its first report"
            self.fail(
                RunFailure(
                    f"rank {rank} failed in its training function {where}: {training_error!r}",
                    training_error,
                    rank,
                    last if last >= self.ledger.first_index else None,
                )
            )
        self._check_counts()

    def _check_counts(self) -> None:
        mismatch = self.ledger.count_mismatch()
        if mismatch is not None:
            counts = ", ".join(f"rank {r}: {n}" for r, n in sorted(mismatch.items()))
            self.fail(
                RunFailure(
                    f"ranks reported a different number of times ({counts}); every rank must call "
                    "report() the same number of times",
                    None,
                )
            )

    def fail(self, failure: RunFailure) -> None:
        """Record the first failure of the run attempt and tell the trainer to end it."""
        if self.failure is not None:
            return
        self.failure = failure
        logger.error("run %s failing: %s", self.storage.name, failure.message)
        if self.on_failure is not None:
            self.on_failure(failure)

    # -- commits ---------------------------------------------------------------------------

    def close(self) -> None:
        """No more hand-offs will come; :meth:`run` returns once the queued commits are written."""
        self._send.close()

    async def run(self) -> None:
        async with self._receive:
            async for commit in self._receive:
                decision = commit.decision
                try:
                    if decision.committed:
                        await self._commit(decision.index, commit.messages)
                    else:
                        logger.warning(
                            "report %d not committed: ranks %s failed", decision.index, list(decision.failed_ranks)
                        )
                    if self._receive.statistics().current_buffer_used == 0:
                        await self._settle()
                except Exception as error:  # noqa: BLE001 - a storage error ends the run clearly
                    self.fail(
                        RunFailure(f"commit of report {decision.index} failed: {error!r}", error, None, decision.index)
                    )
            try:
                await self._settle()  # commits written before a failed one
            except Exception as error:  # noqa: BLE001
                self.fail(RunFailure(f"writing the run state failed: {error!r}", error))

    async def _commit(self, index: int, messages: list[HandOffMessage]) -> None:
        metrics = next((m.metrics for m in messages if m.rank == 0), messages[0].metrics)
        parts = tuple(m.part for m in messages if m.part is not None)
        folders = sorted({m.checkpoint_dir for m in messages if m.checkpoint_dir is not None})
        if len(folders) > 1:
            self.fail(
                RunFailure(
                    f"report {index} not committed: ranks used different checkpoint_dir_name values {folders}",
                    None,
                    None,
                    index,
                )
            )
            return
        if folders:
            committed = CommittedCheckpoint(index, folders[0], metrics, parts)
            await _threads.run_in_thread(self.storage.commit, committed)
            # Retention and ``Result`` need the index, folder and metrics; the part manifests
            # are in the marker, and only the ``on_commit`` callbacks (at the next settle) get them.
            self.checkpoints.append(dataclasses.replace(committed, parts=()))
            self._unsettled.append(committed)
            logger.info("committed %s (report %d, ranks %s)", committed.path, index, [p.rank for p in parts])
        self.committed_indices.append(index)
        self.last_metrics = metrics

    async def _settle(self) -> None:
        """Apply retention and write the run state, once for all the commits written since.

        Called whenever no decided commit is waiting; ``on_commit`` callbacks hear of each commit
        of the batch here, in order, after the batch's run state is written and before retention
        deletes anything. The markers are the truth (a resume scans
        them), so the run state may lag a commit or two; writing it once per batch instead of
        once per commit keeps the commit queue from growing when reports come faster than a
        growing run state can be rewritten. The run state names only the kept set and is written
        before anything is deleted, so a crash in between leaves extra folders (removed at a
        later commit), never a run state that names a deleted checkpoint.
        """
        if not self._unsettled:
            return
        written, self._unsettled = self._unsettled, []
        plan = plan_retention(self.checkpoints, self.checkpoint_config, self._folders_in_flight())
        self.checkpoints = list(plan.keep)
        await _threads.run_in_thread(self.storage.write_run_state, self.run_state())
        for committed in written:
            self._emit("on_commit", committed)
        if plan.delete:
            await _threads.run_in_thread(self._delete, [c.path for c in plan.delete])

    def _folders_in_flight(self) -> set[str]:
        return {m.checkpoint_dir for ms in self._waiting.values() for m in ms if m.checkpoint_dir is not None}

    def _delete(self, folders: list[str]) -> None:
        for folder in folders:
            try:
                self.storage.delete_checkpoint(folder)
            except Exception as error:  # noqa: BLE001 - a failed clean-up must not fail training
                logger.warning("retention could not delete %s: %r", self.storage.url(folder), error)
                continue
            self.deleted += 1
            logger.info("retention deleted %s", folder)

    def run_state(self) -> dict[str, Any]:
        latest = self.checkpoints[-1] if self.checkpoints else None
        return {
            "format": 1,
            "name": self.storage.name,
            "latest": latest.index if latest else None,
            "next_index": (latest.index + 1) if latest else 0,
            "checkpoints": [{"index": c.index, "path": c.path, "metrics": c.metrics} for c in self.checkpoints],
        }

    def _emit(self, method: str, payload: object) -> None:
        for callback in self.callbacks:
            handler = getattr(callback, method, None)
            if handler is None:
                continue
            try:
                handler(payload)
            except Exception:
                logger.exception("callback %r.%s failed", callback, method)
