"""User-facing configuration objects.

Names and defaults follow Ray Train where Ray has the same knob (``ScalingConfig``,
``RunConfig``, ``CheckpointConfig``, ``FailureConfig``, ``CheckpointUploadMode``); the knobs Ray
does not have (``UploadConfig``, ``RetryPolicy``) are this library's answer to the weaknesses
listed in DESIGN.md section 7. Every object checks its values when it is built, so a bad value
fails at the line that wrote it.
"""

from __future__ import annotations

import enum
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

__all__ = [
    "CheckpointConfig",
    "CheckpointUploadMode",
    "FailureConfig",
    "RetryPolicy",
    "RunConfig",
    "ScalingConfig",
    "UploadConfig",
]


class CheckpointUploadMode(enum.Enum):
    """How ``report()`` gets a checkpoint into storage (same members as Ray Train's)."""

    SYNC = "SYNC"  #: upload now; ``report()`` returns once the report is handed off in order
    ASYNC = "ASYNC"  #: snapshot now, upload in the background; ``report()`` returns at once
    NO_UPLOAD = "NO_UPLOAD"  #: the files are already in the run folder; register them in place

    @property
    def default_delete_local(self) -> bool:
        """The default of ``delete_local_checkpoint_after_upload`` for this mode."""
        return self is CheckpointUploadMode.ASYNC


@dataclass(frozen=True, slots=True)
class ScalingConfig:
    """How many ranks run the training function."""

    num_workers: int = 1
    #: Resources of each rank on the Ray backend (ignored by the local backend).
    resources_per_worker: dict[str, float] = field(default_factory=lambda: {"CPU": 1.0})

    def __post_init__(self) -> None:
        if not isinstance(self.num_workers, int) or self.num_workers < 1:
            raise ValueError(f"ScalingConfig.num_workers must be an int >= 1, got {self.num_workers!r}")


@dataclass(frozen=True, slots=True)
class CheckpointConfig:
    """Which committed checkpoints to keep."""

    #: Keep this many committed checkpoints (None keeps all). The latest is always kept.
    num_to_keep: int | None = None
    #: Metric (from rank 0's metrics) that ranks checkpoints; None ranks them by index.
    checkpoint_score_attribute: str | None = None
    checkpoint_score_order: Literal["max", "min"] = "max"

    def __post_init__(self) -> None:
        if self.num_to_keep is not None and (not isinstance(self.num_to_keep, int) or self.num_to_keep < 1):
            raise ValueError(f"CheckpointConfig.num_to_keep must be None or >= 1, got {self.num_to_keep!r}")
        if self.checkpoint_score_order not in ("max", "min"):
            raise ValueError(
                f"CheckpointConfig.checkpoint_score_order must be 'max' or 'min', got {self.checkpoint_score_order!r}"
            )


@dataclass(frozen=True, slots=True)
class FailureConfig:
    """How many times a failed run attempt is restarted from the latest committed checkpoint."""

    max_failures: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.max_failures, int) or self.max_failures < -1:
            raise ValueError(f"FailureConfig.max_failures must be an int >= -1, got {self.max_failures!r}")


RetryPredicate = Callable[[BaseException], bool]


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How one upload is retried.

    ``retry_on`` is a tuple of exception types or a predicate on the exception. ``ValueError``
    and ``TypeError`` are never retried: they mean the input is wrong, and trying again cannot
    help.
    """

    max_attempts: int = 3
    initial_backoff_s: float = 0.5
    max_backoff_s: float = 30.0
    jitter: float = 1.0
    #: Give up on one attempt after this many seconds (None: no per-attempt limit).
    attempt_timeout_s: float | None = None
    retry_on: tuple[type[BaseException], ...] | RetryPredicate = (OSError, TimeoutError)

    def __post_init__(self) -> None:
        if not isinstance(self.max_attempts, int) or self.max_attempts < 1:
            raise ValueError(f"RetryPolicy.max_attempts must be an int >= 1, got {self.max_attempts!r}")
        for name in ("initial_backoff_s", "max_backoff_s", "jitter"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or value < 0:
                raise ValueError(f"RetryPolicy.{name} must be a number >= 0, got {value!r}")
        if self.attempt_timeout_s is not None and self.attempt_timeout_s <= 0:
            raise ValueError(f"RetryPolicy.attempt_timeout_s must be None or > 0, got {self.attempt_timeout_s!r}")
        if not callable(self.retry_on) and not (
            isinstance(self.retry_on, tuple)
            and all(isinstance(t, type) and issubclass(t, BaseException) for t in self.retry_on)
        ):
            raise TypeError(
                f"RetryPolicy.retry_on must be a tuple of exception types or a predicate, got {self.retry_on!r}"
            )

    def should_retry(self, error: BaseException) -> bool:
        """Whether ``error`` is worth another attempt under this policy."""
        if isinstance(error, ValueError | TypeError) or not isinstance(error, Exception):
            return False
        if isinstance(self.retry_on, tuple):
            return isinstance(error, self.retry_on)
        return bool(self.retry_on(error))


@dataclass(frozen=True, slots=True)
class UploadConfig:
    """Upload concurrency, back-pressure, retries, and what a failed report does to the run."""

    #: Upload slots per rank (a ``trio.CapacityLimiter``).
    max_concurrent_uploads: int = 2
    #: ``report()`` blocks while this many reports of the rank are not terminal (None: no bound).
    #: This bounds the local disk held by snapshots that wait for upload.
    max_pending_reports: int | None = 4
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    #: ``"raise"``: the first failed report fails the run. ``"continue"``: it is FAILED, its
    #: index is not committed, and training goes on.
    on_failure: Literal["raise", "continue"] = "raise"
    #: Show a progress display (None: follow the ``STATEMACHINE_PROGRESS`` environment variable).
    progress: bool | None = None
    #: How ASYNC takes its snapshot: ``"link"`` (hard links, copy where linking fails) or
    #: ``"copy"`` (always copy; safe even if the caller rewrites files in place).
    snapshot: Literal["link", "copy"] = "link"
    #: After a failure, uploads already running get this long to finish (so that finished
    #: work is still committed) before what is left is cancelled.
    drain_timeout_s: float = 60.0
    #: ASYNC uploads to a local disk that copy at once in one process, all ranks together
    #: (None: one fewer than the CPUs this process may use, at least one). A page-cache copy is
    #: CPU work, and more copies than that take the CPU from training: with eight ranks on two
    #: cores, the p99 of an ASYNC ``report()`` halved at one copy at a time. Raise it when the
    #: "local" path is a network file system, whose copies wait on the network instead.
    background_local_copies: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.max_concurrent_uploads, int) or self.max_concurrent_uploads < 1:
            raise ValueError(
                f"UploadConfig.max_concurrent_uploads must be an int >= 1, got {self.max_concurrent_uploads!r}"
            )
        if self.max_pending_reports is not None and (
            not isinstance(self.max_pending_reports, int) or self.max_pending_reports < 1
        ):
            raise ValueError(
                f"UploadConfig.max_pending_reports must be None or an int >= 1, got {self.max_pending_reports!r}"
            )
        if self.on_failure not in ("raise", "continue"):
            raise ValueError(f"UploadConfig.on_failure must be 'raise' or 'continue', got {self.on_failure!r}")
        if self.snapshot not in ("link", "copy"):
            raise ValueError(f"UploadConfig.snapshot must be 'link' or 'copy', got {self.snapshot!r}")
        if not isinstance(self.drain_timeout_s, int | float) or self.drain_timeout_s < 0:
            raise ValueError(f"UploadConfig.drain_timeout_s must be a number >= 0, got {self.drain_timeout_s!r}")
        if self.background_local_copies is not None and (
            not isinstance(self.background_local_copies, int) or self.background_local_copies < 1
        ):
            raise ValueError(
                "UploadConfig.background_local_copies must be None or an int >= 1, "
                f"got {self.background_local_copies!r}"
            )
        if not isinstance(self.retry, RetryPolicy):
            raise TypeError(f"UploadConfig.retry must be a RetryPolicy, got {self.retry!r}")

    @property
    def show_progress(self) -> bool:
        if self.progress is not None:
            return self.progress
        return os.environ.get("STATEMACHINE_PROGRESS", "0").lower() in ("1", "true", "yes", "on")


@dataclass(frozen=True, slots=True)
class RunConfig:
    """Where a run lives and how it behaves."""

    #: Any fsspec URL (``file://``, ``memory://``, ``s3://``...) or a plain local path.
    storage_path: str = "statemachine-runs"
    #: The run folder's name under ``storage_path``; a new ``fit()`` with the same name resumes.
    name: str | None = None
    checkpoint_config: CheckpointConfig = field(default_factory=CheckpointConfig)
    failure_config: FailureConfig = field(default_factory=FailureConfig)
    upload_config: UploadConfig = field(default_factory=UploadConfig)
    #: Options passed to the fsspec file system (for example s3fs's ``client_kwargs``).
    storage_options: dict[str, object] = field(default_factory=dict)
    #: Observers with any of ``on_report(message)``, ``on_commit(committed)`` and
    #: ``on_upload_progress(rank, index, nbytes)`` (the last is called in the upload thread).
    callbacks: tuple[object, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.storage_path, str | os.PathLike) or not str(self.storage_path):
            raise ValueError(f"RunConfig.storage_path must be a non-empty path or URL, got {self.storage_path!r}")
        if self.name is not None and (
            not self.name or "/" in self.name or "\\" in self.name or self.name in (".", "..")
        ):
            raise ValueError(f"RunConfig.name must be a plain folder name, got {self.name!r}")
