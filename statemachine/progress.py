"""A live progress display of a run (rich), as a controller callback.

``fit()`` shows it when ``UploadConfig(progress=True)``, or when ``progress`` is None and the
environment variable ``STATEMACHINE_PROGRESS`` is ``1``/``true``/``yes``/``on``. It has one row
per rank (reports handed to the controller, failures), one for commits, one for all bytes
uploaded with the current speed, and one row per upload while its bytes are being written.

Why it cannot slow training down: the training thread never calls it. ``on_report`` and
``on_commit`` run on the trio thread, ``on_upload_progress`` in the upload thread once per 8 MiB
chunk, and all three only add to counters; rich's refresh thread reads the counters and draws,
four times a second. ``python -m statemachine.progress`` measures
the time ``report()`` blocks with the display on and off, side by side in one process.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from types import TracebackType
from typing import Any

from rich.console import Console, RenderableType
from rich.filesize import decimal
from rich.progress import BarColumn, Progress, ProgressColumn, Task, TaskID, TextColumn, TimeElapsedColumn
from rich.text import Text

__all__ = ["RunProgress", "measure_progress_cost"]


class _AmountColumn(ProgressColumn):
    """Counts for report and commit rows, bytes and speed for upload rows."""

    def render(self, task: Task) -> Text:
        if task.fields.get("unit") == "bytes":
            speed = task.finished_speed or task.speed
            rate = f" {decimal(int(speed))}/s" if speed else ""
            return Text(f"{decimal(int(task.completed))}{rate}")
        total = f"/{int(task.total)}" if task.total is not None else ""
        return Text(f"{int(task.completed)}{total} {task.fields.get('info', '')}".rstrip())


class _SyncingProgress(Progress):
    """A ``Progress`` that pulls the run's counters into its rows each time it draws."""

    def __init__(self, sync: Callable[[], None], *columns: ProgressColumn, **options: Any) -> None:
        # Set first: the base class draws once while it is being built.
        self._sync: Callable[[], None] = lambda: None
        self._syncing = False
        super().__init__(*columns, **options)
        self._sync = sync

    def get_renderables(self) -> Iterable[RenderableType]:
        self._syncing = True
        try:
            self._sync()
        finally:
            self._syncing = False
        yield from super().get_renderables()

    def refresh(self) -> None:
        # ``add_task`` draws at once; during a sync that would draw (and sync) inside the sync.
        if not self._syncing:
            super().refresh()


class RunProgress:
    """Callback that draws a run's progress; use it as a context manager around ``fit()``.

    ``reports_per_rank``, when known, gives each rank's row a total (a bar); otherwise it
    counts up. ``console`` defaults to standard error, so that a program's own output on
    standard output is not mixed with the display.

    The callbacks only bump counters under a lock of this object's own, held for a few
    instructions; the rich rows are brought up to date from those counters by the thread that
    draws. A first version updated rich directly from the callbacks and doubled the time SYNC
    ``report()`` blocked: rich holds its lock while it draws, and the controller's thread and
    the upload threads queued behind it.
    """

    def __init__(
        self,
        *,
        world_size: int | None = None,
        reports_per_rank: int | None = None,
        console: Console | None = None,
        disable: bool = False,
        refresh_per_second: float = 4.0,
    ) -> None:
        self.reports_per_rank = reports_per_rank
        self.progress = _SyncingProgress(
            self._sync_rows,
            TextColumn("{task.description:<24}"),
            BarColumn(),
            _AmountColumn(),
            TimeElapsedColumn(),
            console=console or Console(stderr=True),
            disable=disable,
            refresh_per_second=refresh_per_second,
            # Rich would swap sys.stdout/sys.stderr for the whole process while the display is
            # up; training threads and log handlers hold on to those streams, so leave them be.
            redirect_stdout=False,
            redirect_stderr=False,
        )
        self._lock = threading.Lock()
        self._reports: dict[int, int] = dict.fromkeys(range(world_size or 0), 0)
        self._failed: dict[int, int] = {}
        self._commits = 0
        self._latest = ""
        self._total_bytes = 0
        #: Bytes written so far by each upload whose report is not handed off yet.
        self._active: dict[tuple[int, int], int] = {}
        self._rank_rows: dict[int, TaskID] = {}
        self._upload_rows: dict[tuple[int, int], TaskID] = {}
        # Metrics-only commits are not announced to callbacks, so this row has no total.
        self._commit_row = self.progress.add_task("checkpoints committed", total=None, info="")
        self._bytes_row = self.progress.add_task("uploaded", total=None, unit="bytes")
        self._sync_rows()

    def __enter__(self) -> RunProgress:
        self.progress.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        # Stopping joins the drawing thread (and draws a last time), so the final sync below
        # cannot run alongside one of its syncs.
        self.progress.stop()
        self._sync_rows()

    def _sync_rows(self) -> None:
        """Bring the rich rows up to date with the counters: by the drawing thread before it
        draws, or by the owner while the display is not running (rows are not shared)."""
        with self._lock:
            reports = dict(self._reports)
            failed = dict(self._failed)
            commits, latest, total = self._commits, self._latest, self._total_bytes
            active = dict(self._active)
        progress = self.progress
        for rank in sorted(reports):
            row = self._rank_rows.get(rank)
            if row is None:
                row = progress.add_task(f"rank {rank} reports", total=self.reports_per_rank, info="")
                self._rank_rows[rank] = row
            info = f"({failed[rank]} failed)" if failed.get(rank) else ""
            progress.update(row, completed=reports[rank], info=info)
        progress.update(self._commit_row, completed=commits, info=f"latest {latest}" if latest else "")
        progress.update(self._bytes_row, completed=total)
        for key in [k for k in self._upload_rows if k not in active]:
            progress.remove_task(self._upload_rows.pop(key))
        for (rank, index), nbytes in sorted(active.items()):
            row = self._upload_rows.get((rank, index))
            if row is None:
                row = progress.add_task(f"  rank {rank} report {index}", total=None, unit="bytes")
                self._upload_rows[(rank, index)] = row
            progress.update(row, completed=nbytes)

    # -- controller callbacks ----------------------------------------------------------------

    def on_report(self, message: Any) -> None:
        with self._lock:
            self._reports[message.rank] = self._reports.get(message.rank, 0) + 1
            if message.error is not None:
                self._failed[message.rank] = self._failed.get(message.rank, 0) + 1
            self._active.pop((message.rank, message.index), None)

    def on_commit(self, committed: Any) -> None:
        with self._lock:
            self._commits += 1
            self._latest = str(committed.path)

    def on_upload_progress(self, rank: int, index: int, nbytes: int) -> None:
        with self._lock:
            self._active[(rank, index)] = self._active.get((rank, index), 0) + nbytes
            self._total_bytes += nbytes


# -- measuring what the display costs ----------------------------------------------------------


def _bench_train_fn(config: dict[str, Any]) -> None:
    import statemachine as sm

    payload = os.urandom(int(config["size_kib"] * 1024))
    modes = (sm.CheckpointUploadMode.SYNC, sm.CheckpointUploadMode.ASYNC)
    for step in range(config["steps"]):
        with tempfile.TemporaryDirectory() as local:
            with open(os.path.join(local, "weights.bin"), "wb") as handle:
                handle.write(payload)
            sm.report(
                {"step": step},
                checkpoint=sm.Checkpoint.from_directory(local),
                checkpoint_upload_mode=modes[step % 2],
            )


def measure_progress_cost(
    *, rounds: int = 5, ranks: int = 4, steps: int = 20, size_kib: float = 1024.0, storage: str | None = None
) -> dict[str, Any]:
    """Median time ``report()`` blocks, by mode, with the display off and on, in interleaved runs.

    The display draws into a terminal-like in-memory console (``force_terminal``) so that it
    really renders, as it would in a terminal, without writing to this one.
    """
    import statemachine as sm

    blocked: dict[str, dict[str, list[float]]] = {"off": {}, "on": {}}
    with tempfile.TemporaryDirectory() as scratch:
        root = storage or f"file://{scratch}"
        for round_number in range(rounds):
            # Alternate which setting goes first, so that drift in the machine's load is shared.
            for setting in ("off", "on") if round_number % 2 == 0 else ("on", "off"):
                callbacks: tuple[object, ...] = ()
                display: RunProgress | None = None
                if setting == "on":
                    console = Console(file=io.StringIO(), force_terminal=True, width=120)
                    display = RunProgress(world_size=ranks, reports_per_rank=steps, console=console)
                    callbacks = (display,)
                trainer = sm.Trainer(
                    _bench_train_fn,
                    train_loop_config={"steps": steps, "size_kib": size_kib},
                    scaling_config=sm.ScalingConfig(num_workers=ranks),
                    run_config=sm.RunConfig(
                        storage_path=root,
                        name=f"progress-{setting}-{round_number}",
                        checkpoint_config=sm.CheckpointConfig(num_to_keep=2),
                        upload_config=sm.UploadConfig(progress=False),
                        callbacks=callbacks,
                    ),
                )
                if display is not None:
                    with display:
                        result = trainer.fit()
                else:
                    result = trainer.fit()
                for report in result.reports:
                    blocked[setting].setdefault(report.mode.name, []).append(report.timings["blocked_s"])
    modes = sorted(blocked["off"])
    return {
        "rounds": rounds,
        "ranks": ranks,
        "steps": steps,
        "size_kib": size_kib,
        "median_blocked_ms": {
            mode: {
                "off": statistics.median(blocked["off"][mode]) * 1e3,
                "on": statistics.median(blocked["on"][mode]) * 1e3,
                "reports": len(blocked["on"][mode]),
            }
            for mode in modes
        },
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m statemachine.progress", description="measure what the progress display costs report()"
    )
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--ranks", type=int, default=4)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--size-kib", type=float, default=1024.0)
    args = parser.parse_args(argv)
    started = time.perf_counter()
    figures = measure_progress_cost(rounds=args.rounds, ranks=args.ranks, steps=args.steps, size_kib=args.size_kib)
    figures["wall_s"] = round(time.perf_counter() - started, 2)
    print(json.dumps(figures, indent=1))
    print(f"{'mode':<10} {'reports':>8} {'off ms':>10} {'on ms':>10}")
    for mode, row in figures["median_blocked_ms"].items():
        print(f"{mode:<10} {row['reports']:>8} {row['off']:>10.3f} {row['on']:>10.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
