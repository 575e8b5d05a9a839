"""Deliberately broken variants of the core, each of which the checks must catch.

A proof that passes whatever the code does proves nothing. Each mutant here breaks one rule of
DESIGN.md section 3 the way a plausible bug would: by subclassing the real
:class:`~statemachine.lifecycle.RankLifecycle` or :class:`~statemachine.lifecycle.CommitLedger`,
by handing the model a mutated copy of the real :data:`~statemachine.lifecycle.TRANSITIONS`, or
by changing the runtime rule the model applies for SYNC. ``statemachine/lifecycle.py`` itself is
never touched. ``caught_by`` names the checks that must catch the mutant; the test suite runs them
(``proofs/test_proofs.py``) and fails if a mutant slips through.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace

from statemachine.lifecycle import (
    TRANSITIONS,
    Action,
    CommitDecision,
    CommitLedger,
    Effect,
    Event,
    HandOff,
    RankLifecycle,
    ReportState,
    Transition,
    step,
)

from .model import Core

__all__ = ["MUTANTS", "Mutant", "mutated_table"]

S = ReportState
Table = Mapping[tuple[ReportState, Event], Transition]


@dataclass(frozen=True)
class Mutant:
    name: str
    description: str
    core: Core
    #: Checks that must catch it: "explorer" and/or "induction".
    caught_by: frozenset[str]


def mutated_table(change: Callable[[dict[tuple[ReportState, Event], Transition]], None]) -> Table:
    """A copy of the real table with ``change`` applied to it."""
    table = dict(TRANSITIONS)
    change(table)
    return table


def _drop_release_on_failed_upload(table: dict[tuple[ReportState, Event], Transition]) -> None:
    key = (S.UPLOADING, Event.UPLOAD_FAILED)
    table[key] = replace(table[key], actions=())


def _release_again_on_turn(table: dict[tuple[ReportState, Event], Transition]) -> None:
    key = (S.WAITING_TURN, Event.TURN_REACHED)
    table[key] = replace(table[key], actions=(Action.RELEASE_SLOT,))


def _skip_the_turn(table: dict[tuple[ReportState, Event], Transition]) -> None:
    key = (S.PENDING, Event.NOTHING_TO_UPLOAD)
    table[key] = replace(table[key], target=S.REPORTED)


def _drop_upload_success(table: dict[tuple[ReportState, Event], Transition]) -> None:
    del table[(S.UPLOADING, Event.UPLOAD_SUCCEEDED)]


def _requeue_failed_upload(table: dict[tuple[ReportState, Event], Transition]) -> None:
    key = (S.UPLOADING, Event.UPLOAD_FAILED)
    table[key] = replace(table[key], target=S.PENDING)


class FailedKeepsTurnLifecycle(RankLifecycle):
    """Hands off only records that waited for their turn: a FAILED record blocks its rank."""

    __slots__ = ()

    def _advance_turn(self, effects: list[Effect]) -> None:
        while self._next_turn < len(self._states):
            index = self._next_turn
            if self._states[index] is not S.WAITING_TURN:
                return
            self._enter(index, step(S.WAITING_TURN, Event.TURN_REACHED), effects)
            effects.append(HandOff(index, self._states[index]))
            self._next_turn += 1


class EagerHandOffLifecycle(RankLifecycle):
    """Hands a record off as soon as its own work is done, whatever the earlier records do."""

    __slots__ = ()

    def _advance_turn(self, effects: list[Effect]) -> None:
        super()._advance_turn(effects)
        for index in range(self._next_turn + 1, len(self._states)):
            if self._states[index] is S.WAITING_TURN:
                self._enter(index, step(S.WAITING_TURN, Event.TURN_REACHED), effects)
                effects.append(HandOff(index, self._states[index]))


class PendingBoundOffByOneLifecycle(RankLifecycle):
    """Lets one report more in than ``max_pending`` allows."""

    __slots__ = ()

    def can_accept(self) -> bool:
        return self.max_pending is None or self._open <= self.max_pending


class CommitOnFirstRankLedger(CommitLedger):
    """Decides an index as soon as one rank has handed it off, not when every rank has."""

    __slots__ = ()

    def hand_off(self, rank: int, index: int, state: ReportState) -> list[CommitDecision]:
        self._expected[rank] += 1
        self._arrived.setdefault(index, {})[rank] = state
        decisions: list[CommitDecision] = []
        while self._arrived.get(self._next_decision):
            states = self._arrived[self._next_decision]
            failed = tuple(r for r in sorted(states) if states[r] is S.FAILED)
            decisions.append(CommitDecision(self._next_decision, not failed, failed))
            self._next_decision += 1
        return decisions


class CommitFailedLedger(CommitLedger):
    """Commits an index even when a rank's report of it FAILED."""

    __slots__ = ()

    def hand_off(self, rank: int, index: int, state: ReportState) -> list[CommitDecision]:
        return [CommitDecision(d.index, True, ()) for d in super().hand_off(rank, index, state)]


MUTANTS: dict[str, Mutant] = {
    m.name: m
    for m in (
        Mutant(
            "failed_report_keeps_turn",
            "a FAILED report is never handed off, so it blocks the later reports of its rank",
            Core("failed_report_keeps_turn", lifecycle_class=FailedKeepsTurnLifecycle),
            frozenset({"explorer"}),
        ),
        Mutant(
            "failed_upload_keeps_slot",
            "UPLOADING -> FAILED does not release the upload slot (RELEASE_SLOT dropped from the row)",
            Core("failed_upload_keeps_slot", transitions=mutated_table(_drop_release_on_failed_upload)),
            frozenset({"explorer", "induction"}),
        ),
        Mutant(
            "slot_released_twice",
            "WAITING_TURN -> REPORTED releases the slot again, after the upload already gave it back",
            Core("slot_released_twice", transitions=mutated_table(_release_again_on_turn)),
            frozenset({"explorer", "induction"}),
        ),
        Mutant(
            "reported_without_turn",
            "a report with nothing to upload goes straight to REPORTED, skipping WAITING_TURN",
            Core("reported_without_turn", transitions=mutated_table(_skip_the_turn)),
            frozenset({"explorer", "induction"}),
        ),
        Mutant(
            "upload_never_succeeds",
            "the UPLOADING -> WAITING_TURN row is missing: only failure can end an upload",
            Core("upload_never_succeeds", transitions=mutated_table(_drop_upload_success)),
            frozenset({"explorer", "induction"}),
        ),
        Mutant(
            "failed_upload_requeued",
            "a failed upload goes back to PENDING instead of FAILED: the lifecycle can cycle forever",
            Core("failed_upload_requeued", transitions=mutated_table(_requeue_failed_upload)),
            frozenset({"induction"}),
        ),
        Mutant(
            "hand_off_out_of_order",
            "a report is handed off when its own work is done, before earlier reports of its rank",
            Core("hand_off_out_of_order", lifecycle_class=EagerHandOffLifecycle),
            frozenset({"explorer"}),
        ),
        Mutant(
            "pending_bound_off_by_one",
            "can_accept() lets max_pending + 1 reports be open",
            Core("pending_bound_off_by_one", lifecycle_class=PendingBoundOffByOneLifecycle),
            frozenset({"explorer"}),
        ),
        Mutant(
            "commit_before_every_rank",
            "an index is decided as soon as one rank handed it off",
            Core("commit_before_every_rank", ledger_class=CommitOnFirstRankLedger),
            frozenset({"explorer"}),
        ),
        Mutant(
            "failed_index_committed",
            "an index is committed even though a rank's report of it FAILED",
            Core("failed_index_committed", ledger_class=CommitFailedLedger),
            frozenset({"explorer"}),
        ),
        Mutant(
            "sync_returns_early",
            "a SYNC report() waits on the previous report instead of its own, so it returns too early",
            Core("sync_returns_early", sync_waits_on=lambda index: index - 1 if index else None),
            frozenset({"explorer"}),
        ),
        Mutant(
            "sync_waits_on_next_report",
            "a SYNC report() waits on the report after it, which the blocked thread can never make",
            Core("sync_waits_on_next_report", sync_waits_on=lambda index: index + 1),
            frozenset({"explorer"}),
        ),
    )
}
