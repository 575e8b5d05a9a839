"""An inductive proof, checked by z3, of the turn-and-commit rule for any number of reports.

The explorer tries every interleaving, but only up to a few reports. This module proves the
rule for *every* world size ``W >= 1`` and *every* number of reports ``N >= 0`` at once. The
state of a run is symbolic:

* ``issued[r]``: how many reports rank ``r`` has made; ``turn[r]``: the rank's next turn;
* ``st[r, i]``: the state of report ``i`` of rank ``r`` (an array over both, of a z3 enum sort
  built from :class:`~statemachine.lifecycle.ReportState`);
* ``holds[r, i]``: whether the report holds an upload slot;
* ``D``: the next index the controller decides; ``committed[i]``: whether index ``i`` was
  committed; ``bad``: an action the real code would refuse (a slot released that is not held,
  a hand-off in a non-terminal state, a move the table does not have).

The steps are the training thread's ``report`` (one more PENDING report), one step per row of
:data:`statemachine.lifecycle.TRANSITIONS` whose event a driver applies (generated from the
table, so a mutated table is a different proof), the turn rule of
:meth:`RankLifecycle._advance_turn` (the report at the turn is handed off when it is FAILED,
or, through the table's ``TURN_REACHED`` row, when it is WAITING_TURN), and the ledger's
decision of index ``D`` once every rank's turn is past it. The real lifecycle advances the turn
eagerly after every event; here it is a separate step that may happen later, a superset of the
real schedules, so what is proved here holds for the real one.

Three obligations, each a z3 query that must be unsatisfiable:

1. *initiation*: the initial state satisfies the invariant :func:`invariant`;
2. *consecution*: every step from a state satisfying it leads to a state satisfying it (one
   query per step and per conjunct, so a failure names both);
3. *progress*: in a state satisfying it that is not final, some step is enabled that is neither
   an upload failure nor an abort, so the run never depends on a failure to move on.

Termination is argued separately (:func:`termination_heights`): the table's states form a DAG,
and every step raises ``sum(issued) + sum(turn) + D + sum(height(st))``, which is bounded for
fixed ``W`` and ``N``. With progress, every run ends in the final state: every rank has handed
off ``N`` reports in order, and indices ``0..N-1`` are decided in order, each committed exactly
when every rank REPORTED it.
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import z3

from statemachine.lifecycle import DRIVER_EVENTS, TRANSITIONS, Action, Event, ReportState, Transition

__all__ = ["Obligation", "ProofResult", "invariant", "main", "prove", "termination_heights"]

Table = Mapping[tuple[ReportState, Event], Transition]

#: Events that the environment chooses when things go wrong; progress may not rely on them.
FAILURE_EVENTS = frozenset({Event.UPLOAD_FAILED, Event.ABORTED})


@dataclass(frozen=True, slots=True)
class Obligation:
    name: str
    proved: bool
    detail: str = ""


@dataclass(slots=True)
class ProofResult:
    obligations: list[Obligation] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return all(o.proved for o in self.obligations)

    @property
    def failures(self) -> list[Obligation]:
        return [o for o in self.obligations if not o.proved]

    def summary(self) -> str:
        proved = sum(o.proved for o in self.obligations)
        lines = [
            f"{'PROVED' if self.ok else 'FAILED'}: {proved}/{len(self.obligations)} obligations, {self.seconds:.2f} s"
        ]
        lines += [f"  not proved: {o.name}: {o.detail}" for o in self.failures]
        return "\n".join(lines)


def termination_heights(table: Table) -> dict[ReportState, int]:
    """Height of each state in the table's graph (0 for states nothing leaves); raise on a cycle."""
    heights: dict[ReportState, int] = {}
    visiting: set[ReportState] = set()

    def height(state: ReportState, path: tuple[ReportState, ...]) -> int:
        if state in heights:
            return heights[state]
        if state in visiting:
            cycle = " -> ".join(s.name for s in (*path, state))
            raise ValueError(f"the transition table has a cycle: {cycle}")
        visiting.add(state)
        targets = [t.target for (source, _), t in table.items() if source is state]
        heights[state] = 1 + max((height(t, (*path, state)) for t in targets), default=-1)
        visiting.discard(state)
        return heights[state]

    for state in ReportState:
        height(state, ())
    return heights


class _Sorts:
    """The z3 enum sort of report states; z3 allows declaring it once per context."""

    _made: _Sorts | None = None

    def __init__(self) -> None:
        names = [s.name for s in ReportState]
        self.sort, values = z3.EnumSort("ReportState", names)
        self.of = {s: v for s, v in zip(ReportState, values, strict=True)}

    @classmethod
    def get(cls) -> _Sorts:
        if cls._made is None:
            cls._made = _Sorts()
        return cls._made


@dataclass(frozen=True)
class Frame:
    """One symbolic state of the run."""

    issued: z3.ArrayRef
    turn: z3.ArrayRef
    st: z3.ArrayRef
    holds: z3.ArrayRef
    D: z3.ArithRef
    committed: z3.ArrayRef
    #: Ghost: for an index decided not committed, a rank whose report of it is not REPORTED.
    witness: z3.ArrayRef
    bad: z3.BoolRef

    @staticmethod
    def fresh(prefix: str, sorts: _Sorts) -> Frame:
        Int, Bool = z3.IntSort(), z3.BoolSort()
        return Frame(
            issued=z3.Array(f"{prefix}issued", Int, Int),
            turn=z3.Array(f"{prefix}turn", Int, Int),
            st=z3.Array(f"{prefix}st", Int, Int, sorts.sort),
            holds=z3.Array(f"{prefix}holds", Int, Int, Bool),
            D=z3.Int(f"{prefix}D"),
            committed=z3.Array(f"{prefix}committed", Int, Bool),
            witness=z3.Array(f"{prefix}witness", Int, Int),
            bad=z3.Bool(f"{prefix}bad"),
        )

    def replace(self, **changes: object) -> Frame:
        values = {
            name: getattr(self, name) for name in ("issued", "turn", "st", "holds", "D", "committed", "witness", "bad")
        }
        values.update(changes)
        return Frame(**values)

    def equal(self, other: Frame) -> z3.BoolRef:
        return z3.And(
            self.issued == other.issued,
            self.turn == other.turn,
            self.st == other.st,
            self.holds == other.holds,
            self.D == other.D,
            self.committed == other.committed,
            self.witness == other.witness,
            self.bad == other.bad,
        )


class _Model:
    """The symbolic run for one transition table.

    ``bound`` None quantifies over every rank and index (the proof). With a bound ``b`` the
    world has at most ``b`` ranks and ``b`` reports and every quantifier is expanded into a
    finite conjunction over it: the queries are then quantifier-free, z3 decides them quickly,
    and a satisfying assignment is a concrete counterexample in that small world.
    """

    def __init__(self, table: Table, bound: int | None = None) -> None:
        self.table = table
        self.bound = bound
        self.sorts = _Sorts.get()
        self.W = z3.Int("W")
        self.N = z3.Int("N")

    def terminal(self, value: z3.ExprRef) -> z3.BoolRef:
        return z3.Or([value == self.sorts.of[s] for s in ReportState if s.terminal])

    def is_state(self, value: z3.ExprRef, state: ReportState) -> z3.BoolRef:
        return value == self.sorts.of[state]

    def rank(self, r: z3.ArithRef) -> z3.BoolRef:
        return z3.And(0 <= r, r < self.W)

    def index(self, i: z3.ArithRef) -> z3.BoolRef:
        return z3.And(0 <= i, i < self.N)

    def all_ranks(self, body: Callable[[z3.ArithRef], z3.BoolRef]) -> z3.BoolRef:
        if self.bound is None:
            r = z3.FreshInt("r")
            return z3.ForAll([r], z3.Implies(self.rank(r), body(r)))
        return z3.And([z3.Implies(k < self.W, body(z3.IntVal(k))) for k in range(self.bound)])

    def all_indices(self, body: Callable[[z3.ArithRef], z3.BoolRef]) -> z3.BoolRef:
        if self.bound is None:
            i = z3.FreshInt("i")
            return z3.ForAll([i], z3.Implies(self.index(i), body(i)))
        return z3.And([z3.Implies(k < self.N, body(z3.IntVal(k))) for k in range(self.bound)])

    def some(self, body: Callable[[z3.ArithRef, z3.ArithRef], z3.BoolRef]) -> z3.BoolRef:
        """Some rank and index satisfy ``body`` (the parameters of a step)."""
        if self.bound is None:
            r, i = z3.FreshInt("r"), z3.FreshInt("i")
            return z3.Exists([r, i], z3.And(self.rank(r), body(r, i)))
        return z3.Or(
            [
                z3.And(r < self.W, body(z3.IntVal(r), z3.IntVal(i)))
                for r in range(self.bound)
                for i in range(-1, self.bound + 1)
            ]
        )

    def sizes(self) -> z3.BoolRef:
        if self.bound is None:
            return z3.And(self.W >= 1, self.N >= 0)
        return z3.And(self.W >= 1, self.N >= 0, self.W <= self.bound, self.N <= self.bound)

    # -- the invariant ---------------------------------------------------------------------

    def invariant(self, f: Frame) -> list[tuple[str, z3.BoolRef]]:
        S = self.sorts.of
        REPORTED, PENDING, UPLOADING = S[ReportState.REPORTED], S[ReportState.PENDING], S[ReportState.UPLOADING]

        def each(body: Callable[[z3.ArithRef, z3.ArithRef], z3.BoolRef]) -> z3.BoolRef:
            return self.all_ranks(lambda r: self.all_indices(lambda i: body(r, i)))

        return [
            ("sizes", self.sizes()),
            ("no refused action", z3.Not(f.bad)),
            (
                "0 <= turn <= issued <= N",
                self.all_ranks(lambda r: z3.And(0 <= f.turn[r], f.turn[r] <= f.issued[r], f.issued[r] <= self.N)),
            ),
            (
                "reports before the turn are terminal (handed off in order)",
                each(lambda r, i: z3.Implies(i < f.turn[r], self.terminal(f.st[r, i]))),
            ),
            (
                "no report at or after the turn is REPORTED",
                each(lambda r, i: z3.Implies(f.turn[r] <= i, f.st[r, i] != REPORTED)),
            ),
            (
                "reports not made yet are PENDING without a slot",
                each(lambda r, i: z3.Implies(f.issued[r] <= i, z3.And(f.st[r, i] == PENDING, z3.Not(f.holds[r, i])))),
            ),
            (
                "a report holds a slot exactly while UPLOADING",
                each(lambda r, i: f.holds[r, i] == (f.st[r, i] == UPLOADING)),
            ),
            (
                "decisions trail every rank's turn",
                z3.And(0 <= f.D, f.D <= self.N, self.all_ranks(lambda r: f.D <= f.turn[r])),
            ),
            (
                "a committed index i < D was REPORTED by every rank",
                each(lambda r, i: z3.Implies(z3.And(i < f.D, f.committed[i]), f.st[r, i] == REPORTED)),
            ),
            (
                "an index i < D that is not committed has a rank that did not report it",
                self.all_indices(
                    lambda i: z3.Implies(
                        z3.And(i < f.D, z3.Not(f.committed[i])),
                        z3.And(self.rank(f.witness[i]), f.st[f.witness[i], i] != REPORTED),
                    )
                ),
            ),
            (
                "nothing at or after D is committed (commits in index order)",
                self.all_indices(lambda i: z3.Implies(f.D <= i, z3.Not(f.committed[i]))),
            ),
        ]

    def initial(self, f: Frame) -> z3.BoolRef:
        Int = z3.IntSort()
        a, b = z3.Ints("a b")
        return z3.And(
            self.sizes(),
            f.issued == z3.K(Int, z3.IntVal(0)),
            f.turn == z3.K(Int, z3.IntVal(0)),
            f.st == z3.Lambda([a, b], self.sorts.of[ReportState.PENDING]),
            f.holds == z3.Lambda([a, b], z3.BoolVal(False)),
            f.D == 0,
            f.committed == z3.K(Int, z3.BoolVal(False)),
            z3.Not(f.bad),
        )

    def final(self, f: Frame) -> z3.BoolRef:
        return z3.And(self.all_ranks(lambda r: z3.And(f.issued[r] == self.N, f.turn[r] == self.N)), f.D == self.N)

    # -- the steps ---------------------------------------------------------------------------

    def _holds_state(self, f: Frame, r: z3.ArithRef, i: z3.ArithRef, state: ReportState) -> z3.BoolRef:
        """Report (r, i) exists and is in ``state``."""
        return z3.And(0 <= i, i < f.issued[r], f.st[r, i] == self.sorts.of[state])

    def _enter(self, f: Frame, r: z3.ArithRef, i: z3.ArithRef, row: Transition) -> Frame:
        """Record ``row`` for report (r, i); ``bad`` is set when the real code would refuse."""
        releases = row.actions.count(Action.RELEASE_SLOT)
        refused: list[z3.BoolRef] = []
        holds = f.holds
        if releases:
            refused.append(z3.Not(f.holds[r, i]) if releases == 1 else z3.BoolVal(True))
            holds = z3.Store(holds, r, i, False)
        if row.target is ReportState.UPLOADING:
            if not releases:
                refused.append(f.holds[r, i])
            holds = z3.Store(holds, r, i, True)
        bad = z3.Or(f.bad, *refused) if refused else f.bad
        return f.replace(st=z3.Store(f.st, r, i, self.sorts.of[row.target]), holds=holds, bad=bad)

    def steps(self) -> list[_Step]:
        S = self.sorts.of
        steps = [
            _Step(
                "report() makes a new PENDING report",
                lambda f, r, i: f.issued[r] < self.N,
                lambda f, r, i: f.replace(issued=z3.Store(f.issued, r, f.issued[r] + 1)),
            )
        ]
        for (source, event), row in sorted(self.table.items(), key=lambda kv: (kv[0][0].name, kv[0][1].name)):
            if event not in DRIVER_EVENTS:
                continue
            steps.append(
                _Step(
                    f"{source.name} --{event.name}--> {row.target.name}",
                    functools.partial(self._holds_state, state=source),
                    functools.partial(self._enter, row=row),
                    progress=event not in FAILURE_EVENTS,
                )
            )

        def at_turn(f: Frame, r: z3.ArithRef, i: z3.ArithRef, state: ReportState) -> z3.BoolRef:
            return z3.And(i == f.turn[r], i < f.issued[r], f.st[r, i] == S[state])

        steps.append(
            _Step(
                "the turn hands off a FAILED report",
                lambda f, r, i: at_turn(f, r, i, ReportState.FAILED),
                lambda f, r, i: f.replace(turn=z3.Store(f.turn, r, i + 1)),
            )
        )
        turn_row = self.table.get((ReportState.WAITING_TURN, Event.TURN_REACHED))

        def hand_off_waiting(f: Frame, r: z3.ArithRef, i: z3.ArithRef) -> Frame:
            if turn_row is None:
                return f.replace(bad=z3.BoolVal(True))  # step() raises IllegalTransition
            g = self._enter(f, r, i, turn_row)
            refused = z3.BoolVal(not turn_row.target.terminal)  # the ledger refuses such a hand-off
            return g.replace(bad=z3.Or(g.bad, refused), turn=z3.Store(f.turn, r, i + 1))

        steps.append(
            _Step(
                "the turn hands off a WAITING_TURN report (TURN_REACHED)",
                lambda f, r, i: at_turn(f, r, i, ReportState.WAITING_TURN),
                hand_off_waiting,
            )
        )

        def decide(f: Frame, r: z3.ArithRef, i: z3.ArithRef) -> z3.BoolRef:
            # One decision per state: pin the step's parameters so "enabled" has one witness.
            return z3.And(r == 0, i == f.D, f.D < self.N, self.all_ranks(lambda q: f.turn[q] > f.D))

        def decide_post(f: Frame, r: z3.ArithRef, i: z3.ArithRef) -> Frame:
            return f.replace(
                D=f.D + 1,
                committed=z3.Store(f.committed, f.D, self._choice_commit),
                witness=z3.Store(f.witness, f.D, self._choice_witness),
            )

        def decide_choice(f: Frame) -> z3.BoolRef:
            reported = S[ReportState.REPORTED]
            everyone = self.all_ranks(lambda q: f.st[q, f.D] == reported)
            someone_not = z3.And(self.rank(self._choice_witness), f.st[self._choice_witness, f.D] != reported)
            return z3.If(self._choice_commit, everyone, someone_not)

        steps.append(_Step("the ledger decides index D", decide, decide_post, choice=decide_choice))
        return steps

    _choice_commit = z3.Bool("step_commit")
    _choice_witness = z3.Int("step_witness")


@dataclass(frozen=True)
class _Step:
    """One kind of step: enabled for rank r and index i when ``guard``; leads to ``post``."""

    name: str
    guard: Callable[[Frame, z3.ArithRef, z3.ArithRef], z3.BoolRef]
    post: Callable[[Frame, z3.ArithRef, z3.ArithRef], Frame]
    progress: bool = True
    #: Constraint on the step's free choices (the decision's verdict and witness).
    choice: Callable[[Frame], z3.BoolRef] | None = None


def invariant(table: Table = TRANSITIONS) -> list[str]:
    """The names of the invariant's conjuncts (for the README and the tests)."""
    model = _Model(table)
    return [name for name, _ in model.invariant(Frame.fresh("", model.sorts))]


#: Small worlds searched for a concrete counterexample when an obligation is not proved.
SEARCH_BOUND = 3


@dataclass
class _Queries:
    """The formulas of one model (unbounded or bounded), built once and reused by every query."""

    model: _Model
    pre: Frame
    invariant_pre: list[z3.BoolRef]
    steps: list[_Step]
    posts: list[tuple[list[z3.BoolRef], list[z3.BoolRef]]]  #: per step: (guard and choice, post invariant)

    @staticmethod
    def build(table: Table, bound: int | None) -> _Queries:
        model = _Model(table, bound)
        pre = Frame.fresh("", model.sorts)
        r, i = z3.Ints("step_r step_i")
        steps = model.steps()
        posts = []
        for step in steps:
            enabled = [model.rank(r), step.guard(pre, r, i), *([step.choice(pre)] if step.choice else [])]
            posts.append((enabled, [c for _, c in model.invariant(step.post(pre, r, i))]))
        return _Queries(model, pre, [c for _, c in model.invariant(pre)], steps, posts)


def _check(
    queries: tuple[_Queries, _Queries], goal: Callable[[_Queries], list[z3.BoolRef]], timeout_ms: int
) -> tuple[bool, str]:
    """True when ``goal`` is unsatisfiable for every W and N; else a counterexample or a reason."""
    small, full = queries
    solver = z3.Solver()
    solver.add(*goal(small))
    if solver.check() == z3.sat:
        found = solver.model()
        r, i = z3.Ints("step_r step_i")
        return False, (
            f"counterexample with W={found.eval(small.model.W)} ranks, N={found.eval(small.model.N)} reports, "
            f"step at rank {found.eval(r)}, report {found.eval(i)}"
        )
    solver = z3.Solver()
    solver.set("timeout", timeout_ms)
    solver.add(*goal(full))
    verdict = solver.check()
    if verdict == z3.unsat:
        return True, ""
    if verdict == z3.sat:
        return False, "counterexample in a world larger than the search bound"
    return False, (
        f"z3 could not decide ({solver.reason_unknown()}); "
        f"no counterexample up to {SEARCH_BOUND} ranks x {SEARCH_BOUND} reports"
    )


def prove(table: Table = TRANSITIONS, timeout_ms: int = 30_000, stop_at_first_failure: bool = False) -> ProofResult:
    """Check every obligation for ``table``; a failed one is listed with what broke."""
    started = time.perf_counter()
    result = ProofResult()
    try:
        for obligation in _obligations(table, timeout_ms):
            result.obligations.append(obligation)
            if stop_at_first_failure and not obligation.proved:
                break
    finally:
        result.seconds = time.perf_counter() - started
    return result


def _obligations(table: Table, timeout_ms: int) -> Iterator[Obligation]:
    try:
        termination_heights(table)
        yield Obligation("termination: the table is acyclic", True)
    except ValueError as error:
        yield Obligation("termination: the table is acyclic", False, str(error))
    queries = (_Queries.build(table, SEARCH_BOUND), _Queries.build(table, None))
    names = invariant(table)
    for n, name in enumerate(names):

        def initiation(q: _Queries, n: int = n) -> list[z3.BoolRef]:
            return [q.model.initial(q.pre), z3.Not(q.model.invariant(q.pre)[n][1])]

        proved, detail = _check(queries, initiation, timeout_ms)
        yield Obligation(f"initiation: {name}", proved, detail)
    for k, step in enumerate(queries[1].steps):
        # Not vacuous: the step is enabled in some state satisfying the invariant.
        solver = z3.Solver()
        solver.add(*queries[0].invariant_pre, *queries[0].posts[k][0])
        enabled = solver.check() == z3.sat
        yield Obligation(f"non-vacuity: {step.name} is enabled in some invariant state", enabled, "never enabled")
        for n, name in enumerate(names):

            def consecution(q: _Queries, k: int = k, n: int = n) -> list[z3.BoolRef]:
                enabled, post_invariant = q.posts[k]
                return [*q.invariant_pre, *enabled, z3.Not(post_invariant[n])]

            proved, detail = _check(queries, consecution, timeout_ms)
            yield Obligation(f"consecution: {step.name} keeps '{name}'", proved, detail)

    def progress(q: _Queries) -> list[z3.BoolRef]:
        stuck = [z3.Not(q.model.some(functools.partial(s.guard, q.pre))) for s in q.steps if s.progress]
        return [*q.invariant_pre, z3.Not(q.model.final(q.pre)), *stuck]

    proved, detail = _check(queries, progress, timeout_ms)
    yield Obligation("progress: every non-final state has a step that is not a failure", proved, detail)


def main(argv: Sequence[str] | None = None) -> int:
    from .mutants import MUTANTS

    parser = argparse.ArgumentParser(prog="python -m proofs.induction", description=__doc__.split("\n\n")[0])
    parser.add_argument("--mutant", choices=sorted(MUTANTS), help="prove a deliberately broken table instead")
    args = parser.parse_args(argv)
    table = TRANSITIONS
    if args.mutant:
        table = MUTANTS[args.mutant].core.table()
    result = prove(table)
    print(result.summary())
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
