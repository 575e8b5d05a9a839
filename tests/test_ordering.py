"""Reports reach the controller in order and commit in order, for every mix of modes."""

from __future__ import annotations

import itertools

import pytest

import statemachine as sm
from tests.conftest import run_trio
from tests.helpers import ASYNC, METRICS, NO_UPLOAD, SYNC, Recorder, Step, assert_run_is_consistent, trainer

KINDS: tuple[Step, ...] = (SYNC, ASYNC, NO_UPLOAD, METRICS)


def _plans(first: Step, second: Step, ranks: int) -> list[list[Step]]:
    """Each rank gets both modes in a different order, with metrics-only reports between."""
    shapes = [
        [first, second, METRICS, second, first],
        [second, first, METRICS, first, second],
        [first, METRICS, second, second, first],
    ]
    return shapes[:ranks]


@pytest.mark.parametrize("ranks", [2, 3])
@pytest.mark.parametrize(("first", "second"), list(itertools.product(KINDS, repeat=2)), ids=str)
def test_every_ordered_pair_of_modes_hands_off_and_commits_in_order(
    first: Step, second: Step, ranks: int, memory_url: str
) -> None:
    plans = _plans(first, second, ranks)
    recorder = Recorder()
    result = run_trio(trainer(memory_url, plans, recorder).fit_async)
    assert result.error is None
    assert result.committed_indices == list(range(5))
    assert all(r.state.name == "REPORTED" for r in result.reports)
    assert_run_is_consistent(result, recorder, plans)


def test_mixed_modes_on_file_storage_commit_every_checkpoint(file_url: str) -> None:
    plans = [[SYNC, ASYNC, NO_UPLOAD, ASYNC, SYNC, METRICS, ASYNC]] * 3
    recorder = Recorder()
    result = run_trio(trainer(file_url, plans, recorder).fit_async)
    assert [c.index for c in recorder.commits] == [0, 1, 2, 3, 4, 6]
    assert_run_is_consistent(result, recorder, plans)
    assert result.checkpoint is not None and result.checkpoint.path.endswith("checkpoint_000006")


def test_async_uploads_run_concurrently_up_to_the_slot_limit_and_still_hand_off_in_order(memory_url: str) -> None:
    plans = [[ASYNC] * 8]
    recorder = Recorder()
    result = run_trio(trainer(memory_url, plans, recorder, sm.UploadConfig(max_concurrent_uploads=4)).fit_async)
    assert_run_is_consistent(result, recorder, plans)
