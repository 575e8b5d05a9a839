"""``bench-ray``: the command runs and reports what it measured (its figures are not judged here)."""

from __future__ import annotations

import json
import math

import pytest

from statemachine.bench_ray import BenchRow, ratios
from statemachine.cli import main


def test_bench_ray_quick_on_the_local_backend_prints_one_row_per_job_as_json(
    capsys: pytest.CaptureFixture[str], tmp_path: object
) -> None:
    code = main(["bench-ray", "--quick", "--systems", "local", "--json", "--workdir", str(tmp_path)])

    data = json.loads(capsys.readouterr().out)
    assert code == 0
    assert [(r["system"], r["mode"], r["size_mib"], r["reports"]) for r in data["rows"]] == [
        ("local", "metrics", 0, 6),
        ("local", "ASYNC", 1, 6),
    ]
    assert all(0 <= r["blocked_median_ms"] <= r["blocked_p99_ms"] and r["fit_s"] > 0 for r in data["rows"])
    assert data["ratios"] == []  # no Ray Train row to compare with


def test_ratios_divide_each_of_our_rows_by_ray_train_for_the_same_mode_and_size() -> None:
    rows = [
        BenchRow("raytrain", "ASYNC", 16, 20, 100.0, 400.0, 20.0),
        BenchRow("ray", "ASYNC", 16, 20, 1.0, 8.0, 8.0),
        BenchRow("local", "ASYNC", 256, 20, 1.0, 2.0, 5.0),
        BenchRow("raytrain", "metrics", 0, 20, 0.0, 0.0, 10.0),
        BenchRow("local", "metrics", 0, 20, 0.5, 0.7, 5.0),
    ]

    result = ratios(rows)

    assert result[0] == {
        "system": "ray",
        "mode": "ASYNC",
        "size_mib": 16,
        "blocked_median": 0.01,
        "blocked_p99": 0.02,
        "fit": 0.4,
    }
    assert [(r["system"], r["mode"]) for r in result] == [("ray", "ASYNC"), ("local", "metrics")]
    assert math.isnan(result[1]["blocked_median"]) and result[1]["fit"] == 0.5
