"""The contract over S3's real protocol: s3fs talking HTTP to a moto server on 127.0.0.1.

The server is moto's ``ThreadedMotoServer`` (a real werkzeug HTTP server, started once per
session on a free port); the library reaches it through ``RunConfig.storage_options`` exactly
as it would reach AWS, so every request (multipart uploads, conditional PUTs, listings, server
side copies) goes over the wire.
"""

from __future__ import annotations

import json
import os
import posixpath
import uuid
from collections.abc import Iterator
from typing import Any

import crc32c
import fsspec
import pytest

import statemachine as sm
from statemachine.cli import main
from statemachine.storage import MARKER_NAME, S3_DEFAULT_OPTIONS, STAGING_NAME, CommittedCheckpoint, RunStorage

pytestmark = [pytest.mark.s3, pytest.mark.timeout(120)]

BUCKET = "statemachine-tests"
MIB = 1024 * 1024


@pytest.fixture(scope="session")
def s3_server() -> Iterator[dict[str, Any]]:
    """A moto S3 server on 127.0.0.1 (free port) with one bucket; yields the storage options."""
    from moto.server import ThreadedMotoServer

    saved = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")}
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1")
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    options: dict[str, Any] = {
        "key": "testing",
        "secret": "testing",
        "anon": False,
        "client_kwargs": {"endpoint_url": f"http://{host}:{port}"},
    }
    fs = fsspec.filesystem("s3", **options)
    fs.mkdir(BUCKET)
    try:
        yield options
    finally:
        server.stop()
        fsspec.filesystem("s3", **options).clear_instance_cache()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture
def s3_url(s3_server: dict[str, Any]) -> str:
    return f"s3://{BUCKET}/runs-{uuid.uuid4().hex[:8]}"


def _s3(options: dict[str, Any]) -> Any:
    return fsspec.filesystem("s3", **{**S3_DEFAULT_OPTIONS, **options})


def _write(folder: str, name: str, data: bytes) -> None:
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, name), "wb") as handle:
        handle.write(data)


def _payload(rank: int, step: int) -> bytes:
    return f"rank {rank} step {step} ".encode() * 1000


def mixed_modes_fn(config: dict[str, Any]) -> None:
    ctx = sm.get_context()
    rank = ctx.world_rank
    for step, mode in enumerate(("SYNC", "ASYNC", "NO_UPLOAD", "metrics")):
        metrics = {"step": step, "rank": rank}
        if mode == "metrics":
            sm.report(metrics)
        elif mode == "NO_UPLOAD":
            target = ctx.next_checkpoint_path()
            with fsspec.open(f"{target}/weights.bin", "wb", **config["options"]) as handle:
                handle.write(_payload(rank, step))
            sm.report(
                metrics, checkpoint=sm.Checkpoint(target), checkpoint_upload_mode=sm.CheckpointUploadMode.NO_UPLOAD
            )
        else:
            local = os.path.join(config["tmp"], f"rank_{rank}", str(step))
            _write(local, "weights.bin", _payload(rank, step))
            sm.report(
                metrics,
                checkpoint=sm.Checkpoint.from_directory(local),
                checkpoint_upload_mode=sm.CheckpointUploadMode[mode],
            )


def test_mixed_modes_over_s3_commit_every_index_in_order_with_a_manifest_that_matches_the_objects(
    s3_server: dict[str, Any], s3_url: str, tmp_path: Any
) -> None:
    result = sm.Trainer(
        mixed_modes_fn,
        train_loop_config={"options": s3_server, "tmp": str(tmp_path)},
        scaling_config=sm.ScalingConfig(num_workers=2),
        run_config=sm.RunConfig(storage_path=s3_url, name="mixed", storage_options=s3_server),
    ).fit()

    fs = _s3(s3_server)
    run = f"{s3_url[len('s3://') :]}/mixed"
    assert result.committed_indices == [0, 1, 2, 3]
    assert [r.state for r in result.reports] == [sm.ReportState.REPORTED] * 8
    for index in range(3):
        folder = f"{run}/checkpoint_{index:06d}"
        marker = json.loads(fs.cat_file(f"{folder}/{MARKER_NAME}"))
        assert marker["index"] == index and marker["ranks"] == [0, 1]
        for part in marker["parts"]:
            (entry,) = part["files"]
            data = fs.cat_file(f"{run}/{part['path']}/{entry['path']}")
            assert data == _payload(part["rank"], index)
            assert entry["crc32c"] == f"{crc32c.crc32c(data):08x}" and entry["size"] == len(data)
    assert not [p for p in fs.find(run) if "/.staging/" in p]
    assert json.loads(fs.cat_file(f"{run}/run_state.json"))["latest"] == 2
    assert result.checkpoint is not None
    local = result.checkpoint.to_directory(str(tmp_path / "restored"))
    with open(os.path.join(local, "rank_1", "weights.bin"), "rb") as handle:
        assert handle.read() == _payload(1, 2)


def test_commit_marker_on_s3_is_written_once_and_a_second_commit_of_the_index_raises(
    s3_server: dict[str, Any], s3_url: str
) -> None:
    storage = RunStorage(s3_url, "marker", s3_server)
    first = CommittedCheckpoint(0, "checkpoint_000000", {"loss": 1.0})
    storage.commit(first)

    with pytest.raises(FileExistsError, match=MARKER_NAME):
        storage.commit(CommittedCheckpoint(0, "checkpoint_000000", {"loss": 2.0}))
    marker = storage.read_marker("checkpoint_000000")
    assert marker is not None and marker.metrics == {"loss": 1.0}


def test_s3_server_refuses_a_conditional_create_over_an_existing_marker(s3_server: dict[str, Any], s3_url: str) -> None:
    # The race the exists() check cannot close: a second writer that already passed it. The
    # PUT itself carries If-None-Match, so the store refuses it.
    storage = RunStorage(s3_url, "race", s3_server)
    storage.commit(CommittedCheckpoint(0, "checkpoint_000000", {"loss": 1.0}))
    path = storage.path(posixpath.join("checkpoint_000000", MARKER_NAME))

    with pytest.raises(FileExistsError):
        storage.fs.pipe_file(path, b"{}", mode="create")
    assert json.loads(storage.fs.cat_file(path))["metrics"] == {"loss": 1.0}


def sync_report_fn(config: dict[str, Any]) -> None:
    local = os.path.join(config["tmp"], f"rank_{sm.get_context().world_rank}")
    _write(local, "weights.bin", b"w" * (3 * MIB))
    sm.report({"step": 0}, checkpoint=sm.Checkpoint.from_directory(local))


def test_upload_that_s3_rejects_fails_the_run_naming_rank_and_index_and_commits_nothing(
    s3_server: dict[str, Any], s3_url: str, tmp_path: Any
) -> None:
    # 1 MiB parts are below S3's 5 MiB minimum: the server refuses to complete the multipart
    # upload (EntityTooSmall), as AWS would.
    trainer = sm.Trainer(
        sync_report_fn,
        train_loop_config={"tmp": str(tmp_path)},
        run_config=sm.RunConfig(
            storage_path=s3_url,
            name="fails",
            storage_options={**s3_server, "default_block_size": MIB},
            upload_config=sm.UploadConfig(retry=sm.RetryPolicy(max_attempts=1)),
        ),
    )

    with pytest.raises(sm.TrainingFailedError, match=r"rank 0, report 0") as caught:
        trainer.fit()
    result = caught.value.result
    assert [r.state for r in result.reports] == [sm.ReportState.FAILED]
    assert result.committed_indices == [] and result.checkpoint is None
    assert not [p for p in _s3(s3_server).find(s3_url[len("s3://") :]) if p.endswith(MARKER_NAME)]
    assert os.path.exists(os.path.join(str(tmp_path), "rank_0", "weights.bin"))  # kept: nothing lost


def resume_fn(config: dict[str, Any]) -> None:
    start = sm.get_checkpoint()
    first = 0
    if start is not None:
        with start.as_directory() as folder, open(os.path.join(folder, "rank_0", "step.txt")) as handle:
            first = int(handle.read()) + 1
    for step in range(first, 4):
        if step == 2 and start is None:
            raise RuntimeError("simulated crash at step 2")
        local = os.path.join(config["tmp"], str(step))
        _write(local, "step.txt", str(step).encode())
        sm.report({"step": step}, checkpoint=sm.Checkpoint.from_directory(local))


def test_second_fit_on_s3_resumes_after_the_latest_commit_and_removes_a_partial_folder(
    s3_server: dict[str, Any], s3_url: str, tmp_path: Any
) -> None:
    def trainer() -> sm.Trainer:
        return sm.Trainer(
            resume_fn,
            train_loop_config={"tmp": str(tmp_path)},
            run_config=sm.RunConfig(storage_path=s3_url, name="resume", storage_options=s3_server),
        )

    with pytest.raises(sm.TrainingFailedError, match="simulated crash"):
        trainer().fit()
    fs = _s3(s3_server)
    run = f"{s3_url[len('s3://') :]}/resume"
    fs.pipe_file(f"{run}/checkpoint_000002/rank_0/step.txt", b"partial, never committed")

    result = trainer().fit()

    assert [r.index for r in result.reports] == [2, 3]
    assert result.committed_indices == [2, 3]
    marker = json.loads(fs.cat_file(f"{run}/checkpoint_000002/{MARKER_NAME}"))
    assert fs.cat_file(f"{run}/checkpoint_000002/rank_0/step.txt") == b"2"
    assert marker["parts"][0]["files"][0]["size"] == 1
    assert result.metrics == {"step": 3}


def test_s3_uploads_use_bounded_parts_and_concurrency_unless_the_user_overrides_them(
    s3_server: dict[str, Any], s3_url: str, tmp_path: Any
) -> None:
    storage = RunStorage(s3_url, "parts", s3_server)
    overridden = RunStorage(s3_url, "parts", {**s3_server, "max_concurrency": 2})
    local = str(tmp_path / "big")
    _write(local, "weights.bin", os.urandom(MIB) * 33)

    written: list[int] = []

    part = storage.upload_part(local, "checkpoint_000000/rank_0", 0, progress=written.append)

    assert (storage.fs.max_concurrency, storage.fs.default_block_size) == (4, 8 * MIB)
    assert overridden.fs.max_concurrency == 2
    assert sorted(written) == [MIB] + [8 * MIB] * 4  # one call per part sent
    assert storage.fs.size(storage.path("checkpoint_000000/rank_0/weights.bin")) == 33 * MIB == part.bytes


def test_s3_upload_writes_final_keys_directly_and_a_late_writer_cannot_replace_them(
    s3_server: dict[str, Any], s3_url: str, tmp_path: Any
) -> None:
    storage = RunStorage(s3_url, "direct", s3_server)
    local = str(tmp_path / "part")
    _write(local, "weights.bin", b"delivered")
    storage.upload_part(local, "checkpoint_000000/rank_0", 0)
    key = storage.path("checkpoint_000000/rank_0/weights.bin")

    # What an abandoned attempt that wakes up late would send:
    with pytest.raises(FileExistsError):
        storage.fs.pipe_file(key, b"stale bytes", mode="create")

    assert storage._has_conditional_create()
    assert storage.fs.cat_file(key) == b"delivered"
    assert not storage.fs.exists(storage.path(f"checkpoint_000000/{STAGING_NAME}"))


def test_s3_key_created_first_by_another_attempt_is_kept_only_when_its_size_matches(
    s3_server: dict[str, Any], s3_url: str, tmp_path: Any
) -> None:
    storage = RunStorage(s3_url, "race", s3_server)
    local = str(tmp_path / "part")
    _write(local, "a.bin", b"same bytes")
    _write(local, "b.bin", b"other")
    source_a, source_b = os.path.join(local, "a.bin"), os.path.join(local, "b.bin")
    key_a, key_b = storage.path("p/a.bin"), storage.path("p/b.bin")
    storage.fs.pipe_file(key_a, b"same bytes")

    storage._put_created([source_a], [key_a], [10], {}, None)
    storage.fs.pipe_file(key_b, b"a different length")
    with pytest.raises(FileExistsError):
        storage._put_created([source_b], [key_b], [5], {}, None)
    assert storage.fs.cat_file(key_a) == b"same bytes"


def test_bench_command_measures_s3_through_the_endpoint_option(
    s3_server: dict[str, Any], s3_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    endpoint = s3_server["client_kwargs"]["endpoint_url"]
    code = main(
        [
            "bench",
            "--storage",
            s3_url,
            "--storage-option",
            f"endpoint_url={endpoint}",
            "--storage-option",
            "key=testing",
            "--storage-option",
            "secret=testing",
            "--sections",
            "blocked,throughput",
            "--sizes",
            "1",
            "--ranks",
            "1",
            "--reports",
            "3",
            "--json",
        ]
    )

    figures = json.loads(capsys.readouterr().out)
    assert code == 0 and figures["storage"] == s3_url
    assert {row["mode"] for row in figures["blocked"]} == {"SYNC", "ASYNC", "NO_UPLOAD", "metrics-only"}
    (throughput,) = figures["throughput"]
    assert throughput["size_mib"] == 1 and throughput["ratio"] > 0
    assert not _s3(s3_server).find(s3_url[len("s3://") :])  # the bench leaves nothing behind
