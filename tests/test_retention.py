"""Retention: which committed checkpoints are kept, and that the rest are deleted for real."""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any

import fsspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

import statemachine as sm
from statemachine.config import CheckpointConfig
from statemachine.retention import plan_retention
from statemachine.storage import MARKER_NAME, RUN_STATE_NAME, CommittedCheckpoint
from tests.conftest import run_trio


def _ckpt(index: int, **metrics: Any) -> CommittedCheckpoint:
    return CommittedCheckpoint(index, f"checkpoint_{index:06d}", dict(metrics))


def _indices(checkpoints: tuple[CommittedCheckpoint, ...]) -> list[int]:
    return [c.index for c in checkpoints]


def test_num_to_keep_none_keeps_every_checkpoint() -> None:
    plan = plan_retention([_ckpt(i) for i in range(5)], CheckpointConfig())
    assert _indices(plan.keep) == [0, 1, 2, 3, 4]
    assert plan.delete == ()


def test_without_score_attribute_the_newest_are_kept() -> None:
    plan = plan_retention([_ckpt(i) for i in range(5)], CheckpointConfig(num_to_keep=2))
    assert _indices(plan.keep) == [3, 4]
    assert _indices(plan.delete) == [0, 1, 2]


@pytest.mark.parametrize(("order", "expected"), [("min", [1, 3, 4]), ("max", [0, 2, 4])])
def test_score_order_picks_the_best_and_the_latest_is_kept_besides(order: str, expected: list[int]) -> None:
    losses = [0.9, 0.1, 0.8, 0.2, 0.5]
    checkpoints = [_ckpt(i, loss=loss) for i, loss in enumerate(losses)]
    config = CheckpointConfig(num_to_keep=2, checkpoint_score_attribute="loss", checkpoint_score_order=order)  # type: ignore[arg-type]
    plan = plan_retention(checkpoints, config)
    assert _indices(plan.keep) == expected


def test_checkpoints_missing_the_score_attribute_are_deleted_first() -> None:
    checkpoints = [_ckpt(0, loss=5.0), _ckpt(1), _ckpt(2, loss=float("nan")), _ckpt(3, loss="high"), _ckpt(4, loss=9.0)]
    config = CheckpointConfig(num_to_keep=2, checkpoint_score_attribute="loss", checkpoint_score_order="min")
    plan = plan_retention(checkpoints, config)
    assert _indices(plan.keep) == [0, 4]
    assert _indices(plan.delete) == [1, 2, 3]


def test_protected_folders_and_folders_outside_the_run_are_never_deleted() -> None:
    checkpoints = [_ckpt(0), _ckpt(1), CommittedCheckpoint(2, "../elsewhere", {}), _ckpt(3), _ckpt(4)]
    plan = plan_retention(checkpoints, CheckpointConfig(num_to_keep=1), protected={"checkpoint_000001"})
    assert _indices(plan.keep) == [1, 2, 4]
    assert _indices(plan.delete) == [0, 3]


@given(
    scores=st.lists(st.one_of(st.none(), st.floats(-10, 10)), min_size=1, max_size=12),
    num_to_keep=st.integers(1, 5),
    order=st.sampled_from(["max", "min"]),
)
def test_plan_keeps_the_latest_at_most_n_plus_one_and_never_a_worse_one(
    scores: list[float | None], num_to_keep: int, order: str
) -> None:
    checkpoints = [_ckpt(i) if s is None else _ckpt(i, acc=s) for i, s in enumerate(scores)]
    config = CheckpointConfig(num_to_keep=num_to_keep, checkpoint_score_attribute="acc", checkpoint_score_order=order)  # type: ignore[arg-type]
    plan = plan_retention(checkpoints, config)
    assert sorted(_indices(plan.keep) + _indices(plan.delete)) == list(range(len(scores)))
    assert plan.keep[-1].index == len(scores) - 1
    assert len(plan.keep) <= num_to_keep + 1
    if plan.delete:
        assert len(plan.keep) >= num_to_keep

    def better(value: float | None) -> float:
        if value is None:
            return float("-inf")
        return value if order == "max" else -value

    kept_best = [better(scores[c.index]) for c in plan.keep if c.index != len(scores) - 1]
    for deleted in plan.delete:
        assert all(better(scores[deleted.index]) <= score for score in kept_best)


def _train(config: dict[str, Any]) -> None:
    for step, loss in enumerate(config["losses"]):
        with tempfile.TemporaryDirectory() as local:
            with open(os.path.join(local, "weights.bin"), "wb") as handle:
                handle.write(bytes([step]) * 1000)
            sm.report(
                {"loss": loss, "step": step},
                checkpoint=sm.Checkpoint.from_directory(local),
                checkpoint_upload_mode=config["modes"][step % len(config["modes"])],
            )


def test_fit_deletes_checkpoints_outside_the_kept_set_and_reports_the_kept_set(storage_url: str) -> None:
    losses = [0.9, 0.1, 0.8, 0.2, 0.5, 0.7]
    modes = [sm.CheckpointUploadMode.ASYNC, sm.CheckpointUploadMode.SYNC]
    trainer = sm.Trainer(
        _train,
        train_loop_config={"losses": losses, "modes": modes},
        scaling_config=sm.ScalingConfig(num_workers=2),
        run_config=sm.RunConfig(
            storage_path=storage_url,
            name="keep",
            checkpoint_config=sm.CheckpointConfig(
                num_to_keep=2, checkpoint_score_attribute="loss", checkpoint_score_order="min"
            ),
        ),
    )
    result = run_trio(trainer.fit_async)
    fs, root = fsspec.core.url_to_fs(f"{storage_url}/keep")
    folders = sorted(os.path.basename(p.rstrip("/")) for p in fs.ls(root, detail=False))
    assert folders == ["checkpoint_000001", "checkpoint_000003", "checkpoint_000005", RUN_STATE_NAME]
    for folder in ("checkpoint_000001", "checkpoint_000003", "checkpoint_000005"):
        assert fs.exists(f"{root}/{folder}/{MARKER_NAME}")
    state = json.loads(fs.cat_file(f"{root}/{RUN_STATE_NAME}"))
    assert [c["path"] for c in state["checkpoints"]] == ["checkpoint_000001", "checkpoint_000003", "checkpoint_000005"]
    assert state["latest"] == 5
    assert [m["loss"] for _, m in result.best_checkpoints] == [0.1, 0.2, 0.7]
    assert [os.path.basename(c.path) for c, _ in result.best_checkpoints] == [
        "checkpoint_000001",
        "checkpoint_000003",
        "checkpoint_000005",
    ]
    assert result.checkpoint is not None and result.checkpoint.path.endswith("checkpoint_000005")
    assert result.stats["checkpoints_deleted"] == 3
    assert result.stats["checkpoints_kept"] == 3


class _StateAtCommit:
    """Reads storage when each commit is announced: after the run state, before deletions."""

    def __init__(self, run_url: str) -> None:
        self.fs, self.root = fsspec.core.url_to_fs(run_url)
        self.seen: list[tuple[list[str], list[str]]] = []

    def on_commit(self, committed: CommittedCheckpoint) -> None:
        state = json.loads(self.fs.cat_file(f"{self.root}/{RUN_STATE_NAME}"))
        kept = [c["path"] for c in state["checkpoints"]]
        marked = sorted(
            os.path.basename(p.rstrip("/"))
            for p in self.fs.ls(self.root, detail=False)
            if self.fs.exists(f"{p.rstrip('/')}/{MARKER_NAME}")
        )
        self.seen.append((kept, marked))


def test_run_state_names_only_the_kept_set_before_anything_is_deleted(memory_url: str) -> None:
    observer = _StateAtCommit(f"{memory_url}/order")
    trainer = sm.Trainer(
        _train,
        train_loop_config={"losses": [0.5, 0.4, 0.3, 0.2], "modes": [sm.CheckpointUploadMode.SYNC]},
        run_config=sm.RunConfig(
            storage_path=memory_url,
            name="order",
            checkpoint_config=sm.CheckpointConfig(num_to_keep=1),
            callbacks=(observer,),
        ),
    )
    run_trio(trainer.fit_async)
    assert len(observer.seen) == 4
    for index, (kept, marked) in enumerate(observer.seen):
        # Commits announced together (written while a later report was already queued) see the
        # run state of their batch: it names only the newest, and nothing is deleted yet.
        assert len(kept) == 1 and kept[0] >= f"checkpoint_{index:06d}"
        newest = int(kept[0][-6:])
        assert all(f"checkpoint_{i:06d}" in marked for i in range(index, newest + 1))
    assert observer.seen[-1][0] == ["checkpoint_000003"]
    # When the last commit is announced, everything before it is out of the run state; the
    # folders it replaced are deleted only afterwards.
    assert "checkpoint_000002" in observer.seen[-1][1]
