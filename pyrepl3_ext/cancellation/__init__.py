"""Cooperative cancellation of running cells: by id, from any thread, or by deadline.

The model is trio's cancel scope, reduced to what a cell needs, with the
request and its delivery kept apart as trio keeps ``CancelScope`` and
``CancelStatus`` apart:

* Every execution runs inside its own :class:`CancelScope` (``scope.py``; a
  new object per cell, never reused) carrying its ``execution_id`` and an
  optional deadline.  Scopes nest per thread (a cell that runs a cell);
  cancelling a scope cancels the scopes nested in it.
* ``cancel(shell, execution_id, reason)`` (``api.py``) marks the scope and
  arms a mechanism that makes the cell's thread raise :class:`CellCancelled`
  (or :class:`CellTimeout`) at its next *safe point* (``safepoints.py``).
  It returns whether it hit a running execution; ``cancel_status`` says how
  far delivery got.
* Cancellation is level-triggered: a cell that catches the exception and
  carries on is cancelled again after ``c.PyREPL3.cancel_grace`` seconds.
* :func:`shield` marks a block (the engine's bookkeeping, a host's critical
  section) where cancellation is deferred until the block ends.

Invariants (each has a test):

1. Nothing is installed while nobody cancels: no tracer, no monitoring
   events, no thread; on 3.12+ a cell with a timeout is armed for the last
   2 ms before its deadline, raising only once it has passed
   (``manager.WATCH_LEAD``).  A signal handler (main thread) and, on 3.12+, a
   ``sys.monitoring`` tool with zero events are registered at load; both
   cost nothing measurable (``bench/bench_cancel.py``).
2. A cancel aimed at execution N never lands in N+1: every mechanism looks
   the target up again in the target thread (the same scope object, still
   running) before raising, and the scope is closed under the lock
   (``scope._lock``) before anything is disarmed.
3. The exception is raised only in frames that run the cell's code (above
   IPython's ``run_code``), never in IPython's or pyrepl3's own frames, and
   not while a frame is in a ``finally:`` body, on a ``try:`` line, in an
   ``__enter__``/``__exit__`` (or their async forms), or in the import
   system, unless the hard deadline (``HARD_DEADLINE`` after the cancel)
   passed.
4. After a cell ends (or the extension unloads) no tracer or monitoring
   event of ours stays installed, and the previous ``sys.settrace`` function
   (a debugger, coverage) is back.

The delivery mechanisms, one module each, chosen per thread and Python
version (numbers in ``docs/cancellation.md``):

* ``monitoring.py``: Python 3.12+, every thread, ``sys.monitoring`` events
  on the code running the cell.
* ``main_thread.py``: the main thread, a signal that raises inside blocking
  calls; before 3.12 also a lazy line tracer.
* ``async_exc.py``: worker threads before 3.12, an asynchronous exception
  while the cell is inside ``run_code`` (it cannot honour safe points).
* async cells waiting in the event loop: the cell's task is cancelled from
  the loop (``manager.py``) and the ``CancelledError`` is reported as the
  cell's ``CellCancelled``.
* waits the engine owns use :func:`interruptible_wait`; a cancel sets the
  event they block on, so they wake at once in any thread.

``timers.py`` runs deadlines and re-arms; ``unwinding.py`` keeps what a very
deep cancelled stack costs after the raise bounded; ``manager.py`` is the
per-shell component that ties them together.
"""

from __future__ import annotations

from .api import (CancelReport, cancel, cancel_status, check_cancelled, current_scope,
                  interruptible_sleep, interruptible_wait, shield)
from .manager import CancellationManager
from .scope import HARD_DEADLINE, CancelScope

# internals that diagnostics and tests reach through the package name
from .main_thread import _SIGNAL  # noqa: F401,E402
from .monitoring import _MONITORING  # noqa: F401,E402
from .safepoints import (_cell_frames, _frames_above_root, _unsafe_lines,  # noqa: F401,E402
                         _unsafe_lines_cache)
from .scope import (_cancelled_threads, _lock, _new_thread_stack,  # noqa: F401,E402
                    _thread_frames, _thread_scopes, _thread_wakers)

__all__ = ["CancelReport", "CancelScope", "CancellationManager", "HARD_DEADLINE", "cancel",
           "cancel_status", "check_cancelled", "current_scope", "interruptible_sleep",
           "interruptible_wait", "shield"]
