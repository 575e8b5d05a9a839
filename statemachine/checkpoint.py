"""The :class:`Checkpoint` handle: a directory on some file system."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator

import fsspec
from fsspec.implementations.local import LocalFileSystem

__all__ = ["Checkpoint"]


class Checkpoint:
    """A directory of checkpoint files, local or in any fsspec storage.

    ``Checkpoint(path_or_url)`` resolves the URL with fsspec; ``Checkpoint(path, filesystem)``
    takes a path inside an already open file system. ``.path`` is always a path inside
    ``.filesystem`` (no protocol prefix); ``.url`` adds the protocol back.
    """

    __slots__ = ("filesystem", "path")

    def __init__(
        self, path_or_url: str | os.PathLike[str], filesystem: fsspec.AbstractFileSystem | None = None
    ) -> None:
        if not isinstance(path_or_url, str | os.PathLike):
            raise TypeError(f"Checkpoint path must be a str or os.PathLike, got {type(path_or_url).__name__}")
        text = os.fspath(path_or_url)
        if not text:
            raise ValueError("Checkpoint path must not be empty")
        if filesystem is None:
            filesystem, text = fsspec.core.url_to_fs(text)
        elif isinstance(filesystem, LocalFileSystem):
            text = os.path.abspath(text)
        self.filesystem: fsspec.AbstractFileSystem = filesystem
        self.path: str = text.rstrip("/") or "/"

    @classmethod
    def from_directory(cls, path: str | os.PathLike[str]) -> Checkpoint:
        """A checkpoint of a local directory (it must exist)."""
        if not isinstance(path, str | os.PathLike):
            raise TypeError(f"Checkpoint.from_directory takes a path, got {type(path).__name__}")
        local = os.path.abspath(os.fspath(path))
        if not os.path.isdir(local):
            raise ValueError(f"checkpoint directory does not exist or is not a directory: {local}")
        return cls(local, LocalFileSystem())

    @property
    def is_local(self) -> bool:
        return isinstance(self.filesystem, LocalFileSystem)

    @property
    def url(self) -> str:
        return str(self.filesystem.unstrip_protocol(self.path))

    def to_directory(self, path: str | os.PathLike[str] | None = None) -> str:
        """Copy the files into local directory ``path`` (a new temporary one if None); return it."""
        target = os.path.abspath(os.fspath(path)) if path is not None else tempfile.mkdtemp(prefix="checkpoint-")
        os.makedirs(target, exist_ok=True)
        if self.is_local:
            shutil.copytree(self.path, target, dirs_exist_ok=True)
        else:
            # fsspec's memory file system hands every reader the same file object, so two ranks
            # copying one checkpoint at once would share a read position; cat_file does not.
            shared_handles = "memory" in _protocols(self.filesystem)
            for source in self.filesystem.find(self.path):
                relative = source[len(self.path) :].lstrip("/")
                destination = os.path.join(target, relative)
                os.makedirs(os.path.dirname(destination), exist_ok=True)
                if shared_handles:
                    with open(destination, "wb") as handle:
                        handle.write(self.filesystem.cat_file(source))
                else:
                    self.filesystem.get_file(source, destination)
        return target

    @contextlib.contextmanager
    def as_directory(self) -> Iterator[str]:
        """Yield a local directory with the files: the directory itself when it is local."""
        if self.is_local:
            yield self.path
            return
        target = self.to_directory()
        try:
            yield target
        finally:
            shutil.rmtree(target, ignore_errors=True)

    def __repr__(self) -> str:
        return f"Checkpoint({self.url!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Checkpoint) and (self.url, type(self.filesystem)) == (
            other.url,
            type(other.filesystem),
        )

    def __hash__(self) -> int:
        return hash(self.url)


def _protocols(filesystem: fsspec.AbstractFileSystem) -> tuple[str, ...]:
    protocol = filesystem.protocol
    return (protocol,) if isinstance(protocol, str) else tuple(protocol)
