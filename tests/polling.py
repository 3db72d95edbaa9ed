"""Waiting for a condition another thread or process brings about.

No deadline here: a condition that never comes is a hang, and hangs are
pytest-timeout's to report (pyproject.toml; it prints every thread's stack,
this frame's caller included).  Tests assert outcomes, never durations
(tests/test_no_wall_clock_asserts.py).
"""

from __future__ import annotations

import asyncio
import time
from typing import Callable


def wait_until(predicate: Callable[[], object], what: str = "", *,
               interval: float = 0.005) -> None:
    """Return once ``predicate()`` is true (polled every ``interval`` s);
    ``what`` names the condition for whoever reads the hang's stack."""
    while not predicate():
        time.sleep(interval)


async def async_wait_until(predicate: Callable[[], object], what: str = "", *,
                           interval: float = 0.005) -> None:
    """``wait_until`` for a coroutine: the loop keeps running meanwhile."""
    while not predicate():
        await asyncio.sleep(interval)
