"""The embedded default: every rank in this process, one trio run, one thread per rank."""

from __future__ import annotations

import trio

from ..controller import Controller
from ..rank import RankRuntime
from ..result import ReportLog
from ..storage import RunStorage
from . import RunPlan

__all__ = ["LocalBackend"]


class LocalBackend:
    """Runs the ranks as tasks of the caller's trio run (each training function in a thread)."""

    def __init__(self) -> None:
        self.ranks: list[RankRuntime] = []

    async def run(self, plan: RunPlan, controller: Controller) -> None:
        storage = RunStorage(plan.storage_path, plan.name, plan.storage_options)
        start = storage.open_checkpoint(plan.start_checkpoint) if plan.start_checkpoint else None
        protected = (storage.root,) if storage.is_local else ()
        self.ranks = [
            RankRuntime(
                rank=rank,
                world_size=plan.world_size,
                storage=storage,
                upload=plan.upload,
                first_index=plan.first_index,
                sink=controller,
                start_checkpoint=start,
                protected_dirs=protected,
            )
            for rank in range(plan.world_size)
        ]

        async def run_rank(runtime: RankRuntime) -> None:
            await runtime.run(plan.train_fn, plan.config)
            controller.rank_finished(runtime.rank, runtime.training_error)

        try:
            async with trio.open_nursery() as nursery:
                for runtime in self.ranks:
                    nursery.start_soon(run_rank, runtime)
        finally:
            storage.close()

    def report_logs(self) -> list[ReportLog]:
        return [runtime.report_log() for runtime in self.ranks]

    def abort(self, error: BaseException) -> None:
        for runtime in self.ranks:
            runtime.abort(error)
