"""Stateful property tests of the pure lifecycle core against a deliberately simple model.

Hypothesis drives the real :class:`RankLifecycle` of 1 to 4 ranks and one :class:`CommitLedger`
the way the runtime does: reports of any kind, upload slots, uploads that succeed, fail or are
retried, NO_UPLOAD registrations that fail, cancellations, the pending bound, and SYNC reports
that block their rank's training thread. The model is a list of plain strings per rank and
recomputes, the simplest way possible, what the core must have done: which reports are handed
off, in which order, and which indices commit. Every rule compares the effects the core returned
with the model; the invariants compare the whole state after every step.

The regression tests at the end replay, on the real core, the shortest counterexamples that the
explorer in ``proofs/`` printed for the mutants, so the behaviour each one breaks is pinned by a
plain test too.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from statemachine.lifecycle import (
    CommitLedger,
    Event,
    HandOff,
    IllegalTransition,
    RankLifecycle,
    ReleaseSlot,
    ReportState,
)

KINDS = ("SYNC", "ASYNC", "NO_UPLOAD", "METRICS")
MAX_ATTEMPTS = 2


@dataclass
class ModelRank:
    """What a rank should look like: state names, kinds, attempts, and the hand-offs so far."""

    states: list[str] = field(default_factory=list)
    kinds: list[str] = field(default_factory=list)
    attempts: list[int] = field(default_factory=list)
    handed: list[tuple[int, str]] = field(default_factory=list)

    def open_count(self) -> int:
        return sum(s not in ("REPORTED", "FAILED") for s in self.states)

    def uploading(self) -> int:
        return self.states.count("UPLOADING")

    def settle(self) -> list[tuple[int, str]]:
        """Hand off, in order, every report whose predecessors are all done."""
        new: list[tuple[int, str]] = []
        while len(self.handed) < len(self.states):
            index = len(self.handed)
            if self.states[index] == "WAITING_TURN":
                self.states[index] = "REPORTED"
            elif self.states[index] != "FAILED":
                break
            self.handed.append((index, self.states[index]))
            new.append((index, self.states[index]))
        return new


class LifecycleMachine(RuleBasedStateMachine):
    """The real core of a few ranks, checked step by step against :class:`ModelRank`."""

    @initialize(
        ranks=st.integers(1, 4),
        max_uploads=st.integers(1, 3),
        max_pending=st.none() | st.integers(1, 4),
    )
    def start(self, ranks: int, max_uploads: int, max_pending: int | None) -> None:
        self.world = ranks
        self.max_uploads = max_uploads
        self.max_pending = max_pending
        self.cores = [RankLifecycle(max_uploads, max_pending) for _ in range(ranks)]
        self.models = [ModelRank() for _ in range(ranks)]
        self.ledger = CommitLedger(ranks)
        self.decisions: list[tuple[int, bool]] = []
        self.slots: list[set[int]] = [set() for _ in range(ranks)]

    # -- helpers ---------------------------------------------------------------------------

    def thread_blocked(self, rank: int) -> bool:
        model = self.models[rank]
        return bool(model.kinds) and model.kinds[-1] == "SYNC" and model.states[-1] not in ("REPORTED", "FAILED")

    def apply(self, rank: int, index: int, event: Event, new_state: str) -> None:
        model = self.models[rank]
        releases = model.states[index] == "UPLOADING"
        model.states[index] = new_state
        expected_hand_offs = model.settle()
        effects = self.cores[rank].apply(index, event)
        released = [e.index for e in effects if isinstance(e, ReleaseSlot)]
        handed = [(e.index, e.state.name) for e in effects if isinstance(e, HandOff)]
        assert released == ([index] if releases else [])
        assert handed == expected_hand_offs
        for slot in released:
            self.slots[rank].remove(slot)
        for hand_off in effects:
            if isinstance(hand_off, HandOff):
                for decision in self.ledger.hand_off(rank, hand_off.index, hand_off.state):
                    self.decisions.append((decision.index, decision.committed))

    def open_indices(self, rank: int, state: str) -> list[int]:
        return [i for i, s in enumerate(self.models[rank].states) if s == state]

    # -- rules -----------------------------------------------------------------------------

    @rule(data=st.data(), kind=st.sampled_from(KINDS))
    def report(self, data: st.DataObject, kind: str) -> None:
        rank = data.draw(st.integers(0, self.world - 1), label="rank")
        core, model = self.cores[rank], self.models[rank]
        full = self.max_pending is not None and model.open_count() >= self.max_pending
        assert core.can_accept() is not full
        if self.thread_blocked(rank):
            return
        if full:
            with pytest.raises(IllegalTransition):
                core.accept()
            return
        assert core.accept() == len(model.states)
        model.states.append("PENDING")
        model.kinds.append(kind)
        model.attempts.append(0)

    @rule(data=st.data())
    def start_upload(self, data: st.DataObject) -> None:
        rank = data.draw(st.integers(0, self.world - 1), label="rank")
        model = self.models[rank]
        waiting = [i for i in self.open_indices(rank, "PENDING") if model.kinds[i] in ("SYNC", "ASYNC")]
        if not waiting:
            return
        index = data.draw(st.sampled_from(waiting), label="report")
        if model.uploading() >= self.max_uploads:
            assert not self.cores[rank].can_acquire_slot()
            with pytest.raises(IllegalTransition):
                self.cores[rank].apply(index, Event.SLOT_ACQUIRED)
            return
        self.slots[rank].add(index)
        model.attempts[index] = 1
        self.apply(rank, index, Event.SLOT_ACQUIRED, "UPLOADING")

    @rule(data=st.data(), outcome=st.sampled_from(("succeeds", "fails")))
    def upload_attempt_ends(self, data: st.DataObject, outcome: str) -> None:
        rank = data.draw(st.integers(0, self.world - 1), label="rank")
        uploading = self.open_indices(rank, "UPLOADING")
        if not uploading:
            return
        index = data.draw(st.sampled_from(uploading), label="report")
        model = self.models[rank]
        if outcome == "succeeds":
            self.apply(rank, index, Event.UPLOAD_SUCCEEDED, "WAITING_TURN")
        elif model.attempts[index] < MAX_ATTEMPTS:
            model.attempts[index] += 1  # retried: the record stays UPLOADING and keeps its slot
        else:
            self.apply(rank, index, Event.UPLOAD_FAILED, "FAILED")

    @rule(data=st.data(), registered=st.booleans())
    def nothing_to_upload(self, data: st.DataObject, registered: bool) -> None:
        rank = data.draw(st.integers(0, self.world - 1), label="rank")
        model = self.models[rank]
        waiting = [i for i in self.open_indices(rank, "PENDING") if model.kinds[i] in ("NO_UPLOAD", "METRICS")]
        if not waiting:
            return
        index = data.draw(st.sampled_from(waiting), label="report")
        if registered or model.kinds[index] == "METRICS":
            self.apply(rank, index, Event.NOTHING_TO_UPLOAD, "WAITING_TURN")
        else:
            self.apply(rank, index, Event.ABORTED, "FAILED")

    @rule(data=st.data())
    def cancel(self, data: st.DataObject) -> None:
        rank = data.draw(st.integers(0, self.world - 1), label="rank")
        model = self.models[rank]
        open_reports = [i for i, s in enumerate(model.states) if s not in ("REPORTED", "FAILED")]
        if not open_reports:
            return
        index = data.draw(st.sampled_from(open_reports), label="report")
        self.apply(rank, index, Event.ABORTED, "FAILED")

    @rule(data=st.data(), event=st.sampled_from(list(Event)))
    def illegal_events_change_nothing(self, data: st.DataObject, event: Event) -> None:
        rank = data.draw(st.integers(0, self.world - 1), label="rank")
        model = self.models[rank]
        if not model.states:
            return
        index = data.draw(st.integers(0, len(model.states) - 1), label="report")
        legal = {
            "PENDING": {Event.SLOT_ACQUIRED, Event.NOTHING_TO_UPLOAD, Event.ABORTED},
            "UPLOADING": {Event.UPLOAD_SUCCEEDED, Event.UPLOAD_FAILED, Event.ABORTED},
            "WAITING_TURN": {Event.ABORTED},
        }.get(model.states[index], set())
        if event in legal:
            return
        before = self.cores[rank].states
        with pytest.raises(IllegalTransition):
            self.cores[rank].apply(index, event)
        assert self.cores[rank].states == before

    @precondition(lambda self: any(self.models[r].states for r in range(self.world)))
    @rule()
    def every_rank_drains(self) -> None:
        """Finish every open report the way a healthy run does, so commits happen too."""
        for rank in range(self.world):
            model = self.models[rank]
            for index, state in enumerate(list(model.states)):
                if state == "PENDING" and model.kinds[index] in ("SYNC", "ASYNC"):
                    if model.uploading() >= self.max_uploads:
                        continue
                    self.slots[rank].add(index)
                    self.apply(rank, index, Event.SLOT_ACQUIRED, "UPLOADING")
                    self.apply(rank, index, Event.UPLOAD_SUCCEEDED, "WAITING_TURN")
                elif state == "PENDING":
                    self.apply(rank, index, Event.NOTHING_TO_UPLOAD, "WAITING_TURN")
                elif state == "UPLOADING":
                    self.apply(rank, index, Event.UPLOAD_SUCCEEDED, "WAITING_TURN")

    # -- invariants ------------------------------------------------------------------------

    @invariant()
    def states_match_the_model(self) -> None:
        for core, model in zip(self.cores, self.models, strict=True):
            assert [s.name for s in core.states] == model.states
            assert core.next_turn == len(model.handed)
            assert core.open_reports == model.open_count()

    @invariant()
    def slots_are_held_exactly_by_uploads(self) -> None:
        for rank, core in enumerate(self.cores):
            assert core.uploads_in_flight == self.models[rank].uploading() == len(self.slots[rank])
            assert core.uploads_in_flight <= self.max_uploads

    @invariant()
    def pending_bound_holds(self) -> None:
        if self.max_pending is not None:
            for core in self.cores:
                assert core.open_reports <= self.max_pending

    @invariant()
    def hand_offs_are_in_report_order(self) -> None:
        for model in self.models:
            assert [index for index, _ in model.handed] == list(range(len(model.handed)))
            assert all(state in ("REPORTED", "FAILED") for _, state in model.handed)

    @invariant()
    def decisions_are_in_order_and_committed_only_when_complete(self) -> None:
        assert [index for index, _ in self.decisions] == list(range(len(self.decisions)))
        for index, committed in self.decisions:
            everyone = all(self.models[r].states[index] == "REPORTED" for r in range(self.world))
            assert committed == everyone
        decided_all = min(len(m.handed) for m in self.models)
        assert len(self.decisions) == decided_all == self.ledger.next_decision


#: Ten times the profile's example count: 1,000 in CI, 10,000 with HYPOTHESIS_PROFILE=thorough.
STATEFUL_EXAMPLES = 10 * settings().max_examples

TestLifecycleMachine = LifecycleMachine.TestCase
TestLifecycleMachine.settings = settings(max_examples=STATEFUL_EXAMPLES, stateful_step_count=40, deadline=None)
# The time limit covers all examples together (a few tens of milliseconds each).
TestLifecycleMachine.pytestmark = [pytest.mark.timeout(120 + STATEFUL_EXAMPLES // 10)]  # type: ignore[attr-defined]


# -- regression tests: the explorer's shortest counterexamples, replayed on the real core -------------


def test_failed_registration_is_handed_off_at_once_as_failed() -> None:
    """Mutant failed_report_keeps_turn: NO_UPLOAD report 0 fails to register (2 moves)."""
    core = RankLifecycle()
    core.accept()
    assert core.apply(0, Event.ABORTED) == [HandOff(0, ReportState.FAILED)]
    assert core.finished


def test_failed_upload_gives_its_slot_back() -> None:
    """Mutant failed_upload_keeps_slot: SYNC report 0 takes the slot, its upload fails (3 moves)."""
    core = RankLifecycle(max_uploads=1)
    core.accept()
    core.apply(0, Event.SLOT_ACQUIRED)
    assert core.apply(0, Event.UPLOAD_FAILED) == [ReleaseSlot(0), HandOff(0, ReportState.FAILED)]
    assert core.uploads_in_flight == 0 and core.can_acquire_slot()


def test_report_with_nothing_to_upload_releases_no_slot_and_waits_for_its_turn() -> None:
    """Mutants slot_released_twice and reported_without_turn: NO_UPLOAD report 0, nothing to upload."""
    core = RankLifecycle()
    core.accept()
    assert core.apply(0, Event.NOTHING_TO_UPLOAD) == [HandOff(0, ReportState.REPORTED)]
    core.accept()
    core.accept()
    assert core.apply(2, Event.NOTHING_TO_UPLOAD) == []
    assert core.state(2) is ReportState.WAITING_TURN


def test_later_report_is_not_handed_off_before_an_earlier_upload() -> None:
    """Mutant hand_off_out_of_order: ASYNC report 0 pending, NO_UPLOAD report 1 done (3 moves)."""
    core = RankLifecycle()
    core.accept()
    core.accept()
    assert core.apply(1, Event.NOTHING_TO_UPLOAD) == []
    core.apply(0, Event.SLOT_ACQUIRED)
    assert core.apply(0, Event.UPLOAD_SUCCEEDED) == [
        ReleaseSlot(0),
        HandOff(0, ReportState.REPORTED),
        HandOff(1, ReportState.REPORTED),
    ]


def test_pending_bound_of_one_refuses_a_second_open_report() -> None:
    """Mutant pending_bound_off_by_one: ASYNC report 0 open, report 1 asked (2 moves)."""
    core = RankLifecycle(max_uploads=2, max_pending=1)
    core.accept()
    assert not core.can_accept()
    with pytest.raises(IllegalTransition):
        core.accept()


def test_index_is_not_decided_until_every_rank_handed_it_off() -> None:
    """Mutant commit_before_every_rank: only rank 0 of 2 handed off index 0 (2 moves)."""
    ledger = CommitLedger(2)
    assert ledger.hand_off(0, 0, ReportState.REPORTED) == []
    decisions = ledger.hand_off(1, 0, ReportState.FAILED)
    assert [(d.index, d.committed, d.failed_ranks) for d in decisions] == [(0, False, (1,))]
