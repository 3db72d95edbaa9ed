"""The component: per-shell cancellation (scopes for its executions,
deadlines, the mechanisms it arms), loaded by the extension like any other.
"""

from __future__ import annotations

import asyncio
import signal
import sys
import threading
import time
from typing import Any, Callable

from ..errors import CellCancelled
from ..extension import Component, InstancePatches, format_traceback
from .scope import (CancelScope, _HAS_MONITORING, _MAIN_THREAD_ID,
                    _cancelled_threads, _get_ident, _lock, _foreign_stack, _new_thread_stack,
                    _thread_scopes, _thread_wakers)
from .unwinding import (_bounded_showtraceback, _deeper_than, _holds_deep_stack, _pause_gc,
                        _release_deep_stack, _resume_gc, _shorten_tracebacks)
from .safepoints import (DEFER, OUTSIDE, _VERDICT_WALK, _cell_code_on_stack, _cell_suspended_in,
                         _innermost_cell_frames, _register_root, _verdict)
from .monitoring import _MONITORING
from .main_thread import _SIGNAL
from .async_exc import _AsyncCellCancelled, _post_async_exc
from . import timers
from .api import CancelReport, current_scope

#: A cell with a timeout has its delivery armed this long before the
#: deadline (``CancellationManager._watch``), so the deadline is met by the
#: cell's own next event instead of a thread that must first win the GIL.
#: Its cost: those last 2 ms run with the events on (a line-by-line loop
#: runs slower there).
WATCH_LEAD = 0.002
#: shorter timeouts go without a watch (it would cover over a tenth of them)
WATCH_MIN_TIMEOUT = 10 * WATCH_LEAD
#: after the deadline of a watched cell on a worker thread, when the timer
#: looks at it (a C call or a ``finally`` still holding it, a swallowed raise)
WATCH_FALLBACK = 0.001

def _monitor(scope: CancelScope, frame: Any) -> None:
    """Arm ``sys.monitoring`` delivery on ``scope``'s thread, whose innermost
    frame is ``frame`` (caller holds ``_lock``)."""
    scope.mechanism = "armed"
    scope.monitored = True
    _MONITORING.arm(scope, frame)


# -- the component ------------------------------------------------------------

class CancellationManager(Component):
    """Per-shell cancellation: scopes for its executions, deadlines, mechanisms."""

    name = "cancellation"

    def __init__(self, state: Any):
        super().__init__(state)
        self._signal = False
        self._monitoring = False
        self._patches = InstancePatches()
        self._cell_timeout = 0.0

    # load / unload
    def attach(self) -> None:
        from IPython.core.interactiveshell import InteractiveShell

        _register_root(InteractiveShell.run_code.__code__)
        config = self.state.config
        signum = getattr(signal, config.cancel_signal, None)
        if not isinstance(signum, int):
            raise ValueError(f"PyREPL3.cancel_signal: unknown signal {config.cancel_signal!r}")
        # read on every cell: a plain attribute kept in sync beats a trait lookup
        self._cell_timeout = config.cell_timeout
        config.observe(self._on_cell_timeout, names="cell_timeout")
        self._signal = _SIGNAL.acquire(signum)
        self._monitoring = _MONITORING.acquire()
        self._patches.wrap(self.state.shell, "showtraceback", self._showing_cancels)
        if not _HAS_MONITORING:
            # 3.10/3.11 workers use SetAsyncExc, which must know when the
            # thread is inside the cell's code: wrap run_code to count it.
            shell = self.state.shell
            self._patches.wrap(shell, "run_code",
                               lambda original: self._counting_run_code(shell, original))

    def _counting_run_code(self, shell: Any, original: Callable) -> Callable:
        """``shell.run_code`` that marks its scope ``in_code`` (3.10/3.11).

        Only threads that the asynchronous exception may target need it:
        in the main thread, while the signal mechanism is ours, the
        original coroutine is returned as it is (no extra frame per
        top-level statement).
        """
        signal_tid = threading.main_thread().ident if self._signal else None

        def run_code(code_obj, result=None, *, async_=False):
            tid = _get_ident()
            stack = _thread_scopes.get(tid)  # current_scope(), inline
            if not stack or tid == signal_tid:
                return original(code_obj, result, async_=async_)
            return counted(stack[-1], code_obj, result, async_)

        async def counted(scope, code_obj, result, async_):
            excepthook = sys.excepthook
            # Created before the thread counts as in the cell's code, so an
            # exception posted from then on finds it bound and closable.
            # ``in_code`` is a flag, not a counter: one store is one
            # bytecode, and an asynchronous exception lands only between
            # bytecodes, so it is never left half-updated.  No lock while
            # nobody cancels: the poster sets ``cancel_called`` before it
            # reads ``in_code`` (under the lock), and this side stores
            # ``in_code`` before it reads ``cancel_called``, so one of the
            # two always sees the other.
            coro = original(code_obj, result, async_=async_)
            try:
                try:
                    scope.in_code = True
                    if scope.cancel_called and not scope.finished:
                        # cancelled before (or between) top-level
                        # statements: do not start the next one
                        raise scope.raising()
                    return await coro
                finally:
                    scope.in_code = False
                    coro.close()  # no-op once awaited to the end
                    if scope.cancel_called:
                        with _lock:
                            pending = scope.async_exc_pending
                            scope.async_exc_pending = False
                        if pending:
                            # Posted but maybe not delivered yet (if it
                            # was, this is a no-op).  Let it land here
                            # rather than retract it: SetAsyncExc(NULL)
                            # leaves the eval breaker set for good on
                            # 3.10/3.11, slowing every later line and
                            # wedging signal handlers.
                            for _ in range(1000):
                                pass
            except CellCancelled as exc:
                # Posted to this thread while outside the user's code (in
                # this wrapper or run_code's preamble): report it as this
                # statement's error, as run_code itself would.
                with _lock:
                    scope.in_code = False
                    scope.async_exc_pending = False
                coro.close()
                sys.excepthook = excepthook
                if result is not None:
                    result.error_in_exec = exc
                shell.showtraceback((type(exc), exc, exc.__traceback__))
                return True

        return run_code

    def _showing_cancels(self, original: Callable) -> Callable:
        """``shell.showtraceback`` that shows a cancelled cell's stand-in
        exception (an ``await`` cell's ``CancelledError``, a
        ``KeyboardInterrupt``) as the ``CellCancelled`` the result will
        carry, rendered the light way, here and in the result IPython 9
        renders again for its history: its context traceback of a
        ``CancelledError`` took 20-35 ms per cancel, and 117 ms for the
        first in a process (3.12).  Very deep tracebacks are shortened first."""
        show = _bounded_showtraceback(original)
        shell = self.state.shell

        def showtraceback(exc_tuple=None, *args, **kwargs):
            try:
                error = exc_tuple[1] if exc_tuple else sys.exc_info()[1]
                if isinstance(error, (asyncio.CancelledError, KeyboardInterrupt)):
                    scope = current_scope()
                    if scope is not None and scope.manager is self and scope.cancel_called:
                        shown = self._stand_in(scope, error)
                        exc_tuple = (type(shown), shown, shown.__traceback__)
                        # the running cell's result too: IPython 9 renders
                        # its error again, for history, once the cell is over
                        result = getattr(shell.displayhook, "exec_result", None)
                        if result is not None and result.error_in_exec is error:
                            result.error_in_exec = shown
            except Exception:  # noqa: BLE001 - showing the error matters more
                pass
            return show(exc_tuple, *args, **kwargs)
        return showtraceback

    @staticmethod
    def _stand_in(scope: CancelScope, error: BaseException) -> CellCancelled:
        """The ``CellCancelled`` reported for ``error``, a cancelled cell's
        ``CancelledError`` or ``KeyboardInterrupt`` (made once: shown, then
        put in the result)."""
        shown = scope.stand_in
        if shown is None or shown.__cause__ is not error:
            shown = scope.exception()
            shown.__cause__ = error
            shown.__traceback__ = error.__traceback__
            scope.stand_in = shown
        return shown

    def _on_cell_timeout(self, change: dict) -> None:
        self._cell_timeout = change["new"]

    def detach(self) -> None:
        self.state.config.unobserve(self._on_cell_timeout, names="cell_timeout")
        # Running cells (e.g. the one running %unload_ext) are not cancelled;
        # their scopes are closed so no mechanism fires for them any more.
        with _lock:
            for scope in self._own_scopes():
                self._close_scope(scope)
        _SIGNAL.disarm_current_thread()
        self._patches.undo()
        if self._signal:
            _SIGNAL.release()
            self._signal = False
        if self._monitoring:
            _MONITORING.release()
            self._monitoring = False

    # per cell
    def before_cell(self, execution: Any) -> None:
        # Hot path (every cell).  No lock: only this thread pushes and pops
        # its own stack, list and dict operations are atomic, and cancel()
        # reads both under the lock and re-checks ``finished`` before arming.
        tid = _get_ident()
        stack = _thread_scopes.get(tid)
        if stack is None:  # this thread's first cell
            stack = _new_thread_stack(tid)
        parent = stack[-1] if stack else None
        scope = CancelScope(execution, tid, self, parent)
        stack.append(scope)
        if parent is not None and parent.cancel_called and not parent.finished:
            # the enclosing cell's cancel may have walked the stack before the push
            self.cancel(execution.id, parent.reason, kind=parent.kind)
        if execution.mode in ("async", "async-host"):  # executor.py's await routes
            self._bind_task(scope)
        if execution.options or self._cell_timeout:
            timeout = execution.options.get("timeout") or self._cell_timeout
            if timeout and timeout > 0:
                self._start_deadline(scope, timeout)

    @staticmethod
    def _bind_task(scope: CancelScope) -> None:
        # only the cell's own coroutine task may be cancelled: a sync cell
        # run from a host's coroutine (ipykernel) must not touch the host's task
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        scope.loop = loop
        scope.task = asyncio.current_task(loop)

    def _start_deadline(self, scope: CancelScope, timeout: float) -> None:
        scope.deadline = time.monotonic() + timeout
        if _HAS_MONITORING and self._monitoring and scope.task is None \
                and timeout >= WATCH_MIN_TIMEOUT:
            timers._TIMER.call_at(scope.deadline - WATCH_LEAD,
                                  lambda: self._watch(scope, timeout))
        else:
            timers._TIMER.call_at(scope.deadline, lambda: self._deadline(scope, timeout))

    def _watch(self, scope: CancelScope, timeout: float) -> None:
        """Arm the cell's delivery ``WATCH_LEAD`` before its deadline.

        At the deadline the cell's own next event then raises
        (``scope.due()``): no thread has to win the GIL back from a
        computing cell first, a hand-off of 0.5-0.9 ms that a deadline's
        answer otherwise waits for.  The timer still runs ``_deadline``: at
        the deadline for the main thread (its signal interrupts a blocking
        call), ``WATCH_FALLBACK`` later for a worker thread, whose cell the
        watch has stopped by then unless a C call or a ``finally`` holds it;
        and at the deadline whenever the watch did not arm.
        """
        if scope.finished:
            return
        armed = time.monotonic() < scope.deadline and \
            self._arm_watch(scope, f"cell exceeded its timeout of {timeout:g} s")
        late = armed and scope.thread_id != _MAIN_THREAD_ID
        timers._TIMER.call_at(scope.deadline + (WATCH_FALLBACK if late else 0.0),
                              lambda: self._deadline(scope, timeout))

    def _arm_watch(self, scope: CancelScope, reason: str) -> bool:
        """The arming of :meth:`_arm`, with no cancel yet (``watch_reason``
        says what the scope becomes at the deadline).  Not when a cancel or
        another scope is under way on that thread, in an engine-owned wait
        (its waker is set by the deadline's cancel), or in a runaway
        recursion (its unwinding needs the collector paused first)."""
        tid = scope.thread_id
        with _lock:
            stack = _thread_scopes.get(tid)
            if scope.finished or scope.cancel_called or not stack or stack[-1] is not scope \
                    or tid in _cancelled_threads or _thread_wakers.get(tid):
                return False
            # Set before ``finished`` is read again: after_cell sets
            # ``finished`` before it reads ``watch_reason``, so either it
            # closes the scope (under this lock, after us) or we see it done.
            scope.watch_reason = reason
            with _foreign_stack(tid) as frame:
                if scope.finished or frame is None or _deeper_than(frame, _VERDICT_WALK):
                    scope.watch_reason = None
                    return False
                scope.requested_at = scope.deadline  # the hard deadline's start
                _cancelled_threads[tid] = scope
                _monitor(scope, frame)
                del frame
        return True

    def after_cell(self, execution: Any, result: Any) -> None:
        # The cell's scope is on top of this thread's stack (inner cells
        # close before outer ones); anything else means before_cell did not
        # open one (it failed, or the extension loaded mid-cell).
        if result is not None and result.error_in_exec is not None:
            error = result.error_in_exec
            _shorten_tracebacks(error)  # before the error event formats it
            if _holds_deep_stack(error):
                # IPython has shown it; the error event's text is rendered
                # now (kept on the exception), then the runaway's frames go
                format_traceback(error, self.state.shell)
                _release_deep_stack(error)
        stack = _thread_scopes.get(_get_ident())
        scope = stack[-1] if stack else None
        if scope is None or scope.execution is not execution:
            scope = self._find(execution.id, prefer=stack)
            if scope is None:
                return
            stack = None  # not on top: _forget finds it
        scope.finished = True  # from now on cancel() misses it (checked under the lock)
        if not scope.cancel_called and scope.watch_reason is None:
            # Never cancelled nor watched, the common case: no lock.  A cancel
            # racing this sees ``finished`` and arms nothing here (``_arm``
            # passes it on to a cancelled enclosing scope); so does a watch.
            if stack is not None:
                stack.pop()
            else:
                self._forget(scope)
        else:
            with _lock:
                self._close_scope(scope)  # a watch that never fired is disarmed too
            if scope.cancel_called:
                _SIGNAL.disarm_current_thread()
                if scope.task_cancels and hasattr(scope.task, "uncancel"):
                    for _ in range(scope.task_cancels):
                        scope.task.uncancel()  # the cell absorbed them; the host's task goes on
                if result is not None:
                    self._report_as_cancelled(scope, result)
        # a cancelled outer cell stays cancelled after its inner cell ended
        parent = scope.parent
        if parent is not None and parent.cancel_called and not parent.finished:
            parent.manager._arm(parent, rearm=True)

    def scope_of(self, execution_id: str) -> CancelScope | None:
        """The open cancel scope of a running execution of this shell (for
        waits in threads the cell started, which a cancel does not wake)."""
        return self._find(execution_id, prefer=_thread_scopes.get(_get_ident()))

    def _own_scopes(self) -> list[CancelScope]:
        """This manager's open scopes, in every thread (caller holds ``_lock``)."""
        return [scope for stack in _thread_scopes.values() for scope in list(stack)
                if scope.manager is self]

    def _find(self, execution_id: str, prefer: list | None = None) -> CancelScope | None:
        """The open scope of ``execution_id``, looked up in ``prefer`` (a
        thread's stack, innermost first) before every thread's.  The stacks
        are the only registry: a cell costs one push and one pop."""
        with _lock:
            for scope in [*reversed(prefer or ()), *self._own_scopes()]:
                if scope.manager is self and scope.execution_id == execution_id \
                        and not scope.finished:
                    return scope
        return None

    @staticmethod
    def _forget(scope: CancelScope) -> None:
        """Drop a finished scope from its thread's stack.

        Only the scope's own thread (or the manager lock holder) calls this;
        the empty stack stays registered for the thread's next cell.
        """
        stack = _thread_scopes.get(scope.thread_id)
        if stack:
            if stack[-1] is scope:
                stack.pop()
            elif scope in stack:
                stack.remove(scope)

    def _close_scope(self, scope: CancelScope) -> None:
        """Mark ``scope`` finished and disarm it (caller holds ``_lock``)."""
        scope.finished = True
        if scope.gc_paused:
            _resume_gc(scope)
        self._forget(scope)
        if _cancelled_threads.get(scope.thread_id) is scope:
            del _cancelled_threads[scope.thread_id]
            # every wait of the cell has returned by now; on 3.10/3.11 an
            # asynchronous CellCancelled can land in a wait's cleanup and skip
            # its unregistering, which would leave the event for the next
            # thread with this id
            _thread_wakers.pop(scope.thread_id, None)
        if scope.armed_codes or scope.armed_global:
            _MONITORING.disarm(scope)

    def _report_as_cancelled(self, scope: CancelScope, result: Any) -> None:
        error = result.error_in_exec
        if isinstance(error, _AsyncCellCancelled):
            replacement = scope.exception()  # report the public type, not ours
            replacement.__traceback__ = error.__traceback__
            result.error_in_exec = replacement
        elif isinstance(error, CellCancelled):
            if scope.reason:
                error.args = (scope.reason,)
                error.reason = scope.reason
            error.kind = scope.kind
            error.execution_id = scope.execution_id
        elif isinstance(error, (asyncio.CancelledError, KeyboardInterrupt)):
            result.error_in_exec = self._stand_in(scope, error)

    # cancel requests
    def cancel(self, execution_id: str, reason: str = "cancelled", *,
               kind: str = "cancelled") -> bool:
        scope = self._find(execution_id)
        with _lock:
            if scope is None or scope.finished:
                return False
            if scope.cancel_called:
                return True  # already on its way; re-arming is the timer's job
            # nested scopes started by this cell are cancelled with it
            innermost = scope.mark_cancelled(reason, kind, time.monotonic())
        innermost.manager._arm(innermost)
        return True

    def _deadline(self, scope: CancelScope, timeout: float) -> None:
        if scope.finished:
            return
        if scope.watch_fired:
            # the watch cancelled it at the deadline, in the cell's thread:
            # what cancel() would add is the level-triggered re-arm
            self._rearm_later(scope)
            return
        self.cancel(scope.execution_id, f"cell exceeded its timeout of {timeout:g} s",
                    kind="timeout")

    def _arm(self, scope: CancelScope, rearm: bool = False) -> None:
        """Make the scope's thread raise at its next safe point."""
        with _lock:
            while scope.finished:
                # It ended as the cancel arrived: the cancelled scope it was
                # nested in (same request, or still cancelled) stops instead.
                scope = scope.parent
                if scope is None or not scope.cancel_called:
                    return
            handover = scope.manager is not self  # nested in another shell's cell
            if not handover:
                tid = scope.thread_id
                _cancelled_threads[tid] = scope
                scope.mechanism = "pending"
                for waker in _thread_wakers.get(tid, ()):
                    waker.set()  # engine-owned waits return now and raise
        if handover:
            scope.manager._arm(scope, rearm)
            return
        if not scope.deep:
            # a runaway recursion: its unwinding (after our raise, or after
            # the RecursionError that may win the race) runs without the
            # collector, until the cell ends (unwinding.py)
            with _foreign_stack(tid) as frame:
                deep = frame is not None and _deeper_than(frame, _VERDICT_WALK)
                del frame
            if deep:
                with _lock:
                    if not scope.finished:
                        scope.deep = True
                        _pause_gc(scope)
        config = self.state.config
        if tid == _MAIN_THREAD_ID and self._signal:
            if _HAS_MONITORING and self._monitoring:
                # 3.12+: the same events as in workers for Python code (they
                # raise exactly where a one-line loop sits in a try/with);
                # the signal only for blocking calls
                with _lock, _foreign_stack(tid) as frame:
                    if scope.finished:
                        return
                    _monitor(scope, frame)
            self._signal_main(scope, config.cancel_escalate_after)
        elif _HAS_MONITORING and self._monitoring:
            with _lock, _foreign_stack(tid) as frame:
                if scope.finished:
                    return
                if frame is not None:
                    _monitor(scope, frame)
        else:
            with _lock, _foreign_stack(tid) as frame:
                if scope.finished:
                    return
                scope.mechanism = "armed"
                # an async cell suspended in its loop (worker thread) is run
                # by the loop's machinery: the task cancel below stops it, an
                # exception posted now would land in the loop, not the cell
                # and one in IPython's traceback printing must not be cut
                # short there: posted only while the cell's code runs
                if scope.in_code and not scope.async_exc_pending and \
                        _innermost_cell_frames(frame):
                    scope.async_exc_pending = True
                    _post_async_exc(tid, _AsyncCellCancelled)
        # An async cell suspended in its loop: cancel its task from the loop.
        # Scheduled after the arming above, so the loop's "raised" is the
        # last word and never overwritten by "armed" (which would leave the
        # global events on, and a stack walk per call, while IPython formats
        # the traceback).
        if scope.loop is not None and scope.task is not None:
            try:
                scope.loop.call_soon_threadsafe(self._cancel_task, scope)
            except RuntimeError:
                pass  # loop closed: the cell is over
        self._rearm_later(scope)

    def _signal_main(self, scope: CancelScope, escalate_after: float) -> None:
        """Signal the main thread now, and again every ``escalate_after``
        seconds until the exception is raised.

        The first signal interrupts a blocking call at once (the handler
        raises there when the call is at a safe point); the later ones
        catch a cell that blocks after a deferral (a ``finally`` that then
        sleeps) and, before 3.12, one that no line event reaches.
        """
        _SIGNAL.send()
        interval = max(escalate_after, 0.0005)

        def escalate() -> None:
            if scope.finished or scope.mechanism == "raised":
                return
            if not scope.monitored:
                scope.mechanism = "escalate"
            _SIGNAL.send()
            timers._TIMER.call_at(time.monotonic() + interval, escalate)

        timers._TIMER.call_at(time.monotonic() + interval, escalate)

    def _rearm_later(self, scope: CancelScope) -> None:
        """Look at ``scope`` again ``cancel_grace`` seconds from now (the
        level-triggered re-arm below)."""
        timers._TIMER.call_at(time.monotonic() + max(self.state.config.cancel_grace, 0.05),
                              lambda: self._rearm_if_running(scope))

    def _rearm_if_running(self, scope: CancelScope) -> None:
        """Level-triggered cancellation: still running a grace period after
        the exception was raised means the cell swallowed it; cancel again.

        The asynchronous-exception mechanism cannot tell whether its
        exception was delivered, so it is simply posted again.
        """
        if scope.finished:
            return
        uses_async_exc = not _HAS_MONITORING and scope.thread_id != threading.main_thread().ident
        if (scope.mechanism == "raised" or uses_async_exc) \
                and not _cell_code_on_stack(scope.thread_id) \
                and not _cell_suspended_in(scope.task):
            # The exception left the cell's code; IPython is still wrapping up
            # (formatting a deep traceback can take a while): nothing to re-arm.
            self._rearm_later(scope)
        elif scope.mechanism == "raised" or uses_async_exc or (
                scope.monitored and not scope.armed_global
                and _cell_code_on_stack(scope.thread_id)):
            # (the last: armed before the cell's code started, and its start
            # slipped past the watch on run_code; the cell's code now runs
            # with no event armed in it, so arm again where it runs)
            with _lock:
                if scope.finished:
                    return
                if _HAS_MONITORING and _MONITORING.tool is not None:
                    _MONITORING.disarm(scope)
                scope.async_exc_pending = False
            self._arm(scope, rearm=True)
        else:  # not raised yet: no safe point reached, or blocked in C code
            self._rearm_later(scope)

    @staticmethod
    def _cancel_task(scope: CancelScope) -> None:
        """Runs in the loop's thread while the cell's task is suspended."""
        with _lock:
            if scope.finished or scope.task is None \
                    or scope.task.done():
                return
            scope.mechanism = "raised"
            scope.raised += 1
            scope.task_cancels += 1
            if scope.armed_codes or scope.armed_global:
                # the task machinery delivers it: events off, as in _mon_check
                _MONITORING.disarm(scope)
        scope.task.cancel(scope.reason)

    def status(self, execution_id: str) -> CancelReport:
        """Where the cancel of ``execution_id`` stands (module ``cancel_status``)."""
        scope = self._find(execution_id)
        if scope is None:
            return CancelReport(True, "delivered", "the execution has ended")
        if not scope.cancel_called:
            return CancelReport(True, "not-cancelled", "running, no cancel requested")
        if scope.raised:
            return CancelReport(True, "delivered", "the cell got its exception; IPython is "
                                                   "finishing it")
        age = time.monotonic() - scope.requested_at
        if scope.thread_id == _MAIN_THREAD_ID and self._signal and age > scope.hard_deadline:
            return CancelReport(True, "escalated", "no safe point for 2 s: the next one "
                                "raises even in a finally/__exit__")
        if scope.mechanism == "escalate":
            return CancelReport(True, "escalated", "the signal raises inside the blocking "
                                                   "call at its next safe point")
        detail = ""
        with _foreign_stack(scope.thread_id) as frame:
            verdict = _verdict(frame, scope) if frame is not None else OUTSIDE
            del frame
        if verdict == OUTSIDE:
            detail = "the cell's code is not running (IPython's own work before or after it)"
        elif verdict == DEFER:
            detail = "deferred: a finally, __exit__, with line, import or shield is running"
        elif age > 0.05 and scope.thread_id != _MAIN_THREAD_ID:
            detail = ("no Python line ran since the cancel: a C call blocks this worker "
                      "thread and cannot be interrupted; it raises when the call returns")
        return CancelReport(True, "pending", detail)

    def running(self) -> list[str]:
        """Ids of the executions of this shell that are running now."""
        with _lock:
            return [s.execution_id for s in self._own_scopes() if not s.finished]
