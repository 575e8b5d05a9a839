"""Shared fixtures: a deadline for every async test, storage URLs, a helper to run a Trainer."""

from __future__ import annotations

import os
import uuid
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, TypeVar

import fsspec
import pytest
import trio

from statemachine.testing import ThreadAwareClock

T = TypeVar("T")

#: Virtual seconds a scenario may take before it counts as a hang (the clock jumps when idle,
#: so a deadlock reaches this deadline at once as trio.TooSlowError).
DEADLINE_S = 600.0


def run_trio(fn: Callable[[], Awaitable[T]], deadline: float = DEADLINE_S) -> T:
    """Run ``fn`` under the thread-aware autojump clock with a ``fail_after`` deadline."""

    async def main() -> T:
        with trio.fail_after(deadline):
            return await fn()

    return trio.run(main, clock=ThreadAwareClock())


@pytest.fixture
def memory_url() -> Iterator[str]:
    """A fresh ``memory://`` folder, removed afterwards."""
    url = f"memory://runs-{uuid.uuid4().hex[:8]}"
    yield url
    fs = fsspec.filesystem("memory")
    path = url[len("memory://") :]
    if fs.exists(path):
        fs.rm(path, recursive=True)


@pytest.fixture
def file_url(tmp_path: Any) -> str:
    return f"file://{os.path.join(str(tmp_path), 'storage')}"


@pytest.fixture(params=["file", "memory"])
def storage_url(request: pytest.FixtureRequest, tmp_path: Any, memory_url: str) -> str:
    """Each storage kind that needs no server."""
    if request.param == "file":
        return f"file://{os.path.join(str(tmp_path), 'storage')}"
    return memory_url


# Hypothesis profiles. "ci" (the default) keeps Hypothesis's 100 examples per test; the tests of
# issue #3 scale from it (the lifecycle state machine runs 10x, about 1,000 examples, the runtime
# scenarios about 1.5x). HYPOTHESIS_PROFILE=thorough runs ten times as many everywhere.
from hypothesis import HealthCheck  # noqa: E402 - appended section
from hypothesis import settings as hypothesis_settings  # noqa: E402

hypothesis_settings.register_profile(
    "ci", max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
hypothesis_settings.register_profile(
    "thorough", max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
hypothesis_settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
