"""Run statistics computed from the reports: counts, bytes, upload and blocked times.

``Result.stats`` is :func:`run_stats` of the last attempt's reports, plus what the controller
knows (commits, checkpoints kept and deleted by retention) and the attempt's wall time. All
times are seconds; summaries are ``{"count", "mean", "p50", "p99"}`` with NaN where there is
nothing to summarise. ``blocked_s`` is the time ``report()`` held the training loop, by mode;
``blocked_checkpoint_s`` is the same for reports that carried a checkpoint only (metrics-only
reports are nearly free and would hide the cost of a mode). ``upload_s`` runs from taking an
upload slot to the finished upload (retries and back-off included); ``upload_MiBps`` is each
upload's bytes over that time, ``throughput_MiBps`` all bytes over all upload time.
"""

from __future__ import annotations

import math
import statistics
from collections import Counter
from collections.abc import Iterable
from typing import Any

from .result import ReportInfo

__all__ = ["format_stats", "percentile", "run_stats", "summary"]


def percentile(values: list[float], q: float) -> float:
    """The ``q``-th percentile (0..100) by nearest rank; NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def summary(values: list[float]) -> dict[str, float]:
    """Count, mean, median and p99 of ``values`` (NaN where there are none)."""
    return {
        "count": float(len(values)),
        "mean": statistics.fmean(values) if values else math.nan,
        "p50": percentile(values, 50),
        "p99": percentile(values, 99),
    }


MIB = 1024 * 1024


def run_stats(
    reports: Iterable[ReportInfo],
    *,
    commits: int | None = None,
    checkpoints_kept: int | None = None,
    checkpoints_deleted: int | None = None,
    elapsed_s: float | None = None,
) -> dict[str, Any]:
    """Counts by state and by mode, bytes uploaded, upload time and blocked time per mode.

    One pass over ``reports``: ``Result.reports`` builds each report as it is read.
    """
    count = 0
    by_state: Counter[str] = Counter()
    by_mode: Counter[str] = Counter()
    blocked: dict[str, list[float]] = {}
    blocked_checkpoint: dict[str, list[float]] = {}
    uploads: list[float] = []
    speeds: list[float] = []
    uploaded = all_bytes = retries = 0.0
    for report in reports:
        count += 1
        by_state[report.state.name] += 1
        by_mode[report.mode.name] += 1
        timings = report.timings
        all_bytes += timings.get("bytes", 0.0)
        retries += timings.get("retries", 0.0)
        if "blocked_s" in timings:
            blocked.setdefault(report.mode.name, []).append(timings["blocked_s"])
            if report.checkpoint_dir is not None:
                blocked_checkpoint.setdefault(report.mode.name, []).append(timings["blocked_s"])
        if "upload_s" in timings:
            uploads.append(timings["upload_s"])
            uploaded += timings.get("bytes", 0.0)
            if timings["upload_s"] > 0:
                speeds.append(timings.get("bytes", 0.0) / MIB / timings["upload_s"])
    extra: dict[str, Any] = {
        "upload_MiBps": summary(speeds),
        "throughput_MiBps": uploaded / MIB / sum(uploads) if sum(uploads) > 0 else math.nan,
        "blocked_checkpoint_s": {mode: summary(values) for mode, values in sorted(blocked_checkpoint.items())},
    }
    for key, value in (
        ("commits", commits),
        ("checkpoints_kept", checkpoints_kept),
        ("checkpoints_deleted", checkpoints_deleted),
        ("elapsed_s", elapsed_s),
    ):
        if value is not None:
            extra[key] = value
    return {
        "reports": count,
        "by_state": dict(by_state),
        "by_mode": dict(by_mode),
        "bytes_uploaded": int(all_bytes),
        "upload_s": summary(uploads),
        "retries": int(retries),
        "blocked_s": {mode: summary(values) for mode, values in sorted(blocked.items())},
    } | extra


def format_stats(stats: dict[str, Any]) -> str:
    """One readable paragraph of :func:`run_stats` for the log."""

    def ms(values: dict[str, float]) -> str:
        return f"p50 {values['p50'] * 1e3:.2f} ms, p99 {values['p99'] * 1e3:.2f} ms"

    lines = [
        f"reports {stats['reports']} by state {stats['by_state']} by mode {stats['by_mode']}",
        f"uploaded {stats['bytes_uploaded'] / MIB:.1f} MiB; upload time mean {stats['upload_s']['mean']:.3f} s, "
        f"p50 {stats['upload_s']['p50']:.3f} s, p99 {stats['upload_s']['p99']:.3f} s; "
        f"throughput {stats['throughput_MiBps']:.1f} MiB/s; retries {stats['retries']}",
        "blocked in report(): "
        + ("; ".join(f"{mode} {ms(values)}" for mode, values in stats["blocked_s"].items()) or "no reports"),
    ]
    if "commits" in stats:
        lines.append(
            f"commits {stats['commits']}; checkpoints kept {stats.get('checkpoints_kept')}, "
            f"deleted by retention {stats.get('checkpoints_deleted')}"
        )
    if "elapsed_s" in stats:
        lines.append(f"elapsed {stats['elapsed_s']:.2f} s")
    return "\n  ".join(lines)
