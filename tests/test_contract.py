"""One contract, two backends: the same scenarios on the local backend and on a real Ray cluster.

Each scenario runs a real ``Trainer`` with two ranks against ``file://`` storage in the test's
temporary folder (Ray actors of the local cluster share this machine's file system). The Ray
cluster is started once per session (4 CPUs, no dashboard) and shut down at the end. Local runs
go through ``run_trio`` (thread-aware autojump clock); Ray runs wait on other processes, so they
use trio's real clock with a generous ``fail_after``: a hang is a ``TooSlowError``, not a stuck CI.
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import tempfile
import textwrap
import threading
from collections.abc import Iterator
from typing import Any

import fsspec
import pytest
import trio

import statemachine as sm
from tests.conftest import run_trio

pytestmark = pytest.mark.timeout(180)

#: Real seconds a Ray run may take before it counts as a hang.
RAY_DEADLINE_S = 90.0

MODES = (sm.CheckpointUploadMode.SYNC, sm.CheckpointUploadMode.ASYNC, sm.CheckpointUploadMode.NO_UPLOAD)


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[str]:
    """A local Ray cluster for the whole session; yields its address."""
    ray = pytest.importorskip("ray")
    from ray import cloudpickle

    # The training functions below live in this test module, which Ray's workers cannot import
    # (pytest put the tests folder on the driver's sys.path only): send them by value.
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    ray.init(num_cpus=4, include_dashboard=False, logging_level="WARNING")
    try:
        yield str(ray.get_runtime_context().gcs_address)
    finally:
        ray.shutdown()


@pytest.fixture(params=["local", pytest.param("ray", marks=pytest.mark.ray)])
def backend(request: pytest.FixtureRequest) -> str:
    if request.param == "ray":
        request.getfixturevalue("ray_cluster")
    return str(request.param)


def fit(trainer: sm.Trainer) -> sm.Result:
    """``trainer.fit()`` with a deadline that turns a hang into ``trio.TooSlowError``."""
    if trainer.backend_name == "local":
        return run_trio(trainer.fit_async)

    async def bounded() -> sm.Result:
        with trio.fail_after(RAY_DEADLINE_S):
            return await trainer.fit_async()

    return trio.run(bounded)


def make_trainer(train_fn: Any, config: dict[str, Any], backend: str, storage: str, **run_options: Any) -> sm.Trainer:
    return sm.Trainer(
        train_fn,
        train_loop_config=config,
        scaling_config=sm.ScalingConfig(num_workers=2),
        run_config=sm.RunConfig(storage_path=storage, name="run", **run_options),
        backend=backend,
        backend_options={"placement_timeout_s": 30.0} if backend == "ray" else None,
    )


def read_files(checkpoint: sm.Checkpoint) -> dict[str, bytes]:
    """Every file of a committed checkpoint, by path relative to its folder."""
    fs, root = fsspec.core.url_to_fs(checkpoint.url)
    return {path[len(root) :].lstrip("/"): fs.cat_file(path) for path in fs.find(root) if "rank_" in path}


def write_checkpoint(folder: str, name: str, data: bytes) -> None:
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, name), "wb") as handle:
        handle.write(data)


class Recorder:
    """Callback that records, in the driver, the order in which the controller saw things."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.handed_off: list[tuple[int, int]] = []
        self.commits: list[int] = []

    def on_report(self, message: Any) -> None:
        with self.lock:
            self.handed_off.append((message.rank, message.index))

    def on_commit(self, committed: Any) -> None:
        with self.lock:
            self.commits.append(committed.index)


# -- training functions (module level, so that Ray can ship them) --------------------------------


def mixed_modes_fn(config: dict[str, Any]) -> None:
    ctx = sm.get_context()
    rank = ctx.world_rank
    for step in range(config["steps"]):
        metrics = {"step": step, "rank": rank}
        if step == config["metrics_only_step"]:
            sm.report(metrics)
            continue
        mode = MODES[(step + rank) % len(MODES)]
        data = f"rank {rank} step {step}".encode()
        if mode is sm.CheckpointUploadMode.NO_UPLOAD:
            target = ctx.next_checkpoint_path()
            with fsspec.open(f"{target}/state.txt", "wb", auto_mkdir=True) as handle:
                handle.write(data)
            sm.report(metrics, checkpoint=sm.Checkpoint(target), checkpoint_upload_mode=mode)
            continue
        local = tempfile.mkdtemp()
        write_checkpoint(local, "state.txt", data)
        sm.report(metrics, checkpoint=sm.Checkpoint.from_directory(local), checkpoint_upload_mode=mode)


DELETE_CASES = (
    ("sync-default", sm.CheckpointUploadMode.SYNC, None, True),
    ("sync-delete", sm.CheckpointUploadMode.SYNC, True, False),
    ("async-default", sm.CheckpointUploadMode.ASYNC, None, False),
    ("async-keep", sm.CheckpointUploadMode.ASYNC, False, True),
)


def delete_flags_fn(config: dict[str, Any]) -> None:
    rank = sm.get_context().world_rank
    for step, (case, mode, delete, _) in enumerate(DELETE_CASES):
        folder = os.path.join(config["local"], f"rank{rank}", case)
        write_checkpoint(folder, "weights.bin", os.urandom(1024))
        sm.report(
            {"step": step},
            checkpoint=sm.Checkpoint.from_directory(folder),
            checkpoint_upload_mode=mode,
            delete_local_checkpoint_after_upload=delete,
        )


def temporary_directory_fn(config: dict[str, Any]) -> None:
    rank = sm.get_context().world_rank
    for step in range(config["steps"]):
        with tempfile.TemporaryDirectory() as local:
            write_checkpoint(local, "data.bin", f"rank {rank} step {step};".encode() * 1000)
            sm.report(
                {"step": step},
                checkpoint=sm.Checkpoint.from_directory(local),
                checkpoint_upload_mode=sm.CheckpointUploadMode.ASYNC,
            )


def failing_rank_fn(config: dict[str, Any]) -> None:
    rank = sm.get_context().world_rank
    if rank == 1:
        sm.report({"step": 0})
        sm.report({"step": 1})
        raise KeyError("rank-1-broke")
    step = 0
    while True:  # ends only when report() raises RunAbortedError, because the run is failing
        sm.report({"step": step})
        step += 1


def missing_no_upload_fn(config: dict[str, Any]) -> None:
    ctx = sm.get_context()
    for step in range(3):
        target = ctx.next_checkpoint_path()
        if not (ctx.world_rank == 1 and step == 1):
            with fsspec.open(f"{target}/state.txt", "wb", auto_mkdir=True) as handle:
                handle.write(b"x")
        sm.report({"step": step}, checkpoint=sm.Checkpoint(target), checkpoint_upload_mode=MODES[2])


def uneven_counts_fn(config: dict[str, Any]) -> None:
    for step in range(3 - sm.get_context().world_rank):
        sm.report({"step": step})


def resumable_fn(config: dict[str, Any]) -> None:
    rank = sm.get_context().world_rank
    start = sm.get_checkpoint()
    resumed_from = -1
    if start is not None:
        with start.as_directory() as folder:
            with open(os.path.join(folder, f"rank_{rank}", "step.txt")) as handle:
                resumed_from = int(handle.read())
    for step in range(resumed_from + 1, config["steps"]):
        local = tempfile.mkdtemp()
        write_checkpoint(local, "step.txt", str(step).encode())
        sm.report(
            {"step": step, "resumed_from": resumed_from},
            checkpoint=sm.Checkpoint.from_directory(local),
            checkpoint_upload_mode=sm.CheckpointUploadMode.SYNC,
        )
        flag = os.path.join(config["flags"], "failed-once")
        if rank == 1 and step == 1 and not os.path.exists(flag):
            open(flag, "w").close()
            raise RuntimeError("first attempt breaks after step 1")


# -- the contract, on both backends --------------------------------------------------------


def test_reports_reach_the_controller_in_order_and_commit_in_order_for_mixed_modes(backend: str, file_url: str) -> None:
    recorder = Recorder()
    config = {"steps": 7, "metrics_only_step": 4}
    result = fit(make_trainer(mixed_modes_fn, config, backend, file_url, callbacks=(recorder,)))

    for rank in (0, 1):
        assert [i for r, i in recorder.handed_off if r == rank] == list(range(7))
    assert result.committed_indices == list(range(7))
    assert recorder.commits == [0, 1, 2, 3, 5, 6]
    assert all(r.state is sm.ReportState.REPORTED for r in result.reports)
    assert len(result.reports) == 14
    assert result.metrics == {"step": 6, "rank": 0}
    assert result.checkpoint is not None
    assert read_files(result.checkpoint) == {
        "rank_0/state.txt": b"rank 0 step 6",
        "rank_1/state.txt": b"rank 1 step 6",
    }


def test_local_checkpoint_is_deleted_after_upload_only_as_the_flag_or_mode_default_says(
    backend: str, file_url: str, tmp_path: Any
) -> None:
    local = os.path.join(str(tmp_path), "local")
    result = fit(make_trainer(delete_flags_fn, {"local": local}, backend, file_url))

    assert result.committed_indices == [0, 1, 2, 3]
    for rank in (0, 1):
        kept = {case: os.path.isdir(os.path.join(local, f"rank{rank}", case)) for case, *_ in DELETE_CASES}
        assert kept == {case: keep for case, _, _, keep in DELETE_CASES}


def test_async_report_from_a_temporary_directory_commits_what_was_reported(backend: str, file_url: str) -> None:
    result = fit(make_trainer(temporary_directory_fn, {"steps": 3}, backend, file_url))

    assert result.committed_indices == [0, 1, 2]
    assert len(result.best_checkpoints) == 3
    for step, (checkpoint, metrics) in enumerate(result.best_checkpoints):
        assert metrics == {"step": step}
        assert read_files(checkpoint) == {
            f"rank_{rank}/data.bin": f"rank {rank} step {step};".encode() * 1000 for rank in (0, 1)
        }


def test_training_error_on_one_rank_fails_the_run_and_stops_the_other_rank(backend: str, file_url: str) -> None:
    with pytest.raises(sm.TrainingFailedError) as caught:
        fit(make_trainer(failing_rank_fn, {}, backend, file_url))

    error = caught.value
    assert "rank 1" in str(error) and "after report 1" in str(error) and "rank-1-broke" in str(error)
    assert isinstance(error.__cause__, KeyError)
    assert error.result is not None and error.result.error is error
    assert [r.index for r in error.result.reports if r.rank == 1] == [0, 1]
    # Returning at all is the other half: rank 0 reports in a loop that only report() raising
    # RunAbortedError (the backend's abort) can end; a missed abort is a TooSlowError here.


def test_failed_report_fails_the_run_naming_rank_and_index(backend: str, file_url: str) -> None:
    with pytest.raises(sm.TrainingFailedError) as caught:
        fit(make_trainer(missing_no_upload_fn, {}, backend, file_url))

    assert "rank 1, report 1 failed" in str(caught.value)
    assert isinstance(caught.value.__cause__, FileNotFoundError)
    assert caught.value.result is not None
    assert 1 not in caught.value.result.committed_indices
    failed = [r for r in caught.value.result.reports if r.state is sm.ReportState.FAILED]
    assert [(r.rank, r.index) for r in failed] == [(1, 1)]


def test_ranks_that_report_a_different_number_of_times_fail_the_run(backend: str, file_url: str) -> None:
    with pytest.raises(sm.TrainingFailedError) as caught:
        fit(make_trainer(uneven_counts_fn, {}, backend, file_url))

    message = str(caught.value)
    assert "different number of times" in message
    assert "rank 0: 3" in message and "rank 1: 2" in message
    assert caught.value.result is not None and caught.value.result.committed_indices == [0, 1]


def test_failed_attempt_restarts_from_the_latest_commit_and_a_new_fit_resumes(
    backend: str, file_url: str, tmp_path: Any
) -> None:
    config = {"steps": 4, "flags": str(tmp_path)}
    first = fit(make_trainer(resumable_fn, config, backend, file_url, failure_config=sm.FailureConfig(max_failures=1)))

    assert len(first.failures) == 1
    failed_attempt = first.failures[0].result
    assert failed_attempt is not None
    # Rank 0 may not have reported anything yet when rank 1 breaks (on Ray its actor may start
    # later), so the failed attempt may have committed nothing: the restart then starts over.
    last_committed = max(failed_attempt.committed_indices, default=-1)
    assert first.metrics == {"step": 3, "resumed_from": last_committed}
    assert first.committed_indices == list(range(last_committed + 1, 4))

    second = fit(make_trainer(resumable_fn, {**config, "steps": 6}, backend, file_url))

    assert second.failures == []
    assert second.committed_indices == [4, 5]
    assert second.metrics == {"step": 5, "resumed_from": 3}
    assert second.checkpoint is not None
    assert read_files(second.checkpoint) == {"rank_0/step.txt": b"5", "rank_1/step.txt": b"5"}


# -- what only the Ray backend can get wrong ---------------------------------------------------


def dying_rank_fn(config: dict[str, Any]) -> None:
    rank = sm.get_context().world_rank
    flag = os.path.join(config["flags"], "died-once")
    for step in range(3):
        sm.report({"step": step})
        if rank == 1 and step == 0 and not os.path.exists(flag):
            open(flag, "w").close()
            os._exit(1)  # the whole actor process goes, as on a lost node


class UnpicklableError(Exception):
    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.lock = threading.Lock()


def unpicklable_error_fn(config: dict[str, Any]) -> None:
    sm.report({"step": 0})
    if sm.get_context().world_rank == 0:
        raise UnpicklableError("holds a lock")
    sm.report({"step": 1})


@pytest.mark.ray
def test_ray_actor_that_dies_fails_the_attempt_naming_the_rank_and_the_run_restarts(
    ray_cluster: str, file_url: str, tmp_path: Any
) -> None:
    from ray.exceptions import RayActorError

    trainer = make_trainer(
        dying_rank_fn, {"flags": str(tmp_path)}, "ray", file_url, failure_config=sm.FailureConfig(max_failures=1)
    )
    result = fit(trainer)

    assert len(result.failures) == 1
    assert "rank 1 died" in str(result.failures[0]) and "Ray actor was lost" in str(result.failures[0])
    assert isinstance(result.failures[0].__cause__, RayActorError)
    assert result.metrics == {"step": 2}


@pytest.mark.ray
def test_ray_actor_that_dies_without_restarts_left_fails_fit(ray_cluster: str, file_url: str, tmp_path: Any) -> None:
    with pytest.raises(sm.TrainingFailedError, match=r"rank 1 died .*Ray actor was lost"):
        fit(make_trainer(dying_rank_fn, {"flags": str(tmp_path)}, "ray", file_url))


@pytest.mark.ray
def test_ray_ranks_the_cluster_cannot_place_fail_within_the_placement_timeout(ray_cluster: str, file_url: str) -> None:
    trainer = sm.Trainer(
        uneven_counts_fn,
        scaling_config=sm.ScalingConfig(num_workers=2, resources_per_worker={"CPU": 64}),
        run_config=sm.RunConfig(storage_path=file_url, name="run"),
        backend="ray",
        backend_options={"placement_timeout_s": 1.0},
    )
    with pytest.raises(sm.TrainingFailedError) as caught:
        fit(trainer)

    message = str(caught.value)
    assert "could not place 2 ranks with {'CPU': 64.0} each within 1 s" in message
    assert "'CPU': 4.0" in message  # what the cluster has
    assert caught.value.result is not None and caught.value.result.reports == []


@pytest.mark.ray
def test_ray_error_that_cannot_be_pickled_reaches_the_driver_with_its_type_and_traceback(
    ray_cluster: str, file_url: str
) -> None:
    from statemachine.backends.ray import RemoteRankError

    with pytest.raises(sm.TrainingFailedError) as caught:
        fit(make_trainer(unpicklable_error_fn, {}, "ray", file_url))

    assert "rank 0 failed in its training function after report 0" in str(caught.value)
    cause = caught.value.__cause__
    assert isinstance(cause, RemoteRankError)
    assert cause.type_name == "UnpicklableError" and "holds a lock" in str(cause)
    assert "unpicklable_error_fn" in cause.remote_traceback


@pytest.mark.ray
def test_ray_training_function_that_cannot_be_shipped_fails_the_run_clearly(ray_cluster: str, file_url: str) -> None:
    lock = threading.Lock()

    def holds_a_lock() -> None:
        with lock:
            sm.report({"step": 0})

    with pytest.raises(sm.TrainingFailedError, match="could not start the ranks as Ray actors"):
        fit(make_trainer(holds_a_lock, {}, "ray", file_url))


def test_ray_backend_refuses_per_process_memory_storage_at_the_call() -> None:
    with pytest.raises(ValueError, match=r"backend='ray' cannot use storage_path='memory://runs'"):
        sm.Trainer(uneven_counts_fn, run_config=sm.RunConfig(storage_path="memory://runs"), backend="ray")


@pytest.mark.ray
def test_ray_driver_joins_an_existing_cluster_by_address(ray_cluster: str, file_url: str) -> None:
    script = textwrap.dedent(
        f"""
        import ray, statemachine as sm

        def train_fn():
            for step in range(3):
                sm.report({{"step": step, "rank": sm.get_context().world_rank}})

        result = sm.Trainer(
            train_fn,
            scaling_config=sm.ScalingConfig(num_workers=2),
            run_config=sm.RunConfig(storage_path={file_url!r}, name="joined"),
            backend="ray",
            backend_options={{"address": {ray_cluster!r}}},
        ).fit()
        print("ADDRESS", ray.get_runtime_context().gcs_address)
        print("COMMITTED", result.committed_indices, result.metrics)
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=RAY_DEADLINE_S, check=False
    )

    assert done.returncode == 0, done.stderr[-3000:]
    assert f"ADDRESS {ray_cluster}" in done.stdout
    assert "COMMITTED [0, 1, 2] {'step': 2, 'rank': 0}" in done.stdout


def test_report_failed_error_keeps_rank_and_index_across_processes() -> None:
    error = sm.ReportFailedError("rank 1, report 3: boom", 1, 3)
    error.add_note("raised on rank 1")

    copy = pickle.loads(pickle.dumps(error))

    assert (str(copy), copy.rank, copy.index) == ("rank 1, report 3: boom", 1, 3)
    assert copy.__notes__ == ["raised on rank 1"]
