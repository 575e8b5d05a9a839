"""``python -m statemachine bench``: every section runs and reports figures that fit together.

The figures themselves are not judged here (the machine is shared and noisy); the targets are
read off the command's output, never asserted by a timed test.
"""

from __future__ import annotations

import json
import os

import pytest

from statemachine.bench import parse_storage_options
from statemachine.cli import main

pytestmark = pytest.mark.timeout(120)


def test_bench_runs_every_section_on_local_storage_and_prints_consistent_json(
    tmp_path: object, capsys: pytest.CaptureFixture[str]
) -> None:
    storage = os.path.join(str(tmp_path), "storage")
    code = main(
        ["bench", "--storage", storage, "--sizes", "1", "--ranks", "1,2", "--reports", "20", "--step-ms", "1", "--json"]
    )

    figures = json.loads(capsys.readouterr().out)
    assert code == 0
    assert figures["step_ms"] == 1.0
    blocked = {(row["mode"], row["ranks"]): row for row in figures["blocked"]}
    assert set(blocked) == {(m, r) for m in ("SYNC", "ASYNC", "NO_UPLOAD", "metrics-only") for r in (1, 2)}
    assert blocked[("ASYNC", 2)]["reports"] == 40  # every report of every rank is counted
    assert all(0 <= row["median_ms"] <= row["p99_ms"] <= row["max_ms"] for row in figures["blocked"])
    (throughput,) = figures["throughput"]
    assert throughput["repeats"] == 20 and throughput["ratio"] > 0
    assert [row["ranks"] for row in figures["metrics"]] == [8, 64]
    assert figures["metrics"][1]["cost_ratio_vs_first"] > 0
    kept = {run["num_to_keep"]: run for run in figures["memory"]}
    assert set(kept) == {2, None}
    for run in kept.values():
        assert run["reports"] == run["reports_in_result"] == 200
        assert [s["reports"] for s in run["samples"]] == list(range(20, 201, 20))
    assert kept[2]["checkpoints_in_result"] == 2 and kept[None]["checkpoints_in_result"] == 20
    assert os.listdir(storage) == []  # every run folder and raw copy is removed


def test_storage_options_parse_values_and_route_the_endpoint_to_client_kwargs() -> None:
    options = parse_storage_options(["endpoint_url=http://127.0.0.1:9000", "anon=false", "max_concurrency=2"])

    assert options == {"client_kwargs": {"endpoint_url": "http://127.0.0.1:9000"}, "anon": False, "max_concurrency": 2}
    with pytest.raises(ValueError, match="KEY=VALUE"):
        parse_storage_options(["endpoint_url"])
