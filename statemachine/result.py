"""What ``fit()`` returns: :class:`Result` and the per-report :class:`ReportInfo`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .checkpoint import Checkpoint
from .config import CheckpointUploadMode
from .lifecycle import ReportState

__all__ = ["ReportInfo", "Result"]


class ReportTimings:
    """The timings of one report while the run goes on; :class:`ReportInfo` gets them as a dict.

    Slots rather than a dict per report: a run keeps one per report until it ends, and a dict
    with its keys and floats cost about 200 bytes more (``bench``'s memory section).
    """

    __slots__ = ("blocked_s", "bytes", "retries", "upload_s")

    def __init__(self) -> None:
        self.blocked_s: float | None = None
        self.upload_s: float | None = None
        self.bytes: float | None = None
        self.retries: float | None = None

    def as_dict(self) -> dict[str, float]:
        found = {}
        for name in self.__slots__:
            value = getattr(self, name)
            if value is not None:
                found[name] = value
        return found


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


@dataclass(slots=True)
class Result:
    """Everything a run produced."""

    #: Rank 0's metrics of the last committed report (None if nothing was committed).
    metrics: dict[str, Any] | None
    #: The latest committed checkpoint (None if no committed report carried one).
    checkpoint: Checkpoint | None
    #: ``(checkpoint, metrics)`` of the committed checkpoints kept by the retention policy, oldest first.
    best_checkpoints: list[tuple[Checkpoint, dict[str, Any]]]
    #: Every report of every rank, sorted by (index, rank).
    reports: list[ReportInfo]
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
