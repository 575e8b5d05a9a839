"""Backends run the ranks of one run attempt and connect them to the controller.

A backend gets a :class:`RunPlan` and the :class:`~statemachine.controller.Controller` (which is
also the ranks' :class:`~statemachine.rank.RankSink`). It must call ``controller.hand_off`` in
each rank's report order, ``controller.report_failed`` as soon as a report fails, and
``controller.rank_finished`` once a rank's training function has returned and all its reports
are terminal; :meth:`Backend.abort` asks every rank to stop accepting reports.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, cast

from ..config import UploadConfig

if TYPE_CHECKING:
    from ..controller import Controller
    from ..result import ReportLog

__all__ = ["Backend", "RunPlan", "make_backend"]


@dataclass(frozen=True, slots=True)
class RunPlan:
    """Everything a backend needs to start the ranks of one run attempt."""

    train_fn: Callable[..., Any]
    config: Mapping[str, Any] | None
    world_size: int
    storage_path: str
    name: str
    storage_options: Mapping[str, Any]
    upload: UploadConfig
    first_index: int
    #: URL of the checkpoint the attempt resumes from (None: fresh start).
    start_checkpoint: str | None
    resources_per_worker: Mapping[str, float]


class Backend(Protocol):
    async def run(self, plan: RunPlan, controller: Controller) -> None:
        """Run every rank to the end (or until cancelled)."""
        ...

    def report_logs(self) -> list[ReportLog]:
        """The reports of every rank so far, one log per rank (also after a cancelled :meth:`run`)."""
        ...

    def abort(self, error: BaseException) -> None:
        """Make every rank's next ``report()`` raise ``RunAbortedError``."""
        ...


def make_backend(name: str, options: Mapping[str, Any] | None = None) -> Backend:
    if name == "local":
        from .local import LocalBackend

        return LocalBackend()
    if name == "ray":
        try:
            module = importlib.import_module(".ray", __package__)
        except ImportError as error:
            raise ValueError(f"backend='ray' needs the ray extra: pip install 'statemachine[ray]' ({error})") from error
        return cast(Backend, module.RayBackend(**dict(options or {})))
    raise ValueError(f"unknown backend {name!r}; use 'local' or 'ray'")
