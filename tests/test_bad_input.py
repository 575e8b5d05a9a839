"""Bad input gets a clear ValueError/TypeError at the call that caused it, and uses no index."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import pytest

import statemachine as sm
from tests.conftest import run_trio
from tests.helpers import Recorder


def _local_dir(tmp: str) -> sm.Checkpoint:
    os.makedirs(tmp, exist_ok=True)
    with open(os.path.join(tmp, "f"), "w") as handle:
        handle.write("x")
    return sm.Checkpoint.from_directory(tmp)


BAD_CALLS: dict[str, tuple[Callable[[str], None], type[Exception], str]] = {
    "metrics not JSON": (lambda tmp: sm.report({"tensor": object()}), TypeError, "JSON-serialisable"),
    "metrics not a dict": (lambda tmp: sm.report([1, 2]), TypeError, "must be a dict"),  # type: ignore[arg-type]
    "metric name not str": (lambda tmp: sm.report({1: 2}), TypeError, "names must be str"),  # type: ignore[dict-item]
    "unknown mode": (
        lambda tmp: sm.report({}, checkpoint_upload_mode="ASYNC"),  # type: ignore[arg-type]
        ValueError,
        "CheckpointUploadMode",
    ),
    "checkpoint not a Checkpoint": (lambda tmp: sm.report({}, checkpoint=tmp), TypeError, "statemachine.Checkpoint"),  # type: ignore[arg-type]
    "missing directory": (
        lambda tmp: sm.report({}, checkpoint=sm.Checkpoint(os.path.join(tmp, "missing"))),
        ValueError,
        "does not exist",
    ),
    "dir name escapes with ..": (
        lambda tmp: sm.report({}, checkpoint=_local_dir(tmp), checkpoint_dir_name="../elsewhere"),
        ValueError,
        "escapes the run folder",
    ),
    "dir name is absolute": (
        lambda tmp: sm.report({}, checkpoint=_local_dir(tmp), checkpoint_dir_name="/etc/x"),
        ValueError,
        "escapes the run folder",
    ),
    "dir name is reserved": (
        lambda tmp: sm.report({}, checkpoint=_local_dir(tmp), checkpoint_dir_name="run_state.json"),
        ValueError,
        "reserves",
    ),
    "NO_UPLOAD outside the run folder": (
        lambda tmp: sm.report({}, checkpoint=_local_dir(tmp), checkpoint_upload_mode=sm.CheckpointUploadMode.NO_UPLOAD),
        ValueError,
        "outside the run folder",
    ),
    "delete flag not a bool": (
        lambda tmp: sm.report({}, checkpoint=_local_dir(tmp), delete_local_checkpoint_after_upload="yes"),  # type: ignore[arg-type]
        TypeError,
        "delete_local_checkpoint_after_upload",
    ),
    "upload fn not callable": (
        lambda tmp: sm.report({}, checkpoint=_local_dir(tmp), checkpoint_upload_fn=3),  # type: ignore[arg-type]
        TypeError,
        "checkpoint_upload_fn",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_CALLS))
def test_bad_report_raises_at_the_call_and_uses_no_report_index(case: str, tmp_path: Any, memory_url: str) -> None:
    call, error_type, message = BAD_CALLS[case]
    caught: list[BaseException] = []

    def train_fn() -> None:
        try:
            call(str(tmp_path / "ckpt"))
        except Exception as error:  # noqa: BLE001 - the test inspects whatever was raised
            caught.append(error)
        sm.report({"ok": True})

    recorder = Recorder()
    run = sm.Trainer(train_fn, run_config=sm.RunConfig(storage_path=memory_url, name="bad", callbacks=(recorder,)))
    result = run_trio(run.fit_async)
    assert len(caught) == 1
    assert isinstance(caught[0], error_type), repr(caught[0])
    assert message in str(caught[0])
    assert [(m.index, m.metrics) for m in recorder.hand_offs] == [(0, {"ok": True})]
    assert result.error is None


def test_missing_directory_is_refused_by_from_directory(tmp_path: Any) -> None:
    with pytest.raises(ValueError, match="does not exist"):
        sm.Checkpoint.from_directory(tmp_path / "nope")


@pytest.mark.parametrize("call", [lambda: sm.report({}), sm.get_context, sm.get_checkpoint])
def test_library_calls_outside_a_training_function_raise_runtime_error(call: Callable[[], Any]) -> None:
    with pytest.raises(RuntimeError, match="inside a training function"):
        call()


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: sm.ScalingConfig(num_workers=0), "num_workers"),
        (lambda: sm.UploadConfig(max_concurrent_uploads=0), "max_concurrent_uploads"),
        (lambda: sm.UploadConfig(max_pending_reports=0), "max_pending_reports"),
        (lambda: sm.UploadConfig(on_failure="ignore"), "on_failure"),
        (lambda: sm.RetryPolicy(max_attempts=0), "max_attempts"),
        (lambda: sm.RetryPolicy(attempt_timeout_s=0), "attempt_timeout_s"),
        (lambda: sm.RetryPolicy(retry_on=("OSError",)), "retry_on"),
        (lambda: sm.CheckpointConfig(num_to_keep=0), "num_to_keep"),
        (lambda: sm.CheckpointConfig(checkpoint_score_order="up"), "checkpoint_score_order"),
        (lambda: sm.RunConfig(name="a/b"), "name"),
        (lambda: sm.Trainer(lambda: None, backend="slurm"), "backend"),
        (lambda: sm.Trainer(42), "callable"),
    ],
)
def test_bad_configuration_is_refused_where_it_is_written(build: Callable[[], Any], message: str) -> None:
    with pytest.raises((ValueError, TypeError), match=message):
        build()


def test_retry_policy_never_retries_value_or_type_errors() -> None:
    policy = sm.RetryPolicy(retry_on=lambda error: True)
    assert not policy.should_retry(ValueError("bad"))
    assert not policy.should_retry(TypeError("bad"))
    assert not policy.should_retry(KeyboardInterrupt())
    assert policy.should_retry(OSError("flaky"))
    assert sm.RetryPolicy().should_retry(TimeoutError())
    assert not sm.RetryPolicy().should_retry(RuntimeError())
