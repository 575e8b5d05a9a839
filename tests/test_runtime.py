"""The trio runtime of a rank: back-pressure, delete flags, snapshots, errors, async training."""

from __future__ import annotations

import os
import re
import tempfile
import threading
from typing import Any

import fsspec
import pytest
import trio
import trio.testing

import statemachine as sm
from tests.conftest import run_trio
from tests.fsutil import FailingFileSystem, GatedFileSystem
from tests.helpers import (
    ASYNC,
    METRICS,
    NO_UPLOAD,
    SYNC,
    Recorder,
    assert_run_is_consistent,
    payload,
    plan_train_fn,
    trainer,
)


def _write(directory: str, rank: int, step: int) -> str:
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "data.bin"), "wb") as handle:
        handle.write(payload(rank, step))
    return directory


def test_max_pending_reports_holds_back_report_until_an_earlier_one_is_terminal(tmp_path: Any) -> None:
    GatedFileSystem.reset()
    returned: list[int] = []

    async def train_fn() -> None:
        for step in range(3):
            local = _write(str(tmp_path / f"c{step}"), 0, step)
            await sm.areport(
                {"step": step}, checkpoint=sm.Checkpoint.from_directory(local), checkpoint_upload_mode=ASYNC
            )
            returned.append(step)

    run = sm.Trainer(
        train_fn,
        run_config=sm.RunConfig(
            storage_path="gated://runs",
            name="bp",
            upload_config=sm.UploadConfig(max_concurrent_uploads=1, max_pending_reports=2),
        ),
    )

    async def scenario() -> sm.Result:
        async with trio.open_nursery() as nursery:
            results: list[sm.Result] = []

            async def fit() -> None:
                results.append(await run.fit_async())

            nursery.start_soon(fit)
            await trio.to_thread.run_sync(GatedFileSystem.writers.wait)
            await trio.testing.wait_all_tasks_blocked()
            # Report 0 uploads (held by the gate), report 1 waits for the slot: the third
            # report() must be waiting for one of them to become terminal.
            assert returned == [0, 1]
            GatedFileSystem.gate.set()
        return results[0]

    result = run_trio(scenario)
    assert returned == [0, 1, 2]
    assert result.committed_indices == [0, 1, 2]


@pytest.mark.parametrize(
    ("mode", "flag", "deleted"),
    [
        (SYNC, None, False),
        (SYNC, True, True),
        (ASYNC, None, True),
        (ASYNC, False, False),
    ],
)
def test_local_checkpoint_is_deleted_after_upload_only_as_the_flag_or_mode_default_says(
    mode: sm.CheckpointUploadMode, flag: bool | None, deleted: bool, tmp_path: Any, memory_url: str
) -> None:
    local = _write(str(tmp_path / "ckpt"), 0, 0)

    def train_fn() -> None:
        sm.report(
            {"x": 1},
            checkpoint=sm.Checkpoint.from_directory(local),
            checkpoint_upload_mode=mode,
            delete_local_checkpoint_after_upload=flag,
        )

    result = run_trio(sm.Trainer(train_fn, run_config=sm.RunConfig(storage_path=memory_url, name="d")).fit_async)
    assert result.committed_indices == [0]
    assert os.path.exists(local) is not deleted


def test_failed_upload_keeps_the_local_checkpoint(tmp_path: Any) -> None:
    FailingFileSystem.reset("rank_0")
    local = _write(str(tmp_path / "ckpt"), 0, 0)

    def train_fn() -> None:
        sm.report(
            {"x": 1},
            checkpoint=sm.Checkpoint.from_directory(local),
            checkpoint_upload_mode=ASYNC,
            delete_local_checkpoint_after_upload=True,
        )

    trainer_ = sm.Trainer(train_fn, run_config=sm.RunConfig(storage_path="failing://runs", name="keep"))
    with pytest.raises(sm.TrainingFailedError, match=r"rank 0, report 0 failed: OSError"):
        run_trio(trainer_.fit_async)
    assert os.path.exists(os.path.join(local, "data.bin"))


def _async_report_then_change(change: str, snapshot: str) -> sm.Result:
    """ASYNC-report a TemporaryDirectory, change it as ``change`` says, leave it; then upload."""
    GatedFileSystem.reset()

    def train_fn() -> None:
        with tempfile.TemporaryDirectory() as local:
            _write(local, 0, 0)
            sm.report({"x": 1}, checkpoint=sm.Checkpoint.from_directory(local), checkpoint_upload_mode=ASYNC)
            path = os.path.join(local, "data.bin")
            if change == "replace":
                with open(path + ".new", "wb") as handle:
                    handle.write(b"written after report")
                os.replace(path + ".new", path)
            elif change == "rewrite":
                with open(path, "wb") as handle:
                    handle.write(b"rewritten in place after report")
        GatedFileSystem.gate.set()  # the upload may start only now: the directory is gone

    trainer_ = sm.Trainer(
        train_fn,
        run_config=sm.RunConfig(
            storage_path="gated://runs",
            name="tmp",
            upload_config=sm.UploadConfig(snapshot=snapshot),  # type: ignore[arg-type]
        ),
    )
    return run_trio(trainer_.fit_async)


def _uploaded(result: sm.Result) -> bytes:
    assert result.checkpoint is not None
    with result.checkpoint.as_directory() as folder, open(os.path.join(folder, "rank_0", "data.bin"), "rb") as handle:
        return handle.read()


@pytest.mark.parametrize(("change", "snapshot"), [("none", "link"), ("replace", "link"), ("rewrite", "copy")])
def test_async_report_of_a_temporary_directory_uploads_what_was_there_at_report_time(
    change: str, snapshot: str
) -> None:
    assert _uploaded(_async_report_then_change(change, snapshot)) == payload(0, 0)


def test_file_rewritten_in_place_under_a_hard_link_snapshot_fails_the_report_instead_of_uploading_it() -> None:
    with pytest.raises(sm.TrainingFailedError, match="rewritten in place") as info:
        _async_report_then_change("rewrite", "link")
    assert info.value.result is not None and info.value.result.checkpoint is None


def test_training_function_that_raises_after_async_reports_still_commits_them(memory_url: str) -> None:
    both_reported = threading.Barrier(2)

    def train_fn(config: dict[str, Any]) -> None:
        for step in range(3):
            with tempfile.TemporaryDirectory() as local:
                _write(local, sm.get_context().world_rank, step)
                sm.report({"step": step}, checkpoint=sm.Checkpoint.from_directory(local), checkpoint_upload_mode=ASYNC)
        both_reported.wait(timeout=60)  # so that rank 0 is not stopped before its own reports
        if sm.get_context().world_rank == 1:
            raise ZeroDivisionError("boom after reporting")

    trainer_ = sm.Trainer(
        train_fn,
        scaling_config=sm.ScalingConfig(num_workers=2),
        run_config=sm.RunConfig(storage_path=memory_url, name="raise"),
    )
    with pytest.raises(sm.TrainingFailedError, match=r"rank 1 failed in its training function after report 2") as info:
        run_trio(trainer_.fit_async)
    assert isinstance(info.value.__cause__, ZeroDivisionError)
    result = info.value.result
    assert result is not None and result.error is info.value
    assert result.committed_indices == [0, 1, 2]
    assert result.checkpoint is not None and result.checkpoint.path.endswith("checkpoint_000002")


def test_caught_bad_report_uses_no_index_and_the_next_good_report_works(memory_url: str) -> None:
    errors: list[BaseException] = []

    def train_fn() -> None:
        try:
            sm.report({"bad": object()})
        except TypeError as error:
            errors.append(error)
        sm.report({"good": 1})

    recorder = Recorder()
    result = run_trio(
        sm.Trainer(
            train_fn, run_config=sm.RunConfig(storage_path=memory_url, name="c", callbacks=(recorder,))
        ).fit_async
    )
    assert len(errors) == 1 and "JSON" in str(errors[0])
    assert [(m.index, m.metrics) for m in recorder.hand_offs] == [(0, {"good": 1})]
    assert result.metrics == {"good": 1}


def test_ranks_that_report_a_different_number_of_times_fail_the_run_with_their_counts(memory_url: str) -> None:
    plans = [[METRICS, METRICS, METRICS], [METRICS, METRICS]]
    with pytest.raises(sm.TrainingFailedError, match=r"rank 0: 3, rank 1: 2"):
        run_trio(trainer(memory_url, plans).fit_async)


def test_sync_upload_error_ends_the_run_naming_rank_index_and_cause_without_committing() -> None:
    FailingFileSystem.reset("checkpoint_000001/.staging/rank_1")
    plans = [[SYNC, SYNC, SYNC], [SYNC, SYNC, SYNC]]
    with pytest.raises(sm.TrainingFailedError, match=r"rank 1, report 1 failed: OSError\('injected") as info:
        run_trio(trainer("failing://runs", plans).fit_async)
    result = info.value.result
    assert result is not None
    assert result.committed_indices == [0]
    assert FailingFileSystem().exists("failing://runs/run/checkpoint_000000/_COMMITTED.json")
    assert not FailingFileSystem().exists("failing://runs/run/checkpoint_000001/_COMMITTED.json")
    states = {(r.rank, r.index): r.state for r in result.reports}
    assert states[(1, 1)] is sm.ReportState.FAILED


def test_on_failure_continue_skips_the_failed_index_and_commits_the_rest() -> None:
    FailingFileSystem.reset("checkpoint_000001/.staging/rank_0")
    plans = [[ASYNC, ASYNC, ASYNC], [ASYNC, ASYNC, ASYNC]]
    recorder = Recorder()
    result = run_trio(trainer("failing://runs", plans, recorder, sm.UploadConfig(on_failure="continue")).fit_async)
    assert result.error is None
    assert result.committed_indices == [0, 2]
    failed = [r for r in result.reports if r.state is sm.ReportState.FAILED]
    assert [(r.rank, r.index) for r in failed] == [(0, 1)]
    assert isinstance(failed[0].error, OSError)


def test_async_training_function_reports_with_areport(memory_url: str) -> None:
    async def train_fn(config: dict[str, Any]) -> None:
        for step in range(config["steps"]):
            await sm.areport({"step": step})

    recorder = Recorder()
    result = run_trio(
        sm.Trainer(
            train_fn,
            train_loop_config={"steps": 4},
            scaling_config=sm.ScalingConfig(num_workers=2),
            run_config=sm.RunConfig(storage_path=memory_url, name="a", callbacks=(recorder,)),
        ).fit_async
    )
    assert result.committed_indices == [0, 1, 2, 3]
    assert_run_is_consistent(result, recorder, [[METRICS] * 4] * 2)


def test_sync_report_returns_only_after_its_hand_off(memory_url: str, tmp_path: Any) -> None:
    seen: list[int] = []
    recorder = Recorder()

    def train_fn() -> None:
        for step in range(3):
            local = _write(str(tmp_path / f"s{step}"), 0, step)
            sm.report({"step": step}, checkpoint=sm.Checkpoint.from_directory(local), checkpoint_upload_mode=SYNC)
            seen.append(len(recorder.hand_offs))

    run_trio(
        sm.Trainer(
            train_fn, run_config=sm.RunConfig(storage_path=memory_url, name="s", callbacks=(recorder,))
        ).fit_async
    )
    assert seen == [1, 2, 3]


def test_no_upload_registers_files_in_place_without_copying(file_url: str) -> None:
    plans = [[NO_UPLOAD, NO_UPLOAD]]
    recorder = Recorder()
    result = run_trio(trainer(file_url, plans, recorder).fit_async)
    assert_run_is_consistent(result, recorder, plans)
    assert [p.path for c in recorder.commits for p in c.parts] == [
        "checkpoint_000000/rank_0",
        "checkpoint_000001/rank_0",
    ]


def test_get_context_describes_the_rank(memory_url: str) -> None:
    seen: list[tuple[int, int, str, str]] = []

    def train_fn() -> None:
        ctx = sm.get_context()
        seen.append((ctx.world_rank, ctx.world_size, ctx.run_name, ctx.next_checkpoint_path()))
        assert sm.get_checkpoint() is None

    run_trio(
        sm.Trainer(
            train_fn,
            scaling_config=sm.ScalingConfig(num_workers=2),
            run_config=sm.RunConfig(storage_path=memory_url, name="ctx"),
        ).fit_async
    )
    assert sorted(s[:3] for s in seen) == [(0, 2, "ctx"), (1, 2, "ctx")]
    assert all(s[3].endswith(f"/ctx/checkpoint_000000/rank_{s[0]}") for s in seen)


def test_snapshot_folders_are_made_ahead_recycled_empty_and_discarded(tmp_path: Any) -> None:
    from statemachine.storage import SnapshotFolders, snapshot_directory

    folders = SnapshotFolders(str(tmp_path / "snaps"), spare=2, keep=3)
    folders.refill()
    ready = sorted(os.listdir(tmp_path / "snaps"))
    assert len(ready) == 2 and not folders.needs_refill()

    source = _write(str(tmp_path / "ckpt"), 0, 0)
    os.makedirs(os.path.join(source, "nested"))
    with open(os.path.join(source, "nested", "more.bin"), "wb") as handle:
        handle.write(b"more")
    target, linked = snapshot_directory(source, folders.take(), "link")
    assert os.path.basename(target) in ready
    assert sorted(linked) == ["data.bin", "nested/more.bin"]
    assert open(os.path.join(target, "nested", "more.bin"), "rb").read() == b"more"

    folders.recycle(target)  # emptied, nested folder included, and ready for the next snapshot
    assert os.listdir(target) == []
    assert os.path.exists(os.path.join(source, "nested", "more.bin"))  # the caller's files are untouched
    taken = [folders.take(), folders.take()]
    assert folders.needs_refill() and target in taken
    taken += [folders.take(), folders.take()]  # none ready: made on the spot
    for path in taken:
        folders.recycle(path)
    assert len(os.listdir(folders.root)) == 3  # beyond ``keep``, a recycled folder is removed
    folders.discard()
    assert os.listdir(folders.root) == []


def test_async_snapshots_reuse_their_folders_and_leave_nothing_behind(memory_url: str) -> None:
    sources: list[str] = []

    def train_fn() -> None:
        for step in range(6):
            with tempfile.TemporaryDirectory() as local:
                _write(local, 0, step)
                sm.report({"step": step}, checkpoint=sm.Checkpoint.from_directory(local), checkpoint_upload_mode=SYNC)
                sm.report({"step": step}, checkpoint=sm.Checkpoint.from_directory(local), checkpoint_upload_mode=ASYNC)

    original = sm.rank.RankRuntime.prepare

    def spy(self: Any, *args: Any) -> Any:
        request = original(self, *args)
        if request.snapshot:
            sources.append(request.upload_source)
        return request

    sm.rank.RankRuntime.prepare = spy  # type: ignore[method-assign]
    try:
        result = run_trio(sm.Trainer(train_fn, run_config=sm.RunConfig(storage_path=memory_url, name="reuse")).fit_async)
    finally:
        sm.rank.RankRuntime.prepare = original  # type: ignore[method-assign]
    assert result.committed_indices == list(range(12))
    assert len(sources) == 6 and len(set(sources)) < 6  # each SYNC report lets the previous upload finish
    assert not any(os.path.exists(path) for path in sources)  # removed when the rank ended
    fs, root = fsspec.core.url_to_fs(f"{memory_url}/reuse")
    for step in range(6):  # a reused folder holds this report's files and nothing else
        part = f"{root}/checkpoint_{2 * step + 1:06d}/rank_0"
        assert [p.rsplit("/", 1)[1] for p in fs.ls(part, detail=False)] == ["data.bin"]
        assert fs.cat_file(f"{part}/data.bin") == payload(0, step)


def test_round_trip_reports_never_overtake_posted_ones(file_url: str) -> None:
    # ASYNC and NO_UPLOAD reports are posted to trio and return at once; a SYNC report with a
    # checkpoint, and a metrics-only report while the rank has open reports, make the round
    # trip. Back to back, the round trip must still be accepted after the posted reports.
    pattern = [ASYNC, ASYNC, SYNC, NO_UPLOAD, METRICS, ASYNC, METRICS, SYNC, NO_UPLOAD, NO_UPLOAD, SYNC]
    plans = [pattern * 4, (pattern[3:] + pattern[:3]) * 4]
    recorder = Recorder()
    result = run_trio(
        sm.Trainer(
            plan_train_fn,
            train_loop_config={"plans": plans},
            scaling_config=sm.ScalingConfig(num_workers=2),
            run_config=sm.RunConfig(
                storage_path=file_url,
                name="order",
                callbacks=(recorder,),
                upload_config=sm.UploadConfig(max_pending_reports=None),
            ),
        ).fit_async
    )
    assert_run_is_consistent(result, recorder, plans)
    assert [m.metrics["step"] for m in recorder.hand_offs if m.rank == 0] == list(range(len(plans[0])))


def test_background_work_waits_for_a_report_in_progress_but_never_longer_than_the_grace() -> None:
    from statemachine import _threads
    from statemachine._threads import REPORT_GRACE_S

    waited: dict[str, float] = {}

    async def timed(name: str) -> None:
        start = trio.current_time()
        await _threads.yield_to_reports()
        waited[name] = trio.current_time() - start

    async def main() -> None:
        with trio.fail_after(10):
            await timed("idle")
            _threads.reporting_started()
            try:
                await timed("stuck")  # a report that never ends does not hold uploads back for long
            finally:
                _threads.reporting_finished()
            _threads.reporting_started()

            async def finish_report() -> None:
                await trio.sleep(0.005)
                _threads.reporting_finished()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(finish_report)
                await timed("ends")

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    assert waited["idle"] == 0.0
    assert REPORT_GRACE_S <= waited["stuck"] < REPORT_GRACE_S + 0.002
    assert 0.005 <= waited["ends"] < 0.007
    assert _threads.reports_in_progress() == 0


@pytest.mark.parametrize("defer", [True, False])
def test_a_deferred_post_reaches_trio_only_after_the_reports_in_progress(
    monkeypatch: pytest.MonkeyPatch, defer: bool
) -> None:
    import time
    import types

    from statemachine import _threads

    poster_waits = threading.Event()

    def sleep(seconds: float) -> None:
        poster_waits.set()
        time.sleep(seconds)

    monkeypatch.setattr(_threads, "time", types.SimpleNamespace(monotonic=time.monotonic, sleep=sleep))
    monkeypatch.setattr(_threads, "REPORT_GRACE_S", 60.0)  # only the report's end lets it through
    arrived: list[str] = []

    async def main() -> None:
        token = trio.lowlevel.current_trio_token()
        handed_over = trio.Event()

        def callback() -> None:
            _threads.posted_done()
            arrived.append("posted")
            handed_over.set()

        with trio.fail_after(30):
            _threads.reporting_started()  # another rank's training thread is inside report()
            try:
                _threads.post(token, callback, lambda error: None, defer=defer)
                if defer:
                    assert await trio.to_thread.run_sync(poster_waits.wait, 30)
                    await trio.testing.wait_all_tasks_blocked()
                    assert arrived == []  # the poster holds it while the report is in progress
                else:
                    await handed_over.wait()  # handed over with the report still in progress
            finally:
                _threads.reporting_finished()
            await handed_over.wait()

    trio.run(main)
    assert arrived == ["posted"]
    assert poster_waits.is_set() is defer


def test_sync_report_with_nothing_open_uploads_in_the_calling_thread_and_trio_retries_a_failed_first_attempt() -> None:
    from statemachine import _threads

    FailingFileSystem.reset(fail_once=("checkpoint_000001/.staging/rank_0",))
    training_threads: list[int] = []

    def train_fn() -> None:
        training_threads.append(threading.get_ident())
        for step in range(4):
            with tempfile.TemporaryDirectory() as local:
                _write(local, 0, step)
                mode = ASYNC if step == 2 else SYNC
                sm.report({"step": step}, checkpoint=sm.Checkpoint.from_directory(local), checkpoint_upload_mode=mode)

    retry = sm.RetryPolicy(max_attempts=3, initial_backoff_s=0.01, max_backoff_s=0.01)
    run = sm.Trainer(
        train_fn,
        run_config=sm.RunConfig(
            storage_path="failing://runs", name="here", upload_config=sm.UploadConfig(retry=retry)
        ),
    )
    result = run_trio(run.fit_async)

    assert result.committed_indices == [0, 1, 2, 3]
    (training,) = training_threads
    writers: dict[str, list[int]] = {}
    for path, ident in FailingFileSystem.writes:
        if "/.staging/" in path:  # the uploads (markers are written by the controller)
            writers.setdefault(re.search(r"checkpoint_\d+", path).group(0), []).append(ident)  # type: ignore[union-attr]
    # Report 0: written by the training thread. Report 1: its first attempt too (it failed),
    # the retry by a worker thread. Report 2 (ASYNC): a worker. Report 3, a SYNC report made
    # while report 2 may still be open, by whichever way was possible, and correctly.
    assert writers["checkpoint_000000"] == [training]
    assert writers["checkpoint_000001"][0] == training and writers["checkpoint_000001"][-1] != training
    assert training not in writers["checkpoint_000002"]
    retries = {r.index: r.timings.get("retries") for r in result.reports}
    assert retries[0] == 0 and retries[1] == 1
    for index in range(4):
        assert FailingFileSystem().cat_file(f"failing://runs/here/checkpoint_{index:06d}/rank_0/data.bin") == payload(0, index)
    assert _threads.busy_threads() == 0  # the caller's waits were counted out again


def test_sync_first_attempt_that_keeps_failing_raises_report_failed_error_in_the_calling_thread(tmp_path: Any) -> None:
    FailingFileSystem.reset("checkpoint_000000/.staging/rank_0")
    raised: list[BaseException] = []
    local = _write(str(tmp_path / "ckpt"), 0, 0)

    def train_fn() -> None:
        try:
            sm.report({"step": 0}, checkpoint=sm.Checkpoint.from_directory(local), checkpoint_upload_mode=SYNC)
        except sm.ReportFailedError as error:
            raised.append(error)
            raise

    retry = sm.RetryPolicy(max_attempts=2, initial_backoff_s=0.01, max_backoff_s=0.01)
    run = sm.Trainer(
        train_fn,
        run_config=sm.RunConfig(storage_path="failing://runs", name="fails", upload_config=sm.UploadConfig(retry=retry)),
    )
    with pytest.raises(sm.TrainingFailedError, match="rank 0, report 0"):
        run_trio(run.fit_async)
    assert len(raised) == 1 and raised[0].index == 0  # type: ignore[attr-defined]
    assert isinstance(raised[0].__cause__, OSError)
    assert len([p for p, _ in FailingFileSystem.writes if "/.staging/" in p]) == 2  # both attempts were made
    assert os.path.exists(os.path.join(local, "data.bin"))  # the local copy is kept


def test_folders_made_ahead_stop_once_discarded_even_when_a_refill_is_under_way(tmp_path: Any) -> None:
    from statemachine.storage import SnapshotFolders

    folders = SnapshotFolders(str(tmp_path / "staging"), spare=3)
    made = threading.Event()
    proceed = threading.Event()
    original = os.makedirs

    def slow_makedirs(path: str, *args: Any, **kwargs: Any) -> None:
        original(path, *args, **kwargs)
        made.set()
        assert proceed.wait(10)

    worker = threading.Thread(target=folders.refill)
    os.makedirs = slow_makedirs  # type: ignore[assignment]
    try:
        worker.start()
        assert made.wait(10)  # the refill made a folder and has not recorded it yet
        folders.discard()  # the rank ends now
        proceed.set()
        worker.join(10)
    finally:
        os.makedirs = original
    assert not worker.is_alive()
    assert not os.path.exists(folders.root)  # the late folder, and the emptied root, are gone
    folders.refill()
    assert not os.path.exists(folders.root)  # and nothing is made after the discard
