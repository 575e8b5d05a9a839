"""Durable storage on fsspec: the run folder, uploads, the commit marker, and the run state.

Layout of a run folder (DESIGN.md section 4)::

    <storage_path>/<name>/
        run_state.json                      latest committed index and kept checkpoints
        checkpoint_000000/
            rank_0/...                      files of rank 0 (uploaded or registered in place)
            rank_1/...
            _COMMITTED.json                 the commit marker with the manifest, written last
            .staging/                       upload attempts in progress (removed on commit)
        .staging/                           on a local disk: the upload attempts, in folders
                                            made ahead of time (see ``RunStorage.upload_part``)

Why the marker is the only truth: uploads of different ranks finish at different times and a
process may die at any point. A checkpoint folder therefore looks complete long before it is;
only the controller knows when every rank's part is in, and it says so by writing
``_COMMITTED.json`` after everything else. Readers never look at a folder without it.

Why attempts are staged: an attempt that timed out may still be writing in an abandoned thread.
Each attempt writes under ``.staging/`` in its own folder and is moved into place only when it
finished, so a late writer can never touch a part that a later attempt delivered. On S3, where
a move is a copy of every object, conditional writes give the same guarantee without the copy
(see :meth:`RunStorage.upload_part`).

Everything here is blocking I/O: the runtime calls it through ``trio.to_thread``.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import json
import logging
import mmap
import os
import posixpath
import re
import shutil
import sys
import tempfile
import threading
import time
import uuid
import zlib
from collections.abc import Callable, Iterable, Mapping
from concurrent import futures
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Protocol

import crc32c
import fsspec
from fsspec.implementations.local import LocalFileSystem

from . import _threads
from .checkpoint import Checkpoint

__all__ = [
    "MARKER_NAME",
    "RUN_STATE_NAME",
    "CHECKSUM_ALGORITHM",
    "CHECKSUM_NAMES",
    "FileEntry",
    "CheckpointModifiedError",
    "PartManifest",
    "RunStorage",
    "SnapshotFolders",
    "snapshot_directory",
]

logger = logging.getLogger("statemachine")

MARKER_NAME = "_COMMITTED.json"
RUN_STATE_NAME = "run_state.json"
STAGING_NAME = ".staging"
CHUNK_SIZE = 8 * 1024 * 1024
logger = logging.getLogger("statemachine")
_CHECKPOINT_RE = re.compile(r"^checkpoint_(\d{6,})$")

#: Options the library gives s3fs unless the user's ``storage_options`` set them. s3fs uploads a
#: file in parts, ``max_concurrency`` parts at a time, each part held in memory, and many files
#: at once; its defaults (50 MiB parts, 10 at a time, up to 128 files) can hold gigabytes per
#: upload, for each upload slot of each rank. :meth:`RunStorage.upload_part` sends
#: ``max_concurrency`` files at a time in parts of ``default_block_size`` (raised only for files
#: too large for S3's 10,000 parts; a file under two parts goes in one PUT), so one upload holds
#: at most 4 files x 4 parts x 8 MiB = 128 MiB with these defaults, and keeps up to 16
#: requests in flight. Note that S3 refuses parts under 5 MiB (except the last).
S3_DEFAULT_OPTIONS: Mapping[str, Any] = {"max_concurrency": 4, "default_block_size": 8 * 1024 * 1024}
S3_MAX_PARTS = 10_000

#: Called with the number of bytes written, after each chunk.
ProgressCallback = Callable[[int], None]


class AttemptGuard(Protocol):
    """One upload attempt as the caller sees it (implemented by ``statemachine.upload``)."""

    def check(self) -> None:
        """Raise if the caller abandoned this attempt (it timed out or the run is ending)."""

    def publish(self) -> contextlib.AbstractContextManager[None]:
        """Hold while moving the staged part into place; raise on entry if abandoned."""


def _never_abandoned() -> None:
    return None


#: The checksum of new manifests. CRC-32C (Castagnoli) is the one object stores compute
#: themselves (S3's ``x-amz-checksum-crc32c``, GCS's ``crc32c``), and the ``crc32c`` package
#: computes it with the CPU's CRC instruction: 0.64 ms for 16 MiB here, against 3.9 ms for
#: ``zlib.crc32``, the CRC-32 of the manifests written before it (still read and verified).
CHECKSUM_ALGORITHM = "crc32c"
_CHECKSUMS: dict[str, Callable[[Any, int], int]] = {"crc32c": crc32c.crc32c, "crc32": zlib.crc32}
#: How messages name each algorithm.
CHECKSUM_NAMES = {"crc32c": "CRC-32C", "crc32": "CRC-32"}


@dataclass(frozen=True, slots=True)
class FileEntry:
    """One file of a part: its path relative to the part folder, size and checksum (hex)."""

    path: str
    size: int
    checksum: str
    #: ``crc32c``; markers written by earlier versions say ``crc32``.
    algorithm: str = CHECKSUM_ALGORITHM

    def to_json(self) -> dict[str, Any]:
        return {"path": self.path, "size": self.size, self.algorithm: self.checksum}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> FileEntry:
        for algorithm in _CHECKSUMS:
            if algorithm in data:
                return cls(str(data["path"]), int(data["size"]), str(data[algorithm]), algorithm)
        raise ValueError(f"manifest entry {data!r} has no checksum (one of {sorted(_CHECKSUMS)})")


@dataclass(frozen=True, slots=True)
class PartManifest:
    """What one rank contributed to a checkpoint."""

    rank: int
    #: The part folder, relative to the run folder.
    path: str
    files: tuple[FileEntry, ...] = ()
    #: Checksums still being computed (local uploads, see :meth:`RunStorage.upload_part`);
    #: :meth:`wait_for_checksums` fills them into ``files``. None when ``files`` is complete.
    checksums: Future[list[tuple[int, str]]] | None = field(default=None, compare=False, repr=False)

    @property
    def bytes(self) -> int:
        return sum(f.size for f in self.files)

    def wait_for_checksums(self) -> None:
        """Block until ``files`` holds every checksum; raise the error that prevented one."""
        pending = self.checksums
        if pending is None:
            return
        results = pending.result()
        files = tuple(FileEntry(f.path, f.size, crc, f.algorithm) for f, (_, crc) in zip(self.files, results, strict=True))
        # Frozen for everyone else; completing it once, in place, keeps every holder of this
        # manifest (the controller's list of commits included) looking at the same files.
        object.__setattr__(self, "files", files)
        object.__setattr__(self, "checksums", None)

    def __reduce__(self) -> tuple[Any, ...]:
        # A manifest sent to another process (a Ray rank to the driver) carries its checksums,
        # not the future that computes them.
        self.wait_for_checksums()
        return (PartManifest, (self.rank, self.path, self.files))

    def to_json(self) -> dict[str, Any]:
        self.wait_for_checksums()
        return {"rank": self.rank, "path": self.path, "bytes": self.bytes, "files": [f.to_json() for f in self.files]}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> PartManifest:
        return cls(int(data["rank"]), str(data["path"]), tuple(FileEntry.from_json(f) for f in data["files"]))


@dataclass(frozen=True, slots=True)
class CommittedCheckpoint:
    """A committed checkpoint as its marker describes it."""

    index: int
    #: The checkpoint folder, relative to the run folder.
    path: str
    metrics: dict[str, Any]
    parts: tuple[PartManifest, ...] = field(default=())

    def to_json(self) -> dict[str, Any]:
        return {
            "format": 1,
            "index": self.index,
            "path": self.path,
            "metrics": self.metrics,
            "ranks": [p.rank for p in self.parts],
            "parts": [p.to_json() for p in self.parts],
            "bytes": sum(p.bytes for p in self.parts),
            "committed_at": time.time(),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> CommittedCheckpoint:
        return cls(
            int(data["index"]),
            str(data["path"]),
            dict(data.get("metrics") or {}),
            tuple(PartManifest.from_json(p) for p in data.get("parts", ())),
        )


def checkpoint_dir_name(index: int) -> str:
    return f"checkpoint_{index:06d}"


def validate_dir_name(name: object) -> str:
    """Check a user's ``checkpoint_dir_name``: a relative path that stays inside the run folder."""
    if not isinstance(name, str):
        raise TypeError(f"checkpoint_dir_name must be a str, got {type(name).__name__}")
    cleaned = posixpath.normpath(name.replace("\\", "/"))
    if (
        not name
        or name.startswith(("/", "\\"))
        or re.match(r"^[A-Za-z]:", name)
        or "://" in name
        or cleaned in (".", "..")
        or cleaned.startswith("../")
    ):
        raise ValueError(f"checkpoint_dir_name {name!r} escapes the run folder; give a relative folder name")
    first = cleaned.split("/", 1)[0]
    if first in (RUN_STATE_NAME, STAGING_NAME) or cleaned.endswith(MARKER_NAME):
        raise ValueError(f"checkpoint_dir_name {name!r} is a name the library reserves")
    return cleaned


def _crc_hex(value: int) -> str:
    return f"{value & 0xFFFFFFFF:08x}"


def file_checksum(path: str, algorithm: str = CHECKSUM_ALGORITHM) -> tuple[int, str]:
    """Size and checksum (hex) of a local file.

    Through ``mmap``: the checksum then reads the page cache in place, with the GIL released
    for the whole file, and no buffer is allocated (zeroing an 8 MiB ``bytearray`` per upload
    held the GIL for about a millisecond, which other ranks' ``report()`` calls waited out).
    """
    update = _CHECKSUMS[algorithm]
    with open(path, "rb") as handle:
        size = os.fstat(handle.fileno()).st_size
        if size == 0:
            return 0, _crc_hex(0)
        with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
            return len(mapped), _crc_hex(update(mapped, 0))


#: Helper threads of a SYNC upload to a local disk, besides the calling thread.
COPY_HELPERS = max(1, min(3, _threads.usable_cpus() - 1))


def _copy_files_spread(
    sources: list[str],
    destinations: list[str],
    sizes: list[int],
    helpers: futures.Executor,
    check: Callable[[], None],
) -> None:
    """Copy files on a local disk with the calling thread and helper threads together.

    A page-cache copy keeps one core busy, and ``fs.put`` copies one file after another; two
    threads copied the four 4 MiB files of ``bench``'s checkpoint 1.5-1.7x as fast on this
    project's 2-core machine. Files are taken largest first from one shared queue, so a helper
    that starts late (its pool busy with another rank's upload) finds nothing left and the
    caller never waits for work that has not begun. Raises the first error after every copy
    that started has stopped; ``check`` runs before each file, so an abandoned attempt stops
    at its next file.
    """
    queue = collections.deque(sorted(zip(sizes, sources, destinations, strict=True), reverse=True))
    errors: list[BaseException] = []

    def drain() -> None:
        while not errors:
            try:
                _size, source, destination = queue.popleft()
            except IndexError:
                return
            try:
                check()
                shutil.copyfile(source, destination)
            except BaseException as error:  # noqa: BLE001 - raised in the calling thread below
                errors.append(error)

    started = [helpers.submit(drain) for _ in range(min(len(sources) - 1, COPY_HELPERS))]
    drain()
    futures.wait(started)
    if errors:
        raise errors[0]


#: How much nicer than the process the checksum threads are (Linux; see below).
BACKGROUND_NICENESS = 10


def _lower_thread_priority() -> None:
    """Make the calling thread ``BACKGROUND_NICENESS`` nicer than the process (Linux only).

    After a SYNC upload, the checksum of the delivered files starts as the calling thread asks
    the rank's trio thread to finish the report; with both cores busy (the checksum and the
    staging refill), the trio thread waited about 1.8 ms to run, a third of a 16 MiB report.
    At niceness +10 it ran within 0.16 ms. Linux gives each thread its own niceness; elsewhere
    ``setpriority`` would change the whole process, so nothing is done there.
    """
    if not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(OSError):
        thread = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, thread, min(19, os.getpriority(os.PRIO_PROCESS, thread) + BACKGROUND_NICENESS))


#: At most this many ASYNC copies to a local disk at once in a process, whatever
#: ``UploadConfig.background_local_copies`` says (it bounds each run; this bounds the threads).
BACKGROUND_COPY_THREADS = 64

_pools: dict[str, futures.ThreadPoolExecutor] = {}
_pools_lock = threading.Lock()


def _shared_pool(name: str, workers: int, nicer: bool) -> futures.ThreadPoolExecutor:
    """The process's thread pool ``name``, made on first use and shared by every storage.

    One pool per storage left its idle threads behind after each ``fit()`` (two ranks: four
    more threads per run); shared, a process has at most ``workers`` threads of each kind,
    made as they are needed. ``nicer``: its threads run at :data:`BACKGROUND_NICENESS`.
    """
    with _pools_lock:
        pool = _pools.get(name)
        if pool is None:
            pool = futures.ThreadPoolExecutor(
                max_workers=workers, thread_name_prefix=name, initializer=_lower_thread_priority if nicer else None
            )
            _pools[name] = pool
        return pool


def _forget_pools_in_child() -> None:
    """After a fork the pools' threads exist only in the parent: the child makes its own."""
    global _pools_lock
    _pools.clear()
    _pools_lock = threading.Lock()


os.register_at_fork(after_in_child=_forget_pools_in_child)


def _checksum_files(paths: list[str]) -> list[tuple[int, str]]:
    return [file_checksum(path) for path in paths]


class _ProgressAdapter(fsspec.callbacks.Callback):  # type: ignore[misc]
    """Turns fsspec's callbacks into the library's ``progress(bytes)`` and abandonment checks.

    ``fs.put`` of many files calls this one per file and asks :meth:`branched` for a child per
    file, which s3fs and most file systems call per chunk with the bytes sent. Each call also
    runs ``check`` (see :class:`AttemptGuard`), so an abandoned attempt stops at its next chunk
    where the file system reports chunks, and at its next file otherwise.
    """

    def __init__(
        self,
        progress: ProgressCallback | None,
        parent: _ProgressAdapter | None = None,
        check: Callable[[], None] = _never_abandoned,
    ) -> None:
        super().__init__()
        self._progress = progress
        self.parent = parent
        self.check = check
        self.reported = 0

    def progress(self, n: int) -> None:
        if self._progress is not None:
            self._progress(n)

    def branched(self, path_1: str, path_2: str, **kwargs: Any) -> _ProgressAdapter:
        self.check()
        return _ProgressAdapter(self._progress, self, self.check)

    def relative_update(self, inc: int = 1) -> None:
        self.check()
        if self.parent is None:
            return  # a whole file done; its bytes were counted by its child
        self.parent.reported += inc
        self.progress(inc)


def _check_linked(local_dir: str, linked: LinkStats | None) -> None:
    """Raise :class:`CheckpointModifiedError` if a hard-linked source changed since its snapshot."""
    for relative, stats in (linked or {}).items():
        info = os.stat(os.path.join(local_dir, relative))
        if (info.st_size, info.st_mtime_ns) != stats:
            raise CheckpointModifiedError(
                f"{relative} was rewritten in place while its ASYNC upload was running; write each "
                "checkpoint to a new directory or file, or use UploadConfig(snapshot='copy')"
            )


def _file_entries(directory: str) -> list[tuple[str, os.DirEntry[str]]]:
    """``(relative POSIX path, entry)`` of every file under ``directory``, sorted by path: one
    ``scandir`` per folder; a linked folder is not followed (as ``os.walk``)."""
    found: list[tuple[str, os.DirEntry[str]]] = []
    pending = [("", directory)]
    while pending:
        prefix, folder = pending.pop()
        with os.scandir(folder) as entries:
            for entry in entries:
                if entry.is_dir():
                    if not entry.is_symlink():
                        pending.append((f"{prefix}{entry.name}/", entry.path))
                else:
                    found.append((prefix + entry.name, entry))
    found.sort(key=lambda item: item[0])
    return found


def local_files_with_sizes(directory: str) -> list[tuple[str, int]]:
    """``(relative POSIX path, size)`` of every file under ``directory``, sorted by path
    (``os.walk``, ``relpath`` and ``getsize`` cost twice as much, inside every SYNC report)."""
    return [(relative, entry.stat().st_size) for relative, entry in _file_entries(directory)]


class CheckpointModifiedError(ValueError):
    """A hard-linked ASYNC snapshot changed because the caller rewrote a file in place."""


#: ``relative path -> (size, mtime_ns)`` of each hard-linked file at snapshot time.
LinkStats = dict[str, tuple[int, int]]


def snapshot_directory(source: str, target: str, mode: str = "link") -> tuple[str, LinkStats]:
    """Freeze ``source`` into ``target``, an empty folder; return it and its link stats.

    ``mode="link"`` hard-links each file (a copy where the file system refuses, for example
    across devices): cheap, and safe when the caller deletes its folder or replaces files (a
    ``TemporaryDirectory``, a write-then-rename). A hard link shares the file's data, so a file
    *rewritten in place* would change the snapshot too; the stats returned let the upload notice
    that and fail the report with :class:`CheckpointModifiedError` instead of uploading a torn
    file. ``mode="copy"`` always copies, which is safe against anything. ``target`` is normally
    a folder made ahead of time (see :class:`SnapshotFolders`).
    """
    made = {target}
    linked: LinkStats = {}
    for relative, entry in _file_entries(source):
        src = entry.path
        dst = os.path.join(target, relative)
        if "/" in relative:  # a nested file, whose folder may be new (most checkpoints are flat)
            parent = os.path.dirname(dst)
            if parent not in made:
                os.makedirs(parent, exist_ok=True)
                made.add(parent)
        if mode == "link":
            try:
                os.link(src, dst)
            except OSError:
                pass
            else:
                info = os.stat(dst)
                linked[relative] = (info.st_size, info.st_mtime_ns)
                continue
        shutil.copyfile(src, dst)
    return target, linked


class SnapshotFolders:
    """Empty folders under ``root``, made ahead of time by :meth:`refill`.

    Making a folder allocates an inode, which cost 0.2-0.8 ms on this project's ext4 machines,
    several times more than hard-linking a checkpoint's files. An ASYNC ``report()`` takes its
    snapshot folder from one of these, and an upload to a local disk its staging folder; each
    makes a folder itself only when none is left.
    """

    def __init__(self, root: str, spare: int = 2, keep: int = 4) -> None:
        self.root = root
        #: How many folders :meth:`refill` makes ready; :meth:`recycle` keeps up to ``keep``.
        self.spare = spare
        self.keep = max(keep, spare)
        self._ready: list[str] = []
        self._lock = threading.Lock()
        self._closed = False

    def take(self) -> str:
        with self._lock:
            if self._ready:
                return self._ready.pop()
        path = os.path.join(self.root, uuid.uuid4().hex)
        os.makedirs(path)
        return path

    def needs_refill(self) -> bool:
        """No folder is ready (recycled folders come back; a refill is for when they do not keep up)."""
        return not self._ready

    def refill(self) -> None:
        """Make folders until ``spare`` are ready (blocking: call it in a thread); none after
        :meth:`discard`, which may run meanwhile."""
        while True:
            with self._lock:
                if self._closed or len(self._ready) >= self.spare:
                    return
            path = os.path.join(self.root, uuid.uuid4().hex)
            os.makedirs(path)
            with self._lock:
                if not self._closed:
                    self._ready.append(path)
                    continue
            with contextlib.suppress(OSError):  # discarded while this one was being made
                os.rmdir(path)
                os.rmdir(self.root)  # only if empty (other ranks may share it)
            return

    def recycle(self, path: str) -> None:
        """Empty a snapshot folder whose upload is done and keep it for a later snapshot
        (blocking: call it in a thread); removing and making folders costs more than emptying."""
        with os.scandir(path) as entries:
            for entry in entries:
                if entry.is_dir(follow_symlinks=False):
                    shutil.rmtree(entry.path)
                else:
                    os.unlink(entry.path)
        with self._lock:
            if not self._closed and len(self._ready) < self.keep:
                self._ready.append(path)
                return
        os.rmdir(path)

    def discard(self) -> None:
        """Remove the folders nobody took; make no more."""
        with self._lock:
            self._closed = True
            ready, self._ready = self._ready, []
        for path in ready:
            with contextlib.suppress(OSError):
                os.rmdir(path)


def delete_local_directory(path: str, protected: Iterable[str] = ()) -> bool:
    """Remove a local checkpoint directory unless it is a folder that must never be removed.

    Refuses the file system root, the home folder, the current folder and its parents, and any
    folder in ``protected`` or inside one (the local run folder). Returns whether it removed.
    """
    real = os.path.realpath(path)
    cwd = os.path.realpath(os.getcwd())
    forbidden = {os.path.realpath(os.path.expanduser("~")), os.path.realpath(os.sep)}
    if real in forbidden or cwd == real or cwd.startswith(real + os.sep):
        return False
    for folder in protected:
        folder = os.path.realpath(folder)
        if real == folder or real.startswith(folder + os.sep) or folder.startswith(real + os.sep):
            return False
    shutil.rmtree(real, ignore_errors=True)
    return True


def _protocols(fs: fsspec.AbstractFileSystem) -> tuple[str, ...]:
    protocol = fs.protocol
    return (protocol,) if isinstance(protocol, str) else tuple(protocol)


class RunStorage:
    """One run folder in one fsspec file system."""

    def __init__(
        self, storage_path: str | os.PathLike[str], name: str, storage_options: Mapping[str, Any] | None = None
    ) -> None:
        options = dict(storage_options or {})
        if fsspec.core.split_protocol(os.fspath(storage_path))[0] in ("s3", "s3a"):
            options = {**S3_DEFAULT_OPTIONS, **options}
        fs, root = fsspec.core.url_to_fs(os.fspath(storage_path), **options)
        self.fs: fsspec.AbstractFileSystem = fs
        self.name = name
        self.root: str = posixpath.join(root.rstrip("/"), name) if root.rstrip("/") else name
        self.is_local = isinstance(fs, LocalFileSystem)
        self.is_s3 = "s3" in _protocols(fs)
        self._probe_lock = threading.Lock()
        self._conditional_create: bool | None = None
        #: Staging folders made ahead of time (local disks only; see :meth:`upload_part`).
        self._staging_folders: SnapshotFolders | None = None
        if self.is_local:
            self._staging_folders = SnapshotFolders(self.path(STAGING_NAME))

    # -- paths ---------------------------------------------------------------------------

    def url(self, relative: str = "") -> str:
        path = posixpath.join(self.root, relative) if relative else self.root
        return str(self.fs.unstrip_protocol(path))

    def path(self, relative: str) -> str:
        return posixpath.join(self.root, relative)

    def part_relpath(self, checkpoint_relpath: str, rank: int) -> str:
        return posixpath.join(checkpoint_relpath, f"rank_{rank}")

    def relative_to_run(self, url_or_path: str) -> str | None:
        """The path of ``url_or_path`` inside the run folder, or None when it is outside."""
        try:
            fs, path = fsspec.core.url_to_fs(url_or_path)
        except (ValueError, ImportError):
            return None
        if fs.protocol != self.fs.protocol:
            return None
        path = posixpath.normpath(path)
        root = posixpath.normpath(self.root)
        if path == root or not path.startswith(root + "/"):
            return None
        return str(path)[len(root) + 1 :]

    # -- uploads -------------------------------------------------------------------------

    def upload_part(
        self,
        local_dir: str,
        part_relpath: str,
        rank: int,
        progress: ProgressCallback | None = None,
        linked: LinkStats | None = None,
        attempt: AttemptGuard | None = None,
        spread: bool = False,
    ) -> PartManifest:
        """Copy ``local_dir`` to ``part_relpath``; return its manifest.

        ``spread``: someone waits for this upload (SYNC), so on a local disk the files are
        copied by the calling thread and up to ``cpu_count - 1`` helper threads at once (see
        :func:`_copy_files_spread`); other uploads copy in one thread, nicer than the training
        threads (see :meth:`_background_copier`).

        An attempt abandoned on a timeout may still be writing when a later attempt of the same
        part finishes, and must never change what that one delivered. Two ways keep it so:

        - staged (every file system but S3): each attempt writes to its own folder under
          ``.staging/``, checks the stored sizes (a short write fails the attempt), and moves it
          into place only once complete and only under ``attempt.publish()`` (see
          :class:`AttemptGuard`), so an abandoned attempt never replaces a newer part;
        - direct (S3 with conditional writes): each file is written at its final key with
          ``If-None-Match: *``. Once a key exists, no other attempt can replace it; a key that
          an earlier attempt created first holds the same bytes, because the source cannot
          change until this attempt returns (SYNC blocks the caller; ASYNC uploads a snapshot).
          This saves the server-side copy and delete of every object, which cost a third of
          the SYNC time against the S3 server of the tests (``bench --storage s3://...``).

        ``linked`` holds the snapshot-time stats of hard-linked files (see
        :func:`snapshot_directory`); a file whose stats changed was rewritten in place by the
        caller, and the upload fails rather than publish a mix of two checkpoints.
        """
        check = attempt.check if attempt is not None else _never_abandoned
        checkpoint_relpath = posixpath.dirname(part_relpath)
        final = self.path(part_relpath)
        direct = self.is_s3 and self._has_conditional_create()
        staging_folders = self._staging_folders
        if direct:
            target = final
        elif staging_folders is not None:
            # A local disk: a folder made ahead of time (creating the checkpoint folder, its
            # staging folder and the attempt's took 0.7 ms of a 5 ms SYNC report of 16 MiB),
            # in the run's own staging folder, so the move into place stays one rename.
            target = staging_folders.take()
            self._checksummer().submit(staging_folders.refill)
        else:
            target = self.path(posixpath.join(checkpoint_relpath, STAGING_NAME, f"rank_{rank}-{uuid.uuid4().hex[:12]}"))
        listed = local_files_with_sizes(local_dir)
        relatives = [relative for relative, _size in listed]
        sizes = [size for _relative, size in listed]
        sources = [os.path.join(local_dir, relative) for relative in relatives]
        destinations = [posixpath.join(target, relative) for relative in relatives]
        # The copy is ``fs.put``, the call a raw copy would make (sendfile on a local file
        # system, concurrent multipart on S3), so an upload costs what copying the files costs.
        # The checksums are computed by other threads: on a local disk after the upload, from
        # the delivered files, and waited for only by the commit (zlib's CRC-32 cost as much CPU
        # as a page-cache copy and doubled a SYNC report when computed while copying; CRC-32C
        # costs a sixth of that, which the training thread need not wait for either); elsewhere
        # during the upload, from the source (reading the upload back would download it).
        checksums = None if self.is_local else self._checksummer().submit(_checksum_files, sources)
        try:
            check()
            if direct and self.fs.exists(final):
                self.fs.rm(final, recursive=True)  # what a failed earlier attempt or run left
            for parent in sorted({target, *(posixpath.dirname(d) for d in destinations)}):
                self.fs.makedirs(parent, exist_ok=True)
            options: dict[str, Any] = {}
            if self.is_s3 and sources:
                # s3fs would use 50 MiB parts here whatever default_block_size says.
                options["chunksize"] = max(self.fs.default_block_size, -(-max(sizes) // S3_MAX_PARTS))
            callback = _ProgressAdapter(progress, check=check)
            if direct:
                self._put_created(sources, destinations, sizes, options, callback)
            elif spread and self.is_local and len(sources) > 1:
                _copy_files_spread(sources, destinations, sizes, self._copier(), check)
            elif sources and self.is_local and not spread:
                # Nobody waits for this copy (ASYNC): a thread nicer than the training threads
                # makes it, so that a report() never waits for a core behind it.
                copy = self._background_copier().submit(self.fs.put, sources, destinations, callback=callback)
                copy.result()
            elif sources:
                if self.is_s3:
                    options["batch_size"] = self.fs.max_concurrency
                # One call for all files: async file systems (s3fs) send them concurrently.
                self.fs.put(sources, destinations, callback=callback, **options)
            if sum(sizes) > callback.reported:
                callback.progress(sum(sizes) - callback.reported)  # file systems that copy silently
            _check_linked(local_dir, linked)
            check()
            if not direct:
                self._verify_sizes(target, zip(relatives, sizes, strict=True))
        except BaseException:
            # A failed or abandoned attempt clears its own staging folder so that retries do not
            # pile up files (what a killed process leaves is removed on resume).
            if not direct:
                with contextlib.suppress(Exception):
                    if self.fs.exists(target):
                        self.fs.rm(target, recursive=True)
            raise
        finally:
            if checksums is not None:
                futures.wait([checksums])
        if checksums is None:
            entries = [FileEntry(relative, size, "") for relative, size in zip(relatives, sizes, strict=True)]
        else:
            entries = [
                FileEntry(relative, size, crc)
                for relative, (size, crc) in zip(relatives, checksums.result(), strict=True)
            ]
        if not direct:
            with attempt.publish() if attempt is not None else contextlib.nullcontext():
                if self.fs.exists(final):
                    self.fs.rm(final, recursive=True)
                self.fs.makedirs(posixpath.dirname(final), exist_ok=True)
                if not self.is_s3:
                    self.fs.mv(target, final, recursive=True)  # one rename on a local disk
                else:
                    # No rename on S3: a server-side copy of each file, then the staging objects
                    # go. Naming the files, rather than ``mv(recursive=True)``, keeps s3fs from
                    # copying placeholders of nested folders, which are not objects.
                    names = [entry.path for entry in entries]
                    self.fs.copy([posixpath.join(target, n) for n in names], [posixpath.join(final, n) for n in names])
                    self.fs.rm(target, recursive=True)
        if self.is_local:
            delivered = self._checksummer().submit(_checksum_files, [posixpath.join(final, e.path) for e in entries])
            return PartManifest(rank, part_relpath, tuple(entries), delivered)
        return PartManifest(rank, part_relpath, tuple(entries))

    def close(self) -> None:
        """Remove the staging folders made ahead that no upload took (at the end of a rank)."""
        if self._staging_folders is not None:
            self._staging_folders.discard()
            with contextlib.suppress(OSError):
                os.rmdir(self._staging_folders.root)  # only when no other rank's folders are left

    def _verify_sizes(self, staging: str, expected: Iterable[tuple[str, int]]) -> None:
        """Raise ``OSError`` if storage holds fewer bytes than were written (a short write)."""
        if self.is_local:
            # One stat per file; ``find`` walks the folder and builds an info dict per entry.
            for relative, expected_size in expected:
                path = posixpath.join(staging, relative)
                stored = os.stat(path).st_size
                if stored != expected_size:
                    message = f"short write: storage holds {stored} of {expected_size} bytes"
                    raise OSError(errno.EIO, message, self.fs.unstrip_protocol(path))
            return
        listed = {path.rstrip("/"): info.get("size") for path, info in self.fs.find(staging, detail=True).items()}
        for relative, expected_size in expected:
            path = posixpath.join(staging, relative)
            size = listed.get(path)
            if size is None:
                size = self.fs.size(path)
            if size != expected_size:
                message = f"short write: storage holds {size} of {expected_size} bytes"
                raise OSError(errno.EIO, message, self.fs.unstrip_protocol(path))

    def _checksummer(self) -> futures.ThreadPoolExecutor:
        """The process's checksum threads, started once (starting a thread per upload waited for
        the OS to schedule it, milliseconds on a busy machine, inside a SYNC report).

        Nothing waits for them but a commit, so they run at a lower priority (see
        :func:`_lower_thread_priority`)."""
        return _shared_pool("statemachine-checksum", max(1, min(4, _threads.usable_cpus())), nicer=True)

    def _copier(self) -> futures.ThreadPoolExecutor:
        """Helper threads for SYNC uploads to a local disk (see :func:`_copy_files_spread`)."""
        return _shared_pool("statemachine-copy", COPY_HELPERS, nicer=False)

    def _background_copier(self) -> futures.ThreadPoolExecutor:
        """Threads at a lower priority for the local copies nobody waits for (ASYNC uploads).

        The copy of a page-cached file is kernel time that keeps a core busy: 8 ranks of
        16 MiB every 100 ms kept one of this project's two cores busy all the time. At the
        process's own priority, a ``report()`` that woke up on the other core's turn waited
        up to 4-5 ms for a core (its thread's run-queue wait, from ``/proc``); at niceness +10
        (see :func:`_lower_thread_priority`) the copy gives way at once. How many copies run at
        a time is bounded by ``UploadConfig.background_local_copies``, not by this pool, which
        makes its threads only as they are needed.
        """
        return _shared_pool("statemachine-background-copy", BACKGROUND_COPY_THREADS, nicer=True)

    def _has_conditional_create(self) -> bool:
        """Whether the store refuses a second ``If-None-Match: *`` PUT of a key (probed once)."""
        with self._probe_lock:
            if self._conditional_create is None:
                probe = self.path(posixpath.join(STAGING_NAME, f"probe-{uuid.uuid4().hex}"))
                self.fs.pipe_file(probe, b"1", mode="create")
                try:
                    self.fs.pipe_file(probe, b"2", mode="create")
                    self._conditional_create = False
                except FileExistsError:
                    self._conditional_create = True
                finally:
                    self.fs.rm(probe)
                if not self._conditional_create:
                    logger.warning("%s ignores conditional writes; uploads go through a staging folder", self.url())
            return self._conditional_create

    def _put_created(
        self,
        sources: list[str],
        destinations: list[str],
        sizes: list[int],
        options: Mapping[str, Any],
        callback: _ProgressAdapter | None,
    ) -> None:
        """s3fs: create each destination with ``If-None-Match: *``, ``max_concurrency`` at a time.

        Every file is waited for, failed or not (``fs.put`` stops waiting at the first error and
        leaves the others running). A key another attempt created first is accepted when its
        size matches (see :meth:`upload_part`); any other error is raised.
        """
        fs = self.fs
        limit = asyncio.Semaphore(fs.max_concurrency)

        async def put_one(source: str, destination: str) -> None:
            async with limit:
                child = callback.branched(source, destination) if callback is not None else None
                extra = {"callback": child} if child is not None else {}
                await fs._put_file(source, destination, mode="create", **options, **extra)

        async def put_all() -> list[BaseException | None]:
            return await asyncio.gather(
                *(put_one(s, d) for s, d in zip(sources, destinations, strict=True)), return_exceptions=True
            )

        outcomes = fsspec.asyn.sync(fs.loop, put_all)
        for destination, size, outcome in zip(destinations, sizes, outcomes, strict=True):
            if isinstance(outcome, FileExistsError) and fs.size(destination) == size:
                logger.info("%s was written by an earlier attempt of the same upload", destination)
            elif isinstance(outcome, BaseException):
                raise outcome

    def scan_part(self, part_relpath: str, rank: int) -> PartManifest:
        """Build the manifest of files already in storage (NO_UPLOAD), reading them once."""
        base = self.path(part_relpath)
        if not self.fs.isdir(base):
            raise FileNotFoundError(f"NO_UPLOAD checkpoint folder {self.url(part_relpath)} does not exist")
        entries: list[FileEntry] = []
        for path in sorted(self.fs.find(base)):
            entries.append(FileEntry(path[len(base) :].lstrip("/"), *self.file_checksum(path)))
        return PartManifest(rank, part_relpath, tuple(entries))

    def file_checksum(self, path: str, algorithm: str = CHECKSUM_ALGORITHM) -> tuple[int, str]:
        """Size and checksum (hex) of a file in this storage, read once."""
        if self.is_local:
            return file_checksum(path, algorithm)  # mmap: no 8 MiB buffer per read
        update = _CHECKSUMS[algorithm]
        crc = 0
        size = 0
        with self.fs.open(path, "rb") as handle:
            while chunk := handle.read(CHUNK_SIZE):
                crc = update(chunk, crc)
                size += len(chunk)
        return size, _crc_hex(crc)

    # -- commit --------------------------------------------------------------------------

    def _write_atomic(self, path: str, data: bytes, exclusive: bool = False) -> None:
        if self.is_local:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            fd, temporary = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-")
            try:
                with os.fdopen(fd, "wb") as handle:
                    handle.write(data)
                    handle.flush()
                    os.fsync(handle.fileno())
                if exclusive:
                    os.link(temporary, path)
                else:
                    os.replace(temporary, path)
            finally:
                if os.path.exists(temporary):
                    os.unlink(temporary)
            return
        if not exclusive:
            self.fs.pipe_file(path, data)
            return
        # Object stores have no rename to publish with, but a single PUT is atomic, and
        # ``mode="create"`` makes it conditional where the store can: s3fs sends
        # ``If-None-Match: *``, so of two writers racing for the same marker exactly one
        # succeeds and the other gets FileExistsError. The ``exists`` check first gives the same
        # clear error on stores that ignore the condition (then only a true race slips through).
        if self.fs.exists(path):
            raise FileExistsError(f"{self.fs.unstrip_protocol(path)} already exists")
        try:
            self.fs.pipe_file(path, data, mode="create")
        except FileExistsError:
            raise FileExistsError(f"{self.fs.unstrip_protocol(path)} already exists") from None

    def commit(self, checkpoint: CommittedCheckpoint) -> None:
        """Write the commit marker of ``checkpoint`` (last), then drop its staging folder."""
        folder = self.path(checkpoint.path)
        self.fs.makedirs(folder, exist_ok=True)
        for part in checkpoint.parts:
            part.wait_for_checksums()
        payload = json.dumps(checkpoint.to_json(), indent=1, sort_keys=True).encode()
        self._write_atomic(posixpath.join(folder, MARKER_NAME), payload, exclusive=True)
        staging = posixpath.join(folder, STAGING_NAME)
        if self.fs.exists(staging):
            self.fs.rm(staging, recursive=True)

    def read_marker(self, checkpoint_relpath: str) -> CommittedCheckpoint | None:
        path = self.path(posixpath.join(checkpoint_relpath, MARKER_NAME))
        try:
            data = json.loads(self.fs.cat_file(path))
        except FileNotFoundError:
            return None
        return CommittedCheckpoint.from_json(data)

    def open_checkpoint(self, url: str) -> Checkpoint:
        """A checkpoint URL of this storage, opened in the run's own file system so that it keeps
        the storage options (an S3 endpoint, credentials) that a bare URL would lose."""
        return Checkpoint(self.fs._strip_protocol(url), self.fs)

    def checkpoint(self, committed: CommittedCheckpoint) -> Checkpoint:
        return Checkpoint(self.path(committed.path), self.fs)

    # -- run state -----------------------------------------------------------------------

    def read_run_state(self) -> dict[str, Any] | None:
        try:
            data: dict[str, Any] = json.loads(self.fs.cat_file(self.path(RUN_STATE_NAME)))
        except FileNotFoundError:
            return None
        return data

    def write_run_state(self, state: Mapping[str, Any]) -> None:
        self._write_atomic(self.path(RUN_STATE_NAME), json.dumps(state, indent=1, sort_keys=True).encode())

    def checkpoint_folders(self) -> list[tuple[int, str]]:
        """``(index, relative path)`` of every ``checkpoint_NNNNNN`` folder, committed or not."""
        try:
            listing = self.fs.ls(self.root, detail=False)
        except FileNotFoundError:
            return []
        found = []
        for entry in listing:
            base = posixpath.basename(entry.rstrip("/"))
            match = _CHECKPOINT_RE.match(base)
            if match:
                found.append((int(match.group(1)), base))
        return sorted(found)

    def remove_uncommitted(self, from_index: int) -> list[str]:
        """Delete what an attempt that crashed or failed left behind; return what was removed.

        That is: ``checkpoint_NNNNNN`` folders at or after ``from_index`` without a marker;
        top-level folders without a marker that hold nothing but rank parts (``rank_<n>``) and
        ``.staging`` (an uncommitted custom ``checkpoint_dir_name``); and ``.staging`` folders
        inside committed checkpoints (an attempt abandoned after a later one delivered).
        """
        removed = []
        try:
            listing = self.fs.ls(self.root, detail=True)
        except FileNotFoundError:
            return []
        committed = {str(entry["path"]) for entry in (self.read_run_state() or {}).get("checkpoints", ())}
        for entry in listing:
            if entry.get("type") != "directory":
                continue
            relative = posixpath.basename(str(entry["name"]).rstrip("/"))
            match = _CHECKPOINT_RE.match(relative)
            if relative == STAGING_NAME:
                if self._remove_tree(self.path(relative)):  # the run's own staging folder
                    removed.append(relative)
            elif self.read_marker(relative) is not None:
                committed.add(relative)
            elif (match and int(match.group(1)) >= from_index) or (not match and self._holds_only_parts(relative)):
                if self._remove_tree(self.path(relative)):
                    removed.append(relative)
        for relative in sorted(committed):
            staging = self.path(posixpath.join(relative, STAGING_NAME))
            if self.fs.exists(staging) and self._remove_tree(staging):
                removed.append(posixpath.join(relative, STAGING_NAME))
        return removed

    def _remove_tree(self, path: str) -> bool:
        """``rm -r``, tolerating files that appear or vanish meanwhile; return whether it is gone.

        A thread abandoned by an earlier attempt may still be writing or clearing its staging
        folder here. What cannot be removed now is left: it has no marker, so no reader sees
        it, and the next resume tries again.
        """
        for _ in range(3):
            try:
                self.fs.rm(path, recursive=True)
                return True
            except OSError:
                try:
                    if not self.fs.exists(path):
                        return True
                except OSError:
                    pass
        logger.warning("could not remove %s yet; it is not committed and is ignored", self.fs.unstrip_protocol(path))
        return False

    def _holds_only_parts(self, relative: str) -> bool:
        names = [posixpath.basename(p.rstrip("/")) for p in self.fs.ls(self.path(relative), detail=False)]
        return bool(names) and all(n == STAGING_NAME or re.fullmatch(r"rank_\d+", n) for n in names)

    def delete_checkpoint(self, relative: str) -> None:
        """Delete a committed checkpoint: the marker first, so it is never seen half-deleted."""
        folder = self.path(relative)
        marker = posixpath.join(folder, MARKER_NAME)
        if self.fs.exists(marker):
            self.fs.rm(marker)
        if self.fs.exists(folder):
            self.fs.rm(folder, recursive=True)
