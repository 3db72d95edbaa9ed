"""Delivery in the main thread: a signal, and before 3.12 a lazy tracer.

``SIGUSR1`` is sent to the main thread at once and every ``escalate_after``
seconds while a cancel is pending; the handler raises inside a blocking
call at a safe point.  Before 3.12 the first signal also sets ``f_trace`` on
the innermost cell frames (``_local_tracer``) so the next line event
raises; from 3.12 ``monitoring.py`` delivers in Python code and the signal
only serves blocking calls.  Invariant: the handler never traces or raises
outside the cell's code, and untraces everything it traced before raising.
"""

from __future__ import annotations

import signal
import sys
import threading
from typing import Any

from .scope import CancelScope, _cancelled_threads, _get_ident, _lock
from .safepoints import (OUTSIDE, RAISE, _SELF_LOOP_HAS_NO_LINE_EVENTS, _VERDICT_WALK,
                         _handler_may_raise, _in_python, _innermost_cell_frames, _is_cell_code,
                         _is_root, _same_line_back_jumps, _verdict)
from .monitoring import _MONITORING

def _local_tracer(frame, event, arg):
    __tracebackhide__ = True
    if event == "line":
        scope = _cancelled_threads.get(_get_ident())
        if scope is None or scope.finished or scope.mechanism not in ("armed", "escalate"):
            frame.f_trace = None
            return None
        verdict = _verdict(frame, scope)
        if verdict == RAISE:
            # Untrace before raising: the unwinding and the cell's cleanup run
            # at full speed (a re-cancel after the grace period re-arms).
            _untrace(frame)
            _SIGNAL.disarm_current_thread()
            raise scope.raising()
        if verdict == OUTSIDE:
            # the cell's code has ended: IPython's work must not pay per line
            frame.f_trace = None
            _SIGNAL.disarm_current_thread()
            scope.mechanism = "escalate"  # the signal takes over, at no per-line cost
            return None
    return _local_tracer


def _untrace(frame) -> None:
    """Take ``_local_tracer`` off the frames it traces, innermost first: the
    frames it traces are the ones the cell's code called since the cancel,
    so ``_VERDICT_WALK`` frames are enough even in a runaway recursion."""
    f = frame
    for _ in range(_VERDICT_WALK):
        if f is None or _is_root(f.f_code):
            return
        if f.f_trace is _local_tracer:
            f.f_trace = None
        f = f.f_back


def _global_tracer(frame, event, arg):
    """Traces a new frame only when the cell's code called it (the caller is
    traced, or is ``run_code`` starting the cell): IPython's own calls (its
    traceback printing, inspect.getmodule...) are never traced per line."""
    caller = frame.f_back
    if caller is None:
        return None
    if caller.f_trace is _local_tracer or (_is_root(caller.f_code)
                                           and _is_cell_code(frame.f_code)):
        return _local_tracer
    return None


def _escalate(frame, scope: CancelScope) -> None:
    """Raise from the signal handler now if ``frame`` is at a safe point
    where a raise is attributed exactly; otherwise a later signal (or the
    line/instruction events) tries again."""
    __tracebackhide__ = True
    if scope.mechanism != "armed":
        scope.mechanism = "escalate"
    if scope.monitored and _in_python(frame):
        return  # Python code is running: the monitoring events deliver there
    if (_handler_may_raise(frame) or (
            _SELF_LOOP_HAS_NO_LINE_EVENTS
            and frame.f_lasti in _same_line_back_jumps(frame.f_code))) \
            and _verdict(frame, scope) == RAISE:
        if scope.armed_codes or scope.armed_global:
            with _lock:
                _MONITORING.disarm(scope)
        if _get_ident() in _SIGNAL.saved_trace:  # the lazy tracer (before 3.12)
            _untrace(frame)
            _SIGNAL.disarm_current_thread()
        raise scope.raising()


class _MainThreadSignal:
    """The process-wide signal handler; one per process, shared by all shells."""

    def __init__(self) -> None:
        self.signum = 0
        self.previous: Any = None
        self.users = 0
        self.saved_trace: dict[int, Any] = {}
        self.sent = 0  # signals we sent and the handler has not seen yet
        self.handling = False  # the handler is running (signals nest)

    def send(self) -> None:
        self.sent += 1
        signal.pthread_kill(threading.main_thread().ident, self.signum)

    def acquire(self, signum: int) -> bool:
        """Install the handler (main thread only); False if impossible here."""
        if self.users:
            self.users += 1
            return True
        if threading.current_thread() is not threading.main_thread():
            return False
        previous = signal.signal(signum, self._handle)
        # ours already (left by a release that ran off the main thread): never chain to itself
        self.previous = None if previous == self._handle else previous
        self.signum = signum
        self.users = 1
        return True

    def release(self) -> None:
        if not self.users:
            return
        self.users -= 1
        self.tidy()

    def tidy(self) -> None:
        """Put the previous handler back once nobody uses ours.

        Only the main thread can change signal handlers: when the last user
        unloads elsewhere (an engine session closed from a host thread), the
        handler stays (it chains every signal it did not send) until the main
        thread calls this or loads the extension again.
        """
        if self.users == 0 and self.signum and \
                threading.current_thread() is threading.main_thread():
            if signal.getsignal(self.signum) == self._handle:
                signal.signal(self.signum, self.previous if self.previous is not None
                              else signal.SIG_DFL)
            self.previous = None

    def _handle(self, signum, frame) -> None:
        __tracebackhide__ = True
        if self.sent > 0 and (self.handling or frame is None):
            # A signal that arrives while the handler runs (a stack walk of
            # a deep recursion takes longer than the re-send interval) would
            # start another handler inside it, and so on: the next re-send
            # tries again.
            self.sent = 0  # (pending signals coalesce: see _handle_ours)
            return
        self.handling = True
        try:
            return self._handle_ours(signum, frame)
        finally:
            self.handling = False

    def _handle_ours(self, signum, frame) -> None:
        __tracebackhide__ = True
        if self.sent <= 0:
            previous = self.previous
            if callable(previous):  # not ours: chain to the handler we replaced
                previous(signum, frame)
            return
        # Every signal we sent before this call is delivered by it: a pending
        # signal is not queued twice (the OS and Python's own C handler both
        # coalesce).  Counting down by one left the count behind after each
        # coalesced burst, and that many foreign signals were then taken for
        # ours and never chained (tests/test_documented_promises.py).
        self.sent = 0
        scope = _cancelled_threads.get(threading.main_thread().ident)
        if scope is None or scope.finished or scope.mechanism == "raised":
            return  # stale: that cell ended or already got its exception
        if scope.mechanism != "pending" or scope.monitored:
            # monitoring armed (3.12+) or escalation: raise here only where
            # the raise lands exactly (a blocking call, a call's return)
            return _escalate(frame, scope)
        # first delivery, before 3.12: arm line tracing on the cell's frames, lazily
        if sys.gettrace() is not None and sys.gettrace() is not _global_tracer:
            # a debugger or coverage owns settrace: leave it alone and rely
            # on escalation (raise from this handler at a safe point)
            return _escalate(frame, scope)
        frames = _innermost_cell_frames(frame)
        if not frames:
            # Not in the cell's code now (an async cell suspended in its loop,
            # IPython's own machinery): tracing from here would slow that
            # down. The task cancel and escalation handle it.
            return
        if _SELF_LOOP_HAS_NO_LINE_EVENTS and frame.f_lasti in _same_line_back_jumps(frame.f_code):
            # 3.11 ``while True: pass``: no line event will ever come
            return _escalate(frame, scope)
        # Only the innermost frames: an outer frame runs a line again only
        # after its callee returned, and a traced frame's callees are traced
        # (``_global_tracer``); escalation covers an untraced outer loop.
        for f in frames[:64]:
            f.f_trace = _local_tracer
        scope.mechanism = "armed"
        self.saved_trace.setdefault(_get_ident(), sys.gettrace())
        sys.settrace(_global_tracer)  # last: nothing after this may be traced

    def disarm_current_thread(self) -> None:
        tid = _get_ident()
        if tid in self.saved_trace:
            previous = self.saved_trace.pop(tid)
            if sys.gettrace() is _global_tracer:
                sys.settrace(previous)


_SIGNAL = _MainThreadSignal()
