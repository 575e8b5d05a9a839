"""A small model of a run, wrapped around the real lifecycle core.

Why a model, and what is real in it
===================================

The explorer (:mod:`proofs.explorer`) has to try every interleaving, so it cannot run trio,
threads and files. It runs this model instead. The *decisions* in the model are not modelled
at all: every record state, every turn, every hand-off and every commit decision is made by the
real :class:`statemachine.lifecycle.RankLifecycle` and :class:`statemachine.lifecycle.CommitLedger`,
reading the real :data:`statemachine.lifecycle.TRANSITIONS`. Which event may happen to a record
is read from that table too: the model only adds the *guards* that the runtime
(``statemachine/rank.py``) and the environment put on events:

* a rank's training thread issues its reports one after another, choosing any upload mode for
  each; it cannot issue a report while ``max_pending`` reports are open (``wait_for_capacity``),
  nor while its last report was SYNC and is not terminal yet (``report()`` blocks);
* ``SLOT_ACQUIRED`` needs a free token of the rank's upload limiter, which the model keeps
  *separately* from the lifecycle's own count, exactly as the runtime keeps a
  ``trio.CapacityLimiter``; the token comes back only through a ``ReleaseSlot`` effect;
* an upload attempt may succeed or fail at any attempt; a failed attempt is retried until
  ``max_attempts`` are used, and the last failure is ``UPLOAD_FAILED``;
* NO_UPLOAD registration may fail (``ABORTED`` from PENDING), and with ``aborts`` any open
  record may be cancelled;
* a rank finishes when its thread is done and every record's task is done (trio's nursery);
* hand-offs go to the ledger at once (``Controller.hand_off``), and one controller task writes
  the decided commits one at a time, in the order they were decided.

A model state is a plain tuple, so it can be hashed and stored; the core objects are rebuilt
from it for every step (:func:`freeze` / :func:`thaw`), which also works for the subclassed
cores of the mutants, since it copies whatever dataclass fields the object has.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import functools
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple
from unittest import mock

from statemachine import lifecycle
from statemachine.lifecycle import (
    CommitLedger,
    Event,
    HandOff,
    IllegalTransition,
    RankLifecycle,
    ReleaseSlot,
    ReportState,
    Transition,
)

__all__ = [
    "Bounds",
    "Core",
    "Kind",
    "ModelState",
    "RankView",
    "Step",
    "Violation",
    "canonical",
    "check_state",
    "freeze",
    "initial_state",
    "is_final",
    "successors",
    "thaw",
]

S = ReportState


class Kind(enum.Enum):
    """What a report carries and how: the upload modes, plus a report without a checkpoint."""

    SYNC = "SYNC"  #: upload now; report() blocks until the report is terminal
    ASYNC = "ASYNC"  #: upload in the background; report() returns at once
    NO_UPLOAD = "NO_UPLOAD"  #: register files already in storage (may fail to register)
    METRICS = "METRICS"  #: metrics only, nothing to upload

    @property
    def uploads(self) -> bool:
        return self in (Kind.SYNC, Kind.ASYNC)


ALL_KINDS: tuple[Kind, ...] = tuple(Kind)


@dataclass(frozen=True, slots=True)
class Bounds:
    """The size of the world the explorer tries every interleaving of."""

    ranks: int = 2
    reports: int = 2
    max_uploads: int = 1
    max_pending: int | None = None
    kinds: tuple[Kind, ...] = ALL_KINDS
    #: Uploads and registrations may fail.
    failures: bool = True
    #: Upload attempts per report (failed attempts before the last are retried).
    max_attempts: int = 1
    #: Any open record may be cancelled (the run is ending).
    aborts: bool = False

    def __post_init__(self) -> None:
        if self.ranks < 1 or self.reports < 0 or self.max_uploads < 1 or self.max_attempts < 1:
            raise ValueError(f"bounds must be positive: {self}")
        if self.max_pending is not None and self.max_pending < 1:
            raise ValueError(f"max_pending must be None or >= 1, got {self.max_pending}")
        if not self.kinds:
            raise ValueError("at least one report kind is needed")

    def describe(self) -> str:
        pending = "unbounded" if self.max_pending is None else str(self.max_pending)
        return (
            f"{self.ranks} ranks x {self.reports} reports, {self.max_uploads} slot(s), pending bound {pending}, "
            f"kinds {'/'.join(k.value for k in self.kinds)}, failures {'on' if self.failures else 'off'}, "
            f"{self.max_attempts} attempt(s), aborts {'on' if self.aborts else 'off'}"
        )


def _sync_waits_on_own_report(index: int) -> int | None:
    return index


@dataclass(frozen=True)
class Core:
    """The pieces of the library under check; a mutant swaps one of them for a broken one."""

    name: str = "real core"
    lifecycle_class: type[RankLifecycle] = RankLifecycle
    ledger_class: type[CommitLedger] = CommitLedger
    #: A replacement for ``statemachine.lifecycle.TRANSITIONS`` (None: the real table).
    transitions: Mapping[tuple[ReportState, Event], Transition] | None = None
    #: Which report a SYNC ``report()`` for report ``index`` waits on (the runtime's rule;
    #: None: it does not wait at all).
    sync_waits_on: Callable[[int], int | None] = field(default=_sync_waits_on_own_report)

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        """Make ``statemachine.lifecycle`` use this core's table while the block runs."""
        if self.transitions is None:
            yield
            return
        with mock.patch.object(lifecycle, "TRANSITIONS", self.transitions):
            yield

    def table(self) -> Mapping[tuple[ReportState, Event], Transition]:
        return lifecycle.TRANSITIONS if self.transitions is None else self.transitions

    @functools.cached_property
    def settled_states(self) -> frozenset[ReportState]:
        """States that no row leaves: a record there will never need its kind again."""
        return frozenset(ReportState) - {source for source, _ in self.table()}


# -- hashable snapshots of the core objects ------------------------------------------------------

Frozen = tuple[Any, ...]


_FIELDS: dict[type, tuple[str, ...]] = {}


def _field_names(cls: type) -> tuple[str, ...]:
    names = _FIELDS.get(cls)
    if names is None:
        names = _FIELDS[cls] = tuple(f.name for f in dataclasses.fields(cls))
    return names


def _freeze_value(value: object) -> object:
    kind = type(value)
    if kind is list:
        return ("list", tuple([_freeze_value(v) for v in value]))  # type: ignore[attr-defined]
    if kind is dict:
        return ("dict", tuple(sorted([(k, _freeze_value(v)) for k, v in value.items()])))  # type: ignore[attr-defined]
    if isinstance(value, tuple | set | frozenset):
        raise TypeError(f"cannot snapshot a field holding {kind.__name__}")
    return value


def _thaw_value(value: object) -> object:
    if type(value) is tuple:
        tag, items = value
        if tag == "list":
            return [_thaw_value(v) for v in items]
        return {k: _thaw_value(v) for k, v in items}
    return value


def freeze(obj: object) -> Frozen:
    """A hashable, canonical snapshot of a dataclass object (field values, dicts sorted)."""
    cls = type(obj)
    return (cls, tuple([_freeze_value(getattr(obj, name)) for name in _field_names(cls)]))


def thaw(snapshot: Frozen) -> Any:
    """Rebuild the object of :func:`freeze` without running ``__init__``/``__post_init__``."""
    cls, values = snapshot
    obj = object.__new__(cls)
    for name, value in zip(_field_names(cls), values, strict=True):
        object.__setattr__(obj, name, _thaw_value(value))
    return obj


# -- the model state -----------------------------------------------------------------------------


class RankView(NamedTuple):
    """One rank: its lifecycle, and what the runtime around it knows."""

    lifecycle: Frozen
    #: Kind of each issued report; None for a settled report before the last one, whose kind
    #: can no longer matter (forgetting it merges states that differ only in history).
    kinds: tuple[Kind | None, ...]
    attempts: tuple[int, ...]  #: upload attempts started per UPLOADING report (0 otherwise)
    holders: frozenset[int]  #: reports holding a token of the rank's upload limiter
    handed: int  #: hand-offs the controller received from this rank
    finished: bool  #: the rank's nursery exited and the controller was told


class ModelState(NamedTuple):
    ranks: tuple[RankView, ...]
    ledger: Frozen
    decided: tuple[tuple[int, bool], ...]  #: decisions queued for the commit writer, in order
    written: tuple[int, ...]  #: committed indices written to storage, in writing order
    decisions: int  #: decisions made so far


@dataclass(frozen=True, slots=True)
class Step:
    """One enabled move: a label for traces, and the state it leads to (or the violation it hit)."""

    label: str
    target: ModelState | None
    violation: str | None = None


class Violation(Exception):
    """A step of the model broke a rule; the message says which."""


def initial_state(bounds: Bounds, core: Core) -> ModelState:
    with core.installed():
        ranks = tuple(
            RankView(
                freeze(core.lifecycle_class(bounds.max_uploads, bounds.max_pending)), (), (), frozenset(), 0, False
            )
            for _ in range(bounds.ranks)
        )
        return ModelState(ranks, freeze(core.ledger_class(bounds.ranks)), (), (), 0)


def is_final(state: ModelState) -> bool:
    return all(r.finished for r in state.ranks) and not state.decided


def _thread_blocked(view: RankView, lc: RankLifecycle, core: Core) -> bool:
    """A SYNC report() has not returned yet: the training thread cannot issue anything."""
    if not view.kinds or view.kinds[-1] is not Kind.SYNC:
        return False
    waited = core.sync_waits_on(len(view.kinds) - 1)
    if waited is None:
        return False
    if not 0 <= waited < len(lc):
        return True
    return not lc.state(waited).terminal


_TASK_DONE = frozenset({S.WAITING_TURN, S.REPORTED, S.FAILED})


def successors(state: ModelState, bounds: Bounds, core: Core) -> list[Step]:
    """Every move enabled in ``state``; a move that breaks a rule carries the violation."""
    steps: list[Step] = []
    table = core.table()
    with core.installed():
        for r, view in enumerate(state.ranks):
            lc: RankLifecycle = thaw(view.lifecycle)
            if view.finished:
                continue
            issued = len(view.kinds)
            blocked = _thread_blocked(view, lc, core)
            if issued < bounds.reports and not blocked and lc.can_accept():
                for kind in bounds.kinds:
                    steps.append(
                        _run(state, bounds, core, f"rank {r}: report {issued} ({kind.value})", r, "accept", kind)
                    )
            if issued == bounds.reports and not blocked and all(s in _TASK_DONE for s in lc.states):
                steps.append(_run(state, bounds, core, f"rank {r}: training done, nursery exits", r, "finish", None))
            for index, current in enumerate(lc.states):
                report_kind = view.kinds[index]
                if report_kind is None:
                    continue
                for (source, event), _row in table.items():
                    if source is not current or event is Event.TURN_REACHED:
                        continue
                    for label, outcome in _event_guards(event, report_kind, view, index, bounds, current):
                        steps.append(
                            _run(state, bounds, core, f"rank {r}: report {index} {label}", r, outcome, (index, event))
                        )
        if state.decided:
            index, committed = state.decided[0]
            verb = "writes the commit of" if committed else "skips"
            steps.append(_run(state, bounds, core, f"controller {verb} index {index}", -1, "write", None))
    return steps


def _event_guards(
    event: Event, kind: Kind, view: RankView, index: int, bounds: Bounds, current: ReportState
) -> list[tuple[str, str]]:
    """The ways ``event`` can happen to a record of ``kind`` now: (label, outcome) pairs."""
    if event is Event.SLOT_ACQUIRED:
        if kind.uploads and len(view.holders) < bounds.max_uploads:
            return [("takes an upload slot", "acquire")]
        return []
    if event is Event.NOTHING_TO_UPLOAD:
        return [("has nothing to upload", "apply")] if not kind.uploads else []
    if event is Event.UPLOAD_SUCCEEDED:
        return [(f"upload attempt {max(view.attempts[index], 1)} succeeds", "apply")] if kind.uploads else []
    if event is Event.UPLOAD_FAILED:
        if not (kind.uploads and bounds.failures):
            return []
        attempt = max(view.attempts[index], 1)
        if attempt < bounds.max_attempts:
            return [(f"upload attempt {attempt} fails, retried", "retry")]
        return [(f"upload attempt {attempt} fails, giving up", "apply")]
    if event is Event.ABORTED:
        if bounds.aborts:
            return [("is cancelled", "apply")]
        if bounds.failures and kind is Kind.NO_UPLOAD and current is S.PENDING:
            return [("fails to register its files", "apply")]
        return []
    return []


def _run(state: ModelState, bounds: Bounds, core: Core, label: str, rank: int, outcome: str, arg: object) -> Step:
    try:
        return Step(label, _apply(state, bounds, core, rank, outcome, arg))
    except Violation as violation:
        return Step(label, None, str(violation))
    except IllegalTransition as error:
        return Step(label, None, f"the core refused a move the runtime makes: {error}")


def _apply(state: ModelState, bounds: Bounds, core: Core, rank: int, outcome: str, arg: object) -> ModelState:
    ledger: CommitLedger = thaw(state.ledger)
    decided = list(state.decided)
    written = state.written
    decisions = state.decisions
    ranks = list(state.ranks)
    if outcome == "write":
        (index, committed), *rest = decided
        decided = rest
        if committed:
            if written and index <= written[-1]:
                raise Violation(f"commit of index {index} written after index {written[-1]}")
            written = (*written, index)
        return ModelState(state.ranks, state.ledger, tuple(decided), written, decisions)

    view = ranks[rank]
    lc: RankLifecycle = thaw(view.lifecycle)
    kinds: tuple[Kind | None, ...] = view.kinds
    attempts, holders, handed, finished = list(view.attempts), set(view.holders), view.handed, False
    effects: list[object] = []
    if outcome == "accept":
        assert isinstance(arg, Kind)
        ordinal = lc.accept()
        if ordinal != len(kinds):
            raise Violation(f"rank {rank} accepted report {len(kinds)} as ordinal {ordinal}")
        kinds = (*kinds, arg)
        attempts.append(0)
    elif outcome == "finish":
        if not lc.finished:
            raise Violation(
                f"rank {rank} finished (every task done) but its reports {list(range(lc.next_turn, len(lc)))} "
                "were never handed to the controller"
            )
        ledger.rank_finished(rank)
        mismatch = ledger.count_mismatch()
        if mismatch is not None:
            raise Violation(f"the ledger sees a report-count mismatch {mismatch} although every rank reports equally")
        finished = True
    elif outcome == "retry":
        assert isinstance(arg, tuple)
        attempts[arg[0]] = max(attempts[arg[0]], 1) + 1
    else:
        assert isinstance(arg, tuple)
        index, event = arg
        if outcome == "acquire":
            holders.add(index)
            attempts[index] = 1
        effects = list(lc.apply(index, event))
    for effect in effects:
        if isinstance(effect, ReleaseSlot):
            if effect.index not in holders:
                raise Violation(f"rank {rank} released an upload slot for report {effect.index}, which holds none")
            holders.remove(effect.index)
        elif isinstance(effect, HandOff):
            if effect.index != handed:
                raise Violation(f"rank {rank} handed off report {effect.index} but report {handed} was next")
            if lc.state(effect.index) is not effect.state or not effect.state.terminal:
                raise Violation(
                    f"rank {rank} handed off report {effect.index} as {effect.state.name}, "
                    f"but it is {lc.state(effect.index).name}"
                )
            handed += 1
            for decision in ledger.hand_off(rank, effect.index, effect.state):
                if decision.index != decisions:
                    raise Violation(f"the ledger decided index {decision.index} while index {decisions} was next")
                decided.append((decision.index, decision.committed))
                decisions += 1
        else:
            raise Violation(f"unknown effect {effect!r}")
    settled = core.settled_states
    states = lc.states
    last = len(kinds) - 1
    kinds = tuple(None if i < last and states[i] in settled else k for i, k in enumerate(kinds))
    attempts = [a if states[i] is S.UPLOADING else 0 for i, a in enumerate(attempts)]
    ranks[rank] = RankView(freeze(lc), kinds, tuple(attempts), frozenset(holders), handed, finished or view.finished)
    return ModelState(tuple(ranks), freeze(ledger), tuple(decided), written, decisions)


def check_state(state: ModelState, bounds: Bounds, core: Core) -> str | None:
    """The invariants every reachable state must satisfy; the first one broken, or None."""
    lifecycles: list[RankLifecycle] = [thaw(view.lifecycle) for view in state.ranks]
    for r, (view, lc) in enumerate(zip(state.ranks, lifecycles, strict=True)):
        states = lc.states
        uploading = {i for i, s in enumerate(states) if s is S.UPLOADING}
        if len(view.holders) > bounds.max_uploads:
            return f"rank {r} holds {len(view.holders)} upload slots, more than max_uploads={bounds.max_uploads}"
        if uploading != set(view.holders):
            return f"rank {r}: reports {sorted(uploading)} are UPLOADING but slots are held by {sorted(view.holders)}"
        if lc.uploads_in_flight != len(uploading):
            return f"rank {r}: the lifecycle counts {lc.uploads_in_flight} uploads, {len(uploading)} are UPLOADING"
        open_reports = sum(not s.terminal for s in states)
        if lc.open_reports != open_reports:
            return f"rank {r}: the lifecycle counts {lc.open_reports} open reports, {open_reports} are open"
        if bounds.max_pending is not None and open_reports > bounds.max_pending:
            return f"rank {r} has {open_reports} open reports, more than max_pending={bounds.max_pending}"
        if view.handed != lc.next_turn:
            return f"rank {r}: the controller got {view.handed} hand-offs but the turn is at {lc.next_turn}"
        if not all(s.terminal for s in states[: view.handed]):
            return f"rank {r}: a handed-off report is not terminal: {[s.name for s in states]}"
        if view.handed < len(states) and states[view.handed] not in (S.PENDING, S.UPLOADING):
            return (
                f"rank {r}: report {view.handed} is {states[view.handed].name} at its turn but was not handed off "
                f"(states {[s.name for s in states]})"
            )
        for i, kind in enumerate(view.kinds[:-1]):
            if kind is Kind.SYNC and not states[i].terminal:
                return f"rank {r}: SYNC report {i} returned to the training thread while {states[i].name}"
    ledger: CommitLedger = thaw(state.ledger)
    if ledger.next_decision != state.decisions:
        return f"the ledger's next decision is {ledger.next_decision}, but {state.decisions} decisions were made"
    for index in state.written:
        not_in = [r for r, lc in enumerate(lifecycles) if len(lc) <= index or lc.state(index) is not S.REPORTED]
        if not_in:
            return f"index {index} is committed but ranks {not_in} did not report it"
    if list(state.written) != sorted(set(state.written)):
        return f"commits written out of order: {list(state.written)}"
    for index, committed in state.decided:
        everyone = all(len(lc) > index and lc.state(index) is S.REPORTED for lc in lifecycles)
        if committed != everyone:
            return f"index {index} decided committed={committed}, but all ranks REPORTED is {everyone}"
    if is_final(state):
        if state.decisions != bounds.reports:
            return f"the run finished with {state.decisions} of {bounds.reports} indices decided"
        expected = tuple(i for i in range(bounds.reports) if all(lc.state(i) is S.REPORTED for lc in lifecycles))
        if state.written != expected:
            return f"the run finished with commits {list(state.written)}, expected {list(expected)}"
    return None


_LEDGER_FIELDS = frozenset({"world_size", "first_index", "_expected", "_arrived", "_next_decision", "_final_counts"})


def canonical(state: ModelState) -> ModelState:
    """The representative of ``state`` under renumbering of the ranks.

    Ranks are interchangeable: nothing in the model or the core treats rank 0 differently. So
    states that differ only in which rank is which are explored once, with the ranks sorted.
    The ledger keeps per-rank data, which is renumbered along; a ledger with other fields than
    the real one's is left alone (no reduction).
    """
    n = len(state.ranks)
    keys = [repr(view) for view in state.ranks]
    order = sorted(range(n), key=keys.__getitem__)
    if order == list(range(n)):
        return state
    ledger = thaw(state.ledger)
    if set(_field_names(type(ledger))) != _LEDGER_FIELDS:
        return state
    new_of = {old: new for new, old in enumerate(order)}
    ledger._expected = [ledger._expected[old] for old in order]
    ledger._arrived = {i: {new_of[r]: s for r, s in by_rank.items()} for i, by_rank in ledger._arrived.items()}
    ledger._final_counts = {new_of[r]: c for r, c in ledger._final_counts.items()}
    ranks = tuple(state.ranks[old] for old in order)
    return state._replace(ranks=ranks, ledger=freeze(ledger))
