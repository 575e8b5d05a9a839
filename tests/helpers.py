"""Building blocks for runtime tests: a training function driven by a per-rank plan."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import fsspec

import statemachine as sm
from statemachine.rank import HandOffMessage
from statemachine.storage import MARKER_NAME, CommittedCheckpoint

SYNC = sm.CheckpointUploadMode.SYNC
ASYNC = sm.CheckpointUploadMode.ASYNC
NO_UPLOAD = sm.CheckpointUploadMode.NO_UPLOAD
#: A plan step that reports metrics only.
METRICS = "METRICS"

Step = sm.CheckpointUploadMode | str


def payload(rank: int, step: int, size: int = 4096) -> bytes:
    """The checkpoint bytes of ``rank`` at ``step``: recognisable, so a mix-up shows."""
    seed = f"rank={rank};step={step};".encode()
    return (seed * (size // len(seed) + 1))[:size]


def plan_train_fn(config: dict[str, Any]) -> None:
    """Report ``config["plans"][rank]``: one mode (or METRICS) per report."""
    ctx = sm.get_context()
    for step, mode in enumerate(config["plans"][ctx.world_rank]):
        metrics = {"step": step, "rank": ctx.world_rank}
        if mode == METRICS:
            sm.report(metrics)
        elif mode is NO_UPLOAD:
            target = ctx.next_checkpoint_path()
            with fsspec.open(f"{target}/data.bin", "wb", auto_mkdir=True) as handle:
                handle.write(payload(ctx.world_rank, step))
            sm.report(metrics, checkpoint=sm.Checkpoint(target), checkpoint_upload_mode=NO_UPLOAD)
        else:
            with tempfile.TemporaryDirectory() as local:
                with open(os.path.join(local, "data.bin"), "wb") as handle:
                    handle.write(payload(ctx.world_rank, step))
                sm.report(metrics, checkpoint=sm.Checkpoint.from_directory(local), checkpoint_upload_mode=mode)


@dataclass
class Recorder:
    """A run callback that records hand-offs and commits in the order they happen."""

    hand_offs: list[HandOffMessage] = field(default_factory=list)
    commits: list[CommittedCheckpoint] = field(default_factory=list)

    def on_report(self, message: HandOffMessage) -> None:
        self.hand_offs.append(message)

    def on_commit(self, committed: CommittedCheckpoint) -> None:
        self.commits.append(committed)


def trainer(
    storage: str,
    plans: Sequence[Sequence[Step]],
    recorder: Recorder | None = None,
    upload: sm.UploadConfig | None = None,
    train_fn: Any = plan_train_fn,
    name: str = "run",
    **config: Any,
) -> sm.Trainer:
    return sm.Trainer(
        train_fn,
        train_loop_config={"plans": [list(p) for p in plans], **config},
        scaling_config=sm.ScalingConfig(num_workers=len(plans)),
        run_config=sm.RunConfig(
            storage_path=storage,
            name=name,
            upload_config=upload or sm.UploadConfig(),
            callbacks=(recorder,) if recorder else (),
        ),
    )


def read_marker(checkpoint: sm.Checkpoint) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(checkpoint.filesystem.cat_file(f"{checkpoint.path}/{MARKER_NAME}"))
    return data


def assert_run_is_consistent(result: sm.Result, recorder: Recorder, plans: Sequence[Sequence[Step]]) -> None:
    """Per-rank hand-off order, commit order, and committed checkpoints complete and correct."""
    for rank, plan in enumerate(plans):
        indices = [m.index for m in recorder.hand_offs if m.rank == rank]
        assert indices == list(range(len(plan))), f"rank {rank} handed off {indices}"
    committed = [c.index for c in recorder.commits]
    assert committed == sorted(committed)
    assert result.committed_indices == sorted(result.committed_indices)
    for commit in recorder.commits:
        expected_ranks = [r for r, plan in enumerate(plans) if plan[commit.index] != METRICS]
        assert [p.rank for p in commit.parts] == expected_ranks
        checkpoint = sm.Checkpoint(f"{result.path}/{commit.path}")
        marker = read_marker(checkpoint)
        assert marker["index"] == commit.index
        for part in commit.parts:
            data = checkpoint.filesystem.cat_file(f"{result.path.split('://', 1)[-1]}/{part.path}/data.bin")
            assert data == payload(part.rank, commit.index)
