"""A live progress display of a run (rich), as a controller callback.

``fit()`` shows it when ``UploadConfig(progress=True)``, or when ``progress`` is None and the
environment variable ``STATEMACHINE_PROGRESS`` is ``1``/``true``/``yes``/``on``. It has one row
per rank (reports handed to the controller, failures), one for commits, one for all bytes
uploaded with the current speed, and one row per upload while its bytes are being written.

Why it cannot slow training down: the training thread never calls it. ``on_report`` and
``on_commit`` run on the trio thread and only update counters under rich's lock;
``on_upload_progress`` runs in the upload thread once per 8 MiB chunk. Drawing happens in
rich's own refresh thread, a few times a second. ``python -m statemachine.progress`` measures
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
from types import TracebackType
from typing import Any

from rich.console import Console
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


class RunProgress:
    """Callback that draws a run's progress; use it as a context manager around ``fit()``.

    ``reports_per_rank``, when known, gives each rank's row a total (a bar); otherwise it
    counts up. ``console`` defaults to standard error, so that a program's own
    output on standard output is not mixed with the display.
    """

    def __init__(
        self,
        *,
        world_size: int | None = None,
        reports_per_rank: int | None = None,
        console: Console | None = None,
        disable: bool = False,
    ) -> None:
        self.reports_per_rank = reports_per_rank
        self.progress = Progress(
            TextColumn("{task.description:<24}"),
            BarColumn(),
            _AmountColumn(),
            TimeElapsedColumn(),
            console=console or Console(stderr=True),
            disable=disable,
        )
        self._lock = threading.Lock()
        self._ranks: dict[int, TaskID] = {}
        self._failed: dict[int, int] = {}
        self._uploads: dict[tuple[int, int], TaskID] = {}
        # Metrics-only commits are not announced to callbacks, so this row has no total.
        self._commits = self.progress.add_task("checkpoints committed", total=None, info="")
        self._bytes = self.progress.add_task("uploaded", total=None, unit="bytes")
        for rank in range(world_size or 0):
            self._rank_task(rank)

    def __enter__(self) -> RunProgress:
        self.progress.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.progress.stop()

    def _rank_task(self, rank: int) -> TaskID:
        with self._lock:
            task = self._ranks.get(rank)
            if task is None:
                task = self.progress.add_task(f"rank {rank} reports", total=self.reports_per_rank, info="")
                self._ranks[rank] = task
            return task

    # -- controller callbacks ----------------------------------------------------------------

    def on_report(self, message: Any) -> None:
        task = self._rank_task(message.rank)
        if message.error is not None:
            self._failed[message.rank] = self._failed.get(message.rank, 0) + 1
            self.progress.update(task, info=f"({self._failed[message.rank]} failed)")
        self.progress.advance(task)
        with self._lock:
            upload = self._uploads.pop((message.rank, message.index), None)
        if upload is not None:
            self.progress.remove_task(upload)

    def on_commit(self, committed: Any) -> None:
        self.progress.update(self._commits, advance=1, info=f"latest {committed.path}")

    def on_upload_progress(self, rank: int, index: int, nbytes: int) -> None:
        with self._lock:
            task = self._uploads.get((rank, index))
            if task is None:
                task = self.progress.add_task(f"  rank {rank} report {index}", total=None, unit="bytes")
                self._uploads[(rank, index)] = task
        self.progress.advance(task, nbytes)
        self.progress.advance(self._bytes, nbytes)


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
    """Median time ``report()`` blocks, by mode, with the display off and on, in alternating runs.

    The display draws into a terminal-like in-memory console (``force_terminal``) so that it
    really renders, as it would in a terminal, without writing to this one.
    """
    import statemachine as sm

    blocked: dict[str, dict[str, list[float]]] = {"off": {}, "on": {}}
    with tempfile.TemporaryDirectory() as scratch:
        root = storage or f"file://{scratch}"
        for round_number in range(rounds):
            for setting in ("off", "on"):
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
