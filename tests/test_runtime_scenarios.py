"""Whole generated runs on the real trio runtime: order, commits and termination, whatever fails.

Hypothesis draws a scenario: 1 to 3 ranks, 1 to 5 reports per rank, the kind of every report
(SYNC, ASYNC, NO_UPLOAD or metrics only, mixed across ranks), which reports fail, the number of
upload slots and the pending bound. The scenario runs through ``Trainer(...).fit_async()`` with
``on_failure="continue"``, under ``trio.run`` and a ``trio.fail_after`` deadline
(``tests/conftest.py::run_trio``), so a deadlock ends the example as ``trio.TooSlowError``
instead of hanging the suite.

Failures are real: the storage is an fsspec memory file system registered under the test
protocol ``flakymem://`` that raises ``OSError`` when an upload writes a file named
``poison_write*`` or when a NO_UPLOAD registration reads a file named ``poison_read*``; the
training function puts such files into the checkpoints chosen to fail. Nothing in the library is
patched.

Clock. DESIGN.md asks for trio's ``MockClock(autojump_threshold=0)``, but that clock jumps to
the next deadline whenever trio thinks every task is blocked, and a task waiting for a thread
started with ``abandon_on_cancel=True`` counts as blocked. We checked it on trio 0.35:
``with trio.fail_after(30): await trio.to_thread.run_sync(time.sleep, 0.5, abandon_on_cancel=True)``
raises ``TooSlowError`` under that clock. The library runs every training function in such a
thread, so under ``MockClock`` a scenario's deadline would fire while a rank is still training.
The scenarios therefore use :class:`statemachine.testing.ThreadAwareClock`, which behaves like
``MockClock(autojump_threshold=0)`` when no library thread is busy (it jumps straight to the next
deadline) and lets virtual time run at real speed while one is. A deadlock (nothing runs, nothing
can) still meets the deadline at once as ``TooSlowError``.

Scheduling. ``st.random_module()`` seeds Python's ``random`` and every ``Random`` registered
with Hypothesis; trio registers the one its scheduler uses to shuffle each batch of runnable
tasks, so each example also runs the tasks in a different, reproducible order.
"""

from __future__ import annotations

import os
import posixpath
import tempfile
import threading
import uuid
from dataclasses import dataclass
from typing import Any

import fsspec
import pytest
from fsspec.implementations.memory import MemoryFileSystem
from hypothesis import given, settings
from hypothesis import strategies as st

import statemachine as sm
from statemachine.lifecycle import ReportState
from statemachine.storage import CommittedCheckpoint, RunStorage, checkpoint_dir_name
from tests.conftest import run_trio

POISON_WRITE = "poison_write"
POISON_READ = "poison_read"
KINDS = ("SYNC", "ASYNC", "NO_UPLOAD", "METRICS")


class LockedStore(dict[str, Any]):
    """The file table of :class:`FlakyMemoryFileSystem`, safe for the library's I/O threads.

    fsspec's memory file system is not thread-safe: ``find`` iterates its store while another
    thread adds a file, and fails with "dictionary changed size during iteration" (the thorough
    profile hit it in a commit and in a NO_UPLOAD registration, running concurrently with an
    upload). The library does its blocking I/O in several threads, so the test store takes a
    lock and hands out snapshots.
    """

    lock = threading.RLock()

    def __setitem__(self, key: str, value: Any) -> None:
        with self.lock:
            super().__setitem__(key, value)

    def __delitem__(self, key: str) -> None:
        with self.lock:
            super().__delitem__(key)

    def pop(self, key: str, *default: Any) -> Any:
        with self.lock:
            return super().pop(key, *default)

    def items(self) -> Any:
        with self.lock:
            return list(super().items())

    def keys(self) -> Any:
        with self.lock:
            return list(super().keys())

    def values(self) -> Any:
        with self.lock:
            return list(super().values())

    def __iter__(self) -> Any:
        return iter(self.keys())


class FlakyMemoryFileSystem(MemoryFileSystem):  # type: ignore[misc]
    """An in-memory file system that refuses to write or read the files it is told to."""

    protocol = "flakymem"
    store: dict[str, Any] = LockedStore()
    pseudo_dirs = [""]  # noqa: RUF012

    @classmethod
    def _strip_protocol(cls, path: Any) -> Any:
        if isinstance(path, str):
            path = path.removeprefix("flakymem://")
        return super()._strip_protocol(path)

    def _open(self, path: str, mode: str = "rb", *args: Any, **kwargs: Any) -> Any:
        name = posixpath.basename(self._strip_protocol(path))
        if name.startswith(POISON_WRITE) and ("w" in mode or "a" in mode):
            raise OSError(f"injected failure: the storage refuses to write {path}")
        if name.startswith(POISON_READ) and "r" in mode:
            raise OSError(f"injected failure: the storage refuses to read {path}")
        return super()._open(path, mode, *args, **kwargs)


fsspec.register_implementation("flakymem", FlakyMemoryFileSystem, clobber=True)


@dataclass(frozen=True)
class Scenario:
    ranks: int
    reports: int
    #: plan[rank][index] = (kind, fails)
    plan: tuple[tuple[tuple[str, bool], ...], ...]
    max_uploads: int
    max_pending: int | None

    def kind(self, rank: int, index: int) -> str:
        return self.plan[rank][index][0]

    def fails(self, rank: int, index: int) -> bool:
        return self.plan[rank][index][1]


@st.composite
def scenarios(draw: st.DrawFn) -> Scenario:
    ranks = draw(st.integers(1, 3), label="ranks")
    reports = draw(st.integers(1, 5), label="reports per rank")
    report = st.tuples(st.sampled_from(KINDS), st.sampled_from((False, False, True)))
    plan = tuple(
        tuple(
            (kind, fails and kind != "METRICS")
            for kind, fails in draw(st.lists(report, min_size=reports, max_size=reports))
        )
        for _ in range(ranks)
    )
    return Scenario(
        ranks,
        reports,
        plan,
        max_uploads=draw(st.integers(1, 2), label="upload slots"),
        max_pending=draw(st.none() | st.integers(1, 3), label="pending bound"),
    )


class Recorder:
    """A run callback that keeps the hand-offs and commits in the order the controller saw them."""

    def __init__(self) -> None:
        self.hand_offs: list[tuple[int, int, ReportState]] = []
        self.commits: list[CommittedCheckpoint] = []

    def on_report(self, message: Any) -> None:
        self.hand_offs.append((message.rank, message.index, message.state))

    def on_commit(self, committed: CommittedCheckpoint) -> None:
        self.commits.append(committed)


def make_train_fn(scenario: Scenario, local_root: str) -> Any:
    def train(config: dict[str, Any]) -> None:
        ctx = sm.get_context()
        rank = ctx.world_rank
        for index, (kind, fails) in enumerate(scenario.plan[rank]):
            metrics = {"rank": rank, "index": index}
            if kind == "METRICS":
                sm.report(metrics)
            elif kind == "NO_UPLOAD":
                url = ctx.next_checkpoint_path()
                fs, path = fsspec.core.url_to_fs(url)
                fs.pipe_file(posixpath.join(path, "weights.bin"), b"w" * 64)
                if fails:
                    fs.pipe_file(posixpath.join(path, f"{POISON_READ}.bin"), b"x")
                sm.report(
                    metrics, checkpoint=sm.Checkpoint(url), checkpoint_upload_mode=sm.CheckpointUploadMode.NO_UPLOAD
                )
            else:
                folder = os.path.join(local_root, f"rank{rank}-report{index}")
                os.makedirs(folder)
                with open(os.path.join(folder, "weights.bin"), "wb") as handle:
                    handle.write(b"w" * 64)
                if fails:
                    with open(os.path.join(folder, f"{POISON_WRITE}.bin"), "wb") as handle:
                        handle.write(b"x")
                sm.report(
                    metrics,
                    checkpoint=sm.Checkpoint.from_directory(folder),
                    checkpoint_upload_mode=sm.CheckpointUploadMode[kind],
                )

    return train


def run_scenario(scenario: Scenario) -> tuple[sm.Result, Recorder, RunStorage]:
    recorder = Recorder()
    storage_path = f"flakymem://runs-{uuid.uuid4().hex[:10]}"
    upload = sm.UploadConfig(
        max_concurrent_uploads=scenario.max_uploads,
        max_pending_reports=scenario.max_pending,
        on_failure="continue",
        retry=sm.RetryPolicy(max_attempts=2, initial_backoff_s=1.0, jitter=0.0),
    )
    with tempfile.TemporaryDirectory() as local_root:
        trainer = sm.Trainer(
            make_train_fn(scenario, local_root),
            scaling_config=sm.ScalingConfig(num_workers=scenario.ranks),
            run_config=sm.RunConfig(
                storage_path=storage_path, name="scenario", upload_config=upload, callbacks=(recorder,)
            ),
        )
        result = run_trio(trainer.fit_async, deadline=120.0)
    return result, recorder, RunStorage(storage_path, "scenario")


def check_scenario(scenario: Scenario, result: sm.Result, recorder: Recorder, storage: RunStorage) -> None:
    n, ranks = scenario.reports, scenario.ranks
    assert result.error is None
    # Every report is terminal, and FAILED exactly when its storage refused it.
    states = {(r.rank, r.index): r.state for r in result.reports}
    assert set(states) == {(rank, i) for rank in range(ranks) for i in range(n)}
    for (rank, index), state in states.items():
        expected = ReportState.FAILED if scenario.fails(rank, index) else ReportState.REPORTED
        assert state is expected, f"rank {rank} report {index}: {state.name}, expected {expected.name}"
    # Per rank, hand-offs reached the controller in report order.
    for rank in range(ranks):
        assert [i for r, i, _ in recorder.hand_offs if r == rank] == list(range(n))
    # Commits: in order, exactly the indices every rank REPORTED.
    complete = [i for i in range(n) if all(states[(rank, i)] is ReportState.REPORTED for rank in range(ranks))]
    assert result.committed_indices == complete
    with_files = [i for i in complete if any(scenario.kind(rank, i) != "METRICS" for rank in range(ranks))]
    assert [c.index for c in recorder.commits] == with_files
    # A committed checkpoint holds the files of exactly the ranks that had one; nothing else is committed.
    for committed in recorder.commits:
        expected_ranks = [rank for rank in range(ranks) if scenario.kind(rank, committed.index) != "METRICS"]
        assert sorted(part.rank for part in committed.parts) == expected_ranks
        marker = storage.read_marker(committed.path)
        assert marker is not None and marker.index == committed.index
    for index in set(range(n)) - set(with_files):
        assert storage.read_marker(checkpoint_dir_name(index)) is None
    if with_files:
        assert result.checkpoint is not None
        assert result.checkpoint.path.endswith(recorder.commits[-1].path)
    else:
        assert result.checkpoint is None


#: About 150 examples in CI (1.5x the profile), 1,500 with HYPOTHESIS_PROFILE=thorough.
RUNTIME_EXAMPLES = settings().max_examples * 3 // 2


# The time limit covers all examples of the test together (each takes well under a second).
@pytest.mark.timeout(120 + RUNTIME_EXAMPLES)
@settings(max_examples=RUNTIME_EXAMPLES, deadline=None)
@given(scenario=scenarios(), _random=st.random_module())
def test_generated_runs_deliver_in_order_and_commit_only_complete_indices(scenario: Scenario, _random: Any) -> None:
    result, recorder, storage = run_scenario(scenario)
    check_scenario(scenario, result, recorder, storage)


def plan_of(*ranks: str) -> tuple[tuple[tuple[str, bool], ...], ...]:
    """``plan_of("S A! N", ...)``: one string per rank; S/A/N/M kind, ``!`` marks a failing report."""
    letters = {"S": "SYNC", "A": "ASYNC", "N": "NO_UPLOAD", "M": "METRICS"}
    return tuple(tuple((letters[w[0]], w.endswith("!")) for w in rank.split()) for rank in ranks)


@pytest.mark.parametrize(
    "plan, max_uploads, max_pending",
    [
        pytest.param(
            plan_of("S! A", "A S"), 1, None, id="failed SYNC upload on one rank does not block the next report"
        ),
        pytest.param(
            plan_of("A! A A", "M M M"), 1, 1, id="failed ASYNC upload frees its slot under a pending bound of one"
        ),
        pytest.param(plan_of("N! S", "A N"), 2, 2, id="failed NO_UPLOAD registration takes its turn"),
        pytest.param(plan_of("A A A A A"), 2, None, id="one rank with many ASYNC uploads hands off in order"),
        # Found by the thorough profile: a commit's clean-up and a NO_UPLOAD registration ran
        # while another thread wrote an upload, and fsspec's memory store failed with
        # "dictionary changed size during iteration" (see LockedStore).
        pytest.param(plan_of("N M S A M", "A A M N M"), 2, None, id="commit clean-up while another rank uploads"),
        pytest.param(plan_of("N A", "M M", "N A"), 1, 2, id="registration while another rank uploads"),
    ],
)
def test_named_scenarios_deliver_in_order_and_commit_only_complete_indices(
    plan: tuple[tuple[tuple[str, bool], ...], ...], max_uploads: int, max_pending: int | None
) -> None:
    scenario = Scenario(len(plan), len(plan[0]), plan, max_uploads, max_pending)
    result, recorder, storage = run_scenario(scenario)
    check_scenario(scenario, result, recorder, storage)
