"""Deadlines and re-arms without a thread per cell: one timer thread,
started at the first deadline, serving every shell of the process.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import sys
import threading
import time
from typing import Callable

# -- timers -------------------------------------------------------------------

class _Timer:
    """One daemon thread running callbacks at given times; started on first use.

    A deadline set on the thread of a registered event loop (the protocol
    server's, see :meth:`use_loop`) is that loop's own timer instead: a
    cancel request arms its cell there, and waking this thread for the
    cancel's grace period adds a third thread to the hand-off of the GIL
    between the loop and the cell it must reach (timestamps inside the
    server: 2.15-2.35 ms cancel -> response without that wake-up against
    2.57-2.66 ms with it; docs/protocol.md).
    """

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, Callable[[], None]]] = []
        self._ids = itertools.count()
        self._cond = threading.Condition(threading.Lock())
        self._thread: threading.Thread | None = None
        #: thread id -> the long-lived event loop it runs (use_loop)
        self._loops: dict[int, asyncio.AbstractEventLoop] = {}

    def use_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        """Deadlines set on the calling thread while it runs ``loop`` become
        ``loop``'s timers."""
        self._loops[threading.get_ident()] = loop

    def call_at(self, when: float, callback: Callable[[], None]) -> None:
        loop = self._loops.get(threading.get_ident()) if self._loops else None
        if loop is not None and loop.is_running():
            loop.call_later(max(when - time.monotonic(), 0.0), _guarded, callback)
            return
        with self._cond:
            entry = (when, next(self._ids), callback)
            heapq.heappush(self._heap, entry)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="pyrepl3-cancel-timer",
                                                daemon=True)
                self._thread.start()
            elif self._heap[0] is entry and threading.current_thread() is not self._thread:
                # only a new earliest deadline needs the thread awake now:
                # a wake-up costs the caller (a cancel's arming) a thread
                # switch on a busy machine, and the thread re-reads the
                # heap when its current wait ends anyway
                self._cond.notify()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._heap:
                    self._cond.wait()
                when, _, callback = self._heap[0]
                delay = when - time.monotonic()
                if delay > 0:
                    self._cond.wait(delay)
                    continue
                heapq.heappop(self._heap)
            _guarded(callback)


def _guarded(callback: Callable[[], None]) -> None:
    try:
        callback()
    except Exception as exc:  # noqa: BLE001 - a timer must keep running
        print(f"[pyrepl3_ext] cancellation timer error: {exc!r}", file=sys.__stderr__)


_TIMER = _Timer()


def use_loop(loop: asyncio.AbstractEventLoop) -> None:
    """Deadlines set on the calling thread while it runs ``loop`` (the protocol
    server's) become ``loop``'s own timers (see :class:`_Timer`)."""
    _TIMER.use_loop(loop)
