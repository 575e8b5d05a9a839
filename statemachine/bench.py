"""``python -m statemachine bench``: the figures of DESIGN.md section 10, measured on this machine.

Four sections, each a real :class:`~statemachine.Trainer` run against the storage given by
``--storage`` (a fresh folder under it, removed at the end):

``blocked``
    Time the training thread spends inside ``report()``, per mode, for each checkpoint size and
    rank count: median and p99 over every report of every rank. Each run reports one mode only,
    so that a SYNC report never waits behind an ASYNC upload of the same rank. The pending bound
    is lifted (``max_pending_reports=None``) so that ASYNC shows the cost of the hand-over
    itself, not back-pressure; the ``memory`` section shows what the bound is for. Between two
    checkpoint reports each rank "trains" for ``--step-ms`` (default 100 ms) in ``time.sleep``,
    which leaves the GIL free as a GPU step does; all ranks step together, so their reports
    and uploads coincide. With ``--step-ms 0`` the ranks report back to back and, being threads
    of one process on the local backend, spend their blocked time waiting for the GIL that the
    other ranks' ``report()`` calls hold. The row's upload median says whether the uploads
    kept up with the steps (when they did not, the backlog competes for the CPU).
``throughput``
    One rank; a raw copy of the checkpoint folder to the same storage (``fs.put``, what a user
    would write by hand, on the file system opened with the same options as the library's,
    so S3 uses the same part size and concurrency) and a SYNC ``report()`` of the same folder,
    alternated, so that both see the same noise. The ratio of the medians is the figure: 1.0
    is as fast as the raw copy.
``metrics``
    Metrics-only reports in a tight loop with 8 and 64 ranks: reports per second per rank, and
    the coordination cost per report (the wall time of the whole batch divided by the number of
    reports). With every rank on one machine the ranks share the CPU, so per-rank rates fall as
    ranks grow; a flat cost per report (ratio 64/8 near 1) says nothing per report grows with
    the number of ranks.
``memory``
    10,000 reports (a small ASYNC checkpoint every tenth, metrics only otherwise) with the
    default pending bound: RSS and the local snapshot backlog (bytes under the snapshot folder)
    every 1,000 reports, twice: keeping 2 checkpoints and keeping all of them. What a run must
    hold is what ``Result`` returns: every report (``Result.reports``, about 40 bytes each in
    the ranks' report logs) and every kept checkpoint's folder name and metrics
    (``Result.best_checkpoints``); the two runs tell the two apart.

The machine may be busy with other work: every timing is a median (or p99) of many reports,
and the throughput figure is a ratio of interleaved runs. Per-rank figures travel from the
training functions to this process through small JSON files in a local folder, so the same
code measures the ``ray`` backend when it runs on this machine (RSS is then the rank's actor
process, not the driver).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import statistics
import tempfile
import time
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

import fsspec

import statemachine as sm

from .stats import percentile
from .storage import RunStorage

MIB = 1024 * 1024
SNAPSHOT_ROOT = os.path.join(tempfile.gettempdir(), "statemachine-snapshots")

#: The ``memory`` section's retention settings: a run that keeps two checkpoints holds
#: per-report state only; one that keeps every checkpoint also holds each checkpoint's
#: folder and metrics, which ``Result.best_checkpoints`` returns.
MEMORY_KEEP = (2, None)

MODE_NAMES = {"SYNC": sm.CheckpointUploadMode.SYNC, "ASYNC": sm.CheckpointUploadMode.ASYNC}
NO_UPLOAD = sm.CheckpointUploadMode.NO_UPLOAD


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "bench",
        help="measure report() blocking, upload throughput, coordination cost and memory",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--storage", default=None, help="fsspec URL or local folder to measure against (default: a temporary folder)"
    )
    parser.add_argument(
        "--storage-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="fsspec storage option (repeatable); endpoint_url=... goes into s3fs's client_kwargs",
    )
    parser.add_argument("--backend", default="local", choices=("local", "ray"), help="passed to Trainer")
    parser.add_argument(
        "--step-ms",
        type=float,
        default=100.0,
        help="'blocked': training step between two reports, in ms, spent in time.sleep so that the GIL is "
        "free as while a GPU computes (default 100; 0 reports back to back, every rank's thread then "
        "competing for the GIL with the others)",
    )
    parser.add_argument("--quick", action="store_true", help="fewer sizes and repeats: under a minute")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON instead of tables")
    parser.add_argument("--sizes", default=None, help="checkpoint sizes in MiB, comma-separated (default 16,256)")
    parser.add_argument("--ranks", default=None, help="rank counts for 'blocked', comma-separated (default 1,2,8)")
    parser.add_argument(
        "--reports",
        type=int,
        default=None,
        help="override every count: reports per run in 'blocked' and 'metrics', runs in 'throughput', "
        "and reports in 'memory' (times 10); for smoke tests",
    )
    parser.add_argument(
        "--sections",
        default="memory,blocked,throughput,metrics",
        help="which sections to run, comma-separated (default: all)",
    )
    parser.set_defaults(func=run)


# -- options -------------------------------------------------------------------------------


def parse_storage_options(pairs: Sequence[str]) -> dict[str, Any]:
    """``KEY=VALUE`` pairs as fsspec options; ``endpoint_url`` goes where s3fs expects it."""
    options: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--storage-option must look like KEY=VALUE, got {pair!r}")
        parsed: Any = value
        if value.lower() in ("true", "false"):
            parsed = value.lower() == "true"
        elif value.isdigit():
            parsed = int(value)
        if key in ("endpoint_url", "region_name"):
            options.setdefault("client_kwargs", {})[key] = parsed
        else:
            options[key] = parsed
    return options


def _ints(text: str | None, default: Sequence[int]) -> list[int]:
    if text is None:
        return list(default)
    values = [int(v) for v in text.split(",") if v.strip()]
    if not values or any(v < 1 for v in values):
        raise ValueError(f"expected positive integers separated by commas, got {text!r}")
    return values


# -- training functions (module level, so that the ray backend can ship them) ---------------


def _side_channel(config: Mapping[str, Any], rank: int, data: Mapping[str, Any]) -> None:
    with open(os.path.join(config["results"], f"rank_{rank}.json"), "w") as handle:
        json.dump(data, handle)


def _link_or_copy_into(source_dir: str, target_url: str, options: Mapping[str, Any]) -> None:
    """Put the checkpoint files at ``target_url`` the cheapest way (outside any timing)."""
    fs, target = fsspec.core.url_to_fs(target_url, **dict(options))
    if isinstance(fs, fsspec.implementations.local.LocalFileSystem):
        os.makedirs(target, exist_ok=True)
        for name in os.listdir(source_dir):
            try:
                os.link(os.path.join(source_dir, name), os.path.join(target, name))
            except OSError:  # another file system (--storage elsewhere than the temporary folder)
                shutil.copyfile(os.path.join(source_dir, name), os.path.join(target, name))
    else:
        fs.put(source_dir.rstrip("/") + "/", target.rstrip("/") + "/", recursive=True)


def blocked_train_fn(config: dict[str, Any]) -> None:
    """Report ``config["reports"]`` times with one mode; NO_UPLOAD files are placed first."""
    kind = config["kind"]
    checkpoint_dir: str = config.get("source", "")
    step_s = config.get("step_s", 0.0)
    for step in range(config["reports"]):
        if step_s:
            time.sleep(step_s)  # the training step: the GIL is free, as while a GPU computes
        metrics = {"step": step, "loss": 1.0 / (step + 1)}
        if kind == "metrics":
            sm.report(metrics)
        elif kind == "NO_UPLOAD":
            target = sm.get_context().next_checkpoint_path()
            _link_or_copy_into(checkpoint_dir, target, config["storage_options"])
            sm.report(metrics, checkpoint=sm.Checkpoint(target), checkpoint_upload_mode=NO_UPLOAD)
        else:
            sm.report(
                metrics,
                checkpoint=sm.Checkpoint.from_directory(checkpoint_dir),
                checkpoint_upload_mode=MODE_NAMES[kind],
                delete_local_checkpoint_after_upload=False,
            )


def throughput_train_fn(config: dict[str, Any]) -> None:
    """Alternate a raw ``fs.put`` of the folder with a SYNC report of the same folder."""
    ctx = sm.get_context()
    # The file system as the library opens it (same s3fs part size and concurrency), so the
    # ratio measures what the library adds, not a different choice of settings.
    storage = RunStorage(config["raw_url"], "raw", config["storage_options"])
    fs, raw_root = storage.fs, storage.root
    source = config["source"]
    raw_s: list[float] = []
    sync_s: list[float] = []
    for step in range(config["repeats"]):
        target = f"{raw_root}/copy_{step}/rank_{ctx.world_rank}/"
        order = ("raw", "sync") if step % 2 == 0 else ("sync", "raw")
        for what in order:
            started = time.perf_counter()
            if what == "raw":
                fs.put(source.rstrip("/") + "/", target, recursive=True)
                raw_s.append(time.perf_counter() - started)
            else:
                sm.report(
                    {"step": step},
                    checkpoint=sm.Checkpoint.from_directory(source),
                    checkpoint_upload_mode=sm.CheckpointUploadMode.SYNC,
                )
                sync_s.append(time.perf_counter() - started)
    # Kept until now, like the checkpoints the reports wrote: deleting each copy at once would
    # spare the raw copies the page-cache writeback that the checkpoints' bytes go through.
    fs.rm(raw_root, recursive=True)
    _side_channel(config, ctx.world_rank, {"raw_s": raw_s, "sync_s": sync_s})


def metrics_train_fn(config: dict[str, Any]) -> None:
    """Metrics-only reports in a tight loop; the loop's wall-clock window goes to the side channel."""
    rank = sm.get_context().world_rank
    start = time.time()
    for step in range(config["reports"]):
        sm.report({"step": step, "loss": 0.5})
    _side_channel(config, rank, {"start": start, "end": time.time()})


def _snapshot_bytes() -> int:
    """Bytes held by this process's ASYNC snapshots (other processes may share the folder)."""
    total = 0
    mine = f"{os.getpid()}-"
    for root, _dirs, files in os.walk(SNAPSHOT_ROOT):
        if root != SNAPSHOT_ROOT and not os.path.relpath(root, SNAPSHOT_ROOT).startswith(mine):
            continue
        for name in files:
            try:
                total += os.stat(os.path.join(root, name)).st_size
            except OSError:
                pass
    return total


def memory_train_fn(config: dict[str, Any]) -> None:
    """10,000 reports; every tenth carries a small ASYNC checkpoint in a temporary folder."""
    import psutil

    rank = sm.get_context().world_rank
    process = psutil.Process()
    samples: list[dict[str, float]] = []
    payload = os.urandom(config["checkpoint_bytes"])
    every = config["sample_every"]
    for step in range(1, config["reports"] + 1):
        metrics = {"step": step, "loss": 1.0 / step}
        if step % 10 == 0:
            with tempfile.TemporaryDirectory() as local:
                with open(os.path.join(local, "state.bin"), "wb") as handle:
                    handle.write(payload)
                sm.report(
                    metrics,
                    checkpoint=sm.Checkpoint.from_directory(local),
                    checkpoint_upload_mode=sm.CheckpointUploadMode.ASYNC,
                )
        else:
            sm.report(metrics)
        if step % every == 0 and rank == 0:
            samples.append({"reports": step, "rss_mib": process.memory_info().rss / MIB, "backlog": _snapshot_bytes()})
    if rank == 0:
        _side_channel(config, rank, {"samples": samples})


# -- the sections --------------------------------------------------------------------------


class Bench:
    def __init__(
        self,
        storage: str,
        storage_options: dict[str, Any],
        backend: str,
        quick: bool,
        reports: int | None = None,
        step_ms: float = 0.0,
    ) -> None:
        self.storage = storage.rstrip("/")
        self.storage_options = storage_options
        self.backend = backend
        self.quick = quick
        self.reports = reports
        self.step_s = step_ms / 1e3
        self.work = tempfile.mkdtemp(prefix="statemachine-bench-")
        self.fs, self.root = fsspec.core.url_to_fs(self.storage, **storage_options)
        self.sources: dict[int, str] = {}

    def close(self) -> None:
        shutil.rmtree(self.work, ignore_errors=True)

    def source(self, size_mib: int) -> str:
        """A local checkpoint folder of ``size_mib`` MiB (four files), written once."""
        if size_mib not in self.sources:
            folder = os.path.join(self.work, f"source_{size_mib}")
            os.makedirs(folder)
            block = os.urandom(MIB)
            per_file = size_mib * MIB // 4
            for i in range(4):
                with open(os.path.join(folder, f"shard_{i}.bin"), "wb") as handle:
                    for _ in range(per_file // MIB):
                        handle.write(block)
                    handle.write(block[: per_file % MIB])
            self.sources[size_mib] = folder
        return self.sources[size_mib]

    def fit(
        self,
        train_fn: Any,
        ranks: int,
        config: dict[str, Any],
        upload: sm.UploadConfig,
        checkpoints: sm.CheckpointConfig | None = None,
    ) -> tuple[sm.Result, str]:
        results = tempfile.mkdtemp(prefix="results-", dir=self.work)
        name = f"bench-{uuid.uuid4().hex[:10]}"
        trainer = sm.Trainer(
            train_fn,
            train_loop_config={**config, "results": results, "storage_options": self.storage_options},
            scaling_config=sm.ScalingConfig(num_workers=ranks),
            run_config=sm.RunConfig(
                storage_path=self.storage,
                name=name,
                storage_options=self.storage_options,
                upload_config=upload,
                checkpoint_config=checkpoints or sm.CheckpointConfig(),
            ),
            backend=self.backend,
        )
        try:
            result = trainer.fit()
        finally:
            run_folder = f"{self.root}/{name}"
            if self.fs.exists(run_folder):
                self.fs.rm(run_folder, recursive=True)
        return result, results

    def blocked(self, sizes: Sequence[int], rank_counts: Sequence[int]) -> list[dict[str, Any]]:
        rows = []
        upload = sm.UploadConfig(max_pending_reports=None)
        for size in sizes:
            source = self.source(size)
            for ranks in rank_counts:
                reports = self._reports_for(size, ranks)
                for kind in ("SYNC", "ASYNC", "NO_UPLOAD"):
                    config = {"kind": kind, "source": source, "reports": reports, "step_s": self.step_s}
                    result, _ = self.fit(blocked_train_fn, ranks, config, upload)
                    rows.append(self._blocked_row(kind, size, ranks, result))
        for ranks in rank_counts:
            # Metrics-only reports back to back (no step): the coordination cost is the point.
            result, _ = self.fit(blocked_train_fn, ranks, {"kind": "metrics", "reports": self.reports or 200}, upload)
            rows.append(self._blocked_row("metrics-only", 0, ranks, result))
        return rows

    def _reports_for(self, size: int, ranks: int) -> int:
        if self.reports:
            return self.reports
        volume = size * ranks  # MiB written per step
        if self.quick:
            return max(2, min(10, 256 // volume))
        return max(3, min(20, 2048 // volume))

    @staticmethod
    def _blocked_row(kind: str, size: int, ranks: int, result: sm.Result) -> dict[str, Any]:
        blocked = [r.timings["blocked_s"] for r in result.reports if "blocked_s" in r.timings]
        uploads = [r.timings["upload_s"] for r in result.reports if "upload_s" in r.timings]
        return {
            "mode": kind,
            "size_mib": size,
            "ranks": ranks,
            "reports": len(blocked),
            "median_ms": percentile(blocked, 50) * 1e3,
            "p99_ms": percentile(blocked, 99) * 1e3,
            "max_ms": max(blocked) * 1e3,
            "upload_median_ms": percentile(uploads, 50) * 1e3 if uploads else math.nan,
        }

    def throughput(self, sizes: Sequence[int]) -> list[dict[str, Any]]:
        rows = []
        for size in sizes:
            repeats = 6 if self.quick else 12
            if size >= 256 and self.quick:
                repeats = 4
            repeats = self.reports or repeats
            raw_url = f"{self.storage}/raw-copy-{uuid.uuid4().hex[:8]}"
            config = {"source": self.source(size), "repeats": repeats, "raw_url": raw_url}
            _result, results = self.fit(throughput_train_fn, 1, config, sm.UploadConfig())
            with open(os.path.join(results, "rank_0.json")) as handle:
                data = json.load(handle)
            if self.fs.exists(raw_url):
                self.fs.rm(raw_url, recursive=True)
            raw, sync = statistics.median(data["raw_s"]), statistics.median(data["sync_s"])
            rows.append(
                {
                    "size_mib": size,
                    "repeats": repeats,
                    "raw_copy_ms": raw * 1e3,
                    "sync_report_ms": sync * 1e3,
                    "raw_mib_s": size / raw,
                    "sync_mib_s": size / sync,
                    "ratio": sync / raw,
                }
            )
        return rows

    def metrics(self, rank_counts: Sequence[int] = (8, 64)) -> list[dict[str, Any]]:
        rows = []
        reports = self.reports or (200 if self.quick else 1000)
        for ranks in rank_counts:
            result, results = self.fit(metrics_train_fn, ranks, {"reports": reports}, sm.UploadConfig())
            windows = []
            for rank in range(ranks):
                with open(os.path.join(results, f"rank_{rank}.json")) as handle:
                    windows.append(json.load(handle))
            wall = max(w["end"] for w in windows) - min(w["start"] for w in windows)
            per_rank = [reports / (w["end"] - w["start"]) for w in windows]
            blocked = [r.timings["blocked_s"] for r in result.reports if "blocked_s" in r.timings]
            rows.append(
                {
                    "ranks": ranks,
                    "reports_per_rank": reports,
                    "reports_per_s_per_rank": statistics.median(per_rank),
                    "reports_per_s_total": ranks * reports / wall,
                    "cost_per_report_us": wall / (ranks * reports) * 1e6,
                    "blocked_median_ms": percentile(blocked, 50) * 1e3,
                    "blocked_p99_ms": percentile(blocked, 99) * 1e3,
                }
            )
        if len(rows) >= 2:
            rows[-1]["cost_ratio_vs_first"] = rows[-1]["cost_per_report_us"] / rows[0]["cost_per_report_us"]
        return rows

    def memory(self, num_to_keep: int | None) -> dict[str, Any]:
        reports = self.reports * 10 if self.reports else 10_000
        config = {"reports": reports, "checkpoint_bytes": 64 * 1024, "sample_every": reports // 10}
        keep = sm.CheckpointConfig(num_to_keep=num_to_keep)
        result, results = self.fit(memory_train_fn, 1, config, sm.UploadConfig(), keep)
        with open(os.path.join(results, "rank_0.json")) as handle:
            samples = json.load(handle)["samples"]
        by_count = {s["reports"]: s for s in samples}
        first, middle, last = by_count[reports // 10], by_count[reports // 2], by_count[reports]
        return {
            "reports": reports,
            "num_to_keep": num_to_keep,
            "samples": samples,
            "rss_mib_at_first_sample": first["rss_mib"],
            "rss_mib_at_end": last["rss_mib"],
            "rss_growth_mib_per_1k": (last["rss_mib"] - first["rss_mib"]) / (reports - reports // 10) * 1000,
            # The first thousands of reports also warm the allocator and the thread caches up.
            "rss_growth_mib_per_1k_second_half": (last["rss_mib"] - middle["rss_mib"]) / (reports - reports // 2) * 1000,
            "peak_rss_mib": max(s["rss_mib"] for s in samples),
            "max_backlog_kib": max(s["backlog"] for s in samples) / 1024,
            "reports_in_result": len(result.reports),
            "checkpoints_in_result": len(result.best_checkpoints),
        }


# -- output --------------------------------------------------------------------------------


def _fmt(value: float, digits: int = 2) -> str:
    return "nan" if isinstance(value, float) and math.isnan(value) else f"{value:.{digits}f}"


def print_tables(figures: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=max(Console().width, 120))
    console.print(
        f"[bold]statemachine bench[/bold] storage={figures['storage']} backend={figures['backend']} "
        f"quick={figures['quick']} cpus={figures['cpus']} ({figures['seconds']:.0f} s)"
    )
    if "blocked" in figures:
        table = Table(
            title="Time blocked in report() (target: ASYNC, NO_UPLOAD, metrics-only < 1 ms median, < 5 ms p99); "
            f"a {figures['step_ms']:g} ms training step between checkpoint reports, none between metrics-only ones"
        )
        for column in ("mode", "MiB", "ranks", "reports", "median ms", "p99 ms", "max ms", "upload median ms"):
            table.add_column(column, justify="right")
        for row in figures["blocked"]:
            table.add_row(
                row["mode"],
                str(row["size_mib"] or "-"),
                str(row["ranks"]),
                str(row["reports"]),
                _fmt(row["median_ms"], 3),
                _fmt(row["p99_ms"], 3),
                _fmt(row["max_ms"], 3),
                _fmt(row["upload_median_ms"], 1) if "upload_median_ms" in row else "-",
            )
        console.print(table)
    if "throughput" in figures:
        table = Table(title="SYNC report() vs a raw fs.put of the same folder, interleaved (target: ratio <= 1.1)")
        for column in ("MiB", "runs", "raw copy ms", "SYNC ms", "raw MiB/s", "SYNC MiB/s", "ratio"):
            table.add_column(column, justify="right")
        for row in figures["throughput"]:
            table.add_row(
                str(row["size_mib"]),
                str(row["repeats"]),
                _fmt(row["raw_copy_ms"], 1),
                _fmt(row["sync_report_ms"], 1),
                _fmt(row["raw_mib_s"], 0),
                _fmt(row["sync_mib_s"], 0),
                _fmt(row["ratio"], 3),
            )
        console.print(table)
    if "metrics" in figures:
        table = Table(title="Metrics-only reports (target: cost per report 64 vs 8 ranks <= 1.5x)")
        for column in (
            "ranks",
            "reports/rank",
            "per s per rank",
            "per s total",
            "cost/report us",
            "median ms",
            "p99 ms",
        ):
            table.add_column(column, justify="right")
        for row in figures["metrics"]:
            table.add_row(
                str(row["ranks"]),
                str(row["reports_per_rank"]),
                _fmt(row["reports_per_s_per_rank"], 0),
                _fmt(row["reports_per_s_total"], 0),
                _fmt(row["cost_per_report_us"], 1),
                _fmt(row["blocked_median_ms"], 3),
                _fmt(row["blocked_p99_ms"], 3),
            )
        console.print(table)
        last = figures["metrics"][-1]
        if "cost_ratio_vs_first" in last:
            console.print(
                f"cost per report, {last['ranks']} vs {figures['metrics'][0]['ranks']} ranks: "
                f"{last['cost_ratio_vs_first']:.2f}x"
            )
    if "memory" in figures:
        runs = figures["memory"]
        table = Table(
            title=f"Memory and snapshot backlog over {runs[0]['reports']:,} reports (an ASYNC checkpoint every 10th)"
        )
        table.add_column("reports", justify="right")
        for run in runs:
            keep = _keep_label(run["num_to_keep"])
            table.add_column(f"RSS MiB ({keep})", justify="right")
            table.add_column(f"backlog KiB ({keep})", justify="right")
        for position, sample in enumerate(runs[0]["samples"]):
            cells = [str(sample["reports"])]
            for run in runs:
                row = run["samples"][position]
                cells += [_fmt(row["rss_mib"], 1), _fmt(row["backlog"] / 1024, 0)]
            table.add_row(*cells)
        console.print(table)
        for run in runs:
            growth = run["rss_mib_at_end"] - run["rss_mib_at_first_sample"]
            console.print(
                f"RSS growth after the first sample, {_keep_label(run['num_to_keep'])}: {growth:.1f} MiB "
                f"({run['rss_growth_mib_per_1k']:.2f} MiB per 1k reports; "
                f"{run['rss_growth_mib_per_1k_second_half']:.2f} over the second half; "
                f"{run['checkpoints_in_result']:,} checkpoints in the result)"
            )


def _keep_label(num_to_keep: int | None) -> str:
    return "keep all" if num_to_keep is None else f"keep {num_to_keep}"


def run(args: argparse.Namespace) -> int:
    options = parse_storage_options(args.storage_option)
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = set(sections) - {"memory", "blocked", "throughput", "metrics"}
    if unknown:
        raise ValueError(f"unknown bench sections {sorted(unknown)}")
    sizes = _ints(args.sizes, (16, 256))
    rank_counts = _ints(args.ranks, (1, 2, 8))
    temporary = None
    storage = args.storage
    if storage is None:
        temporary = tempfile.mkdtemp(prefix="statemachine-bench-storage-")
        storage = temporary
    if args.reports is not None and args.reports < 1:
        raise ValueError(f"--reports must be >= 1, got {args.reports}")
    if args.step_ms < 0:
        raise ValueError(f"--step-ms must be >= 0, got {args.step_ms}")
    bench = Bench(storage, options, args.backend, args.quick, args.reports, args.step_ms)
    started = time.perf_counter()
    figures: dict[str, Any] = {
        "storage": storage,
        "backend": args.backend,
        "quick": args.quick,
        "step_ms": args.step_ms,
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
    }
    try:
        # Memory first: the peak RSS of this process is not yet raised by the large sections.
        if "memory" in sections:
            figures["memory"] = [bench.memory(num_to_keep) for num_to_keep in MEMORY_KEEP]
        if "blocked" in sections:
            figures["blocked"] = bench.blocked(sizes, rank_counts)
        if "throughput" in sections:
            figures["throughput"] = bench.throughput(sizes)
        if "metrics" in sections:
            figures["metrics"] = bench.metrics()
    finally:
        bench.close()
        if temporary is not None:
            shutil.rmtree(temporary, ignore_errors=True)
    figures["seconds"] = time.perf_counter() - started
    if args.json:
        print(json.dumps(figures, indent=1))
    else:
        print_tables(figures)
    return 0
