"""Local-disk uploads: SYNC copies spread over helper threads, background copies bounded, checksums nicer."""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from concurrent import futures
from typing import Any

import pytest
import trio
import trio.testing

import statemachine as sm
from statemachine import _threads
from statemachine.config import RetryPolicy
from statemachine.result import ReportTimings
from statemachine.storage import RunStorage, _copy_files_spread
from statemachine.upload import UploadJob, upload_report

SIZES = [300_000, 5, 70_000, 0, 123_456]


def _files(tmp_path: Any) -> tuple[list[str], list[str], list[int]]:
    source, target = os.path.join(str(tmp_path), "source"), os.path.join(str(tmp_path), "target")
    os.makedirs(source)
    os.makedirs(target)
    sources, destinations = [], []
    for number, size in enumerate(SIZES):
        path = os.path.join(source, f"f{number}.bin")
        with open(path, "wb") as handle:
            handle.write(os.urandom(size))
        sources.append(path)
        destinations.append(os.path.join(target, f"f{number}.bin"))
    return sources, destinations, list(SIZES)


def _same(a: str, b: str) -> bool:
    with open(a, "rb") as one, open(b, "rb") as other:
        return one.read() == other.read()


def test_spread_copy_delivers_every_file_using_the_helpers(tmp_path: Any) -> None:
    sources, destinations, sizes = _files(tmp_path)
    copied_by: set[int] = set()
    with futures.ThreadPoolExecutor(2) as helpers:
        # The caller waits at the first file until a helper took one: both threads must copy.
        took = threading.Barrier(2, timeout=10)

        def check() -> None:
            ident = threading.get_ident()
            if ident not in copied_by:
                copied_by.add(ident)
                took.wait()

        _copy_files_spread(sources, destinations, sizes, helpers, check)
    assert len(copied_by) == 2
    assert all(_same(a, b) for a, b in zip(sources, destinations, strict=True))


def test_spread_copy_raises_the_first_error_after_every_started_copy_stopped(tmp_path: Any) -> None:
    sources, destinations, sizes = _files(tmp_path)
    os.remove(sources[2])
    with futures.ThreadPoolExecutor(2) as helpers, pytest.raises(FileNotFoundError, match=r"f2\.bin"):
        _copy_files_spread(sources, destinations, sizes, helpers, lambda: None)


def test_spread_copy_stops_at_the_next_file_once_the_attempt_is_abandoned(tmp_path: Any) -> None:
    sources, destinations, sizes = _files(tmp_path)
    calls = []

    def check() -> None:
        calls.append(1)
        if len(calls) > 1:
            raise TimeoutError("attempt abandoned")

    with futures.ThreadPoolExecutor(1) as helpers, pytest.raises(TimeoutError):
        _copy_files_spread(sources, destinations, sizes, helpers, check)
    assert sum(os.path.exists(d) for d in destinations) == 1  # the file whose check passed


def _train(config: dict[str, Any]) -> None:
    sources, _destinations, _sizes = config["files"]
    sm.report(
        {"step": 0},
        checkpoint=sm.Checkpoint.from_directory(os.path.dirname(sources[0])),
        checkpoint_upload_mode=sm.CheckpointUploadMode.SYNC,
    )


def test_a_sync_report_of_several_files_commits_them_all(tmp_path: Any) -> None:
    files = _files(tmp_path)
    storage = os.path.join(str(tmp_path), "storage")
    result = sm.Trainer(
        _train, train_loop_config={"files": files}, run_config=sm.RunConfig(storage_path=storage, name="spread")
    ).fit()
    assert result.checkpoint is not None
    folder = os.path.join(storage, "spread", "checkpoint_000000", "rank_0")
    assert sorted(os.listdir(folder)) == sorted(os.path.basename(p) for p in files[0])
    assert all(_same(p, os.path.join(folder, os.path.basename(p))) for p in files[0])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread niceness is Linux's")
def test_checksum_threads_are_nicer_than_the_process(tmp_path: Any) -> None:
    storage = RunStorage(str(tmp_path), "nice")

    def niceness() -> int:
        return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    background = storage._checksummer().submit(niceness).result()
    assert background == min(19, niceness() + 10)


class _WhoCopies:
    """An attempt guard that notes the niceness of each thread that checks it (before each file)."""

    def __init__(self) -> None:
        self.niceness: dict[int, int] = {}

    def check(self) -> None:
        thread = threading.get_native_id()
        self.niceness[thread] = os.getpriority(os.PRIO_PROCESS, thread)

    def publish(self) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread niceness is Linux's")
@pytest.mark.parametrize(("spread", "files"), [(False, 5), (True, 5), (False, 1), (True, 1)])
def test_only_copies_nobody_waits_for_run_in_nicer_threads(tmp_path: Any, spread: bool, files: int) -> None:
    sources, _destinations, _sizes = _files(tmp_path)
    for extra in sources[files:]:
        os.remove(extra)
    sources = sources[:files]
    storage = RunStorage(os.path.join(str(tmp_path), "storage"), "nice")
    guard = _WhoCopies()
    manifest = storage.upload_part(os.path.dirname(sources[0]), "checkpoint_000000/rank_0", 0, attempt=guard, spread=spread)
    caller = threading.get_native_id()
    ours = os.getpriority(os.PRIO_PROCESS, caller)
    others = {guard.niceness[thread] for thread in guard.niceness if thread != caller}
    if spread:  # SYNC: the caller copies, with helpers at the process's priority
        assert guard.niceness[caller] == ours and others <= {ours}
    else:  # ASYNC: the caller waits while a nicer thread copies
        assert others == {min(19, ours + 10)}
    folder = storage.path("checkpoint_000000/rank_0")
    assert sorted(e.path for e in manifest.files) == sorted(os.listdir(folder))
    assert all(_same(p, os.path.join(folder, os.path.basename(p))) for p in sources)


def _source(tmp_path: Any, name: str) -> str:
    folder = os.path.join(str(tmp_path), name)
    os.makedirs(folder)
    with open(os.path.join(folder, "weights.bin"), "wb") as handle:
        handle.write(os.urandom(1000))
    return folder


@pytest.mark.parametrize("bounded", [True, False])
def test_background_uploads_copy_one_at_a_time_when_the_slots_say_so(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch, bounded: bool
) -> None:
    storage = RunStorage(os.path.join(str(tmp_path), "storage"), "slots")
    inside: list[int] = []
    release = threading.Event()
    real_upload = RunStorage.upload_part
    copying = {"expected": 1 if bounded else 2}

    def upload_part(self: RunStorage, *args: Any, **kwargs: Any) -> Any:
        inside.append(threading.get_ident())
        if len(inside) == copying["expected"]:
            trio.from_thread.run_sync(copying["entered"].set, trio_token=copying["token"])
        release.wait(timeout=30)  # set by the test once it has looked
        return real_upload(self, *args, **kwargs)

    monkeypatch.setattr(RunStorage, "upload_part", upload_part)

    async def main() -> None:
        copying["entered"], copying["token"] = trio.Event(), trio.lowlevel.current_trio_token()
        slots = trio.CapacityLimiter(1) if bounded else None
        jobs = [
            UploadJob(storage, rank, 0, RetryPolicy(), "checkpoint_000000", _source(tmp_path, f"r{rank}"), copy_slots=slots)
            for rank in range(2)
        ]
        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                for job in jobs:
                    nursery.start_soon(upload_report, job, ReportTimings())
                await copying["entered"].wait()  # as many copies as may run are running
                await trio.testing.wait_all_tasks_blocked()
                if bounded:
                    assert slots is not None and slots.statistics().tasks_waiting == 1
                    assert len(inside) == 1
                release.set()
        assert len(inside) == 2

    trio.run(main)
    assert sorted(os.listdir(storage.path("checkpoint_000000"))) == ["rank_0", "rank_1"]


def test_background_local_copies_is_checked_at_the_config() -> None:
    with pytest.raises(ValueError, match="background_local_copies must be None or an int >= 1, got 0"):
        sm.UploadConfig(background_local_copies=0)


def test_every_storage_of_the_process_shares_its_thread_pools(tmp_path: Any) -> None:
    one, other = RunStorage(str(tmp_path), "one"), RunStorage(os.path.join(str(tmp_path), "elsewhere"), "other")
    assert one._checksummer() is other._checksummer()
    assert one._copier() is other._copier()
    assert one._background_copier() is other._background_copier()


def _async_then_sync(config: dict[str, Any]) -> None:
    for mode in (sm.CheckpointUploadMode.ASYNC, sm.CheckpointUploadMode.ASYNC, sm.CheckpointUploadMode.SYNC):
        sm.report(
            {"step": 0},
            checkpoint=sm.Checkpoint.from_directory(config["source"]),
            checkpoint_upload_mode=mode,
            delete_local_checkpoint_after_upload=False,
        )


def test_runs_one_after_another_leave_no_threads_behind(tmp_path: Any) -> None:
    source = _source(tmp_path, "source")
    storage = os.path.join(str(tmp_path), "storage")
    for run in range(4):
        sm.Trainer(
            _async_then_sync,
            train_loop_config={"source": source},
            scaling_config=sm.ScalingConfig(num_workers=2),
            run_config=sm.RunConfig(storage_path=storage, name=f"run{run}"),
        ).fit()
    checksum_threads = [t for t in threading.enumerate() if t.name.startswith("statemachine-checksum")]
    # One pool per storage kept up to that many threads for each rank of each run.
    assert 1 <= len(checksum_threads) <= max(1, min(4, _threads.usable_cpus()))
