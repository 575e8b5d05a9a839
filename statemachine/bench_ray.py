"""``python -m statemachine bench-ray``: the same job with this library and with Ray Train.

One job: N ranks (default 2), S steps (default 10), each step "computes" for a fixed time (a
sleep: the benchmark measures reporting, not training), writes a checkpoint of a given size and
reports it in one mode: metrics only, SYNC, ASYNC or NO_UPLOAD (written straight into the run
folder). The job runs on three systems:

- ``local``: this library, local backend (ranks are threads of this process);
- ``ray``: this library, Ray backend (ranks are Ray actors);
- ``raytrain``: Ray Train V2's ``DataParallelTrainer`` with ``ray.train.report(...,
  checkpoint_upload_mode=...)``.

The training function is the same for all three and measures, itself, how long each
``report()`` call blocked it. Storage is a local folder (``--workdir``); the Ray cluster is
started once, before any timing, so ``fit()`` wall time includes starting the ranks but not the
cluster. Printed: blocked time per report (median, p99), ``fit()`` wall time, and the ratio
ours / Ray Train for each, as a table and, with ``--json``, as JSON.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from rich.console import Console
from rich.table import Table

from .stats import percentile

__all__ = ["BenchRow", "add_parser", "run", "run_benchmark"]

SYSTEMS = ("local", "ray", "raytrain")
MODES = ("metrics", "SYNC", "ASYNC", "NO_UPLOAD")
_MIB = 1 << 20


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "bench-ray", help="side-by-side benchmark against Ray Train's ray.train.report", description=__doc__
    )
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--step-time", type=float, default=0.5, help="simulated compute per step, seconds")
    parser.add_argument("--sizes", type=int, nargs="+", default=[16, 256], help="checkpoint sizes per rank, MiB")
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--systems", nargs="+", default=list(SYSTEMS), choices=SYSTEMS)
    parser.add_argument("--workdir", default=None, help="local folder for storage and scratch (default: a temp dir)")
    parser.add_argument(
        "--raytrain-health-check-s",
        type=float,
        default=None,
        help="RAY_TRAIN_HEALTH_CHECK_INTERVAL_S for Ray Train (default: Ray's, 2 s); its controller takes "
        "reports off a one-slot queue at this interval, so it bounds how long Ray Train's report() blocks",
    )
    parser.add_argument("--quick", action="store_true", help="3 steps of 0.05 s, 1 MiB, metrics and ASYNC only")
    parser.add_argument(
        "--json",
        action="store_true",
        help="also print the rows and ratios as JSON on stdout (the table goes to stderr)",
    )
    parser.set_defaults(func=run)


@dataclass(frozen=True, slots=True)
class BenchRow:
    system: str
    mode: str
    size_mib: int
    reports: int
    blocked_median_ms: float
    blocked_p99_ms: float
    fit_s: float
    #: Why the job failed (its figures are then NaN), or None.
    error: str | None = None


# -- the training function (the same for every system) ----------------------------------------


def _write_payload(folder: str, size: int, seed: int, file_name: str = "weights.bin") -> None:
    """A ``size``-byte file in ``folder``, written in 1 MiB chunks (not the step's compute)."""
    os.makedirs(folder, exist_ok=True)
    block = (seed.to_bytes(8, "little") * (_MIB // 8))[:_MIB]
    with open(os.path.join(folder, file_name), "wb") as handle:
        left = size
        while left > 0:
            handle.write(block[: min(left, _MIB)])
            left -= _MIB


def bench_train_fn(config: dict[str, Any]) -> None:
    system, mode = config["system"], config["mode"]
    size = int(config["size_mib"] * _MIB)
    report: Callable[..., None]
    checkpoint_cls: Any
    upload_modes: Any
    if system == "raytrain":
        import ray.train as rt

        rank = rt.get_context().get_world_rank()
        storage = rt.get_context().get_storage()
        report, checkpoint_cls, upload_modes = rt.report, rt.Checkpoint, rt.CheckpointUploadMode
    else:
        import statemachine as sm

        rank = sm.get_context().world_rank
        report, checkpoint_cls, upload_modes = sm.report, sm.Checkpoint, sm.CheckpointUploadMode
    blocked: list[float] = []
    for step in range(config["steps"]):
        time.sleep(config["step_time"])
        metrics = {"step": step, "loss": 1.0 / (step + 1)}
        kwargs: dict[str, Any] = {}
        local: str | None = None
        if mode == "NO_UPLOAD":
            if system == "raytrain":
                # Ray Train wants every rank's NO_UPLOAD checkpoint to be the same folder.
                target = os.path.join(storage.experiment_fs_path, f"bench_{step:06d}")
                _write_payload(target, size, step, f"weights-rank{rank}.bin")
                checkpoint = checkpoint_cls(target, filesystem=storage.storage_filesystem)
            else:
                url = sm.get_context().next_checkpoint_path()
                _write_payload(url.removeprefix("file://"), size, step)
                checkpoint = checkpoint_cls(url)
            kwargs = {"checkpoint": checkpoint, "checkpoint_upload_mode": upload_modes.NO_UPLOAD}
        elif mode in ("SYNC", "ASYNC"):
            local = tempfile.mkdtemp(prefix=f"rank{rank}-", dir=config["scratch"])
            _write_payload(local, size, step)
            kwargs = {"checkpoint": checkpoint_cls.from_directory(local), "checkpoint_upload_mode": upload_modes[mode]}
        started = time.perf_counter()
        report(metrics, **kwargs)
        blocked.append(time.perf_counter() - started)
        if mode == "SYNC" and local is not None:
            shutil.rmtree(local, ignore_errors=True)  # SYNC keeps the local folder by default (both)
    with open(os.path.join(config["out"], f"rank_{rank}.json"), "w") as handle:
        json.dump(blocked, handle)


# -- running one job on one system --------------------------------------------------------------


def _fit(system: str, config: dict[str, Any], ranks: int, storage: str, name: str) -> None:
    if system == "raytrain":
        import ray.train as rt
        from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer

        DataParallelTrainer(
            bench_train_fn,
            train_loop_config=config,
            scaling_config=rt.ScalingConfig(num_workers=ranks),
            run_config=rt.RunConfig(storage_path=storage, name=name),
        ).fit()
        return
    import statemachine as sm

    sm.Trainer(
        bench_train_fn,
        train_loop_config=config,
        scaling_config=sm.ScalingConfig(num_workers=ranks),
        run_config=sm.RunConfig(storage_path=storage, name=name),
        backend="local" if system == "local" else "ray",
    ).fit()


def run_job(system: str, mode: str, size_mib: int, args: argparse.Namespace, workdir: str) -> BenchRow:
    name = f"{system}-{mode}-{size_mib}-{uuid.uuid4().hex[:6]}"
    out = os.path.join(workdir, "timings", name)
    scratch = os.path.join(workdir, "scratch", name)
    storage = os.path.join(workdir, "storage")
    os.makedirs(out)
    os.makedirs(scratch)
    config = {
        "system": system,
        "mode": mode,
        "size_mib": size_mib,
        "steps": args.steps,
        "step_time": args.step_time,
        "out": out,
        "scratch": scratch,
    }
    started = time.perf_counter()
    error: str | None = None
    blocked: list[float] = []
    try:
        _fit(system, config, args.ranks, storage, name)
        fit_s = time.perf_counter() - started
        for rank in range(args.ranks):
            with open(os.path.join(out, f"rank_{rank}.json")) as handle:
                blocked.extend(json.load(handle))
    except Exception as failure:  # noqa: BLE001 - one failed job must not lose the others' figures
        error, fit_s = f"{type(failure).__name__}: {str(failure).splitlines()[0] if str(failure) else ''}", math.nan
    finally:
        shutil.rmtree(os.path.join(storage, name), ignore_errors=True)
        shutil.rmtree(scratch, ignore_errors=True)
    return BenchRow(
        system=system,
        mode=mode,
        size_mib=size_mib,
        reports=len(blocked),
        blocked_median_ms=percentile(blocked, 50) * 1e3,
        blocked_p99_ms=percentile(blocked, 99) * 1e3,
        fit_s=fit_s,
        error=error,
    )


def _start_ray(ranks: int, health_check_s: float | None) -> None:
    # Ray Train's V2 API (the one with checkpoint_upload_mode) is chosen by this variable, which
    # must be set before ray.train is imported here and in every Ray worker.
    env = {"RAY_TRAIN_V2_ENABLED": "1"}
    if health_check_s is not None:
        env["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] = str(health_check_s)
    os.environ.update(env)
    import ray

    if not ray.is_initialized():
        ray.init(
            num_cpus=max(4, ranks + 2),
            include_dashboard=False,
            log_to_driver=False,
            logging_level=logging.WARNING,
            runtime_env={"env_vars": env},
        )


def run_benchmark(args: argparse.Namespace, progress: Callable[[str], None] = lambda _: None) -> list[BenchRow]:
    if args.quick:
        args.steps, args.step_time, args.sizes = 3, 0.05, [1]
        args.modes = [m for m in args.modes if m in ("metrics", "ASYNC")]
    if args.ranks < 1 or args.steps < 1 or args.step_time < 0 or any(s < 1 for s in args.sizes):
        raise ValueError("--ranks, --steps and --sizes must be >= 1 and --step-time >= 0")
    if args.raytrain_health_check_s is not None and args.raytrain_health_check_s <= 0:
        raise ValueError(f"--raytrain-health-check-s must be > 0, got {args.raytrain_health_check_s}")
    if any(system != "local" for system in args.systems):
        _start_ray(args.ranks, args.raytrain_health_check_s)
    workdir = args.workdir or tempfile.mkdtemp(prefix="statemachine-bench-ray-")
    workdir = os.path.abspath(workdir)
    os.makedirs(workdir, exist_ok=True)
    rows: list[BenchRow] = []
    try:
        for mode in args.modes:
            for size in [0] if mode == "metrics" else args.sizes:
                for system in args.systems:
                    progress(f"{system:<9} {mode:<9} {size:>4} MiB ...")
                    rows.append(run_job(system, mode, size, args, workdir))
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    return rows


def _ratio(ours: float, theirs: float) -> float:
    return ours / theirs if theirs > 0 else math.nan


def ratios(rows: list[BenchRow]) -> list[dict[str, Any]]:
    """For each of our rows, ours / Ray Train's blocked median, p99 and fit time."""
    reference = {(r.mode, r.size_mib): r for r in rows if r.system == "raytrain"}
    out = []
    for row in rows:
        theirs = reference.get((row.mode, row.size_mib))
        if row.system == "raytrain" or theirs is None:
            continue
        out.append(
            {
                "system": row.system,
                "mode": row.mode,
                "size_mib": row.size_mib,
                "blocked_median": _ratio(row.blocked_median_ms, theirs.blocked_median_ms),
                "blocked_p99": _ratio(row.blocked_p99_ms, theirs.blocked_p99_ms),
                "fit": _ratio(row.fit_s, theirs.fit_s),
            }
        )
    return out


def run(args: argparse.Namespace) -> int:
    console = Console(stderr=args.json, width=max(140, Console().width))
    rows = run_benchmark(args, progress=lambda line: console.print(line, style="dim"))
    by_key = {(r["system"], r["mode"], r["size_mib"]): r for r in ratios(rows)}
    tuned = (
        "" if args.raytrain_health_check_s is None else f", Ray Train health check {args.raytrain_health_check_s:g} s"
    )
    table = Table(
        title=f"report() blocked time and fit() wall time: {args.ranks} ranks, {args.steps} steps, "
        f"{args.step_time:g} s compute per step{tuned}; ratio = ours / Ray Train"
    )
    columns = ("mode", "MiB", "system", "reports", "blocked p50 ms", "blocked p99 ms", "fit s")
    for column in (*columns, "p50 ratio", "p99 ratio", "fit ratio"):
        table.add_column(column, justify="left" if column in ("mode", "system") else "right")
    for row in rows:
        ratio = by_key.get((row.system, row.mode, row.size_mib))
        shown = ["-", "-", "-"]
        if ratio:
            shown = [f"{ratio['blocked_median']:.3g}", f"{ratio['blocked_p99']:.3g}", f"{ratio['fit']:.2f}"]
        table.add_row(
            row.mode,
            str(row.size_mib or "-"),
            row.system,
            str(row.reports),
            f"{row.blocked_median_ms:.3f}",
            f"{row.blocked_p99_ms:.3f}",
            f"{row.fit_s:.2f}",
            *shown,
        )
    console.print(table)
    for row in rows:
        if row.error:
            console.print(f"[red]{row.system} {row.mode} {row.size_mib} MiB failed:[/red] {row.error}")
    if args.json:
        print(json.dumps({"rows": [asdict(r) for r in rows], "ratios": ratios(rows)}, indent=2))
    return 0
