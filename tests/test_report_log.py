"""``Result.reports``: the ranks' compact report logs and the sorted, read-only view over them."""

from __future__ import annotations

import pickle
from typing import Any

import pytest

import statemachine as sm
from statemachine.result import ReportLog, Reports, ReportTimings

ASYNC, SYNC = sm.CheckpointUploadMode.ASYNC, sm.CheckpointUploadMode.SYNC
REPORTED, FAILED = sm.ReportState.REPORTED, sm.ReportState.FAILED


def _timings(**values: float) -> ReportTimings:
    timings = ReportTimings()
    for name, value in values.items():
        setattr(timings, name, value)
    return timings


def _log(rank: int, count: int, first_index: int = 0) -> ReportLog:
    log = ReportLog(rank, first_index)
    for position in range(count):
        index = first_index + position
        log.add(index, SYNC, REPORTED, None, _timings(blocked_s=0.5), f"checkpoint_{index:06d}")
    return log


def test_a_report_reads_back_as_it_was_added() -> None:
    log = ReportLog(3, 5)
    error = RuntimeError("disk full")
    log.add(5, ASYNC, FAILED, error, _timings(blocked_s=0.25, upload_s=1.5, bytes=4096.0, retries=2.0), "mine/x")
    log.add(6, SYNC, REPORTED, None, _timings(blocked_s=0.125), None)
    log.add(7, ASYNC, REPORTED, None, _timings(upload_s=2.0, blocked_s=0.0), "checkpoint_000007")
    first, second, third = log
    assert first == sm.ReportInfo(
        rank=3,
        index=5,
        mode=ASYNC,
        state=FAILED,
        error=error,
        timings={"blocked_s": 0.25, "upload_s": 1.5, "bytes": 4096.0, "retries": 2.0},
        checkpoint_dir="mine/x",
    )
    assert second.timings == {"blocked_s": 0.125} and second.checkpoint_dir is None and second.error is None
    assert third.checkpoint_dir == "checkpoint_000007" and third.timings == {"blocked_s": 0.0, "upload_s": 2.0}
    assert log.has_errors


def test_reports_must_be_added_in_index_order() -> None:
    log = _log(0, 2)
    with pytest.raises(ValueError, match="report 5 added out of order \\(expected 2\\)"):
        log.add(5, SYNC, REPORTED, None, ReportTimings(), None)


def test_blocked_time_written_after_the_hand_off_is_read_and_a_copy_is_unaffected_by_later_reports() -> None:
    log = ReportLog(0, 0)
    late = ReportTimings()  # report() has not returned yet when the report is handed off
    log.add(0, SYNC, REPORTED, None, late, None)
    copy = log.copy()
    late.blocked_s = 0.75
    assert log.info(0).timings == {"blocked_s": 0.75}
    log.add(1, SYNC, REPORTED, None, _timings(blocked_s=0.5), None)
    assert len(copy) == 1 and len(log) == 2
    assert copy.info(0).timings == {"blocked_s": 0.75}  # the copy shares the unfinished timings
    unpickled = pickle.loads(pickle.dumps(log))
    assert list(unpickled) == list(log)


def test_reports_are_sorted_by_index_then_rank_also_when_ranks_made_different_numbers() -> None:
    logs = [_log(2, 1, 10), _log(0, 3, 10), _log(1, 0, 10), _log(3, 2, 10)]
    reports = Reports(logs)
    expected = [(10, 0), (10, 2), (10, 3), (11, 0), (11, 3), (12, 0)]
    assert [(r.index, r.rank) for r in reports] == expected
    assert len(reports) == 6
    assert [(reports[i].index, reports[i].rank) for i in range(6)] == expected  # indexing agrees with iteration
    assert (reports[-1].index, reports[-1].rank) == (12, 0)
    assert [(r.index, r.rank) for r in reports[1:5:2]] == [(10, 2), (11, 0)]
    with pytest.raises(IndexError, match="position 6 out of range"):
        reports[6]
    assert reports == list(reports) and reports != list(reports)[:-1]
    assert Reports([]) == [] and len(Reports([ReportLog(0, 0)])) == 0


def test_logs_of_different_attempts_cannot_be_mixed() -> None:
    with pytest.raises(ValueError, match="start at different indices"):
        Reports([_log(0, 1, 0), _log(1, 1, 4)])


def _train(config: dict[str, Any]) -> None:
    rank = sm.get_context().world_rank
    for step in range(config["steps"] + rank):  # rank 1 reports once more: the run fails
        sm.report({"step": step})


def test_a_run_returns_every_report_of_every_rank(memory_url: str) -> None:
    trainer = sm.Trainer(
        _train,
        train_loop_config={"steps": 3},
        scaling_config=sm.ScalingConfig(num_workers=2),
        run_config=sm.RunConfig(storage_path=memory_url, name="log"),
    )
    with pytest.raises(sm.TrainingFailedError) as caught:
        trainer.fit()
    reports = caught.value.result.reports
    assert [(r.index, r.rank) for r in reports] == [(0, 0), (0, 1), (1, 0), (1, 1), (2, 0), (2, 1), (3, 1)]
    assert all(r.state is REPORTED and "blocked_s" in r.timings for r in reports)
