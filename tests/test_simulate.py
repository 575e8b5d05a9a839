"""``python -m statemachine simulate``: runs with injected faults, then the invariant check.

The checker itself is tested against broken storage and broken records, so that "no
violations" means something.
"""

from __future__ import annotations

import json
import os
from typing import Any

import pytest

from statemachine import cli
from statemachine.faults import InjectedCrash
from statemachine.simulate import (
    MODES,
    RunOutcome,
    SimulationConfig,
    _check_record,
    _check_storage,
    _Recorder,
    simulate,
)
from statemachine.storage import MARKER_NAME


def small(tmp_path: Any, **overrides: Any) -> SimulationConfig:
    values: dict[str, Any] = {
        "ranks": 2,
        "reports": 4,
        "seeds": 2,
        "seed": 11,
        "error_rate": 0.1,
        "hang_rate": 0.02,
        "crash_rate": 0.05,
        "partial_write_rate": 0.05,
        "hang_s": 0.5,
        "attempt_timeout_s": 0.15,
        "size_kib": 8,
        "storage": str(tmp_path / "sim"),
    }
    values.update(overrides)
    return SimulationConfig(**values)


def test_simulated_runs_with_faults_in_every_mode_break_no_invariant(tmp_path: Any) -> None:
    outcomes = simulate(small(tmp_path))
    assert [(o.mode, o.seed) for o in outcomes] == [(m, s) for s in (11, 12) for m in MODES]
    for outcome in outcomes:
        assert outcome.violations == 0, (outcome.partial_commits, outcome.lost_reports, outcome.order_violations)
        assert outcome.finished or outcome.failed
    assert sum(sum(o.injected.values()) for o in outcomes) > 0
    assert sum(o.retries for o in outcomes) > 0
    assert sum(o.committed for o in outcomes) > 0


def test_without_attempt_timeouts_sync_first_attempts_run_in_the_training_thread_and_break_nothing(
    tmp_path: Any,
) -> None:
    # No timeout: a SYNC report's first attempt is made by the training thread itself, through
    # the same faults (hangs are bounded by ``hang_s`` and waited out).
    outcomes = simulate(small(tmp_path, attempt_timeout_s=None, hang_s=0.2, modes=("sync", "mixed")))
    for outcome in outcomes:
        assert outcome.violations == 0, (outcome.partial_commits, outcome.lost_reports, outcome.order_violations)
        assert outcome.finished or outcome.failed
    assert sum(o.retries for o in outcomes) > 0 and sum(o.committed for o in outcomes) > 0


def test_same_seed_injects_the_same_faults(tmp_path: Any) -> None:
    config = small(tmp_path, seeds=1, hang_rate=0.0, crash_rate=0.0, modes=("async",))
    first = simulate(config)[0]
    second = simulate(config)[0]
    assert first.injected == second.injected and sum(first.injected.values()) > 0
    assert first.retries == second.retries


def test_simulate_command_prints_the_table_and_exits_zero(tmp_path: Any, capsys: pytest.CaptureFixture[str]) -> None:
    code = cli.main(
        [
            "simulate",
            "--ranks",
            "2",
            "--reports",
            "3",
            "--seeds",
            "1",
            "--modes",
            "mixed,sync",
            "--hang-s",
            "0.5",
            "--attempt-timeout",
            "none",
            "--size-kib",
            "4",
            "--storage",
            str(tmp_path / "sim"),
        ]
    )
    out = capsys.readouterr().out
    assert code == 0
    for column in ("runs", "hangs", "partial commits", "lost reports", "retries", "failures"):
        assert column in out
    assert "mixed" in out and "sync" in out and "total" in out


def test_simulate_rejects_an_unknown_mode() -> None:
    with pytest.raises(ValueError, match="unknown modes"):
        SimulationConfig(modes=("sometimes",))


def test_checker_finds_a_truncated_file_and_an_unlisted_file_in_a_commit(tmp_path: Any) -> None:
    config = small(
        tmp_path,
        seeds=1,
        modes=("sync",),
        error_rate=0.0,
        hang_rate=0.0,
        crash_rate=0.0,
        partial_write_rate=0.0,
        enospc_rate=0.0,
    )
    [clean] = simulate(config)
    assert clean.violations == 0
    run_root = os.path.join(config.storage, "sim-sync-11")
    folder = os.path.join(run_root, "checkpoint_000001")
    with open(os.path.join(folder, MARKER_NAME)) as handle:
        assert json.load(handle)["index"] == 1
    weights = os.path.join(folder, "rank_0", "weights.bin")
    with open(weights, "r+b") as handle:
        handle.truncate(100)
    with open(os.path.join(folder, "rank_1", "stray.bin"), "wb") as handle:
        handle.write(b"not in the manifest")
    outcome = RunOutcome("sync", 11)
    _check_storage(outcome, config, run_root)
    assert any("rank_0/weights.bin does not match its manifest" in p for p in outcome.partial_commits)
    assert any("unlisted file rank_1/stray.bin" in p for p in outcome.partial_commits)


def test_checker_finds_lost_reports_and_out_of_order_hand_offs(tmp_path: Any) -> None:
    recorder = _Recorder(str(tmp_path))
    recorder.report_returned(0, 3)
    recorder.handed_off = {0: [0, 2, 1]}
    recorder.commits = [0, 2, 1]
    outcome = RunOutcome("async", 0)
    _check_record(outcome, recorder, [])
    assert outcome.lost_reports == ["rank 0 report 3 returned from report() but is not in the result"]
    assert any("rank 0 handed off [0, 2, 1]" in v for v in outcome.order_violations)
    assert any("commits out of order" in v for v in outcome.order_violations)
    assert outcome.violations == 3


def test_injected_crash_is_a_base_exception_that_retries_leave_alone() -> None:
    assert not issubclass(InjectedCrash, Exception)


def test_crash_injector_with_a_memory_file_does_not_crash_a_replacement_process_at_the_same_place(
    tmp_path: Any,
) -> None:
    import pickle

    from statemachine.faults import CrashInjector

    memory = str(tmp_path / "crashes.txt")
    original = CrashInjector(seed=3, rate=1.0, memory_file=memory)
    first_process, replacement = pickle.loads(pickle.dumps(original)), pickle.loads(pickle.dumps(original))
    with pytest.raises(InjectedCrash):
        first_process.maybe_crash(1, 4)
    replacement.maybe_crash(1, 4)  # the copy a new actor gets: it has heard of the crash
    with pytest.raises(InjectedCrash):
        replacement.maybe_crash(1, 5)
    forgetful = pickle.loads(pickle.dumps(CrashInjector(seed=3, rate=1.0)))
    with pytest.raises(InjectedCrash):
        forgetful.maybe_crash(1, 4)  # without the file each process crashes at the same place again
