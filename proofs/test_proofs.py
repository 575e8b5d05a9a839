"""The proofs, run by the test suite: explorer bounds, the z3 induction, mutants, the diagram."""

from __future__ import annotations

import pytest

from statemachine import lifecycle
from statemachine.lifecycle import TRANSITIONS, Event, ReportState

from . import diagram, explorer, induction
from .explorer import explore
from .model import ALL_KINDS, Bounds, Core, Kind
from .mutants import MUTANTS, mutated_table

#: The bounds the test suite explores for every interleaving (no symmetry reduction).
CI_BOUNDS = {
    "2 ranks x 2 reports, every kind, failures": Bounds(ranks=2, reports=2),
    "1 rank x 4 reports, every kind, failures": Bounds(ranks=1, reports=4),
    "2 ranks x 2 reports, 2 slots, pending bound 1": Bounds(ranks=2, reports=2, max_uploads=2, max_pending=1),
    "2 ranks x 2 reports, retries and cancellation": Bounds(ranks=2, reports=2, max_attempts=2, aborts=True),
    "2 ranks x 2 reports, nothing fails": Bounds(ranks=2, reports=2, failures=False),
}


@pytest.mark.parametrize("bounds", list(CI_BOUNDS.values()), ids=list(CI_BOUNDS))
def test_explorer_finds_every_interleaving_of_the_real_core_safe_and_finishing(bounds: Bounds) -> None:
    result = explore(bounds)
    assert result.ok, result.counterexample.render() if result.counterexample else ""
    # Not vacuous: every kind was reported, and runs did finish.
    assert result.kinds_seen == set(bounds.kinds)
    assert result.finals > 0
    assert result.states > 1000


def test_symmetry_reduction_keeps_the_verdict_and_shrinks_the_state_space() -> None:
    full = explore(Bounds(ranks=2, reports=2))
    reduced = explore(Bounds(ranks=2, reports=2), symmetry=True)
    assert full.ok and reduced.ok
    assert reduced.states < full.states


def test_induction_proves_the_turn_and_commit_rule_for_the_real_table() -> None:
    result = induction.prove()
    assert result.ok, result.summary()
    names = [o.name for o in result.obligations]
    assert any(n.startswith("progress") for n in names)
    assert sum(n.startswith("consecution") for n in names) >= len(induction.invariant()) * len(TRANSITIONS)


def test_induction_is_generated_from_the_table_so_a_new_row_changes_the_proof() -> None:
    extra = mutated_table(
        lambda t: t.__setitem__(
            (ReportState.FAILED, Event.ABORTED),
            lifecycle.Transition(ReportState.FAILED, Event.ABORTED, ReportState.PENDING),
        )
    )
    result = induction.prove(extra, stop_at_first_failure=True)
    assert not result.ok
    assert "FAILED --ABORTED--> PENDING" in result.summary() or "cycle" in result.summary()


#: The same bounds, cheapest-to-finish first: a mutant is usually caught within the first few
#: hundred states of a bound, but a bound that cannot catch it is explored to the end.
MUTANT_BOUNDS = [
    CI_BOUNDS["2 ranks x 2 reports, 2 slots, pending bound 1"],
    CI_BOUNDS["2 ranks x 2 reports, nothing fails"],
    CI_BOUNDS["2 ranks x 2 reports, every kind, failures"],
    CI_BOUNDS["1 rank x 4 reports, every kind, failures"],
    CI_BOUNDS["2 ranks x 2 reports, retries and cancellation"],
]


@pytest.mark.parametrize("name", sorted(MUTANTS))
def test_mutant_is_caught(name: str) -> None:
    mutant = MUTANTS[name]
    caught = set()
    if "explorer" in mutant.caught_by:
        for bounds in MUTANT_BOUNDS:
            result = explore(bounds, mutant.core)
            if not result.ok:
                assert result.counterexample is not None and result.counterexample.trace
                caught.add("explorer")
                break
    if "induction" in mutant.caught_by:
        assert mutant.core.transitions is not None, "the induction reads tables only"
        if not induction.prove(mutant.core.table(), stop_at_first_failure=True).ok:
            caught.add("induction")
    assert caught == mutant.caught_by


def test_explorer_prints_the_shortest_counterexample_as_a_readable_trace() -> None:
    result = explore(Bounds(ranks=2, reports=2), MUTANTS["failed_upload_keeps_slot"].core)
    assert result.counterexample is not None
    assert result.counterexample.trace == (
        "rank 0: report 0 (SYNC)",
        "rank 0: report 0 takes an upload slot",
        "rank 0: report 0 upload attempt 1 fails, giving up",
    )
    text = result.counterexample.render()
    assert text.startswith("INVARIANT: rank 0: reports [] are UPLOADING but slots are held by [0]")
    assert "shortest trace (3 moves)" in text


def test_explorer_reports_a_deadlock_with_its_trace() -> None:
    result = explore(Bounds(ranks=1, reports=2), MUTANTS["sync_waits_on_next_report"].core)
    assert result.counterexample is not None
    assert result.counterexample.kind == "deadlock"
    # Report 0 was handed off and committed; its report() still waits on report 1.
    assert result.counterexample.trace[-1] == "controller writes the commit of index 0"
    assert "rank 0: report 0 (SYNC)" in result.counterexample.trace


def test_explorer_reports_a_run_that_cannot_finish_although_it_never_stops_moving() -> None:
    # An upload whose success sends it back to PENDING: every state has a move (no deadlock),
    # but no sequence of moves ever finishes the run. Only the backward search can see that.
    def success_requeues(table: dict[tuple[ReportState, Event], lifecycle.Transition]) -> None:
        key = (ReportState.UPLOADING, Event.UPLOAD_SUCCEEDED)
        table[key] = lifecycle.Transition(key[0], key[1], ReportState.PENDING, (lifecycle.Action.RELEASE_SLOT,))

    core = Core("success requeues", transitions=mutated_table(success_requeues))
    result = explore(Bounds(ranks=1, reports=1, kinds=(Kind.ASYNC,), failures=False), core)
    assert result.counterexample is not None
    assert result.counterexample.kind == "cannot finish"
    assert result.counterexample.trace == ()  # the shallowest such state is the initial one


def test_unmutated_core_with_the_default_core_object_is_the_real_table() -> None:
    assert Core().table() is lifecycle.TRANSITIONS
    with MUTANTS["failed_upload_keeps_slot"].core.installed():
        assert lifecycle.TRANSITIONS is not TRANSITIONS
    assert lifecycle.TRANSITIONS is TRANSITIONS


def test_readme_diagram_matches_the_transition_table() -> None:
    text = diagram.README.read_text()
    assert diagram.readme_block() in text
    for (source, event), row in TRANSITIONS.items():
        assert f"{source.name} --> {row.target.name}: {event.name}" in text


def test_diagram_changes_when_the_table_changes() -> None:
    table = MUTANTS["failed_upload_keeps_slot"].core.table()
    assert diagram.mermaid(table) != diagram.mermaid()
    assert "UPLOADING --> FAILED: UPLOAD_FAILED\n" in diagram.mermaid(table) + "\n"


def test_explorer_command_prints_state_counts_and_time(capsys: pytest.CaptureFixture[str]) -> None:
    assert explorer.main(["--ranks", "1", "--reports", "2"]) == 0
    out = capsys.readouterr().out
    assert "OK [real core] 1 ranks x 2 reports" in out and " states, " in out and " s" in out
    assert explorer.main(["--ranks", "1", "--reports", "2", "--mutant", "failed_upload_keeps_slot"]) == 1
    assert "shortest trace" in capsys.readouterr().out


def test_induction_command_reports_proved(capsys: pytest.CaptureFixture[str]) -> None:
    assert induction.main([]) == 0
    assert capsys.readouterr().out.startswith("PROVED")


def test_bounds_reject_nonsense() -> None:
    with pytest.raises(ValueError, match="max_pending"):
        Bounds(max_pending=0)
    with pytest.raises(ValueError, match="kind"):
        Bounds(kinds=())
    assert Bounds().kinds == ALL_KINDS
