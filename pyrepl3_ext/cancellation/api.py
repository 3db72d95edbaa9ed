"""The public functions: cancel an execution, ask how a cancel went,
shield a block, and the waits a cancel wakes at once.

These are what hosts, the engine and cells call; each one looks the target
up through the shell's ``CancellationManager`` (``manager.py``).
"""

from __future__ import annotations

import contextlib
import threading
import time
from typing import Any, Iterator, TYPE_CHECKING

from ..extension import get_state
from .scope import (CancelScope, _MAIN_THREAD_ID, _cancelled_threads, _get_ident, _lock,
                    _shield_depth, _thread_scopes, _thread_wakers)
from .monitoring import _MONITORING
from .main_thread import _SIGNAL

if TYPE_CHECKING:
    from .manager import CancellationManager

# -- public API ---------------------------------------------------------------

def _manager_of(shell: Any) -> "CancellationManager":
    state = get_state(shell)
    manager = getattr(state, "cancellation", None) if state is not None else None
    if manager is None:
        raise RuntimeError("pyrepl3_ext is not loaded in this shell")
    return manager


def cancel(shell: Any, execution_id: str, reason: str = "cancelled", *,
           report: bool = False, wait: float = 0.0) -> "bool | CancelReport":
    """Cancel the running execution ``execution_id`` of ``shell``, from any thread.

    Returns True when it hit a running execution (the cell will raise
    ``CellCancelled`` at its next safe point), False when no such execution
    is running (finished already, or never existed).  With ``report=True``
    it returns a :class:`CancelReport` instead (true when it hit), saying
    whether the exception was delivered, is pending or was escalated, after
    waiting up to ``wait`` seconds for the delivery.
    """
    manager = _manager_of(shell)
    hit = manager.cancel(execution_id, reason)
    if not report:
        return hit
    if not hit:
        return CancelReport(False, "not-running", "no such execution is running")
    deadline = time.monotonic() + max(wait, 0.0)
    while True:
        status = manager.status(execution_id)
        if status.state != "pending" or time.monotonic() >= deadline:
            return status
        time.sleep(0.001)


def cancel_status(shell: Any, execution_id: str) -> "CancelReport":
    """Where the cancel of ``execution_id`` stands (see :class:`CancelReport`)."""
    return _manager_of(shell).status(execution_id)


class CancelReport:
    """The honest answer to a cancel: true when it hit a running execution.

    ``state``: ``delivered`` (the cell got its exception, or ended),
    ``pending`` (armed, waiting for the cell's next safe point; ``detail``
    says why when it is known: blocked in a C call in a worker thread,
    deferred in a ``finally``, the cell's code not running), ``escalated``
    (the main thread's signal raises from inside a blocking call, or the hard
    deadline let the raise cut a cleanup short), ``not-running``.
    """

    __slots__ = ("hit", "state", "detail")

    def __init__(self, hit: bool, state: str, detail: str = ""):
        self.hit = hit
        self.state = state
        self.detail = detail

    def __bool__(self) -> bool:
        return self.hit

    def as_dict(self) -> dict:
        return {"cancelled": self.hit, "state": self.state, "detail": self.detail}

    def __repr__(self) -> str:
        return f"<CancelReport {self.state}{': ' + self.detail if self.detail else ''}>"


@contextlib.contextmanager
def shield() -> Iterator[None]:
    """Defer cancellation of the calling thread's cell until the block ends.

    For critical sections that must not be cut in half (the engine's own
    bookkeeping, a host-marked block).  The hard deadline does not apply.
    """
    _shield_depth.n = getattr(_shield_depth, "n", 0) + 1
    try:
        yield
    finally:
        _shield_depth.n -= 1


def current_scope() -> CancelScope | None:
    """The innermost running scope of the calling thread, if any."""
    stack = _thread_scopes.get(_get_ident())
    return stack[-1] if stack else None


def _cancelled_scope_here() -> CancelScope | None:
    return _cancelled_threads.get(_get_ident())


def check_cancelled() -> None:
    """Raise ``CellCancelled`` now if the calling thread's cell was cancelled."""
    __tracebackhide__ = True  # IPython hides this frame in tracebacks
    scope = _cancelled_threads.get(_get_ident())
    if scope is not None and not scope.finished and scope.due():
        _disarm_for_delivery(scope)
        raise scope.raising()


def _disarm_for_delivery(scope: CancelScope) -> None:
    """Switch the scope's mechanism off as its exception is raised in its
    own thread by a wait the engine owns: the exception unwinds and IPython
    prints it at full speed, with nothing of ours called per line or call."""
    if scope.armed_codes or scope.armed_global:
        with _lock:
            _MONITORING.disarm(scope)
    if scope.thread_id == _MAIN_THREAD_ID:
        _SIGNAL.disarm_current_thread()
        # (f_trace of the frames the handler traced stays set; the global
        # tracer is gone, so those frames cost nothing once they return)


def interruptible_wait(event: threading.Event, timeout: float | None = None) -> bool:
    """``event.wait(timeout)`` that raises ``CellCancelled`` as soon as the
    calling thread's cell is cancelled (or times out), in any thread.

    Waits the engine owns (``input()`` over the API, its sleeps) use this.
    A cancel wakes the wait by *setting* ``event``, so pass an event that
    only this wait uses.  Returns whether the event was set (by its owner).
    """
    tid = _get_ident()
    with _lock:  # registered before the check: a cancel from now on wakes us
        _thread_wakers.setdefault(tid, set()).add(event)
    try:
        check_cancelled()
        got = event.wait(timeout)
        check_cancelled()
        return got
    finally:
        with _lock:
            wakers = _thread_wakers.get(tid)
            if wakers is not None:
                wakers.discard(event)
                if not wakers:
                    del _thread_wakers[tid]


def interruptible_sleep(seconds: float) -> None:
    """``time.sleep`` that a cancel interrupts, in any thread."""
    interruptible_wait(threading.Event(), seconds)
