"""Check a committed checkpoint's files against the manifest in its commit marker.

The marker says which files each rank contributed, with sizes and CRC-32Cs. A folder can stop
matching it after the commit: someone deleted or truncated a file, a bucket lifecycle rule
expired part of it, a copy between buckets was interrupted. Resume must not start from such a
checkpoint, and ``inspect`` must show it.

Two depths:

* quick (the default, used on every resume): one recursive listing of the checkpoint folder,
  then every manifest file must be present with its size. No file is read, so the cost is a few
  listing calls whatever the checkpoint's size.
* deep: additionally reads every file and compares its checksum (CRC-32C) with the manifest's.

Files in the folder that the manifest does not name are reported as ``extra`` but do not make
the checkpoint invalid: a rank may legitimately leave a log next to its files.
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass, field
from typing import Any

from .storage import CHECKSUM_NAMES, MARKER_NAME, STAGING_NAME, CommittedCheckpoint, RunStorage

__all__ = ["Verification", "verify_checkpoint"]


@dataclass(slots=True)
class Verification:
    """What :func:`verify_checkpoint` found for one checkpoint."""

    index: int
    path: str
    deep: bool
    #: Files named by the manifest and their total size.
    files: int = 0
    bytes: int = 0
    #: One line per mismatch (missing file, wrong size, wrong checksum); empty when valid.
    problems: list[str] = field(default_factory=list)
    #: Files in the folder that the manifest does not name (not an error).
    extra: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_json(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "path": self.path,
            "deep": self.deep,
            "ok": self.ok,
            "files": self.files,
            "bytes": self.bytes,
            "problems": list(self.problems),
            "extra": list(self.extra),
        }


def verify_checkpoint(storage: RunStorage, checkpoint: CommittedCheckpoint, deep: bool = False) -> Verification:
    """Compare the files of ``checkpoint`` in ``storage`` with its manifest (blocking I/O)."""
    result = Verification(checkpoint.index, checkpoint.path, deep)
    # Paths below are relative to the run folder. A NO_UPLOAD part may live outside the
    # checkpoint folder (registered in place), so it gets a listing of its own.
    sizes = _list_sizes(storage, checkpoint.path)
    listed = [checkpoint.path]
    expected: set[str] = set()
    for part in checkpoint.parts:
        if not any(_is_within(part.path, root) for root in listed):
            sizes.update(_list_sizes(storage, part.path))
            listed.append(part.path)
        for entry in part.files:
            relative = posixpath.normpath(posixpath.join(part.path, entry.path))
            expected.add(relative)
            result.files += 1
            result.bytes += entry.size
            where = f"rank {part.rank}: {relative}"
            if relative not in sizes:
                result.problems.append(f"{where} is missing")
                continue
            size = sizes[relative]
            if size is not None and size != entry.size:
                result.problems.append(f"{where} has {size} bytes, the manifest says {entry.size}")
                continue
            if deep:
                _, crc = storage.file_checksum(storage.path(relative), entry.algorithm)
                if crc != entry.checksum:
                    name = CHECKSUM_NAMES[entry.algorithm]
                    result.problems.append(f"{where} has {name} {crc}, the manifest says {entry.checksum}")
    own = posixpath.normpath(checkpoint.path)
    result.extra = sorted(
        name[len(own) + 1 :]
        for name in sizes
        if name not in expected
        and _is_within(name, own)
        and name[len(own) + 1 :] != MARKER_NAME
        and not name[len(own) + 1 :].startswith(STAGING_NAME + "/")
    )
    return result


def _is_within(path: str, root: str) -> bool:
    path, root = posixpath.normpath(path), posixpath.normpath(root)
    return path == root or path.startswith(root + "/")


def _list_sizes(storage: RunStorage, relative: str) -> dict[str, int | None]:
    """Every file under ``relative`` (run-relative paths) with its size, from one listing."""
    base = posixpath.normpath(storage.path(relative))
    try:
        listing: dict[str, dict[str, Any]] = storage.fs.find(base, detail=True)
    except FileNotFoundError:
        return {}
    run_root = posixpath.normpath(storage.root)
    sizes: dict[str, int | None] = {}
    for path, info in listing.items():
        if info.get("type", "file") != "file":
            continue
        size = info.get("size")
        sizes[posixpath.normpath(path)[len(run_root) + 1 :]] = int(size) if size is not None else None
    return sizes
