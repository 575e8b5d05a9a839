"""Resume across runs: a new ``fit()`` with the same name starts from the latest whole checkpoint."""

from __future__ import annotations

import logging
import os
import tempfile
from typing import Any

import fsspec
import pytest

import statemachine as sm
from statemachine.storage import RunStorage
from statemachine.trainer import load_committed
from statemachine.verify import verify_checkpoint
from tests.conftest import run_trio


def _train(config: dict[str, Any]) -> None:
    """Record what it resumed from; report ``steps`` checkpoints holding the global step."""
    ctx = sm.get_context()
    start = sm.get_checkpoint()
    first_step = 0
    if start is not None:
        # Each rank reads its own part (fsspec's memory:// hands every reader of a file the same
        # file object, so ranks copying the whole checkpoint at once would race on its position).
        first_step = int(start.filesystem.cat_file(f"{start.path}/rank_{ctx.world_rank}/step.txt")) + 1
    config["resumed_from"][ctx.world_rank] = (start.path if start else None, first_step)
    for step in range(first_step, first_step + config["steps"]):
        with tempfile.TemporaryDirectory() as local:
            with open(os.path.join(local, "step.txt"), "w") as handle:
                handle.write(str(step))
            with open(os.path.join(local, "weights.bin"), "wb") as handle:
                handle.write(bytes([step % 256]) * 2048)
            sm.report(
                {"step": step},
                checkpoint=sm.Checkpoint.from_directory(local),
                checkpoint_upload_mode=sm.CheckpointUploadMode.ASYNC,
            )


def _fit(storage_url: str, steps: int) -> tuple[sm.Result, dict[int, tuple[str | None, int]]]:
    resumed_from: dict[int, tuple[str | None, int]] = {}
    trainer = sm.Trainer(
        _train,
        train_loop_config={"steps": steps, "resumed_from": resumed_from},
        scaling_config=sm.ScalingConfig(num_workers=2),
        run_config=sm.RunConfig(storage_path=storage_url, name="resume"),
    )
    return run_trio(trainer.fit_async), resumed_from


def test_second_fit_resumes_from_the_latest_committed_checkpoint(storage_url: str) -> None:
    first, _ = _fit(storage_url, 3)
    assert first.committed_indices == [0, 1, 2]
    second, resumed_from = _fit(storage_url, 2)
    assert {rank: os.path.basename(path or "") for rank, (path, _) in resumed_from.items()} == {
        0: "checkpoint_000002",
        1: "checkpoint_000002",
    }
    assert {step for _, step in resumed_from.values()} == {3}
    assert second.committed_indices == [3, 4]
    assert sorted({r.index for r in second.reports}) == [3, 4]
    assert second.metrics == {"step": 4}
    assert [os.path.basename(c.path) for c, _ in second.best_checkpoints] == [f"checkpoint_{i:06d}" for i in range(5)]


def _damage(storage_url: str, relative: str, how: str) -> None:
    fs, root = fsspec.core.url_to_fs(f"{storage_url}/resume")
    path = f"{root}/{relative}"
    if how == "missing":
        fs.rm(path)
    else:
        fs.pipe_file(path, fs.cat_file(path)[:-1])


@pytest.mark.parametrize("how", ["missing", "truncated"])
def test_a_latest_checkpoint_that_no_longer_matches_its_manifest_is_skipped_with_a_warning(
    storage_url: str, how: str, caplog: pytest.LogCaptureFixture
) -> None:
    _fit(storage_url, 3)
    _damage(storage_url, "checkpoint_000002/rank_1/weights.bin", how)
    with caplog.at_level(logging.WARNING, logger="statemachine"):
        second, resumed_from = _fit(storage_url, 1)
    assert {os.path.basename(path or "") for path, _ in resumed_from.values()} == {"checkpoint_000001"}
    assert {step for _, step in resumed_from.values()} == {2}
    # The damaged index is not reused: its folder is left for inspection.
    assert second.committed_indices == [3]
    warnings = [r.getMessage() for r in caplog.records if "not resuming from" in r.getMessage()]
    assert len(warnings) == 1 and "checkpoint_000002" in warnings[0] and "rank 1" in warnings[0]


def test_quick_verification_misses_same_size_corruption_and_deep_verification_finds_it(memory_url: str) -> None:
    _fit(memory_url, 1)
    storage = RunStorage(memory_url, "resume")
    fs = storage.fs
    path = storage.path("checkpoint_000000/rank_0/weights.bin")
    data = bytearray(fs.cat_file(path))
    data[0] ^= 0xFF
    fs.pipe_file(path, bytes(data))
    committed, next_index = load_committed(storage)
    assert [c.index for c in committed] == [0] and next_index == 1
    assert verify_checkpoint(storage, committed[0]).ok
    deep = verify_checkpoint(storage, committed[0], deep=True)
    assert not deep.ok
    assert deep.problems == [
        f"rank 0: checkpoint_000000/rank_0/weights.bin has CRC-32C {_crc(bytes(data))}, the manifest says "
        f"{committed[0].parts[0].files[1].checksum}"
    ]


def _crc(data: bytes) -> str:
    import crc32c

    return f"{crc32c.crc32c(data):08x}"


def test_every_checkpoint_damaged_means_a_fresh_start_with_later_indices(memory_url: str) -> None:
    _fit(memory_url, 2)
    _damage(memory_url, "checkpoint_000000/rank_0/step.txt", "missing")
    _damage(memory_url, "checkpoint_000001/rank_0/step.txt", "missing")
    second, resumed_from = _fit(memory_url, 1)
    assert resumed_from == {0: (None, 0), 1: (None, 0)}
    assert second.committed_indices == [2]
