"""The Checkpoint handle on local and fsspec storage."""

from __future__ import annotations

import os
from typing import Any

import fsspec
import pytest

import statemachine as sm


def test_checkpoint_of_a_url_round_trips_files_through_a_local_directory(memory_url: str, tmp_path: Any) -> None:
    fs = fsspec.filesystem("memory")
    base = memory_url[len("memory://") :]
    fs.pipe_file(f"{base}/ckpt/a/b.txt", b"hello")
    checkpoint = sm.Checkpoint(f"{memory_url}/ckpt")
    assert not checkpoint.is_local
    target = checkpoint.to_directory(tmp_path / "out")
    assert open(os.path.join(target, "a", "b.txt"), "rb").read() == b"hello"
    with checkpoint.as_directory() as folder:
        assert open(os.path.join(folder, "a", "b.txt"), "rb").read() == b"hello"
    assert not os.path.exists(folder)


def test_local_checkpoint_as_directory_is_the_directory_itself(tmp_path: Any) -> None:
    checkpoint = sm.Checkpoint.from_directory(tmp_path)
    with checkpoint.as_directory() as folder:
        assert folder == str(tmp_path)
    assert checkpoint == sm.Checkpoint(str(tmp_path))
    assert checkpoint.url.startswith("file://")


def test_checkpoint_rejects_a_non_path() -> None:
    with pytest.raises(TypeError, match=r"str or os\.PathLike"):
        sm.Checkpoint(3)  # type: ignore[arg-type]
