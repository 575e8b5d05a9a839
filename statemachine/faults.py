"""Fault injection: a file system that fails on purpose, and crashes of a rank.

:class:`FaultyFileSystem` wraps any fsspec file system and, for each operation, decides from a
seed whether to fail it: an ``OSError`` (EIO), a full disk (``ENOSPC``), added latency, a hang
(bounded: it waits until :meth:`FaultyFileSystem.release_hangs` or ``hang_s`` seconds), a
silent short write (storage keeps only part of the bytes and reports success), or a crash
(:class:`InjectedCrash`, a ``BaseException``, or ``os._exit`` for a rank in its own process).
It is registered as the ``faulty`` protocol, so a run can use it as its storage::

    RunConfig(
        storage_path="faulty:///tmp/runs",                # the path inside the target file system
        storage_options={"target_protocol": "file", "seed": 7, "error_rate": 0.1},
    )

The path after ``faulty://`` is the path inside the target file system, written as that file
system writes it (``/tmp/runs`` for ``file``, ``/runs`` for ``memory``, ``bucket/runs`` for
``s3``). A ``faulty://`` URL opened without options (as ``fsspec.open(url)`` does) reaches the
local file system without faults.

Why decisions are keyed and not drawn from one random stream: uploads run in several threads,
so the order of operations differs between two runs with the same seed. Each decision is drawn
from a generator seeded by ``(seed, operation, path, n)``, where ``n`` counts earlier calls of
that operation on that path; the path is its last four components (so a run folder under
another root draws the same faults) with random-looking tokens (staging folders) masked. The
same seed therefore injects the same faults into the same operations, whatever the thread
timing. Instances created with the same ``name`` share their counters, their hang release and
their statistics, so a run that re-creates its file system (each attempt does) carries on with
the same fault sequence instead of repeating it.

:class:`CrashInjector` crashes the training function itself: call
:meth:`CrashInjector.maybe_crash` at the point where a crash should be possible.
"""

from __future__ import annotations

import dataclasses
import errno
import io
import os
import random
import re
import threading
import time
from collections import Counter
from collections.abc import Mapping
from typing import Any, Literal

import fsspec
from fsspec.spec import AbstractFileSystem

__all__ = [
    "OPERATIONS",
    "CrashInjector",
    "FaultPlan",
    "FaultyFileSystem",
    "InjectedCrash",
    "crash",
    "fault_statistics",
    "plan_options",
]

#: The operations faults can be injected into (``FaultPlan.operations``).
OPERATIONS = ("read", "write", "ls", "info", "find", "makedirs", "rm", "mv", "copy")

CrashMode = Literal["raise", "exit"]

#: Exit code of a rank process killed by an injected crash with ``crash_mode="exit"``.
CRASH_EXIT_CODE = 70

_TOKEN_RE = re.compile(r"[0-9a-f]{12,32}")


class InjectedCrash(BaseException):
    """A crash injected on purpose. A ``BaseException``, like ``KeyboardInterrupt``: not retried."""


@dataclasses.dataclass(frozen=True, slots=True)
class FaultPlan:
    """What to inject, and how often (rates are per operation, from 0 to 1)."""

    seed: int = 0
    error_rate: float = 0.0
    enospc_rate: float = 0.0
    hang_rate: float = 0.0
    #: A hang ends after this many seconds, or at :meth:`FaultyFileSystem.release_hangs`.
    hang_s: float = 5.0
    partial_write_rate: float = 0.0
    crash_rate: float = 0.0
    crash_mode: CrashMode = "raise"
    #: Each selected operation first sleeps a random time up to this many seconds.
    latency_s: float = 0.0
    #: Operations that can fail (None: all of :data:`OPERATIONS`).
    operations: tuple[str, ...] | None = None
    #: Only paths matching this regular expression can fail (None: every path).
    path_pattern: str | None = None
    #: Stop injecting after this many faults (None: no limit); ``1`` makes "fail once".
    max_faults: int | None = None

    def __post_init__(self) -> None:
        for name in ("error_rate", "enospc_rate", "hang_rate", "partial_write_rate", "crash_rate"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or not 0 <= value <= 1:
                raise ValueError(f"FaultPlan.{name} must be a number from 0 to 1, got {value!r}")
        for name in ("hang_s", "latency_s"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or value < 0:
                raise ValueError(f"FaultPlan.{name} must be a number >= 0, got {value!r}")
        if self.max_faults is not None and (not isinstance(self.max_faults, int) or self.max_faults < 0):
            raise ValueError(f"FaultPlan.max_faults must be None or an int >= 0, got {self.max_faults!r}")
        if self.crash_mode not in ("raise", "exit"):
            raise ValueError(f"FaultPlan.crash_mode must be 'raise' or 'exit', got {self.crash_mode!r}")
        if self.operations is not None:
            unknown = set(self.operations) - set(OPERATIONS)
            if unknown:
                raise ValueError(f"FaultPlan.operations has unknown names {sorted(unknown)}; known: {OPERATIONS}")
        if self.path_pattern is not None:
            try:
                re.compile(self.path_pattern)
            except re.error as error:
                raise ValueError(f"FaultPlan.path_pattern is not a regular expression: {error}") from None

    def applies_to(self, operation: str, path: str) -> bool:
        if self.operations is not None and operation not in self.operations:
            return False
        return self.path_pattern is None or re.search(self.path_pattern, path) is not None


@dataclasses.dataclass(slots=True)
class _Fault:
    """The decision for one operation."""

    latency_s: float = 0.0
    hang: bool = False
    crash: bool = False
    error: int | None = None  #: errno of the OSError to raise
    partial: bool = False


class _SharedState:
    """What instances with the same name share: call counters, hang release, statistics."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.calls: Counter[tuple[str, str]] = Counter()
        self.injected: Counter[str] = Counter()
        self.release = threading.Event()
        self.active = 0
        #: Faults decided so far (for ``FaultPlan.max_faults``).
        self.decided = 0
        self.idle = threading.Condition(self.lock)


_STATES: dict[str, _SharedState] = {}
_STATES_LOCK = threading.Lock()


def _shared(name: str) -> _SharedState:
    with _STATES_LOCK:
        return _STATES.setdefault(name, _SharedState())


def fault_statistics(name: str = "default") -> dict[str, int]:
    """How many faults of each kind were injected by the file systems called ``name``."""
    state = _shared(name)
    with state.lock:
        return dict(state.injected)


class FaultyFileSystem(AbstractFileSystem):  # type: ignore[misc]
    """An fsspec file system that injects faults into another one (see the module docstring).

    ``target_protocol``/``target_options`` (or an open ``fs``) choose the wrapped file system;
    the fault options are those of :class:`FaultPlan`; ``name`` groups instances that share
    state (see :func:`fault_statistics`).
    """

    protocol = "faulty"
    root_marker = ""
    cachable = False

    def __init__(
        self,
        target_protocol: str = "file",
        target_options: Mapping[str, Any] | None = None,
        fs: AbstractFileSystem | None = None,
        name: str = "default",
        **plan: Any,
    ) -> None:
        super().__init__()
        self.target: AbstractFileSystem = (
            fs if fs is not None else fsspec.filesystem(target_protocol, **dict(target_options or {}))
        )
        operations = plan.pop("operations", None)
        if operations is not None:
            plan["operations"] = tuple(operations)
        self.plan = FaultPlan(**plan)
        self.name = name
        self._state = _shared(name)

    # -- control ---------------------------------------------------------------------------

    def release_hangs(self) -> None:
        """End every injected hang now, and make later ones return at once."""
        self._state.release.set()

    def wait_idle(self, timeout: float) -> bool:
        """Wait until no operation of this name is running (abandoned threads included)."""
        deadline = time.monotonic() + timeout
        with self._state.idle:
            while self._state.active:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._state.idle.wait(remaining)
        return True

    @property
    def injected(self) -> dict[str, int]:
        """Faults injected so far by the instances of this name, by kind."""
        return fault_statistics(self.name)

    # -- deciding --------------------------------------------------------------------------

    def _decide(self, operation: str, path: str) -> _Fault:
        plan = self.plan
        if not plan.applies_to(operation, str(path)):
            return _Fault()
        # The tail of the path: the same layout under another root draws the same faults.
        key = _TOKEN_RE.sub("*", "/".join(str(path).rstrip("/").split("/")[-4:]))
        with self._state.lock:
            n = self._state.calls[(operation, key)]
            self._state.calls[(operation, key)] = n + 1
        rng = random.Random(f"{plan.seed}|{operation}|{key}|{n}")
        fault = _Fault(latency_s=rng.uniform(0, plan.latency_s) if plan.latency_s else 0.0)
        draws = [rng.random() for _ in range(5)]
        with self._state.lock:
            if plan.max_faults is not None and self._state.decided >= plan.max_faults:
                return fault
            if any(d < r for d, r in zip(draws, self._rates(operation), strict=True)):
                self._state.decided += 1
        if draws[0] < plan.crash_rate:
            fault.crash = True
        elif draws[1] < plan.hang_rate:
            fault.hang = True
        elif draws[2] < plan.error_rate:
            fault.error = errno.EIO
        elif draws[3] < plan.enospc_rate:
            fault.error = errno.ENOSPC
        elif operation == "write" and draws[4] < plan.partial_write_rate:
            fault.partial = True
        return fault

    def _rates(self, operation: str) -> tuple[float, ...]:
        plan = self.plan
        partial = plan.partial_write_rate if operation == "write" else 0.0
        return (plan.crash_rate, plan.hang_rate, plan.error_rate, plan.enospc_rate, partial)

    def _count(self, kind: str) -> None:
        with self._state.lock:
            self._state.injected[kind] += 1

    def _before(self, fault: _Fault, operation: str, path: str, *, defer_failure: bool = False) -> None:
        """Apply latency and hangs; raise the fault unless a writer raises it mid-write."""
        if fault.latency_s:
            time.sleep(fault.latency_s)
        if fault.hang:
            self._count("hang")
            self._state.release.wait(self.plan.hang_s)
        if not defer_failure:
            self._fail(fault, operation, path)

    def _fail(self, fault: _Fault, operation: str, path: str) -> None:
        if fault.crash:
            self._count("crash")
            if self.plan.crash_mode == "exit":
                os._exit(CRASH_EXIT_CODE)
            raise InjectedCrash(f"injected crash in {operation} {path}")
        if fault.error == errno.ENOSPC:
            self._count("enospc")
            raise OSError(errno.ENOSPC, f"injected: no space left on device ({operation})", path)
        if fault.error is not None:
            self._count("error")
            raise OSError(fault.error, f"injected I/O error ({operation})", path)

    def _run(self, operation: str, path: str, call: Any, *args: Any, **kwargs: Any) -> Any:
        with self._state.lock:
            self._state.active += 1
        try:
            self._before(self._decide(operation, path), operation, path)
            return call(*args, **kwargs)
        finally:
            self._done()

    def _done(self) -> None:
        with self._state.idle:
            self._state.active -= 1
            if not self._state.active:
                self._state.idle.notify_all()

    # -- the file system API ---------------------------------------------------------------

    def ls(self, path: str, detail: bool = True, **kwargs: Any) -> Any:
        return self._run("ls", path, self.target.ls, path, detail=detail, **kwargs)

    def info(self, path: str, **kwargs: Any) -> Any:
        return self._run("info", path, self.target.info, path, **kwargs)

    def exists(self, path: str, **kwargs: Any) -> bool:
        return bool(self._run("info", path, self.target.exists, path, **kwargs))

    def isdir(self, path: str) -> bool:
        return bool(self._run("info", path, self.target.isdir, path))

    def isfile(self, path: str) -> bool:
        return bool(self._run("info", path, self.target.isfile, path))

    def find(
        self, path: str, maxdepth: int | None = None, withdirs: bool = False, detail: bool = False, **kwargs: Any
    ) -> Any:
        return self._run(
            "find", path, self.target.find, path, maxdepth=maxdepth, withdirs=withdirs, detail=detail, **kwargs
        )

    def makedirs(self, path: str, exist_ok: bool = False) -> None:
        self._run("makedirs", path, self.target.makedirs, path, exist_ok=exist_ok)

    def mkdir(self, path: str, create_parents: bool = True, **kwargs: Any) -> None:
        self._run("makedirs", path, self.target.mkdir, path, create_parents=create_parents, **kwargs)

    def rm(self, path: str | list[str], recursive: bool = False, maxdepth: int | None = None) -> None:
        self._run("rm", str(path), self.target.rm, path, recursive=recursive, maxdepth=maxdepth)

    def rm_file(self, path: str) -> None:
        self._run("rm", path, self.target.rm_file, path)

    def mv(self, path1: str, path2: str, recursive: bool = False, maxdepth: int | None = None, **kwargs: Any) -> None:
        self._run("mv", path1, self.target.mv, path1, path2, recursive=recursive, maxdepth=maxdepth, **kwargs)

    def cp_file(self, path1: str, path2: str, **kwargs: Any) -> None:
        self._run("copy", path1, self.target.cp_file, path1, path2, **kwargs)

    def cat_file(self, path: str, start: int | None = None, end: int | None = None, **kwargs: Any) -> Any:
        return self._run("read", path, self.target.cat_file, path, start=start, end=end, **kwargs)

    def get_file(self, rpath: str, lpath: str, **kwargs: Any) -> None:
        self._run("read", rpath, self.target.get_file, rpath, lpath, **kwargs)

    def pipe_file(self, path: str, value: bytes, **kwargs: Any) -> None:
        with self._state.lock:
            self._state.active += 1
        try:
            fault = self._decide("write", path)
            self._before(fault, "write", path)
            if fault.partial:
                self._count("partial_write")
                value = value[: len(value) // 2]
            self.target.pipe_file(path, value, **kwargs)
        finally:
            self._done()

    def put_file(self, lpath: str, rpath: str, **kwargs: Any) -> None:
        with open(lpath, "rb") as handle:
            self.pipe_file(rpath, handle.read())

    def _open(self, path: str, mode: str = "rb", **kwargs: Any) -> Any:
        if "r" in mode:
            return self._run("read", path, self.target._open, path, mode=mode, **kwargs)
        with self._state.lock:
            self._state.active += 1
        try:
            fault = self._decide("write", path)
            # Errors and crashes strike in the middle of the first write, leaving a partial file.
            self._before(fault, "write", path, defer_failure=True)
            handle = self.target._open(path, mode=mode, **kwargs)
        finally:
            self._done()
        return _FaultyWriter(self, handle, fault, path)


class _FaultyWriter(io.RawIOBase):
    """A file being written: fails mid-write, or silently keeps half of each write."""

    def __init__(self, fs: FaultyFileSystem, handle: Any, fault: _Fault, path: str) -> None:
        super().__init__()
        self._fs = fs
        self._handle = handle
        self._fault = fault
        self._path = path
        if fault.partial:
            fs._count("partial_write")

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        if self._fault.crash or self._fault.error is not None:
            self._handle.write(view[: len(view) // 2])
            self._handle.flush()
            self._fs._fail(self._fault, "write", self._path)
        if self._fault.partial:
            self._handle.write(view[: len(view) // 2])
        else:
            self._handle.write(view)
        return len(view)

    def flush(self) -> None:
        if not self._handle.closed:
            self._handle.flush()

    def close(self) -> None:
        if not self.closed:
            try:
                self._handle.close()
            finally:
                super().close()


class CrashInjector:
    """Crashes a training function at chosen points, deterministically from a seed.

    ``maybe_crash(rank, index)`` crashes with probability ``rate`` (decided from ``seed``,
    rank and index), at most once per (rank, index) in this process, so a run restarted
    from a checkpoint makes progress instead of crashing at the same place forever.
    ``mode="raise"`` raises :class:`InjectedCrash`; ``"exit"`` ends the process (``os._exit``),
    which is what a crash looks like to the Ray backend. A process that replaces a crashed one
    starts with a copy that never heard of the crash; with ``memory_file`` (a local path every
    process can reach) the crashes are recorded there before they happen, and none recurs.
    """

    def __init__(
        self, seed: int = 0, rate: float = 0.0, mode: CrashMode = "raise", memory_file: str | None = None
    ) -> None:
        if not isinstance(rate, int | float) or not 0 <= rate <= 1:
            raise ValueError(f"CrashInjector rate must be a number from 0 to 1, got {rate!r}")
        if mode not in ("raise", "exit"):
            raise ValueError(f"CrashInjector mode must be 'raise' or 'exit', got {mode!r}")
        self.seed = seed
        self.rate = rate
        self.mode: CrashMode = mode
        self.memory_file = memory_file
        self._lock = threading.Lock()
        self._crashed: set[tuple[int, int]] = set()

    def __getstate__(self) -> dict[str, Any]:
        return {
            "seed": self.seed,
            "rate": self.rate,
            "mode": self.mode,
            "memory_file": self.memory_file,
            "crashed": sorted(self._crashed),
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["seed"], state["rate"], state["mode"], state.get("memory_file"))  # type: ignore[misc]
        self._crashed = {(int(r), int(i)) for r, i in state["crashed"]}

    def _remembered(self) -> set[tuple[int, int]]:
        if self.memory_file is None or not os.path.exists(self.memory_file):
            return set()
        with open(self.memory_file) as handle:
            return {(int(r), int(i)) for r, i in (line.split() for line in handle if line.strip())}

    @property
    def crashes(self) -> list[tuple[int, int]]:
        """``(rank, index)`` of every crash injected so far, sorted."""
        with self._lock:
            return sorted(self._crashed)

    def maybe_crash(self, rank: int, index: int) -> None:
        if not self.rate or random.Random(f"{self.seed}|crash|{rank}|{index}").random() >= self.rate:
            return
        with self._lock:
            if (rank, index) in self._crashed or (rank, index) in self._remembered():
                return
            self._crashed.add((rank, index))
            if self.memory_file is not None:
                with open(self.memory_file, "a") as handle:
                    handle.write(f"{rank} {index}\n")
        crash(f"injected crash of rank {rank} at report {index}", self.mode)


def crash(message: str = "injected crash", mode: CrashMode = "raise") -> None:
    """Crash now: raise :class:`InjectedCrash`, or end the process with ``mode="exit"``."""
    if mode == "exit":
        os._exit(CRASH_EXIT_CODE)
    raise InjectedCrash(message)


def plan_options(plan: FaultPlan, target_protocol: str = "file", name: str = "default") -> dict[str, Any]:
    """``storage_options`` for a ``faulty://`` storage path that injects ``plan``."""
    options: dict[str, Any] = {f.name: getattr(plan, f.name) for f in dataclasses.fields(plan)}
    if plan.operations is not None:
        options["operations"] = list(plan.operations)
    return {"target_protocol": target_protocol, "name": name, **options}


fsspec.register_implementation("faulty", FaultyFileSystem, clobber=True)
