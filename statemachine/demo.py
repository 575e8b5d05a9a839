"""``python -m statemachine demo``: a small simulated training job with real checkpoint files.

Four ranks train for ten steps. Each step writes a checkpoint of a few MiB per rank and reports
it with a mode that rotates SYNC, ASYNC, NO_UPLOAD (written straight into the run folder at
``next_checkpoint_path()``), with metrics-only reports in between. A progress display follows
reports and commits; the summary lists what was committed and the time each mode blocked the
training loop.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from typing import Any

import fsspec
from rich.console import Console
from rich.table import Table

import statemachine as sm

from .progress import RunProgress
from .stats import percentile

MODES = (sm.CheckpointUploadMode.SYNC, sm.CheckpointUploadMode.ASYNC, sm.CheckpointUploadMode.NO_UPLOAD)


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser("demo", help="run a small simulated training job", description=__doc__)
    parser.add_argument(
        "--storage", default="statemachine-runs", help="fsspec URL or local folder (default: ./statemachine-runs)"
    )
    parser.add_argument("--name", default=None, help="run name (default: demo-<time>)")
    parser.add_argument("--ranks", type=int, default=4)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--size-mib", type=float, default=2.0, help="checkpoint size per rank and step")
    parser.add_argument("--step-time", type=float, default=0.05, help="simulated compute per step, seconds")
    parser.add_argument("--no-progress", action="store_true", help="no progress display")
    parser.set_defaults(func=run)


def train_fn(config: dict[str, Any]) -> None:
    ctx = sm.get_context()
    size = int(config["size_mib"] * 1024 * 1024)
    loss = 1.0
    for step in range(config["steps"]):
        time.sleep(config["step_time"])
        loss *= 0.9
        metrics = {"loss": round(loss, 6), "step": step, "rank": ctx.world_rank}
        mode = MODES[step % len(MODES)]
        if step % 4 == 3:
            sm.report(metrics)  # metrics only
            continue
        payload = os.urandom(1024) * (size // 1024)
        if mode is sm.CheckpointUploadMode.NO_UPLOAD:
            target = ctx.next_checkpoint_path()
            with fsspec.open(f"{target}/weights.bin", "wb", auto_mkdir=True) as handle:
                handle.write(payload)
            sm.report(metrics, checkpoint=sm.Checkpoint(target), checkpoint_upload_mode=mode)
            continue
        with tempfile.TemporaryDirectory() as local:
            with open(os.path.join(local, "weights.bin"), "wb") as handle:
                handle.write(payload)
            with open(os.path.join(local, "step.txt"), "w") as handle:
                handle.write(str(step))
            sm.report(metrics, checkpoint=sm.Checkpoint.from_directory(local), checkpoint_upload_mode=mode)


def run(args: argparse.Namespace) -> int:
    console = Console()
    name = args.name or time.strftime("demo-%Y%m%d-%H%M%S")
    config = {"steps": args.steps, "size_mib": args.size_mib, "step_time": args.step_time}
    display = RunProgress(world_size=args.ranks, reports_per_rank=args.steps, console=console, disable=args.no_progress)
    trainer = sm.Trainer(
        train_fn,
        train_loop_config=config,
        scaling_config=sm.ScalingConfig(num_workers=args.ranks),
        run_config=sm.RunConfig(storage_path=args.storage, name=name, callbacks=(display,)),
    )
    with display:
        try:
            result = trainer.fit()
        except sm.TrainingFailedError as error:
            console.print(f"[red]run failed:[/red] {error}")
            return 1
    print_summary(console, result)
    return 0


def print_summary(console: Console, result: sm.Result) -> None:
    table = Table(title=f"Committed checkpoints in {result.path}")
    for column in ("checkpoint", "ranks", "files", "MiB", "loss (rank 0)"):
        table.add_column(column)
    for checkpoint, metrics in result.best_checkpoints:
        files = [f for f in checkpoint.filesystem.find(checkpoint.path)]
        size = sum(checkpoint.filesystem.size(f) for f in files)
        ranks = sorted({f[len(checkpoint.path) + 1 :].split("/")[0] for f in files if "/rank_" in f})
        table.add_row(
            os.path.basename(checkpoint.path),
            str(len(ranks)),
            str(len(files)),
            f"{size / 2**20:.1f}",
            str(metrics.get("loss")),
        )
    console.print(table)
    blocked = Table(title="Time report() blocked the training loop")
    for column in ("mode", "reports", "median ms", "p99 ms"):
        blocked.add_column(column)
    by_mode: dict[str, list[float]] = {}
    for report in result.reports:
        key = report.mode.name if report.checkpoint_dir else f"{report.mode.name} (metrics only)"
        by_mode.setdefault(key, []).append(report.timings.get("blocked_s", float("nan")))
    for mode, values in sorted(by_mode.items()):
        blocked.add_row(
            mode, str(len(values)), f"{percentile(values, 50) * 1e3:.2f}", f"{percentile(values, 99) * 1e3:.2f}"
        )
    console.print(blocked)
    states: dict[str, int] = {}
    for report in result.reports:
        states[report.state.name] = states.get(report.state.name, 0) + 1
    console.print(f"reports: {states}; committed indices: {result.committed_indices}; latest: {result.checkpoint}")
