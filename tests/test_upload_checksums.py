"""Checksums of uploaded parts: computed off the upload's path, always complete in the marker."""

from __future__ import annotations

import json
import os
import zlib
from typing import Any

import pytest

from statemachine.storage import MARKER_NAME, CommittedCheckpoint, RunStorage, file_crc32


def _part_folder(tmp_path: Any) -> str:
    local = os.path.join(str(tmp_path), "local")
    os.makedirs(os.path.join(local, "sub"))
    for name, data in (("a.bin", b"alpha" * 1000), ("sub/b.bin", b""), ("sub/c.bin", os.urandom(70_000))):
        with open(os.path.join(local, name), "wb") as handle:
            handle.write(data)
    return local


def test_local_upload_marker_lists_the_crc32_of_every_delivered_file(tmp_path: Any) -> None:
    storage = RunStorage(os.path.join(str(tmp_path), "storage"), "run")
    part = storage.upload_part(_part_folder(tmp_path), "checkpoint_000000/rank_0", 0)

    storage.commit(CommittedCheckpoint(0, "checkpoint_000000", {"loss": 1.0}, (part,)))

    marker = json.loads(storage.fs.cat_file(storage.path(f"checkpoint_000000/{MARKER_NAME}")))
    (listed,) = marker["parts"]
    assert [f["path"] for f in listed["files"]] == ["a.bin", "sub/b.bin", "sub/c.bin"]
    for entry in listed["files"]:
        with open(storage.path(f"checkpoint_000000/rank_0/{entry['path']}"), "rb") as handle:
            data = handle.read()
        assert (entry["size"], entry["crc32"]) == (len(data), f"{zlib.crc32(data):08x}")
    assert part.checksums is None and part.files[0].crc32 == listed["files"][0]["crc32"]


def test_commit_fails_clearly_when_a_delivered_file_vanished_before_its_checksum(tmp_path: Any) -> None:
    storage = RunStorage(os.path.join(str(tmp_path), "storage"), "run")
    part = storage.upload_part(_part_folder(tmp_path), "checkpoint_000000/rank_0", 0)
    assert part.checksums is not None
    part.checksums.result()  # the real checksum ran; now simulate one that could not
    broken = type(part)(part.rank, part.path, part.files, storage._checksummer().submit(file_crc32, "/nonexistent"))

    with pytest.raises(FileNotFoundError):
        storage.commit(CommittedCheckpoint(0, "checkpoint_000000", {}, (broken,)))
    assert storage.read_marker("checkpoint_000000") is None
