"""Test helpers that users of the library can use for their own tests too."""

from __future__ import annotations

import time

import trio

from ._threads import busy_threads

__all__ = ["ThreadAwareClock"]


class ThreadAwareClock(trio.abc.Clock):
    """A trio clock that jumps to the next deadline whenever everything is waiting.

    Like ``trio.testing.MockClock(autojump_threshold=0)``, a test under this clock never waits
    for a timeout in real time, and a deadlock hits the test's ``trio.fail_after`` deadline at
    once as a ``TooSlowError``. Unlike it, the clock does not jump while a thread started by the
    library is still working (``MockClock`` treats a trio task that waits for a thread as idle
    and fires every deadline while a file is being copied). While threads work, virtual time
    runs at the speed of real time, so per-attempt timeouts still fire on a hung thread.
    """

    def __init__(self) -> None:
        self._offset = 0.0
        self.jumps = 0

    def start_clock(self) -> None:
        self._offset = 0.0

    def current_time(self) -> float:
        return time.perf_counter() + self._offset

    def deadline_to_sleep_time(self, deadline: float) -> float:
        now = self.current_time()
        if deadline <= now:
            return 0.0
        if busy_threads() == 0 and deadline != float("inf"):
            self._offset += deadline - now
            self.jumps += 1
            return 0.0
        return deadline - now
