"""Thread hand-overs, counted, so that a test clock can tell "idle" from "a thread is working".

Blocking work leaves trio through :func:`run_in_thread`; a training thread comes back into trio
through :func:`call_from_thread`. Both keep :func:`busy_threads` up to date, and only ever change
it on the trio thread, at moments when the trio side is about to wait for a thread or has just
been handed the thread's result, so the count is never zero while a thread's result is still on
its way. :class:`statemachine.testing.ThreadAwareClock` reads it: it jumps virtual time only when
nothing is busy, which is what trio's ``MockClock(autojump_threshold=0)`` would do if it knew
about threads (it does not, and jumps straight past a thread that is still copying a file).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TypeVar

import trio

T = TypeVar("T")

_busy = 0


def busy_threads() -> int:
    """Threads doing work for a trio run of this process (not counting ones waiting on trio)."""
    return _busy


async def run_in_thread(fn: Callable[..., T], *args: object, abandon_on_cancel: bool = False) -> T:
    """``trio.to_thread.run_sync`` that keeps the busy-thread count."""
    global _busy
    _busy += 1
    try:
        return await trio.to_thread.run_sync(fn, *args, abandon_on_cancel=abandon_on_cancel)
    finally:
        _busy -= 1


def call_from_thread(
    afn: Callable[..., Awaitable[T]], *args: object, trio_token: trio.lowlevel.TrioToken | None = None
) -> T:
    """Run ``afn`` in trio from a worker thread (``trio.from_thread.run``), keeping the count."""

    async def counted() -> T:
        global _busy
        _busy -= 1
        try:
            return await afn(*args)
        finally:
            _busy += 1

    return trio.from_thread.run(counted, trio_token=trio_token)
