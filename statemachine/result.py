"""What ``fit()`` returns: :class:`Result` and the per-report :class:`ReportInfo`."""

from __future__ import annotations

import bisect
import math
from array import array
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, overload

from .checkpoint import Checkpoint
from .config import CheckpointUploadMode
from .lifecycle import ReportState
from .storage import checkpoint_dir_name

__all__ = ["ReportInfo", "ReportLog", "Reports", "Result"]

_MODES = list(CheckpointUploadMode)
_STATES = list(ReportState)
_MODE_CODES = {mode: code for code, mode in enumerate(_MODES)}
_STATE_CODES = {state: code for code, state in enumerate(_STATES)}
#: How :class:`ReportLog` stores a report's checkpoint folder.
_NO_DIR, _DEFAULT_DIR, _CUSTOM_DIR = 0, 1, 2


class ReportTimings:
    """The timings of one report while it is open; :class:`ReportLog` keeps them once it ended.

    Filled by the upload (``upload_s``, ``bytes``, ``retries``) and by ``report()`` as it
    returns (``blocked_s``); None is a timing not taken.
    """

    __slots__ = ("blocked_s", "bytes", "retries", "upload_s")

    def __init__(self) -> None:
        self.blocked_s: float | None = None
        self.upload_s: float | None = None
        self.bytes: float | None = None
        self.retries: float | None = None


@dataclass(frozen=True, slots=True)
class ReportInfo:
    """One report of one rank, as it ended."""

    rank: int
    index: int
    mode: CheckpointUploadMode
    state: ReportState
    #: The error of a FAILED report (None otherwise).
    error: BaseException | None
    #: ``blocked_s``: time the caller spent in ``report()``; ``upload_s``: time from the
    #: upload slot to a finished upload (when there was one); ``bytes``: bytes uploaded.
    timings: dict[str, float] = field(default_factory=dict)
    #: The checkpoint folder of this report, relative to the run folder (None: metrics only).
    checkpoint_dir: str | None = None


class ReportLog:
    """The reports of one rank that have ended, a few dozen bytes each.

    A long run makes many reports (metrics-only ones at every step), and ``Result.reports``
    must describe each. Holding a :class:`ReportInfo` with its timings dict per report cost
    about 430 bytes each; the log keeps one typed-array slot per field instead (NaN for a
    timing that was not taken), the errors and custom folder names in dicts of their own,
    and builds a :class:`ReportInfo` only when one is read. Reports are added in index order
    (the turn rule hands them off so), starting at ``first_index``.

    ``blocked_s`` is written by the caller once ``report()`` returns, which may be after the
    report was handed off; such a report's :class:`ReportTimings` is kept until it has it.
    """

    __slots__ = (
        "_blocked",
        "_bytes",
        "_custom_dirs",
        "_dirs",
        "_errors",
        "_late",
        "_modes",
        "_retries",
        "_states",
        "_upload",
        "first_index",
        "rank",
    )

    def __init__(self, rank: int, first_index: int) -> None:
        self.rank = rank
        self.first_index = first_index
        self._modes = bytearray()
        self._states = bytearray()
        self._dirs = bytearray()
        self._blocked = array("d")
        self._upload = array("d")
        self._bytes = array("d")
        self._retries = array("d")
        self._errors: dict[int, BaseException] = {}
        self._custom_dirs: dict[int, str] = {}
        self._late: dict[int, ReportTimings] = {}

    def __len__(self) -> int:
        return len(self._modes)

    def add(
        self,
        index: int,
        mode: CheckpointUploadMode,
        state: ReportState,
        error: BaseException | None,
        timings: ReportTimings,
        checkpoint_dir: str | None,
    ) -> None:
        """Append the report ``index`` (the next one) as it ended."""
        position = len(self._modes)
        if index != self.first_index + position:
            raise ValueError(f"rank {self.rank}: report {index} added out of order (expected {self.first_index + position})")
        self._modes.append(_MODE_CODES[mode])
        self._states.append(_STATE_CODES[state])
        if checkpoint_dir is None:
            self._dirs.append(_NO_DIR)
        elif checkpoint_dir == checkpoint_dir_name(index):
            self._dirs.append(_DEFAULT_DIR)
        else:
            self._dirs.append(_CUSTOM_DIR)
            self._custom_dirs[position] = checkpoint_dir
        if error is not None:
            self._errors[position] = error
        self._upload.append(_nan_if_none(timings.upload_s))
        self._bytes.append(_nan_if_none(timings.bytes))
        self._retries.append(_nan_if_none(timings.retries))
        self._blocked.append(_nan_if_none(timings.blocked_s))
        if self._late:
            self._settle_late()
        if timings.blocked_s is None:
            self._late[position] = timings

    def _settle_late(self) -> None:
        for position, timings in list(self._late.items()):
            if timings.blocked_s is not None:
                self._blocked[position] = timings.blocked_s
                del self._late[position]

    @property
    def has_errors(self) -> bool:
        return bool(self._errors)

    def info(self, position: int) -> ReportInfo:
        """The :class:`ReportInfo` of the ``position``-th report of the log."""
        if self._late:
            self._settle_late()
        timings = {}
        for name, column in (
            ("blocked_s", self._blocked),
            ("upload_s", self._upload),
            ("bytes", self._bytes),
            ("retries", self._retries),
        ):
            value = column[position]
            if not math.isnan(value):
                timings[name] = value
        index = self.first_index + position
        kind = self._dirs[position]
        checkpoint_dir = (
            None if kind == _NO_DIR else checkpoint_dir_name(index) if kind == _DEFAULT_DIR else self._custom_dirs[position]
        )
        return ReportInfo(
            rank=self.rank,
            index=index,
            mode=_MODES[self._modes[position]],
            state=_STATES[self._states[position]],
            error=self._errors.get(position),
            timings=timings,
            checkpoint_dir=checkpoint_dir,
        )

    def __iter__(self) -> Iterator[ReportInfo]:
        return (self.info(position) for position in range(len(self)))

    def copy(self) -> ReportLog:
        """A copy that later additions to this log do not change."""
        if self._late:
            self._settle_late()
        other = ReportLog(self.rank, self.first_index)
        for name in ("_modes", "_states", "_dirs"):
            setattr(other, name, bytearray(getattr(self, name)))
        for name in ("_blocked", "_upload", "_bytes", "_retries"):
            setattr(other, name, array("d", getattr(self, name)))
        for name in ("_errors", "_custom_dirs", "_late"):
            setattr(other, name, dict(getattr(self, name)))
        return other

    def map_errors(self, convert: Callable[[BaseException], BaseException]) -> None:
        """Replace every error by ``convert(error)`` (the Ray backend makes them picklable)."""
        self._errors = {position: convert(error) for position, error in self._errors.items()}

    def __getstate__(self) -> dict[str, Any]:
        if self._late:
            self._settle_late()
        state = {name: getattr(self, name) for name in self.__slots__}
        state["_late"] = {}  # timings a caller never completed: blocked_s stays unknown
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        for name, value in state.items():
            setattr(self, name, value)


def _nan_if_none(value: float | None) -> float:
    return math.nan if value is None else value


class Reports(Sequence[ReportInfo]):
    """Every report of every rank, sorted by (index, rank), read from the ranks' :class:`ReportLog`.

    A read-only sequence: ``len``, indexing, slicing (which gives a list) and iteration build
    each :class:`ReportInfo` as it is read, so a run of a million reports does not hold a
    million objects. Compares equal to a list of the same :class:`ReportInfo` values.
    """

    def __init__(self, logs: Sequence[ReportLog] = ()) -> None:
        by_rank = sorted(logs, key=lambda log: log.rank)
        self._logs = by_rank
        # Every log starts at the same index (one attempt) and is a prefix of the longest;
        # between two log lengths the same logs take part, so a position maps to
        # (offset, log) by arithmetic within its stretch.
        if len({log.first_index for log in by_rank if len(log)}) > 1:
            raise ValueError("the ranks' report logs start at different indices")
        self._stretches: list[tuple[int, int, list[ReportLog]]] = []  # (first position, first offset, logs)
        self._ends: list[int] = []  # the offset each stretch ends before
        position = offset = 0
        for length in sorted({len(log) for log in by_rank} - {0}):
            active = [log for log in by_rank if len(log) > offset]
            self._stretches.append((position, offset, active))
            self._ends.append(length)
            position += (length - offset) * len(active)
            offset = length
        self._len = position
        self._starts = [start for start, _offset, _logs in self._stretches]

    def __len__(self) -> int:
        return self._len

    @overload
    def __getitem__(self, item: int) -> ReportInfo: ...

    @overload
    def __getitem__(self, item: slice) -> list[ReportInfo]: ...

    def __getitem__(self, item: int | slice) -> ReportInfo | list[ReportInfo]:
        if isinstance(item, slice):
            return [self[position] for position in range(*item.indices(self._len))]
        position = item + self._len if item < 0 else item
        if not 0 <= position < self._len:
            raise IndexError(f"report position {item} out of range (have {self._len})")
        start, offset, active = self._stretches[bisect.bisect_right(self._starts, position) - 1]
        step, which = divmod(position - start, len(active))
        return active[which].info(offset + step)

    def __iter__(self) -> Iterator[ReportInfo]:
        for (_start, offset, active), end in zip(self._stretches, self._ends, strict=True):
            for position in range(offset, end):
                for log in active:
                    yield log.info(position)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Reports | list | tuple):
            return len(self) == len(other) and all(a == b for a, b in zip(self, other, strict=True))
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"Reports({list(self)!r})"


@dataclass(slots=True)
class Result:
    """Everything a run produced."""

    #: Rank 0's metrics of the last committed report (None if nothing was committed).
    metrics: dict[str, Any] | None
    #: The latest committed checkpoint (None if no committed report carried one).
    checkpoint: Checkpoint | None
    #: ``(checkpoint, metrics)`` of the committed checkpoints kept by the retention policy, oldest first.
    best_checkpoints: list[tuple[Checkpoint, dict[str, Any]]]
    #: Every report of every rank, sorted by (index, rank); a read-only sequence (see :class:`Reports`).
    reports: Sequence[ReportInfo]
    #: None on success; the error that ended the run otherwise.
    error: BaseException | None = None
    #: The run folder as a URL.
    path: str = ""
    #: Committed report indices, in commit order (with and without checkpoints).
    committed_indices: list[int] = field(default_factory=list)
    #: Failures of earlier attempts that were restarted (``FailureConfig.max_failures``).
    failures: list[BaseException] = field(default_factory=list)
    #: Counters and timings of the run (see ``statemachine.stats``).
    stats: dict[str, Any] = field(default_factory=dict)
