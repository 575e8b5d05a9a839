"""Checksums of uploaded parts: computed off the upload's path, always complete in the marker."""

from __future__ import annotations

import json
import os
import zlib
from typing import Any

import crc32c
import pytest

from statemachine.storage import MARKER_NAME, CommittedCheckpoint, FileEntry, PartManifest, RunStorage, file_checksum
from statemachine.trainer import load_committed
from statemachine.verify import verify_checkpoint


def _part_folder(tmp_path: Any) -> str:
    local = os.path.join(str(tmp_path), "local")
    os.makedirs(os.path.join(local, "sub"))
    for name, data in (("a.bin", b"alpha" * 1000), ("sub/b.bin", b""), ("sub/c.bin", os.urandom(70_000))):
        with open(os.path.join(local, name), "wb") as handle:
            handle.write(data)
    return local


def test_local_upload_marker_lists_the_crc32c_of_every_delivered_file(tmp_path: Any) -> None:
    storage = RunStorage(os.path.join(str(tmp_path), "storage"), "run")
    part = storage.upload_part(_part_folder(tmp_path), "checkpoint_000000/rank_0", 0)

    storage.commit(CommittedCheckpoint(0, "checkpoint_000000", {"loss": 1.0}, (part,)))

    marker = json.loads(storage.fs.cat_file(storage.path(f"checkpoint_000000/{MARKER_NAME}")))
    (listed,) = marker["parts"]
    assert [f["path"] for f in listed["files"]] == ["a.bin", "sub/b.bin", "sub/c.bin"]
    for entry in listed["files"]:
        with open(storage.path(f"checkpoint_000000/rank_0/{entry['path']}"), "rb") as handle:
            data = handle.read()
        assert (entry["size"], entry["crc32c"]) == (len(data), f"{crc32c.crc32c(data):08x}")
    assert part.checksums is None and part.files[0].checksum == listed["files"][0]["crc32c"]


def test_commit_fails_clearly_when_a_delivered_file_vanished_before_its_checksum(tmp_path: Any) -> None:
    storage = RunStorage(os.path.join(str(tmp_path), "storage"), "run")
    part = storage.upload_part(_part_folder(tmp_path), "checkpoint_000000/rank_0", 0)
    assert part.checksums is not None
    part.checksums.result()  # the real checksum ran; now simulate one that could not
    broken = type(part)(part.rank, part.path, part.files, storage._checksummer().submit(file_checksum, "/nonexistent"))

    with pytest.raises(FileNotFoundError):
        storage.commit(CommittedCheckpoint(0, "checkpoint_000000", {}, (broken,)))
    assert storage.read_marker("checkpoint_000000") is None


def test_markers_of_earlier_versions_list_crc32_and_still_verify(tmp_path: Any) -> None:
    storage = RunStorage(os.path.join(str(tmp_path), "storage"), "run")
    part = storage.upload_part(_part_folder(tmp_path), "checkpoint_000000/rank_0", 0)
    part.wait_for_checksums()
    old_entries = []
    for entry in part.files:
        with open(storage.path(f"checkpoint_000000/rank_0/{entry.path}"), "rb") as handle:
            old_entries.append(FileEntry(entry.path, entry.size, f"{zlib.crc32(handle.read()):08x}", "crc32"))
    storage.commit(CommittedCheckpoint(0, "checkpoint_000000", {}, (PartManifest(0, part.path, tuple(old_entries)),)))

    marker = json.loads(storage.fs.cat_file(storage.path(f"checkpoint_000000/{MARKER_NAME}")))
    assert all(set(f) == {"path", "size", "crc32"} for f in marker["parts"][0]["files"])
    (committed,), _next = load_committed(storage)
    assert committed.parts[0].files == tuple(old_entries)
    assert verify_checkpoint(storage, committed, deep=True).ok
    with open(storage.path("checkpoint_000000/rank_0/a.bin"), "r+b") as handle:
        handle.write(b"A")  # same size, other bytes
    problems = verify_checkpoint(storage, committed, deep=True).problems
    assert problems == [
        f"rank 0: checkpoint_000000/rank_0/a.bin has CRC-32 {_zlib_crc(storage)}, the manifest says {old_entries[0].checksum}"
    ]


def _zlib_crc(storage: RunStorage) -> str:
    with open(storage.path("checkpoint_000000/rank_0/a.bin"), "rb") as handle:
        return f"{zlib.crc32(handle.read()):08x}"


def test_a_manifest_entry_without_a_checksum_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match="has no checksum"):
        FileEntry.from_json({"path": "a.bin", "size": 3, "md5": "x"})
