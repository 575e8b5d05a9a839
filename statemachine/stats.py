"""Run statistics computed from the reports: counts, bytes, upload and blocked times."""

from __future__ import annotations

import math
import statistics
from collections import Counter
from collections.abc import Iterable
from typing import Any

from .result import ReportInfo

__all__ = ["percentile", "run_stats", "summary"]


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


def run_stats(reports: Iterable[ReportInfo]) -> dict[str, Any]:
    """Counts by state and by mode, bytes uploaded, upload time and blocked time per mode."""
    reports = list(reports)
    blocked: dict[str, list[float]] = {}
    for report in reports:
        if "blocked_s" in report.timings:
            blocked.setdefault(report.mode.name, []).append(report.timings["blocked_s"])
    uploads = [r.timings["upload_s"] for r in reports if "upload_s" in r.timings]
    return {
        "reports": len(reports),
        "by_state": dict(Counter(r.state.name for r in reports)),
        "by_mode": dict(Counter(r.mode.name for r in reports)),
        "bytes_uploaded": int(sum(r.timings.get("bytes", 0.0) for r in reports)),
        "upload_s": summary(uploads),
        "retries": int(sum(r.timings.get("retries", 0.0) for r in reports)),
        "blocked_s": {mode: summary(values) for mode, values in sorted(blocked.items())},
    }
