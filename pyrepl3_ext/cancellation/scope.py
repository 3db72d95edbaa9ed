"""The request side of cancellation: a cell's ``CancelScope`` and the
per-thread registries every delivery mechanism looks a target up in.

A scope records that a cancel was asked for (``cancel_called``, the reason,
the deadline) and how far delivery got (``mechanism``: "" -> "pending" ->
"armed" | "escalate" -> "raised"); the mechanisms in the sibling modules do
the delivering.  ``_lock`` guards the registries and every arm/disarm: a
scope is closed under it before anything is disarmed (invariant 2).
"""

from __future__ import annotations

import _weakrefset
import os
import sys
import threading
import time
import weakref
from contextlib import contextmanager
from typing import Any, Iterator, TYPE_CHECKING

from ..errors import CellCancelled, CellTimeout
from .unwinding import _hold_gc, _pause_gc, _release_gc

if TYPE_CHECKING:
    import asyncio

    from .manager import CancellationManager

#: Seconds after the first cancel request when safe points stop deferring.
HARD_DEADLINE = 2.0
#: ``sys.monitoring`` tool ids we try, in order (0-2 are used by debuggers,
#: coverage and profilers by convention).
_MONITORING_TOOL_IDS = (4, 3, 5)
_HAS_MONITORING = sys.version_info >= (3, 12)
#: pyrepl3_ext itself: frames of code under it are "ours" (never raised in)
_PKG_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_UNSAFE_MODULE_PARTS = ("importlib/_bootstrap",)
_UNSAFE_FUNCTIONS = ("__enter__", "__exit__", "__aenter__", "__aexit__",
                     # run by the collection of the cell's objects, from C: an
                     # exception there is printed as "Exception ignored" and
                     # dropped, never reaching the cell
                     "__del__")
#: the same for the stdlib's weakref callbacks (WeakSet, WeakValueDictionary,
#: finalize): no frame of these files is a place to raise
_SWALLOWING_FILES = frozenset({weakref.__file__, _weakrefset.__file__})

# The one lock of the mechanism.  It is a C-level lock (never a Python-level
# wrapper such as Condition) because the target thread takes it while an
# asynchronous exception may be pending for it.
_lock = threading.Lock()
_get_ident = threading.get_ident
_monotonic = time.monotonic
_MAIN_THREAD_ID = threading.main_thread().ident
#: thread id -> stack of running scopes (innermost last)
_thread_scopes: dict[int, list["CancelScope"]] = {}
#: thread id -> the scope being cancelled there (what mechanisms look up)
_cancelled_threads: dict[int, "CancelScope"] = {}
_shield_depth = threading.local()
#: thread id -> events the thread is blocked on in :func:`interruptible_wait`;
#: a cancel aimed at that thread sets them so the wait returns at once
_thread_wakers: dict[int, set[threading.Event]] = {}


if sys.version_info >= (3, 12):
    _thread_frames = sys._current_frames
else:
    def _thread_frames() -> dict:
        """``sys._current_frames()`` with the cyclic collector paused.

        On 3.10/3.11 it holds the runtime's thread-list lock while it
        allocates frame objects; a collection started by one of those
        allocations can run code that needs that lock or the GIL, and the
        process deadlocks (CPython gh-106883, not fixed before 3.12; seen
        here in CI as a thread starting while another ran its first cell).
        """
        _hold_gc()
        try:
            return sys._current_frames()
        finally:
            _release_gc()


@contextmanager
def _foreign_stack(thread_id: int) -> Iterator[Any]:
    """The innermost frame of another thread, to be walked inside the block.

    Each ``f_back`` taken on another thread's stack makes a frame object,
    and that allocation can start a collection whose finalizers hand the
    GIL over: the walked thread then runs and may pop the very frame being
    made.  On 3.11 that is a segfault (CI, a cancel of a deep recursion;
    reproduced in seconds by a walker against a recursing thread that
    leaves finalizable garbage, and never with the collector paused).  So
    the collector is paused for the walk, on every version (a bounded walk;
    the pause costs two lock round trips).  Frames kept past the block may
    be read (``f_code``, ``f_lasti``) but not walked further.
    """
    _hold_gc()
    try:
        yield sys._current_frames().get(thread_id)
    finally:
        _release_gc()


def _new_thread_stack(tid: int) -> list:
    """Register the scope stack of a thread running its first cell.

    Stacks stay registered while empty (a thread's next cell reuses it), so
    this is where the empty stacks of threads that ended are dropped.  Rare
    (once per thread), so it may take the lock other threads' sweeps need.
    """
    live = _thread_frames()
    with _lock:
        for other in [t for t, st in _thread_scopes.items() if not st and t not in live]:
            del _thread_scopes[other]
        stack = _thread_scopes[tid] = []
    return stack


class CancelScope:
    """The cancellation state of one execution (see the module docstring)."""

    # Every cell creates one scope, so only the four fields every scope needs
    # are set per instance; the rest are class-level defaults until a
    # cancel (rare) assigns them.
    cancel_called = False
    reason = ""
    kind = "cancelled"
    requested_at = 0.0
    raised = 0
    finished = False
    deadline: float | None = None
    loop: "asyncio.AbstractEventLoop | None" = None
    task: "asyncio.Task | None" = None
    task_cancels = 0                 # task.cancel() calls made for this scope
    #: "" -> "pending" -> "armed" | "escalate" -> "raised"
    mechanism = ""
    armed_codes: tuple | dict = ()   # 3.12+: code -> local events armed for this scope
    armed_ids: frozenset | set = frozenset()  # ids of armed_codes (the per-call test)
    armed_global = False             # 3.12+: PY_START/PY_RESUME enabled for us
    monitored = False                # 3.12+: sys.monitoring delivers (main thread too)
    in_code = False                  # 3.10/3.11: inside run_code (SetAsyncExc is safe)
    async_exc_pending = False
    deep = False                     # its stack is deeper than _VERDICT_WALK (a runaway)
    #: seconds after the first request when safe points stop deferring (a
    #: class attribute: the one place every mechanism reads it from)
    hard_deadline = HARD_DEADLINE
    gc_paused = False                # holds one of _pause_gc's pauses
    #: armed ahead of its deadline (manager._watch): the reason it is
    #: cancelled with once the deadline has passed, None when not watched
    watch_reason: str | None = None
    watch_fired = False              # the cell's own event cancelled it at the deadline
    stand_in: "CellCancelled | None" = None  # reported for a CancelledError/KeyboardInterrupt

    def __init__(self, execution: Any, thread_id: int, manager: "CancellationManager",
                 parent: "CancelScope | None"):
        self.execution = execution  # the foundation's Execution this scope belongs to
        self.thread_id = thread_id
        self.parent = parent
        self.manager = manager

    @property
    def execution_id(self) -> str:
        return self.execution.id

    def raising(self) -> CellCancelled:
        """The exception to raise now, with the delivery recorded (``raise scope.raising()``)."""
        self.mechanism = "raised"
        self.raised += 1
        if self.deep:
            _pause_gc(self)
        return self.exception()

    def due(self) -> bool:
        """Whether the thread is to raise now: cancelled, or watched (armed
        ahead of its deadline) and past the deadline, in which case the
        scope becomes cancelled here, in the cell's own thread, with no
        other thread woken (``manager._watch``).  Before the deadline a
        watched scope raises nowhere."""
        if self.cancel_called:
            return True
        if self.watch_reason is None or _monotonic() < self.deadline:
            return False
        with _lock:
            if not self.cancel_called and not self.finished:
                self.watch_fired = True
                self.mark_cancelled(self.watch_reason, "timeout", self.deadline)
        return self.cancel_called

    def mark_cancelled(self, reason: str, kind: str, at: float) -> "CancelScope":
        """Mark this scope and the cells it started (nested scopes on its
        thread) cancelled, as of ``at``; returns the innermost, the one to arm
        (caller holds ``_lock``)."""
        targets = [self]
        for inner in _thread_scopes.get(self.thread_id, []):
            if inner is not self and inner.inside(self):
                targets.append(inner)
        for target in targets:
            if not target.cancel_called:
                target.cancel_called = True
                target.reason = reason
                target.kind = kind
                target.requested_at = at
        return targets[-1]

    def inside(self, outer: "CancelScope") -> bool:
        """Whether this scope is nested (at any depth) in ``outer``."""
        p = self.parent
        while p is not None:
            if p is outer:
                return True
            p = p.parent
        return False

    def exception(self) -> CellCancelled:
        if self.kind == "timeout":
            return CellTimeout(self.reason, execution_id=self.execution_id)
        return CellCancelled(self.reason, kind=self.kind, execution_id=self.execution_id)

    def __repr__(self) -> str:
        state = "finished" if self.finished else ("cancelled" if self.cancel_called else "running")
        return f"<CancelScope {self.execution_id!r} {state}>"
