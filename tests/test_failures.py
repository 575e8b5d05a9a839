"""Failure handling: retries, timeouts, failure policies, restarts, BaseExceptions, cleanup.

The fault matrix runs every injected fault against every upload mode on the real runtime,
with storage reached through ``faulty://`` (statemachine.faults) over real local files, each
under a deadline (``run_trio``). Hangs are real blocked threads, so the tests that time them
out use short real per-attempt timeouts, still bounded by ``fail_after``.
"""

from __future__ import annotations

import concurrent.futures
import errno
import json
import logging
import os
import posixpath
import re
import tempfile
import threading
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import crc32c
import fsspec
import pytest
import trio

import statemachine as sm
from statemachine.faults import CrashInjector, FaultPlan, FaultyFileSystem, InjectedCrash, plan_options
from statemachine.result import ReportTimings
from statemachine.storage import MARKER_NAME, STAGING_NAME, RunStorage
from statemachine.upload import (
    AttemptAbandonedError,
    AttemptTimeoutError,
    UploadJob,
    _Attempt,
    _PublishLock,
    upload_report,
    wait_for_attempt_threads,
)
from tests.conftest import run_trio

SYNC = sm.CheckpointUploadMode.SYNC
ASYNC = sm.CheckpointUploadMode.ASYNC
NO_UPLOAD = sm.CheckpointUploadMode.NO_UPLOAD
MODES = ("sync", "async", "no_upload", "mixed")
UPLOAD_PATHS = r"/\.staging/|/rank_\d+(/|$)"
RANKS = 2
REPORTS = 3


class CustomCrash(BaseException):
    """A BaseException that is neither KeyboardInterrupt nor SystemExit."""


def data_for(rank: int, step: int) -> bytes:
    return f"rank {rank} step {step} ".encode() * 50


def mode_for(mode: str, rank: int, step: int) -> sm.CheckpointUploadMode:
    if mode == "mixed":
        return (SYNC, ASYNC, NO_UPLOAD)[(rank + step) % 3]
    return {"sync": SYNC, "async": ASYNC, "no_upload": NO_UPLOAD}[mode]


def make_train(
    mode: str,
    *,
    catch: bool = False,
    before_report: Callable[[int, int], None] | None = None,
    resumed: list[tuple[int, str | None]] | None = None,
) -> Callable[[dict[str, Any]], None]:
    """A training function reporting a small real checkpoint every step in the given mode."""

    def train(config: dict[str, Any]) -> None:
        ctx = sm.get_context()
        rank = ctx.world_rank
        start = sm.get_checkpoint()
        first = 0 if start is None else int(posixpath.basename(start.path).rsplit("_", 1)[1]) + 1
        if resumed is not None:
            resumed.append((rank, None if start is None else start.path))
        for step in range(first, config.get("reports", REPORTS)):
            if before_report is not None:
                before_report(rank, step)
            report_mode = mode_for(mode, rank, step)
            try:
                if report_mode is NO_UPLOAD:
                    target = ctx.next_checkpoint_path()
                    with fsspec.open(f"{target}/weights.bin", "wb", auto_mkdir=True) as handle:
                        handle.write(data_for(rank, step))
                    sm.report({"step": step}, checkpoint=sm.Checkpoint(target), checkpoint_upload_mode=report_mode)
                    continue
                with tempfile.TemporaryDirectory() as local:
                    with open(os.path.join(local, "weights.bin"), "wb") as handle:
                        handle.write(data_for(rank, step))
                    sm.report(
                        {"step": step},
                        checkpoint=sm.Checkpoint.from_directory(local),
                        checkpoint_upload_mode=report_mode,
                    )
            except (sm.ReportFailedError, sm.RunAbortedError):
                if not catch:
                    raise

    return train


@pytest.fixture
def faulty_root(tmp_path: Any) -> Iterator[str]:
    yield str(tmp_path / "storage")


def faulty_config(
    root: str,
    plan: FaultPlan,
    *,
    name: str = "run",
    retry: sm.RetryPolicy | None = None,
    on_failure: str = "raise",
    max_failures: int = 0,
    drain_timeout_s: float = 30.0,
) -> tuple[sm.RunConfig, FaultyFileSystem]:
    fault_name = f"test-{uuid.uuid4().hex}"
    options = plan_options(plan, "file", fault_name)
    run_config = sm.RunConfig(
        storage_path=f"faulty://{root}",
        storage_options=options,
        name=name,
        failure_config=sm.FailureConfig(max_failures=max_failures),
        upload_config=sm.UploadConfig(
            retry=retry or sm.RetryPolicy(max_attempts=4, initial_backoff_s=0.01, jitter=0.01),
            on_failure=on_failure,  # type: ignore[arg-type]
            drain_timeout_s=drain_timeout_s,
        ),
    )
    return run_config, FaultyFileSystem(**options)


def fit(train: Callable[..., Any], run_config: sm.RunConfig, ranks: int = RANKS) -> sm.Result:
    trainer = sm.Trainer(
        train,
        train_loop_config={"reports": REPORTS},
        scaling_config=sm.ScalingConfig(num_workers=ranks),
        run_config=run_config,
    )
    return run_trio(trainer.fit_async)


def fit_failing(train: Callable[..., Any], run_config: sm.RunConfig, ranks: int = RANKS) -> sm.TrainingFailedError:
    with pytest.raises(sm.TrainingFailedError) as info:
        fit(train, run_config, ranks)
    return info.value


def assert_committed_intact(root: str, name: str = "run") -> list[int]:
    """Every committed checkpoint matches its manifest byte for byte and holds no other file."""
    run_root = os.path.join(root, name)
    indices = []
    for folder in sorted(os.listdir(run_root)):
        marker = os.path.join(run_root, folder, MARKER_NAME)
        if not os.path.isfile(marker):
            continue
        with open(marker) as handle:
            manifest = json.load(handle)
        indices.append(manifest["index"])
        listed = {MARKER_NAME}
        for part in manifest["parts"]:
            for entry in part["files"]:
                path = os.path.join(run_root, part["path"], entry["path"])
                with open(path, "rb") as handle:
                    data = handle.read()
                assert len(data) == entry["size"], path
                assert f"{crc32c.crc32c(data):08x}" == entry["crc32c"], path
                assert data == data_for(part["rank"], manifest["index"]), path
                listed.add(os.path.relpath(path, os.path.join(run_root, folder)))
        present = {
            os.path.relpath(os.path.join(r, f), os.path.join(run_root, folder))
            for r, _, files in os.walk(os.path.join(run_root, folder))
            for f in files
        }
        assert {p for p in present if not p.startswith(STAGING_NAME)} == listed, folder
    return indices


def upload_ops(mode: str) -> tuple[str, ...]:
    """The operations a mode's reports do on storage: writes for uploads, reads for NO_UPLOAD."""
    return ("read", "find") if mode == "no_upload" else ("write", "mv")


# -- the fault matrix -----------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_no_faults_commits_every_report_without_retries(mode: str, faulty_root: str) -> None:
    run_config, fs = faulty_config(faulty_root, FaultPlan(seed=1))
    result = fit(make_train(mode), run_config)
    assert result.committed_indices == list(range(REPORTS))
    assert result.stats["retries"] == 0
    assert assert_committed_intact(faulty_root) == list(range(REPORTS))
    assert fs.injected == {}


@pytest.mark.parametrize("mode", MODES)
def test_ten_percent_errors_are_absorbed_by_retries(mode: str, faulty_root: str) -> None:
    plan = FaultPlan(seed=1, error_rate=0.1, partial_write_rate=0.1, path_pattern=UPLOAD_PATHS)
    run_config, fs = faulty_config(faulty_root, plan, retry=sm.RetryPolicy(max_attempts=8, initial_backoff_s=0.01))
    result = fit(make_train(mode), run_config)
    assert result.committed_indices == list(range(REPORTS))
    assert assert_committed_intact(faulty_root) == list(range(REPORTS))
    assert 0 < result.stats["retries"] <= sum(fs.injected.values())


@pytest.mark.parametrize("mode", MODES)
def test_fifty_percent_errors_fail_reports_that_are_then_not_committed(mode: str, faulty_root: str) -> None:
    plan = FaultPlan(seed=5, error_rate=0.5, operations=upload_ops(mode), path_pattern=UPLOAD_PATHS)
    run_config, _ = faulty_config(
        faulty_root, plan, retry=sm.RetryPolicy(max_attempts=2, initial_backoff_s=0.01), on_failure="continue"
    )
    result = fit(make_train(mode), run_config)
    states = {(r.rank, r.index): r.state for r in result.reports}
    assert len(states) == RANKS * REPORTS and all(s.terminal for s in states.values())
    failed_indices = {i for (_, i), s in states.items() if s is sm.ReportState.FAILED}
    assert failed_indices, "a 50% error rate with 2 attempts should fail some report"
    assert set(result.committed_indices) == set(range(REPORTS)) - failed_indices
    assert assert_committed_intact(faulty_root) == sorted(set(range(REPORTS)) - failed_indices)
    for report in result.reports:
        if report.state is sm.ReportState.FAILED:
            assert isinstance(report.error, OSError) and "injected" in str(report.error)


@pytest.mark.parametrize("mode", MODES)
def test_hung_attempt_times_out_and_the_retry_delivers(mode: str, faulty_root: str) -> None:
    plan = FaultPlan(
        seed=0, hang_rate=1.0, hang_s=30.0, max_faults=1, operations=upload_ops(mode), path_pattern=UPLOAD_PATHS
    )
    retry = sm.RetryPolicy(max_attempts=3, initial_backoff_s=0.01, attempt_timeout_s=0.2)
    run_config, fs = faulty_config(faulty_root, plan, retry=retry)
    try:
        result = fit(make_train(mode), run_config)
    finally:
        fs.release_hangs()
    assert wait_for_attempt_threads(10.0)
    assert fs.injected == {"hang": 1}
    assert result.committed_indices == list(range(REPORTS))
    assert result.stats["retries"] == 1
    assert assert_committed_intact(faulty_root) == list(range(REPORTS))


@pytest.mark.parametrize("mode", MODES)
def test_crash_mid_upload_restarts_from_the_latest_committed_checkpoint(mode: str, faulty_root: str) -> None:
    # Crash on the 2nd report's storage operations: report 0 is committed first.
    plan = FaultPlan(
        seed=0, crash_rate=1.0, max_faults=1, operations=upload_ops(mode), path_pattern=r"checkpoint_000001/"
    )
    run_config, _ = faulty_config(faulty_root, plan, max_failures=1)
    resumed: list[tuple[int, str | None]] = []
    result = fit(make_train(mode, resumed=resumed), run_config)
    assert len(result.failures) == 1
    failure = result.failures[0]
    assert isinstance(failure.__cause__, InjectedCrash)
    assert "report 1" in str(failure)
    first = failure.result
    assert first is not None and 1 not in first.committed_indices
    # Index 0 is committed unless the other rank was stopped before it even reported it (its
    # report() then raises RunAbortedError); ASYNC reports may also commit index 2 while draining.
    latest = int(first.checkpoint.path[-6:]) if first.checkpoint is not None else -1
    restarted = [path for _, path in resumed[RANKS:]]
    expected_start = first.checkpoint.path if first.checkpoint is not None else None
    assert len(restarted) == RANKS and all(p == expected_start for p in restarted)
    assert result.committed_indices == list(range(latest + 1, REPORTS))
    assert assert_committed_intact(faulty_root) == sorted({*first.committed_indices, *result.committed_indices})


@pytest.mark.parametrize("mode", MODES)
def test_disk_full_exhausts_the_attempts_and_fails_the_run_naming_rank_and_index(mode: str, faulty_root: str) -> None:
    plan = FaultPlan(seed=0, enospc_rate=1.0, operations=upload_ops(mode), path_pattern=UPLOAD_PATHS)
    retry = sm.RetryPolicy(max_attempts=3, initial_backoff_s=0.01)
    run_config, fs = faulty_config(faulty_root, plan, retry=retry)
    error = fit_failing(make_train(mode), run_config)
    assert isinstance(error.__cause__, OSError) and error.__cause__.errno == errno.ENOSPC
    # Reports of both ranks upload at once, so any of them may be the first to give up.
    assert re.match(r"rank [01], report [0-2] failed: OSError\(28", str(error)), str(error)
    assert error.result is not None and error.result.error is error
    assert all(r.state.terminal for r in error.result.reports)
    assert error.result.committed_indices == []
    assert fs.injected["enospc"] >= 3


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("exception", [KeyboardInterrupt, SystemExit, CustomCrash])
def test_base_exception_in_training_ends_the_run_with_a_clear_error(
    mode: str, exception: type[BaseException], faulty_root: str
) -> None:
    def crash(rank: int, step: int) -> None:
        if rank == 1 and step == 2:
            raise exception("boom")

    run_config, _ = faulty_config(faulty_root, FaultPlan())
    error = fit_failing(make_train(mode, before_report=crash), run_config)
    assert isinstance(error.__cause__, exception)
    assert "rank 1" in str(error) and "after report 1" in str(error)
    assert error.result is not None
    assert all(r.state.terminal for r in error.result.reports)
    # Rank 0 may still be before a report when rank 1 dies; what was committed is intact.
    committed = assert_committed_intact(faulty_root)
    assert committed == error.result.committed_indices and set(committed) <= {0, 1}


@pytest.mark.parametrize("mode", MODES)
def test_caught_failure_then_more_reports_goes_on_under_continue(mode: str, faulty_root: str) -> None:
    plan = FaultPlan(seed=0, error_rate=1.0, max_faults=1, operations=upload_ops(mode), path_pattern=UPLOAD_PATHS)
    run_config, _ = faulty_config(faulty_root, plan, retry=sm.RetryPolicy(max_attempts=1), on_failure="continue")
    result = fit(make_train(mode, catch=True), run_config)
    failed = [r for r in result.reports if r.state is sm.ReportState.FAILED]
    assert len(failed) == 1 and isinstance(failed[0].error, OSError)
    assert failed[0].index not in result.committed_indices
    assert len(result.committed_indices) == REPORTS - 1
    assert result.error is None


@pytest.mark.parametrize("mode", MODES)
def test_caught_failure_then_more_reports_ends_clearly_under_raise(mode: str, faulty_root: str) -> None:
    plan = FaultPlan(seed=0, error_rate=1.0, max_faults=1, operations=upload_ops(mode), path_pattern=UPLOAD_PATHS)
    run_config, _ = faulty_config(faulty_root, plan, retry=sm.RetryPolicy(max_attempts=1))
    error = fit_failing(make_train(mode, catch=True), run_config)
    assert isinstance(error.__cause__, OSError)
    assert error.result is not None and all(r.state.terminal for r in error.result.reports)


# -- retries and attempts, one report at a time ---------------------------------------------


def _local_checkpoint(tmp_path: Any, size: int = 1000) -> str:
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "weights.bin").write_bytes(b"w" * size)
    return str(folder)


def test_backoff_grows_exponentially_up_to_the_maximum(tmp_path: Any) -> None:
    calls: list[float] = []

    def flaky(checkpoint: sm.Checkpoint, dir_name: str) -> sm.Checkpoint:
        calls.append(0.0)
        raise OSError("transient")

    storage = RunStorage(f"file://{tmp_path}/storage", "run")
    policy = sm.RetryPolicy(max_attempts=5, initial_backoff_s=1.0, max_backoff_s=3.0, jitter=0.0)
    job = UploadJob(
        storage, 0, 0, policy, "checkpoint_000000", checkpoint=sm.Checkpoint(str(tmp_path)), upload_fn=flaky
    )
    timings = ReportTimings()

    async def main() -> float:
        start = trio.current_time()
        with pytest.raises(OSError, match="transient"):
            await upload_report(job, timings)
        return trio.current_time() - start

    elapsed = run_trio(main)
    assert len(calls) == 5
    assert timings.retries == 4
    # Waits of 1, 2, 3 (capped), 3 (capped) virtual seconds between the five attempts.
    assert 9.0 <= elapsed < 9.5


def test_each_attempt_is_logged_with_rank_index_attempt_bytes_and_error(
    tmp_path: Any, caplog: pytest.LogCaptureFixture
) -> None:
    plan = FaultPlan(seed=0, error_rate=1.0, max_faults=1, operations=("mv",))
    fs = FaultyFileSystem(target_protocol="file", name=f"log-{uuid.uuid4().hex}", **_plan_kwargs(plan))
    storage = RunStorage(f"file://{tmp_path}/storage", "run")
    storage.fs = fs
    source = _local_checkpoint(tmp_path, 1234)
    job = UploadJob(
        storage, 3, 7, sm.RetryPolicy(initial_backoff_s=0.0, jitter=0.0), "checkpoint_000007", source=source
    )
    timings = ReportTimings()
    with caplog.at_level(logging.INFO, logger="statemachine"):
        part = run_trio(lambda: upload_report(job, timings))
    assert part.bytes == 1234 and timings.retries == 1
    text = caplog.text
    assert "rank 3, report 7: upload attempt 1/3 failed after 1234 bytes" in text and "injected I/O error" in text
    assert "rank 3, report 7: upload attempt 2/3 succeeded: 1234 bytes" in text


def _plan_kwargs(plan: FaultPlan) -> dict[str, Any]:
    options = plan_options(plan)
    del options["target_protocol"], options["name"]
    return options


def test_value_and_type_errors_are_never_retried(tmp_path: Any) -> None:
    calls: list[int] = []

    def bad(checkpoint: sm.Checkpoint, dir_name: str) -> sm.Checkpoint:
        calls.append(1)
        raise ValueError("bad input")

    storage = RunStorage(f"file://{tmp_path}/storage", "run")
    job = UploadJob(
        storage, 0, 0, sm.RetryPolicy(), "checkpoint_000000", checkpoint=sm.Checkpoint(str(tmp_path)), upload_fn=bad
    )
    with pytest.raises(ValueError, match="bad input"):
        run_trio(lambda: upload_report(job, ReportTimings()))
    assert calls == [1]


def test_abandoned_attempt_clears_its_staging_and_never_replaces_the_delivered_part(tmp_path: Any) -> None:
    name = f"abandon-{uuid.uuid4().hex}"
    plan = FaultPlan(seed=0, hang_rate=1.0, hang_s=30.0, max_faults=1, operations=("write",))
    fs = FaultyFileSystem(target_protocol="file", name=name, **_plan_kwargs(plan))
    storage = RunStorage(f"file://{tmp_path}/storage", "run")
    storage.fs = fs
    source = _local_checkpoint(tmp_path)
    policy = sm.RetryPolicy(max_attempts=2, initial_backoff_s=0.0, jitter=0.0, attempt_timeout_s=0.2)
    job = UploadJob(storage, 0, 0, policy, "checkpoint_000000", source=source)
    timings = ReportTimings()
    part = run_trio(lambda: upload_report(job, timings))
    final = os.path.join(storage.root, "checkpoint_000000", "rank_0")
    before = os.stat(os.path.join(final, "weights.bin")).st_mtime_ns
    fs.release_hangs()
    assert wait_for_attempt_threads(10.0)
    assert timings.retries == 1 and part.bytes == 1000
    assert os.stat(os.path.join(final, "weights.bin")).st_mtime_ns == before
    # On a local disk the attempts stage in the run's own folder: no file of either is left there.
    staging = os.path.join(storage.root, STAGING_NAME)
    assert [name for _root, _dirs, files in os.walk(staging) for name in files] == []
    assert not os.path.exists(os.path.join(storage.root, "checkpoint_000000", STAGING_NAME))


def test_an_abandoned_attempt_cannot_publish() -> None:
    attempt = _Attempt(_PublishLock())
    attempt.check()
    attempt.abandon()
    with pytest.raises(AttemptAbandonedError), attempt.publish():
        pass
    with pytest.raises(AttemptAbandonedError):
        attempt.check()


def test_attempt_timeout_is_retryable_by_default() -> None:
    assert sm.RetryPolicy().should_retry(AttemptTimeoutError("slow"))
    assert not sm.RetryPolicy().should_retry(KeyboardInterrupt())


# -- custom upload functions ----------------------------------------------------------------


def test_custom_upload_fn_waiting_on_a_background_save_is_committed(file_url: str) -> None:
    executor = concurrent.futures.ThreadPoolExecutor(max_workers=2)

    def save(url: str, data: bytes) -> None:
        with fsspec.open(f"{url}/weights.bin", "wb", auto_mkdir=True) as handle:
            handle.write(data)

    def train() -> None:
        ctx = sm.get_context()
        for step in range(REPORTS):
            target = ctx.next_checkpoint_path()
            future = executor.submit(save, target, data_for(ctx.world_rank, step))

            def wait_for_save(
                checkpoint: sm.Checkpoint, dir_name: str, future: concurrent.futures.Future[None] = future
            ) -> sm.Checkpoint:
                future.result()
                return checkpoint

            sm.report(
                {"step": step},
                checkpoint=sm.Checkpoint(target),
                checkpoint_upload_mode=ASYNC,
                checkpoint_upload_fn=wait_for_save,
            )

    try:
        result = fit(train, sm.RunConfig(storage_path=file_url, name="run"))
    finally:
        executor.shutdown()
    assert result.committed_indices == list(range(REPORTS))
    assert assert_committed_intact(file_url[len("file://") :]) == list(range(REPORTS))


@pytest.mark.parametrize("mode", [SYNC, ASYNC])
def test_custom_upload_fn_returning_no_checkpoint_fails_with_a_type_error(
    mode: sm.CheckpointUploadMode, file_url: str, tmp_path: Any
) -> None:
    source = _local_checkpoint(tmp_path)
    calls: list[str] = []

    def returns_a_string(checkpoint: sm.Checkpoint, dir_name: str) -> Any:
        calls.append(dir_name)
        return "s3://somewhere"

    def train() -> None:
        sm.report(
            {"a": 1},
            checkpoint=sm.Checkpoint.from_directory(source),
            checkpoint_upload_mode=mode,
            checkpoint_upload_fn=returns_a_string,
        )

    error = fit_failing(train, sm.RunConfig(storage_path=file_url, name="run"), ranks=1)
    assert isinstance(error.__cause__, TypeError)
    assert "must return a statemachine.Checkpoint, got str" in str(error.__cause__)
    assert calls == ["checkpoint_000000"]


def test_custom_upload_fn_returning_a_checkpoint_outside_the_run_fails_with_a_value_error(
    file_url: str, tmp_path: Any
) -> None:
    source = _local_checkpoint(tmp_path)

    def train() -> None:
        sm.report(
            {"a": 1},
            checkpoint=sm.Checkpoint.from_directory(source),
            checkpoint_upload_fn=lambda checkpoint, dir_name: checkpoint,
        )

    error = fit_failing(train, sm.RunConfig(storage_path=file_url, name="run"), ranks=1)
    assert isinstance(error.__cause__, ValueError) and "outside the run folder" in str(error.__cause__)


@pytest.mark.parametrize("exception", [KeyboardInterrupt, SystemExit, CustomCrash])
@pytest.mark.parametrize("mode", [SYNC, ASYNC])
def test_base_exception_in_a_custom_upload_fn_fails_the_report_not_the_process(
    exception: type[BaseException], mode: sm.CheckpointUploadMode, file_url: str, tmp_path: Any
) -> None:
    source = _local_checkpoint(tmp_path)
    calls: list[int] = []

    def explode(checkpoint: sm.Checkpoint, dir_name: str) -> sm.Checkpoint:
        calls.append(1)
        raise exception("from the upload thread")

    def train() -> None:
        sm.report(
            {"a": 1},
            checkpoint=sm.Checkpoint.from_directory(source),
            checkpoint_upload_mode=mode,
            checkpoint_upload_fn=explode,
        )
        sm.report({"a": 2})

    error = fit_failing(train, sm.RunConfig(storage_path=file_url, name="run"), ranks=1)
    assert isinstance(error.__cause__, exception)
    assert "rank 0, report 0" in str(error)
    assert calls == [1], "a BaseException is never retried"
    assert error.result is not None and all(r.state.terminal for r in error.result.reports)
    assert os.path.isdir(source), "the local checkpoint is kept when its upload failed"


def test_custom_upload_fn_is_refused_with_no_upload_or_without_a_checkpoint(file_url: str) -> None:
    seen: list[str] = []

    def train() -> None:
        target = sm.get_context().next_checkpoint_path()
        for kwargs in (
            {"checkpoint": sm.Checkpoint(target), "checkpoint_upload_mode": NO_UPLOAD},
            {"checkpoint": None},
        ):
            try:
                sm.report({"a": 1}, checkpoint_upload_fn=lambda c, d: c, **kwargs)  # type: ignore[arg-type]
            except ValueError as error:
                seen.append(str(error))
        sm.report({"a": 1})

    result = fit(train, sm.RunConfig(storage_path=file_url, name="run"), ranks=1)
    assert len(seen) == 2 and "NO_UPLOAD" in seen[0] and "without a checkpoint" in seen[1]
    assert result.committed_indices == [0]


# -- failure policies, restarts, drain ------------------------------------------------------


def test_restart_resumes_after_the_latest_committed_checkpoint_with_failure_history(file_url: str) -> None:
    injector = CrashInjector(seed=0, rate=1.0)
    resumed: list[tuple[int, str | None]] = []

    def crash_at_step_2(rank: int, step: int) -> None:
        if step == 2 and rank == 0:
            injector.maybe_crash(rank, step)

    run_config = sm.RunConfig(storage_path=file_url, name="run", failure_config=sm.FailureConfig(max_failures=2))
    result = fit(make_train("async", before_report=crash_at_step_2, resumed=resumed), run_config)
    assert injector.crashes == [(0, 2)]
    assert len(result.failures) == 1 and isinstance(result.failures[0].__cause__, InjectedCrash)
    latest_before = os.path.join(file_url[len("file://") :], "run", "checkpoint_000001")
    assert sorted(resumed, key=str) == sorted([(0, None), (1, None), (0, latest_before), (1, latest_before)], key=str)
    assert result.committed_indices == [2]
    assert [r.index for r in result.reports] == [2, 2]


def test_failure_lets_uploads_in_flight_on_healthy_ranks_finish_and_commit(file_url: str, tmp_path: Any) -> None:
    source = _local_checkpoint(tmp_path)
    failed = threading.Event()
    rank_0_reported = threading.Event()
    storage_root = file_url[len("file://") :]

    def fail_now(checkpoint: sm.Checkpoint, dir_name: str) -> sm.Checkpoint:
        failed.set()
        raise OSError("storage is gone")

    def train() -> None:
        rank = sm.get_context().world_rank

        def upload_after_failure(checkpoint: sm.Checkpoint, dir_name: str) -> sm.Checkpoint:
            # Index 0 of both ranks is still uploading when rank 1's index 1 fails the run.
            assert failed.wait(30.0)
            target = os.path.join(storage_root, "run", dir_name, f"rank_{rank}")
            os.makedirs(target)
            with open(os.path.join(target, "weights.bin"), "wb") as handle:
                handle.write(data_for(rank, 0))
            return sm.Checkpoint(target)

        sm.report(
            {"step": 0},
            checkpoint=sm.Checkpoint.from_directory(source),
            checkpoint_upload_mode=ASYNC,
            checkpoint_upload_fn=upload_after_failure,
        )
        if rank == 0:
            rank_0_reported.set()
        else:
            assert rank_0_reported.wait(30.0)
            sm.report(
                {"step": 1},
                checkpoint=sm.Checkpoint.from_directory(source),
                checkpoint_upload_mode=ASYNC,
                checkpoint_upload_fn=fail_now,
                delete_local_checkpoint_after_upload=False,
            )

    run_config = sm.RunConfig(
        storage_path=file_url,
        name="run",
        upload_config=sm.UploadConfig(retry=sm.RetryPolicy(max_attempts=1), drain_timeout_s=30.0),
    )
    error = fit_failing(train, run_config)
    assert "rank 1, report 1" in str(error)
    assert error.result is not None and error.result.committed_indices == [0]
    assert assert_committed_intact(storage_root) == [0]


def test_drain_timeout_bounds_the_wait_for_a_hung_upload(file_url: str, tmp_path: Any) -> None:
    source = _local_checkpoint(tmp_path)
    release = threading.Event()
    accepted = threading.Event()

    def hang(checkpoint: sm.Checkpoint, dir_name: str) -> sm.Checkpoint:
        release.wait(30.0)
        raise OSError("released")

    def train() -> None:
        rank = sm.get_context().world_rank
        if rank == 0:
            sm.report(
                {"a": 0},
                checkpoint=sm.Checkpoint.from_directory(source),
                checkpoint_upload_mode=ASYNC,
                checkpoint_upload_fn=hang,
                delete_local_checkpoint_after_upload=False,
            )
            accepted.set()
        else:
            assert accepted.wait(30.0)
            raise RuntimeError("rank 1 dies")

    run_config = sm.RunConfig(
        storage_path=file_url,
        name="run",
        upload_config=sm.UploadConfig(retry=sm.RetryPolicy(max_attempts=1), drain_timeout_s=0.3),
    )
    try:
        error = fit_failing(train, run_config)
    finally:
        release.set()
    assert "rank 1 failed in its training function" in str(error)
    assert error.result is not None
    [report] = error.result.reports
    assert report.state is sm.ReportState.FAILED and isinstance(report.error, sm.RunAbortedError)


# -- cleanup on resume ----------------------------------------------------------------------


def test_resume_removes_uncommitted_folders_and_stale_staging_but_keeps_committed_ones(file_url: str) -> None:
    root = os.path.join(file_url[len("file://") :], "run")
    result = fit(make_train("sync"), sm.RunConfig(storage_path=file_url, name="run"))
    assert result.committed_indices == [0, 1, 2]
    leftovers = {
        "checkpoint_000003/rank_0/weights.bin": b"half",  # crashed before its commit
        "checkpoint_000003/.staging/rank_1-abc/weights.bin": b"half",
        "custom_name/rank_0/weights.bin": b"half",  # an uncommitted custom checkpoint_dir_name
        "checkpoint_000001/.staging/rank_0-def/weights.bin": b"late",  # abandoned after the commit
        ".staging/0123abcd/weights.bin": b"half",  # a local-disk attempt of a crashed process
        "notes/readme.txt": b"the user's own folder",
    }
    for relative, data in leftovers.items():
        os.makedirs(os.path.dirname(os.path.join(root, relative)), exist_ok=True)
        with open(os.path.join(root, relative), "wb") as handle:
            handle.write(data)
    seen: list[str | None] = []

    def resume() -> None:
        checkpoint = sm.get_checkpoint()
        seen.append(None if checkpoint is None else posixpath.basename(checkpoint.path))

    fit(resume, sm.RunConfig(storage_path=file_url, name="run"), ranks=1)
    assert seen == ["checkpoint_000002"]
    assert not os.path.exists(os.path.join(root, "checkpoint_000003"))
    assert not os.path.exists(os.path.join(root, "custom_name"))
    assert not os.path.exists(os.path.join(root, "checkpoint_000001", STAGING_NAME))
    assert not os.path.exists(os.path.join(root, STAGING_NAME, "0123abcd"))
    assert os.path.exists(os.path.join(root, "notes", "readme.txt"))
    assert assert_committed_intact(file_url[len("file://") :]) == [0, 1, 2]


@pytest.mark.parametrize("exception", [KeyboardInterrupt, SystemExit, CustomCrash])
def test_base_exception_in_an_async_training_function_ends_the_run_clearly(
    exception: type[BaseException], file_url: str
) -> None:
    async def train() -> None:
        await sm.areport({"step": 0})
        raise exception("async boom")

    error = fit_failing(train, sm.RunConfig(storage_path=file_url, name="run"), ranks=1)
    assert isinstance(error.__cause__, exception)
    assert "rank 0 failed in its training function after report 0" in str(error)
    assert error.result is not None and error.result.committed_indices == [0]
