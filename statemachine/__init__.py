"""statemachine: ordered, asynchronous checkpoint reporting for distributed training.

Each rank calls :func:`report` with metrics and, optionally, a :class:`Checkpoint`; the
checkpoint is uploaded synchronously, asynchronously or not at all
(:class:`CheckpointUploadMode`), reports reach the controller in order, and checkpoint *i* is
committed atomically once every rank's *i*-th report is in. See README.md and DESIGN.md.
"""

from . import faults as faults  # registers the "faulty://" fault-injection file system with fsspec
from .checkpoint import Checkpoint
from .config import (
    CheckpointConfig,
    CheckpointUploadMode,
    FailureConfig,
    RetryPolicy,
    RunConfig,
    ScalingConfig,
    UploadConfig,
)
from .context import TrainContext, areport, get_checkpoint, get_context, report
from .errors import ReportFailedError, RunAbortedError, TrainingFailedError
from .lifecycle import ReportState
from .result import ReportInfo, Result
from .trainer import Trainer

__all__ = [
    "Checkpoint",
    "CheckpointConfig",
    "CheckpointUploadMode",
    "FailureConfig",
    "ReportFailedError",
    "ReportInfo",
    "ReportState",
    "Result",
    "RetryPolicy",
    "RunAbortedError",
    "RunConfig",
    "ScalingConfig",
    "TrainContext",
    "Trainer",
    "TrainingFailedError",
    "UploadConfig",
    "areport",
    "get_checkpoint",
    "get_context",
    "report",
]

__version__ = "0.1.0"
