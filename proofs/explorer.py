"""Breadth-first exploration of every interleaving of the model in :mod:`proofs.model`.

Run it with larger bounds than the test suite uses::

    python -m proofs.explorer --ranks 3 --reports 2
    python -m proofs.explorer --ranks 2 --reports 3 --uploads 2 --pending 2 --attempts 2

It visits every reachable state once, checks :func:`proofs.model.check_state` in each, and
checks every move as it is made (hand-offs in order, slots released only by their holder,
decisions in order). A state with no move that is not final is a deadlock. After the forward
search, a backward search from the final states over the recorded edges finds every state from
which the run can still finish; a state that cannot is reported too (a livelock, or a corner
that only leads to deadlocks). Because the search is breadth-first and keeps one parent per
state, the counterexample printed for any of these is a shortest one.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

from .model import (
    ALL_KINDS,
    Bounds,
    Core,
    Kind,
    ModelState,
    canonical,
    check_state,
    initial_state,
    is_final,
    successors,
)

__all__ = ["Counterexample", "Exploration", "explore", "main"]


@dataclass(frozen=True, slots=True)
class Counterexample:
    """What went wrong, and the shortest sequence of moves from the initial state to it."""

    kind: str  #: "invariant", "step", "deadlock" or "cannot finish"
    message: str
    trace: tuple[str, ...]

    def render(self) -> str:
        lines = [f"{self.kind.upper()}: {self.message}", f"shortest trace ({len(self.trace)} moves):"]
        lines += [f"  {n:3d}. {label}" for n, label in enumerate(self.trace, 1)]
        return "\n".join(lines)


@dataclass(slots=True)
class Exploration:
    bounds: Bounds
    core: str
    symmetry: bool = False
    states: int = 0
    edges: int = 0
    finals: int = 0
    depth: int = 0
    seconds: float = 0.0
    counterexample: Counterexample | None = None
    kinds_seen: set[Kind] = field(default_factory=set)

    @property
    def ok(self) -> bool:
        return self.counterexample is None

    def summary(self) -> str:
        verdict = "OK" if self.ok else "VIOLATION"
        reduced = ", up to rank symmetry" if self.symmetry else ""
        return (
            f"{verdict} [{self.core}] {self.bounds.describe()}{reduced}: {self.states} states, {self.edges} moves, "
            f"{self.finals} final states, depth {self.depth}, {self.seconds:.2f} s"
        )


def explore(
    bounds: Bounds, core: Core | None = None, *, symmetry: bool = False, max_states: int = 5_000_000
) -> Exploration:
    """Explore every interleaving within ``bounds``; stop at the first (shortest) violation.

    With ``symmetry``, states that differ only by a renumbering of the ranks are explored once
    (:func:`proofs.model.canonical`). When that finds a violation, the search is run again
    without it, so that the counterexample printed names the ranks consistently.
    """
    core = core or Core()
    if symmetry:
        reduced = _explore(bounds, core, True, max_states)
        if reduced.ok:
            return reduced
    return _explore(bounds, core, False, max_states)


def _explore(bounds: Bounds, core: Core, symmetry: bool, max_states: int) -> Exploration:
    started = time.perf_counter()
    result = Exploration(bounds, core.name, symmetry)
    start = initial_state(bounds, core)
    index: dict[ModelState, int] = {start: 0}
    states: list[ModelState] = [start]
    parent: list[tuple[int, str] | None] = [None]
    depth: list[int] = [0]
    predecessors: list[list[int]] = [[]]
    finals: list[int] = []

    def trace(n: int, extra: str | None = None) -> tuple[str, ...]:
        labels: list[str] = [] if extra is None else [extra]
        link = parent[n]
        while link is not None:
            n, label = link
            labels.append(label)
            link = parent[n]
        return tuple(reversed(labels))

    def stop(kind: str, message: str, at: int, extra: str | None = None) -> Exploration:
        result.counterexample = Counterexample(kind, message, trace(at, extra))
        return finish()

    def finish() -> Exploration:
        result.states = len(states)
        result.finals = len(finals)
        result.depth = max(depth)
        result.seconds = time.perf_counter() - started
        return result

    broken = check_state(start, bounds, core)
    if broken is not None:
        return stop("invariant", broken, 0)
    queue: deque[int] = deque([0])
    while queue:
        n = queue.popleft()
        state = states[n]
        moves = successors(state, bounds, core)
        if not moves:
            if is_final(state):
                finals.append(n)
                continue
            return stop("deadlock", "no move is enabled and the run is not finished", n)
        for move in moves:
            result.edges += 1
            if move.target is None:
                return stop("step", move.violation or "", n, move.label)
            reached = canonical(move.target) if symmetry else move.target
            target = index.get(reached)
            if target is None:
                target = len(states)
                index[reached] = target
                states.append(reached)
                parent.append((n, move.label))
                depth.append(depth[n] + 1)
                predecessors.append([])
                for view in reached.ranks:
                    result.kinds_seen.update(k for k in view.kinds if k is not None)
                broken = check_state(reached, bounds, core)
                if broken is not None:
                    return stop("invariant", broken, target)
                if len(states) > max_states:
                    raise RuntimeError(f"more than {max_states} states; use smaller bounds")
                queue.append(target)
            predecessors[target].append(n)
    can_finish = bytearray(len(states))
    backward = deque(finals)
    for n in finals:
        can_finish[n] = 1
    while backward:
        n = backward.popleft()
        for p in predecessors[n]:
            if not can_finish[p]:
                can_finish[p] = 1
                backward.append(p)
    stuck = [n for n in range(len(states)) if not can_finish[n]]
    if stuck:
        first = min(stuck, key=lambda n: depth[n])
        return stop("cannot finish", "no sequence of moves from this state finishes the run", first)
    return finish()


def _parse_kinds(text: str) -> tuple[Kind, ...]:
    try:
        return tuple(Kind[name.strip().upper()] for name in text.split(",") if name.strip())
    except KeyError as error:
        raise argparse.ArgumentTypeError(f"unknown kind {error}; use {','.join(k.name for k in Kind)}") from None


def main(argv: Sequence[str] | None = None) -> int:
    from .mutants import MUTANTS

    parser = argparse.ArgumentParser(prog="python -m proofs.explorer", description=__doc__.split("\n\n")[0])
    parser.add_argument("--ranks", type=int, default=3)
    parser.add_argument("--reports", type=int, default=2)
    parser.add_argument("--uploads", type=int, default=1, help="upload slots per rank (max_uploads)")
    parser.add_argument("--pending", type=int, default=None, help="pending-report bound (default: none)")
    parser.add_argument("--attempts", type=int, default=1, help="upload attempts per report")
    parser.add_argument("--kinds", type=_parse_kinds, default=ALL_KINDS, help="e.g. SYNC,ASYNC,NO_UPLOAD,METRICS")
    parser.add_argument("--no-failures", action="store_true", help="uploads and registrations always succeed")
    parser.add_argument("--aborts", action="store_true", help="any open report may be cancelled")
    parser.add_argument("--no-symmetry", action="store_true", help="explore every rank numbering separately")
    parser.add_argument("--mutant", choices=sorted(MUTANTS), help="explore a deliberately broken core instead")
    args = parser.parse_args(argv)
    try:
        bounds = Bounds(
            ranks=args.ranks,
            reports=args.reports,
            max_uploads=args.uploads,
            max_pending=args.pending,
            kinds=args.kinds,
            failures=not args.no_failures,
            max_attempts=args.attempts,
            aborts=args.aborts,
        )
    except ValueError as error:
        parser.error(str(error))
    core = MUTANTS[args.mutant].core if args.mutant else Core()
    result = explore(bounds, core, symmetry=not args.no_symmetry)
    print(result.summary())
    if result.counterexample is not None:
        print(result.counterexample.render())
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
