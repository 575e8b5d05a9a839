"""``python -m statemachine inspect``: committed, corrupt, partial and missing checkpoint folders."""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any

import fsspec
import pytest

import statemachine as sm
from statemachine.cli import main
from statemachine.inspect_cmd import inspect_run, open_run
from tests.conftest import run_trio


def _train(config: dict[str, Any]) -> None:
    for step in range(config["steps"]):
        with tempfile.TemporaryDirectory() as local:
            with open(os.path.join(local, "weights.bin"), "wb") as handle:
                handle.write(bytes([step]) * 4096)
            with open(os.path.join(local, "meta.txt"), "w") as handle:
                handle.write(f"step {step}")
            sm.report({"loss": 1.0 / (step + 1), "step": step}, checkpoint=sm.Checkpoint.from_directory(local))


def _run(storage_url: str) -> str:
    trainer = sm.Trainer(
        _train,
        train_loop_config={"steps": 4},
        scaling_config=sm.ScalingConfig(num_workers=2),
        run_config=sm.RunConfig(
            storage_path=storage_url, name="insp", checkpoint_config=sm.CheckpointConfig(num_to_keep=3)
        ),
    )
    result = run_trio(trainer.fit_async)
    return result.path


def test_inspect_lists_committed_checkpoints_with_metrics_sizes_and_the_kept_set(storage_url: str) -> None:
    run_url = _run(storage_url)
    inspection = inspect_run(open_run(run_url))
    assert inspection.ok
    assert [(c.index, c.status, c.kept) for c in inspection.checkpoints] == [
        (1, "ok", True),
        (2, "ok", True),
        (3, "ok", True),
    ]
    first = inspection.checkpoints[0]
    assert first.metrics == {"loss": 0.5, "step": 1}
    assert first.ranks == [0, 1]
    assert first.verification is not None
    assert (first.verification.files, first.verification.bytes) == (4, 2 * (4096 + len("step 1")))
    assert inspection.to_json()["kept"] == ["checkpoint_000001", "checkpoint_000002", "checkpoint_000003"]


def test_inspect_lists_files_the_manifest_does_not_name_without_failing(memory_url: str) -> None:
    storage = open_run(_run(memory_url))
    storage.fs.pipe_file(storage.path("checkpoint_000003/rank_0/notes.txt"), b"left by the user")
    entry = inspect_run(storage).checkpoints[-1]
    assert entry.status == "ok"
    assert entry.verification is not None and entry.verification.extra == ["rank_0/notes.txt"]


def test_inspect_flags_corrupt_partial_and_missing_folders_and_exits_1(
    storage_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    run_url = _run(storage_url)
    fs, root = fsspec.core.url_to_fs(run_url)
    fs.rm(f"{root}/checkpoint_000002/rank_1/meta.txt")
    fs.makedirs(f"{root}/checkpoint_000007/rank_0", exist_ok=True)
    fs.pipe_file(f"{root}/checkpoint_000007/rank_0/weights.bin", b"half")
    fs.rm(f"{root}/checkpoint_000001", recursive=True)
    assert main(["inspect", run_url, "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] is False
    statuses = {c["path"]: c["status"] for c in report["checkpoints"]}
    assert statuses == {
        "checkpoint_000001": "missing",
        "checkpoint_000002": "corrupt",
        "checkpoint_000003": "ok",
        "checkpoint_000007": "partial",
    }
    corrupt = next(c for c in report["checkpoints"] if c["path"] == "checkpoint_000002")
    assert corrupt["problems"] == ["rank 1: checkpoint_000002/rank_1/meta.txt is missing"]


def test_inspect_deep_finds_a_changed_byte_that_sizes_cannot(
    memory_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    run_url = _run(memory_url)
    fs, root = fsspec.core.url_to_fs(run_url)
    path = f"{root}/checkpoint_000003/rank_0/weights.bin"
    fs.pipe_file(path, b"\xff" + fs.cat_file(path)[1:])
    assert main(["inspect", run_url]) == 0
    assert main(["inspect", run_url, "--deep"]) == 1
    text = capsys.readouterr().out
    assert "checkpoint_000003" in text and "CRC-32C" in text and "corrupt" in text


def test_inspect_of_a_folder_that_does_not_exist_exits_2(memory_url: str) -> None:
    assert main(["inspect", f"{memory_url}/nothing-here"]) == 2


def test_inspect_accepts_a_plain_local_path(tmp_path: Any, capsys: pytest.CaptureFixture[str]) -> None:
    run_url = _run(str(tmp_path / "runs"))
    assert run_url.startswith("file://")
    assert main(["inspect", str(tmp_path / "runs" / "insp")]) == 0
    out = capsys.readouterr().out
    assert "checkpoint_000003" in out and "kept" in out


def _train_no_upload(config: dict[str, Any]) -> None:
    ctx = sm.get_context()
    for step in range(2):
        # Registered in place, in a folder of its own outside checkpoint_NNNNNN.
        target = f"{ctx.storage_path}/shards/step{step}/rank_{ctx.world_rank}"
        with fsspec.open(f"{target}/model.bin", "wb", auto_mkdir=True) as handle:
            handle.write(bytes([step]) * 100)
        sm.report(
            {"step": step},
            checkpoint=sm.Checkpoint(target),
            checkpoint_upload_mode=sm.CheckpointUploadMode.NO_UPLOAD,
        )


def test_inspect_verifies_no_upload_parts_registered_outside_the_checkpoint_folder(memory_url: str) -> None:
    trainer = sm.Trainer(
        _train_no_upload,
        scaling_config=sm.ScalingConfig(num_workers=2),
        run_config=sm.RunConfig(storage_path=memory_url, name="shards"),
    )
    result = run_trio(trainer.fit_async)
    storage = open_run(result.path)
    inspection = inspect_run(storage)
    assert [(c.index, c.status) for c in inspection.checkpoints] == [(0, "ok"), (1, "ok")]
    assert inspection.checkpoints[1].verification is not None
    assert inspection.checkpoints[1].verification.files == 2
    storage.fs.rm(storage.path("shards/step1/rank_0/model.bin"))
    again = inspect_run(storage)
    assert [(c.index, c.status) for c in again.checkpoints] == [(0, "ok"), (1, "corrupt")]
    assert again.checkpoints[1].verification is not None
    assert again.checkpoints[1].verification.problems == ["rank 0: shards/step1/rank_0/model.bin is missing"]
