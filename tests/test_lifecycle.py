"""The pure lifecycle: every transition, every illegal move, the turn rule and the commit rule."""

from __future__ import annotations

import itertools

import pytest

from statemachine.lifecycle import (
    TRANSITIONS,
    Action,
    CommitDecision,
    CommitLedger,
    Event,
    HandOff,
    IllegalTransition,
    RankLifecycle,
    ReleaseSlot,
    ReportState,
    step,
)

S = ReportState
E = Event

#: The transition table as the design states it (DESIGN.md section 3), written out by hand so
#: that a change to the table in the code is a conscious change to this test too.
EXPECTED = {
    (S.PENDING, E.SLOT_ACQUIRED): (S.UPLOADING, ()),
    (S.PENDING, E.NOTHING_TO_UPLOAD): (S.WAITING_TURN, ()),
    (S.PENDING, E.ABORTED): (S.FAILED, ()),
    (S.UPLOADING, E.UPLOAD_SUCCEEDED): (S.WAITING_TURN, (Action.RELEASE_SLOT,)),
    (S.UPLOADING, E.UPLOAD_FAILED): (S.FAILED, (Action.RELEASE_SLOT,)),
    (S.UPLOADING, E.ABORTED): (S.FAILED, (Action.RELEASE_SLOT,)),
    (S.WAITING_TURN, E.TURN_REACHED): (S.REPORTED, ()),
    (S.WAITING_TURN, E.ABORTED): (S.FAILED, ()),
}


def test_transition_table_is_exactly_the_designed_one() -> None:
    assert {k: (t.target, t.actions) for k, t in TRANSITIONS.items()} == EXPECTED


@pytest.mark.parametrize(("state", "event"), sorted(itertools.product(S, E), key=str))
def test_step_allows_only_table_rows(state: ReportState, event: Event) -> None:
    if (state, event) in EXPECTED:
        assert step(state, event).target is EXPECTED[(state, event)][0]
    else:
        with pytest.raises(IllegalTransition, match=event.name):
            step(state, event)


def test_terminal_states_are_reported_and_failed_and_have_no_way_out() -> None:
    assert {s for s in S if s.terminal} == {S.REPORTED, S.FAILED}
    assert not [k for k in TRANSITIONS if k[0].terminal]


def _drive_to(lifecycle: RankLifecycle, index: int, state: ReportState) -> None:
    """Move report ``index`` (PENDING) to ``state`` through legal events."""
    paths = {
        S.PENDING: [],
        S.UPLOADING: [E.SLOT_ACQUIRED],
        S.FAILED: [E.ABORTED],
    }
    for event in paths[state]:
        lifecycle.apply(index, event)


@pytest.mark.parametrize(("state", "event"), sorted(itertools.product(S, E), key=str))
def test_illegal_event_on_a_record_raises_and_changes_nothing(state: ReportState, event: Event) -> None:
    lifecycle = RankLifecycle(max_uploads=1)
    blocker = lifecycle.accept()  # stays PENDING so that report 1 can sit in WAITING_TURN
    index = lifecycle.accept()
    if state is S.WAITING_TURN:
        lifecycle.apply(index, E.NOTHING_TO_UPLOAD)
    elif state is S.REPORTED:
        lifecycle.apply(blocker, E.ABORTED)
        lifecycle.apply(index, E.NOTHING_TO_UPLOAD)
    else:
        _drive_to(lifecycle, index, state)
    assert lifecycle.state(index) is state
    before = (lifecycle.states, lifecycle.next_turn, lifecycle.open_reports, lifecycle.uploads_in_flight)
    if (state, event) in TRANSITIONS and event is not E.TURN_REACHED:
        return  # legal: covered by the tests below
    with pytest.raises(IllegalTransition):
        lifecycle.apply(index, event)
    assert (lifecycle.states, lifecycle.next_turn, lifecycle.open_reports, lifecycle.uploads_in_flight) == before


def test_upload_success_at_its_turn_is_reported_and_handed_off_with_its_slot_released() -> None:
    lifecycle = RankLifecycle(max_uploads=1)
    index = lifecycle.accept()
    assert lifecycle.apply(index, E.SLOT_ACQUIRED) == []
    assert lifecycle.uploads_in_flight == 1
    effects = lifecycle.apply(index, E.UPLOAD_SUCCEEDED)
    assert effects == [ReleaseSlot(0), HandOff(0, S.REPORTED)]
    assert lifecycle.state(0) is S.REPORTED
    assert lifecycle.finished


def test_failed_upload_releases_its_slot_and_takes_its_turn() -> None:
    lifecycle = RankLifecycle(max_uploads=1)
    lifecycle.accept()
    lifecycle.apply(0, E.SLOT_ACQUIRED)
    assert lifecycle.apply(0, E.UPLOAD_FAILED) == [ReleaseSlot(0), HandOff(0, S.FAILED)]
    assert lifecycle.can_acquire_slot()


def test_later_report_waits_for_earlier_one_then_both_hand_off_in_order() -> None:
    lifecycle = RankLifecycle(max_uploads=2)
    first, second = lifecycle.accept(), lifecycle.accept()
    lifecycle.apply(first, E.SLOT_ACQUIRED)
    assert lifecycle.apply(second, E.NOTHING_TO_UPLOAD) == []
    assert lifecycle.state(second) is S.WAITING_TURN
    effects = lifecycle.apply(first, E.UPLOAD_SUCCEEDED)
    assert effects == [ReleaseSlot(0), HandOff(0, S.REPORTED), HandOff(1, S.REPORTED)]


def test_failed_report_never_blocks_the_reports_after_it() -> None:
    lifecycle = RankLifecycle(max_uploads=2)
    for _ in range(3):
        lifecycle.accept()
    lifecycle.apply(0, E.SLOT_ACQUIRED)
    lifecycle.apply(2, E.NOTHING_TO_UPLOAD)
    lifecycle.apply(1, E.ABORTED)  # fails while report 0 still uploads: not its turn yet
    assert lifecycle.next_turn == 0
    effects = lifecycle.apply(0, E.UPLOAD_FAILED)
    assert [e for e in effects if isinstance(e, HandOff)] == [
        HandOff(0, S.FAILED),
        HandOff(1, S.FAILED),
        HandOff(2, S.REPORTED),
    ]
    assert lifecycle.finished


def test_slot_limit_is_enforced() -> None:
    lifecycle = RankLifecycle(max_uploads=1)
    lifecycle.accept()
    lifecycle.accept()
    lifecycle.apply(0, E.SLOT_ACQUIRED)
    with pytest.raises(IllegalTransition, match="upload slot"):
        lifecycle.apply(1, E.SLOT_ACQUIRED)
    assert lifecycle.state(1) is S.PENDING


def test_pending_bound_refuses_a_report_until_one_is_terminal() -> None:
    lifecycle = RankLifecycle(max_uploads=1, max_pending=2)
    lifecycle.accept()
    lifecycle.accept()
    assert not lifecycle.can_accept()
    with pytest.raises(IllegalTransition, match="pending"):
        lifecycle.accept()
    assert len(lifecycle) == 2
    lifecycle.apply(0, E.NOTHING_TO_UPLOAD)
    assert lifecycle.can_accept()


def test_turn_reached_cannot_be_applied_by_a_driver() -> None:
    lifecycle = RankLifecycle()
    lifecycle.accept()
    lifecycle.apply(0, E.SLOT_ACQUIRED)
    with pytest.raises(IllegalTransition, match="lifecycle itself"):
        lifecycle.apply(0, E.TURN_REACHED)


def test_unknown_report_index_is_refused() -> None:
    with pytest.raises(IllegalTransition, match="no report"):
        RankLifecycle().apply(0, E.ABORTED)


@pytest.mark.parametrize("kwargs", [{"max_uploads": 0}, {"max_pending": 0}])
def test_bad_limits_are_refused(kwargs: dict[str, int]) -> None:
    with pytest.raises(ValueError):
        RankLifecycle(**kwargs)


# -- the commit ledger ----------------------------------------------------------------------


def test_index_commits_only_when_every_rank_reported_it() -> None:
    ledger = CommitLedger(world_size=2)
    assert ledger.hand_off(0, 0, S.REPORTED) == []
    assert ledger.hand_off(1, 0, S.REPORTED) == [CommitDecision(0, True)]


def test_commits_are_decided_in_index_order_even_when_ranks_run_ahead() -> None:
    ledger = CommitLedger(world_size=2)
    ledger.hand_off(0, 0, S.REPORTED)
    ledger.hand_off(0, 1, S.REPORTED)
    assert ledger.hand_off(1, 0, S.REPORTED) == [CommitDecision(0, True)]
    assert ledger.hand_off(1, 1, S.REPORTED) == [CommitDecision(1, True)]
    assert ledger.next_decision == 2


def test_an_index_with_a_failed_rank_is_skipped_not_committed() -> None:
    ledger = CommitLedger(world_size=3, first_index=5)
    ledger.hand_off(0, 5, S.REPORTED)
    ledger.hand_off(2, 5, S.FAILED)
    assert ledger.hand_off(1, 5, S.REPORTED) == [CommitDecision(5, False, (2,))]


def test_out_of_order_or_non_terminal_hand_off_is_refused() -> None:
    ledger = CommitLedger(world_size=1)
    with pytest.raises(IllegalTransition, match="out of order"):
        ledger.hand_off(0, 1, S.REPORTED)
    with pytest.raises(IllegalTransition, match="PENDING"):
        ledger.hand_off(0, 0, S.PENDING)
    with pytest.raises(IllegalTransition, match="no rank"):
        ledger.hand_off(1, 0, S.REPORTED)


def test_count_mismatch_is_known_when_a_finished_rank_has_fewer_reports() -> None:
    ledger = CommitLedger(world_size=2)
    ledger.hand_off(0, 0, S.REPORTED)
    ledger.hand_off(1, 0, S.REPORTED)
    ledger.hand_off(0, 1, S.REPORTED)
    assert ledger.count_mismatch() is None
    ledger.rank_finished(1)
    assert ledger.count_mismatch() == {0: 2, 1: 1}


def test_equal_counts_are_no_mismatch() -> None:
    ledger = CommitLedger(world_size=2)
    for rank in (0, 1):
        ledger.hand_off(rank, 0, S.REPORTED)
        ledger.rank_finished(rank)
    assert ledger.count_mismatch() is None
    assert ledger.all_finished
    with pytest.raises(IllegalTransition, match="after it finished"):
        ledger.hand_off(0, 1, S.REPORTED)
