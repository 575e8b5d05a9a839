"""Exceptions that users see."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .result import Result

__all__ = ["ReportFailedError", "RunAbortedError", "TrainingFailedError"]


class TrainingFailedError(RuntimeError):
    """``fit()`` failed. The message names the rank, the report index and the cause.

    ``__cause__`` is the original exception and ``result`` the :class:`~statemachine.Result` of
    everything that happened up to the failure (``result.error`` is set).
    """

    def __init__(self, message: str, result: Result | None = None) -> None:
        super().__init__(message)
        self.result = result


class ReportFailedError(RuntimeError):
    """A SYNC report of this rank failed (raised by ``report()`` under ``on_failure="raise"``)."""

    def __init__(self, message: str, rank: int, index: int) -> None:
        super().__init__(message)
        self.rank = rank
        self.index = index

    def __reduce__(self) -> tuple[object, ...]:
        # The Ray backend pickles errors from a rank's process to the driver; the default
        # reduction would call __init__ with the message only.
        return (type(self), (str(self), self.rank, self.index), self.__dict__)


class RunAbortedError(RuntimeError):
    """The run is ending because of a failure elsewhere; raised by ``report()`` to unwind."""
