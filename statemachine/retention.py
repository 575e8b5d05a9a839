"""Which committed checkpoints to keep: a pure decision, no I/O (``CheckpointConfig``).

The policy, in the order it is applied:

1. Only committed checkpoints are candidates; anything still in flight is not passed in, and
   any folder named in ``protected`` (a folder a report in flight will commit into, the folder
   a run attempt resumed from) is kept whatever its score. Only folders inside the run folder
   may be deleted: a path that is absolute or climbs out with ``..`` is always kept.
2. The latest committed checkpoint (highest index) is always kept: it is what a new ``fit()``
   resumes from, and deleting it would throw away the newest training state.
3. Of the others, the best ``num_to_keep`` are kept: by ``checkpoint_score_attribute`` of rank
   0's metrics in ``checkpoint_score_order``, or by index (newest first) when there is no
   attribute. ``num_to_keep=None`` keeps everything.

So at most ``num_to_keep + 1`` folders remain, the extra one being the latest when it is not
among the best. A checkpoint whose metrics lack the attribute, or hold a value that is not a
finite number, ranks below every checkpoint that has one: a checkpoint that cannot be compared
is the first to go. Ties are broken by index, the newer checkpoint winning.
"""

from __future__ import annotations

import math
import posixpath
from collections.abc import Collection, Sequence
from dataclasses import dataclass

from .config import CheckpointConfig
from .storage import CommittedCheckpoint

__all__ = ["RetentionPlan", "plan_retention", "score_of"]


@dataclass(frozen=True, slots=True)
class RetentionPlan:
    """The outcome: what stays and what may be deleted, each oldest first."""

    keep: tuple[CommittedCheckpoint, ...]
    delete: tuple[CommittedCheckpoint, ...]


def score_of(checkpoint: CommittedCheckpoint, config: CheckpointConfig) -> float | None:
    """The checkpoint's score where larger is better, or None when it has no usable score."""
    attribute = config.checkpoint_score_attribute
    if attribute is None:
        return float(checkpoint.index)
    value = checkpoint.metrics.get(attribute)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return float(value) if config.checkpoint_score_order == "max" else -float(value)


def plan_retention(
    checkpoints: Sequence[CommittedCheckpoint],
    config: CheckpointConfig,
    protected: Collection[str] = (),
) -> RetentionPlan:
    """Decide which of ``checkpoints`` (all committed) to keep under ``config``."""
    ordered = sorted(checkpoints, key=lambda c: c.index)
    if config.num_to_keep is None or len(ordered) <= config.num_to_keep:
        return RetentionPlan(tuple(ordered), ())
    latest = ordered[-1]

    def rank_key(checkpoint: CommittedCheckpoint) -> tuple[bool, float, int]:
        score = score_of(checkpoint, config)
        return (score is not None, score if score is not None else 0.0, checkpoint.index)

    best = sorted(ordered, key=rank_key, reverse=True)[: config.num_to_keep]
    kept_ids = {id(c) for c in best} | {id(latest)}
    kept_ids |= {id(c) for c in ordered if c.path in protected or not _inside_run_folder(c.path)}
    keep = tuple(c for c in ordered if id(c) in kept_ids)
    delete = tuple(c for c in ordered if id(c) not in kept_ids)
    return RetentionPlan(keep, delete)


def _inside_run_folder(relative: str) -> bool:
    cleaned = posixpath.normpath(relative.replace("\\", "/"))
    return (
        bool(relative) and not cleaned.startswith(("/", "../")) and cleaned not in (".", "..") and "://" not in relative
    )
