"""The main job: ``python -m statemachine demo`` commits checkpoints and prints the summary."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any


def test_demo_command_commits_every_checkpoint_and_prints_blocked_time_per_mode(tmp_path: Any) -> None:
    storage = tmp_path / "runs"
    completed = subprocess.run(
        [
            sys.executable,
            "-m",
            "statemachine",
            "demo",
            "--storage",
            str(storage),
            "--name",
            "d",
            "--steps",
            "6",
            "--size-mib",
            "0.25",
            "--step-time",
            "0",
            "--no-progress",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=os.getcwd(),
    )
    assert completed.returncode == 0, completed.stderr
    for mode in ("SYNC", "ASYNC", "NO_UPLOAD"):
        assert mode in completed.stdout
    run = storage / "d"
    markers = sorted(p.parent.name for p in run.glob("checkpoint_*/_COMMITTED.json"))
    # Steps 0..5 with step 3 metrics-only: five checkpoints, each with all four ranks.
    assert markers == [f"checkpoint_{i:06d}" for i in (0, 1, 2, 4, 5)]
    manifest = json.loads((run / "checkpoint_000002" / "_COMMITTED.json").read_text())
    assert manifest["ranks"] == [0, 1, 2, 3]
    assert all(f["size"] == 256 * 1024 for p in manifest["parts"] for f in p["files"])
    state = json.loads((run / "run_state.json").read_text())
    assert state["latest"] == 5
