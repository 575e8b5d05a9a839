"""Run statistics in ``result.stats``, per-upload progress callbacks, and the rich display."""

from __future__ import annotations

import io
import logging
import math
import os
import tempfile
import threading
from typing import Any

import pytest
from rich.console import Console

import statemachine as sm
from statemachine.progress import RunProgress
from statemachine.storage import CHUNK_SIZE
from tests.conftest import run_trio

SIZES = {"small.bin": 3000, "large.bin": CHUNK_SIZE + 5000}


def _train(config: dict[str, Any]) -> None:
    modes = config["modes"]
    for step in range(config["steps"]):
        mode = modes[step % len(modes)]
        if mode is None:
            sm.report({"step": step})
            continue
        with tempfile.TemporaryDirectory() as local:
            for name, size in SIZES.items():
                with open(os.path.join(local, name), "wb") as handle:
                    handle.write(b"x" * size)
            sm.report({"step": step}, checkpoint=sm.Checkpoint.from_directory(local), checkpoint_upload_mode=mode)


class _Recorder:
    """Collects upload progress per (rank, index), and the threads it was called from."""

    def __init__(self) -> None:
        self.bytes: dict[tuple[int, int], int] = {}
        self.calls: dict[tuple[int, int], int] = {}
        self.threads: set[int] = set()
        self.lock = threading.Lock()

    def on_upload_progress(self, rank: int, index: int, nbytes: int) -> None:
        with self.lock:
            self.bytes[(rank, index)] = self.bytes.get((rank, index), 0) + nbytes
            self.calls[(rank, index)] = self.calls.get((rank, index), 0) + 1
            self.threads.add(threading.get_ident())


def _trainer(storage_url: str, callbacks: tuple[object, ...] = (), progress: bool | None = False) -> sm.Trainer:
    modes = [sm.CheckpointUploadMode.SYNC, sm.CheckpointUploadMode.ASYNC, None]
    return sm.Trainer(
        _train,
        train_loop_config={"steps": 6, "modes": modes},
        scaling_config=sm.ScalingConfig(num_workers=2),
        run_config=sm.RunConfig(
            storage_path=storage_url,
            name="stats",
            checkpoint_config=sm.CheckpointConfig(num_to_keep=2),
            upload_config=sm.UploadConfig(progress=progress),
            callbacks=callbacks,
        ),
    )


def test_result_stats_count_reports_bytes_uploads_and_blocked_time(
    storage_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="statemachine"):
        result = run_trio(_trainer(storage_url).fit_async)
    stats = result.stats
    assert stats["reports"] == 12
    assert stats["by_state"] == {"REPORTED": 12}
    assert stats["by_mode"] == {"SYNC": 8, "ASYNC": 4}
    per_upload = sum(SIZES.values())
    assert stats["bytes_uploaded"] == 8 * per_upload
    assert stats["upload_s"]["count"] == 8
    assert 0 < stats["upload_s"]["p50"] <= stats["upload_s"]["p99"]
    assert stats["upload_MiBps"]["count"] == 8 and stats["throughput_MiBps"] > 0
    assert stats["retries"] == 0
    assert set(stats["blocked_s"]) == {"SYNC", "ASYNC"}
    assert stats["blocked_s"]["SYNC"]["count"] == 8 and stats["blocked_checkpoint_s"]["SYNC"]["count"] == 4
    assert not math.isnan(stats["blocked_s"]["ASYNC"]["p50"])
    assert stats["commits"] == 6
    assert stats["checkpoints_kept"] == 2 and stats["checkpoints_deleted"] == 2
    assert stats["elapsed_s"] > 0
    summaries = [r.getMessage() for r in caplog.records if "attempt finished" in r.getMessage()]
    assert len(summaries) == 1 and "blocked in report(): ASYNC p50" in summaries[0]
    uploads = [r.getMessage() for r in caplog.records if "MiB/s)" in r.getMessage()]
    assert len(uploads) == 8 and all(f"uploaded {per_upload} bytes" in line for line in uploads)


def test_upload_progress_reaches_callbacks_for_every_file_from_upload_threads(memory_url: str) -> None:
    recorder = _Recorder()
    run_trio(_trainer(memory_url, callbacks=(recorder,)).fit_async)
    uploaded = {key for key in recorder.bytes}
    assert uploaded == {(rank, index) for rank in (0, 1) for index in (0, 1, 3, 4)}
    assert set(recorder.bytes.values()) == {sum(SIZES.values())}
    # At least one call per file (file systems that report chunks call once per chunk).
    assert all(calls >= len(SIZES) for calls in recorder.calls.values())
    assert threading.get_ident() not in recorder.threads


def test_run_progress_draws_ranks_commits_and_uploaded_bytes(memory_url: str) -> None:
    output = io.StringIO()
    display = RunProgress(
        world_size=2, reports_per_rank=6, console=Console(file=output, force_terminal=True, width=120)
    )
    with display:
        run_trio(_trainer(memory_url, callbacks=(display,)).fit_async)
    tasks = {task.description: task for task in display.progress.tasks}
    assert tasks["rank 0 reports"].completed == 6 and tasks["rank 1 reports"].completed == 6
    assert tasks["checkpoints committed"].completed == 4
    assert tasks["uploaded"].completed == 8 * sum(SIZES.values())
    # Rows of finished uploads are removed once their report is handed to the controller.
    assert not [d for d in tasks if d.strip().startswith("rank") and "report " in d and "reports" not in d]
    assert "rank 1 reports" in output.getvalue()


@pytest.mark.parametrize(("setting", "env", "shown"), [(True, "0", True), (None, "1", True), (None, "0", False)])
def test_fit_shows_the_display_when_upload_config_or_environment_asks(
    memory_url: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    setting: bool | None,
    env: str,
    shown: bool,
) -> None:
    monkeypatch.setenv("STATEMACHINE_PROGRESS", env)
    run_trio(_trainer(memory_url, progress=setting).fit_async)
    assert ("rank 1 reports" in capsys.readouterr().err) is shown
