"""Small in-memory file systems for tests that need to hold or break a write.

They are real fsspec file systems (subclasses of fsspec's memory file system, each with its own
store), registered under their own protocols, so the library talks to them exactly as it talks
to any storage.
"""

from __future__ import annotations

import threading
from typing import Any, ClassVar

import fsspec
from fsspec.implementations.memory import MemoryFileSystem


class GatedFileSystem(MemoryFileSystem):
    """``gated://``: opening a file for writing waits until :attr:`gate` is set.

    :attr:`writers` is set as soon as a write is waiting, so a test can wait for "an upload is
    in progress" without sleeping.
    """

    protocol = "gated"
    store: ClassVar[dict[str, Any]] = {}
    pseudo_dirs: ClassVar[list[str]] = [""]
    gate = threading.Event()
    writers = threading.Event()

    @classmethod
    def reset(cls) -> None:
        cls.store.clear()
        cls.pseudo_dirs[:] = [""]
        cls.gate = threading.Event()
        cls.writers = threading.Event()

    def _open(self, path: str, mode: str = "rb", *args: Any, **kwargs: Any) -> Any:
        if "w" in mode and "/.staging/" in path:
            type(self).writers.set()
            if not type(self).gate.wait(timeout=60):
                raise TimeoutError("test gate was never opened")
        return super()._open(path, mode, *args, **kwargs)


class FailingFileSystem(MemoryFileSystem):
    """``failing://``: writing a staged file whose path contains :attr:`fail_on` raises OSError;
    one containing a :attr:`fail_once` token raises the first time only. :attr:`writes` lists
    ``(path, thread ident)`` of every write opened."""

    protocol = "failing"
    store: ClassVar[dict[str, Any]] = {}
    pseudo_dirs: ClassVar[list[str]] = [""]
    fail_on: ClassVar[list[str]] = []
    fail_once: ClassVar[list[str]] = []
    writes: ClassVar[list[tuple[str, int]]] = []

    @classmethod
    def reset(cls, *fail_on: str, fail_once: tuple[str, ...] = ()) -> None:
        cls.store.clear()
        cls.pseudo_dirs[:] = [""]
        cls.fail_on[:] = list(fail_on)
        cls.fail_once[:] = list(fail_once)
        cls.writes.clear()

    def _open(self, path: str, mode: str = "rb", *args: Any, **kwargs: Any) -> Any:
        if "w" in mode:
            type(self).writes.append((path, threading.get_ident()))
            if any(token in path for token in type(self).fail_on):
                raise OSError(f"injected write failure for {path}")
            for token in list(type(self).fail_once):
                if token in path:
                    type(self).fail_once.remove(token)
                    raise OSError(f"injected write failure (once) for {path}")
        return super()._open(path, mode, *args, **kwargs)


fsspec.register_implementation("gated", GatedFileSystem, clobber=True)
fsspec.register_implementation("failing", FailingFileSystem, clobber=True)
