"""The report lifecycle: the one place that says what may happen to a report.

Theory of operation
===================

Every call to ``report()`` on a rank creates one *record*. The record moves through five
states (:class:`ReportState`) when *events* (:class:`Event`) are applied to it. Which moves are
legal, and what each move asks the outside world to do, is written down once, as data, in
:data:`TRANSITIONS`. Nothing else in the library decides a state: the trio runtime, the Ray
actors, the proofs in ``proofs/`` and the generated diagram in ``proofs/README.md`` all read
this table and drive this module. It is sans-IO in the manner of h11: no trio, no files, no
clocks. Events go in, effects come out, and the caller carries the effects out.

Two rules sit on top of the per-record table:

*The turn rule* (per rank, :class:`RankLifecycle`). Reports of a rank are handed to the
controller in the order they were made. A record whose own work is done waits in
``WAITING_TURN`` until every earlier record of its rank is terminal; then the lifecycle
applies ``TURN_REACHED`` itself and emits a :class:`HandOff`. A ``FAILED`` record takes its
turn exactly like a ``REPORTED`` one: it is handed off in order and never blocks the records
after it. That is the rule whose absence made the reference implementation deadlock when a
report failed and the caller reported again.

*The commit rule* (across ranks, :class:`CommitLedger`). Report index *i* is committed when
every rank has handed off its *i*-th report and all of them are ``REPORTED``; if any is
``FAILED`` the index is skipped, never committed. Decisions are made strictly in increasing
index order, so commits are ordered even when ranks run at different speeds.

Illegal moves raise :class:`IllegalTransition` and change nothing, so a bug in a driver shows
up as an error at the faulty call rather than as a record in an impossible state.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field

__all__ = [
    "TRANSITIONS",
    "Action",
    "CommitDecision",
    "CommitLedger",
    "Event",
    "HandOff",
    "IllegalTransition",
    "ReleaseSlot",
    "RankLifecycle",
    "ReportState",
    "Transition",
]


class ReportState(enum.Enum):
    """Where one report of one rank stands."""

    PENDING = "PENDING"  #: accepted; waiting for an upload slot, or for its files to be registered
    UPLOADING = "UPLOADING"  #: holds an upload slot; an attempt or its retry back-off is running
    WAITING_TURN = "WAITING_TURN"  #: own work done; an earlier report of the rank is not terminal
    REPORTED = "REPORTED"  #: handed to the controller in order (terminal)
    FAILED = "FAILED"  #: given up; holds the error (terminal)

    @property
    def terminal(self) -> bool:
        return self in (ReportState.REPORTED, ReportState.FAILED)


class Event(enum.Enum):
    """Something that happened to a report."""

    SLOT_ACQUIRED = "slot_acquired"  #: the report took one of its rank's upload slots
    NOTHING_TO_UPLOAD = "nothing_to_upload"  #: metrics only, or NO_UPLOAD files registered
    UPLOAD_SUCCEEDED = "upload_succeeded"  #: an upload attempt finished and was verified
    UPLOAD_FAILED = "upload_failed"  #: the attempts are exhausted (error or timeout)
    TURN_REACHED = "turn_reached"  #: every earlier report of the rank is terminal (applied here)
    ABORTED = "aborted"  #: given up before its work finished: cancelled, run aborted, bad files


class Action(enum.Enum):
    """What a transition asks the driver to do, besides recording the new state."""

    RELEASE_SLOT = "release_slot"  #: give the upload slot back to the rank's limiter


@dataclass(frozen=True, slots=True)
class Transition:
    """One row of the table: ``source`` --``event``--> ``target``, doing ``actions``."""

    source: ReportState
    event: Event
    target: ReportState
    actions: tuple[Action, ...] = ()


_S = ReportState
_E = Event
_RELEASE = (Action.RELEASE_SLOT,)

#: The whole lifecycle. A (state, event) pair not listed here is illegal.
TRANSITIONS: Mapping[tuple[ReportState, Event], Transition] = {
    (t.source, t.event): t
    for t in (
        Transition(_S.PENDING, _E.SLOT_ACQUIRED, _S.UPLOADING),
        Transition(_S.PENDING, _E.NOTHING_TO_UPLOAD, _S.WAITING_TURN),
        Transition(_S.PENDING, _E.ABORTED, _S.FAILED),
        Transition(_S.UPLOADING, _E.UPLOAD_SUCCEEDED, _S.WAITING_TURN, _RELEASE),
        Transition(_S.UPLOADING, _E.UPLOAD_FAILED, _S.FAILED, _RELEASE),
        Transition(_S.UPLOADING, _E.ABORTED, _S.FAILED, _RELEASE),
        Transition(_S.WAITING_TURN, _E.TURN_REACHED, _S.REPORTED),
        Transition(_S.WAITING_TURN, _E.ABORTED, _S.FAILED),
    )
}

#: Events the driver may apply. ``TURN_REACHED`` is applied by :class:`RankLifecycle` only.
DRIVER_EVENTS: frozenset[Event] = frozenset(Event) - {Event.TURN_REACHED}


class IllegalTransition(Exception):
    """An event that the table does not allow in the record's current state."""


@dataclass(frozen=True, slots=True)
class ReleaseSlot:
    """Effect: give back the upload slot held by report ``index``."""

    index: int


@dataclass(frozen=True, slots=True)
class HandOff:
    """Effect: hand report ``index`` (now ``REPORTED`` or ``FAILED``) to the controller."""

    index: int
    state: ReportState


Effect = ReleaseSlot | HandOff


def step(state: ReportState, event: Event) -> Transition:
    """Look one move up in the table, or raise :class:`IllegalTransition`."""
    try:
        return TRANSITIONS[(state, event)]
    except KeyError:
        raise IllegalTransition(f"event {event.name} is not allowed in state {state.name}") from None


@dataclass(slots=True)
class RankLifecycle:
    """The records of one rank, the turn rule, and the rank's upload slots and pending bound.

    Report indices here are the rank's own ordinals, 0, 1, 2, ... in report-call order.
    ``max_uploads`` is the number of upload slots; ``max_pending`` (or None for no bound) the
    number of non-terminal reports the rank may have before :meth:`accept` must wait.
    """

    max_uploads: int = 1
    max_pending: int | None = None
    _states: list[ReportState] = field(default_factory=list)
    _next_turn: int = 0
    _uploading: int = 0
    _open: int = 0

    def __post_init__(self) -> None:
        if self.max_uploads < 1:
            raise ValueError(f"max_uploads must be at least 1, got {self.max_uploads}")
        if self.max_pending is not None and self.max_pending < 1:
            raise ValueError(f"max_pending must be at least 1 or None, got {self.max_pending}")

    # -- queries ---------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._states)

    def state(self, index: int) -> ReportState:
        return self._states[index]

    @property
    def states(self) -> tuple[ReportState, ...]:
        return tuple(self._states)

    @property
    def next_turn(self) -> int:
        """The earliest report not yet handed off (== ``len(self)`` when all are)."""
        return self._next_turn

    @property
    def open_reports(self) -> int:
        """Reports that are not terminal yet."""
        return self._open

    @property
    def uploads_in_flight(self) -> int:
        return self._uploading

    def can_accept(self) -> bool:
        """Whether a new report may be accepted now without exceeding ``max_pending``."""
        return self.max_pending is None or self._open < self.max_pending

    def can_acquire_slot(self) -> bool:
        return self._uploading < self.max_uploads

    @property
    def finished(self) -> bool:
        """True when every report is terminal and handed off."""
        return self._open == 0 and self._next_turn == len(self._states)

    # -- commands --------------------------------------------------------------------------

    def accept(self) -> int:
        """Create a PENDING record and return its ordinal. Raises if the pending bound is full."""
        if not self.can_accept():
            raise IllegalTransition(
                f"cannot accept a report: {self._open} reports are pending (max {self.max_pending})"
            )
        self._states.append(ReportState.PENDING)
        self._open += 1
        return len(self._states) - 1

    def apply(self, index: int, event: Event) -> list[Effect]:
        """Apply ``event`` to report ``index``; return the effects the driver must carry out."""
        if event not in DRIVER_EVENTS:
            raise IllegalTransition(f"event {event.name} is applied by the lifecycle itself")
        if not 0 <= index < len(self._states):
            raise IllegalTransition(f"no report with index {index} (have {len(self._states)})")
        transition = step(self._states[index], event)
        if event is Event.SLOT_ACQUIRED and not self.can_acquire_slot():
            raise IllegalTransition(f"report {index} cannot take an upload slot: all {self.max_uploads} are in use")
        effects: list[Effect] = []
        self._enter(index, transition, effects)
        self._advance_turn(effects)
        return effects

    def _enter(self, index: int, transition: Transition, effects: list[Effect]) -> None:
        self._states[index] = transition.target
        if transition.target is ReportState.UPLOADING:
            self._uploading += 1
        for action in transition.actions:
            if action is Action.RELEASE_SLOT:
                self._uploading -= 1
                effects.append(ReleaseSlot(index))
        if transition.target.terminal and not transition.source.terminal:
            self._open -= 1

    def _advance_turn(self, effects: list[Effect]) -> None:
        while self._next_turn < len(self._states):
            index = self._next_turn
            current = self._states[index]
            if current is ReportState.WAITING_TURN:
                self._enter(index, step(current, Event.TURN_REACHED), effects)
            elif current is not ReportState.FAILED:
                return
            effects.append(HandOff(index, self._states[index]))
            self._next_turn += 1


@dataclass(frozen=True, slots=True)
class CommitDecision:
    """The controller's verdict on one report index, once every rank has handed it off."""

    index: int
    committed: bool
    failed_ranks: tuple[int, ...] = ()


@dataclass(slots=True)
class CommitLedger:
    """The cross-rank commit rule: index *i* commits when all ranks' *i*-th reports are REPORTED.

    ``first_index`` is the index of the first report of this run (it is not 0 after a resume).
    Hand-offs of one rank must arrive in order; the ledger raises :class:`IllegalTransition`
    otherwise, since that would mean the turn rule was broken upstream.
    """

    world_size: int
    first_index: int = 0
    _expected: list[int] = field(default_factory=list)
    _arrived: dict[int, dict[int, ReportState]] = field(default_factory=dict)
    _next_decision: int = 0
    _final_counts: dict[int, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.world_size < 1:
            raise ValueError(f"world_size must be at least 1, got {self.world_size}")
        self._expected = [self.first_index] * self.world_size
        self._next_decision = self.first_index

    @property
    def next_decision(self) -> int:
        """The smallest index not decided yet."""
        return self._next_decision

    def expected(self, rank: int) -> int:
        """The index of the next hand-off expected from ``rank``."""
        return self._expected[rank]

    def hand_off(self, rank: int, index: int, state: ReportState) -> list[CommitDecision]:
        """Record that ``rank`` handed off report ``index`` in ``state``; return new decisions."""
        if not 0 <= rank < self.world_size:
            raise IllegalTransition(f"no rank {rank} in a world of {self.world_size}")
        if not state.terminal:
            raise IllegalTransition(f"rank {rank} handed off report {index} in state {state.name}")
        if index != self._expected[rank]:
            raise IllegalTransition(
                f"rank {rank} handed off report {index} out of order (expected {self._expected[rank]})"
            )
        if rank in self._final_counts:
            raise IllegalTransition(f"rank {rank} handed off report {index} after it finished")
        self._expected[rank] += 1
        self._arrived.setdefault(index, {})[rank] = state
        decisions: list[CommitDecision] = []
        while len(self._arrived.get(self._next_decision, ())) == self.world_size:
            states = self._arrived.pop(self._next_decision)
            failed = tuple(r for r in sorted(states) if states[r] is ReportState.FAILED)
            decisions.append(CommitDecision(self._next_decision, not failed, failed))
            self._next_decision += 1
        return decisions

    def rank_finished(self, rank: int) -> None:
        """Record that ``rank`` will hand off nothing more."""
        self._final_counts[rank] = self._expected[rank] - self.first_index

    def count_mismatch(self) -> dict[int, int] | None:
        """Report counts per rank when ranks provably reported a different number of times.

        Known as soon as one finished rank has fewer reports than another rank has handed off,
        so a mismatch is found without waiting for the slower ranks to finish.
        """
        if not self._final_counts:
            return None
        counts = [e - self.first_index for e in self._expected]
        smallest_final = min(self._final_counts.values())
        if all(c == smallest_final for c in self._final_counts.values()) and max(counts) <= smallest_final:
            return None
        return dict(enumerate(counts))

    @property
    def all_finished(self) -> bool:
        return len(self._final_counts) == self.world_size
