"""After the raise: what a very deep cancelled stack costs, kept bounded.

The cyclic collector is paused while a runaway recursion unwinds, and a
traceback deeper than ``_TB_HEAD + _TB_TAIL`` frames loses its middle before
IPython formats it.
"""

from __future__ import annotations

import gc
import sys
import threading
from typing import Callable, Iterator, TYPE_CHECKING


if TYPE_CHECKING:
    from .scope import CancelScope

# -- the collector while a runaway recursion unwinds ----------------------------
#
# Unwinding a cancelled recursion 10^5-10^6 frames deep allocates a frame
# object and a traceback entry per frame; the cyclic collector, triggered by
# those allocations, traverses the whole (growing) heap again and again: 11
# full collections and 2 s for one cancel on 3.11.  So from the raise in
# such a stack until its cell ends, the collector is paused.  Pauses nest
# (several shells, several threads); the last one switches it back on, and
# only if a pause switched it off.  A cell that swallows the cancel and runs
# on keeps it paused until it ends (documented in docs/cancellation.md).
# The same holds keep it off, briefly, while the canceller walks another
# thread's stack (scope._foreign_stack says why).

_gc_lock = threading.Lock()
_gc_pauses = 0
_gc_disabled_by_us = False


def _hold_gc() -> None:
    """Pause the cyclic collector until the matching :func:`_release_gc`.

    Holds nest across threads: the collector comes back on with the last
    release, and only if a hold switched it off (a host that disabled it
    keeps it disabled).
    """
    with _gc_lock:
        _hold()


def _release_gc() -> None:
    with _gc_lock:
        _release()


def _hold() -> None:  # under _gc_lock
    global _gc_pauses, _gc_disabled_by_us
    _gc_pauses += 1
    if _gc_pauses == 1 and gc.isenabled():
        gc.disable()
        _gc_disabled_by_us = True


def _release() -> None:  # under _gc_lock
    global _gc_pauses, _gc_disabled_by_us
    _gc_pauses -= 1
    if _gc_pauses == 0 and _gc_disabled_by_us:
        _gc_disabled_by_us = False
        gc.enable()


def _deeper_than(frame, depth: int) -> bool:
    f = frame
    for _ in range(depth):
        if f is None:
            return False
        f = f.f_back
    return f is not None


def _pause_gc(scope: CancelScope) -> None:
    """One hold for ``scope`` (at most one), released when it closes."""
    with _gc_lock:
        if scope.gc_paused:
            return
        scope.gc_paused = True
        _hold()


def _resume_gc(scope: CancelScope) -> None:
    with _gc_lock:
        if not scope.gc_paused:
            return
        scope.gc_paused = False
        _release()


# -- deep tracebacks -----------------------------------------------------------

#: Frames kept at each end of a traceback deeper than their sum.  IPython
#: formats a traceback at about 0.1 ms per frame and more (``inspect.getmodule``
#: per frame): a cancel or a RecursionError 100,000 frames deep (after
#: ``sys.setrecursionlimit(10**6)``) would take minutes to print, and the
#: cell ends only after that.
_TB_HEAD, _TB_TAIL = 20, 80
#: A traceback deeper than this gives up its innermost entries once its cell
#: has reported it (:func:`_release_deep_stack`).
_TB_RELEASE = 10_000


def _chain(error: BaseException | None) -> Iterator[BaseException]:
    """``error`` and the exceptions it chains (cause, else context), at most 8."""
    for _ in range(8):
        if error is None:
            return
        yield error
        error = error.__cause__ or error.__context__


def _shorten_tracebacks(error: BaseException) -> None:
    """Cut the middle out of ``error``'s traceback (and of the exceptions it
    chains) when deeper than ``_TB_HEAD + _TB_TAIL`` frames, with a note."""
    for error in _chain(error):
        tb = error.__traceback__
        depth = 0
        t = tb
        while t is not None:
            depth += 1
            t = t.tb_next
        if depth > _TB_HEAD + _TB_TAIL:
            head = tb
            for _ in range(_TB_HEAD - 1):
                head = head.tb_next
            tail = head
            for _ in range(depth - _TB_HEAD - _TB_TAIL + 1):
                tail = tail.tb_next
            head.tb_next = tail
            note = (f"[pyrepl3: {depth - _TB_HEAD - _TB_TAIL:,} of {depth:,} frames "
                    f"left out of this traceback]")
            if hasattr(error, "add_note"):
                error.add_note(note)
            if depth > _TB_RELEASE:
                try:
                    error.__dict__["_pyrepl3_release"] = depth
                except AttributeError:  # no __dict__: its stack stays held
                    pass


def _holds_deep_stack(error: BaseException) -> bool:
    """Whether ``error`` (or one it chains) is marked for :func:`_release_deep_stack`."""
    return any("_pyrepl3_release" in getattr(e, "__dict__", {}) for e in _chain(error))


def _release_deep_stack(error: BaseException) -> None:
    """Let the stack of a runaway recursion go once its cell reported it.

    Each frame holds its caller (``f_back``), so the innermost entries a
    shortened traceback keeps hold every frame of the recursion for as long
    as the exception lives, and IPython keeps the last one
    (``sys.last_traceback``, for ``%debug``): 690,000 frames after a cancel
    50 ms into ``def r(): return r()`` with a raised limit, hundreds of MB,
    and every later full collection of the process took 0.1-0.3 s (a cancel
    of a blocking call in the next cells took up to 0.9 s instead of 2 ms).
    So the traceback keeps only its outer entries, which hold nothing
    inward; what was shown and reported is unchanged (rendered already).
    """
    for error in _chain(error):
        depth = getattr(error, "__dict__", {}).pop("_pyrepl3_release", None)
        if depth is not None:
            last = error.__traceback__
            for _ in range(_TB_HEAD - 1):
                if last is None:
                    break
                last = last.tb_next
            if last is not None and last.tb_next is not None:
                last.tb_next = None
                if hasattr(error, "add_note"):
                    error.add_note(f"[pyrepl3: the innermost {_TB_TAIL} frames were dropped "
                                   f"once shown, to free the {depth:,}-frame stack they held]")


def _bounded_showtraceback(original: Callable) -> Callable:
    """``shell.showtraceback`` that shortens a very deep traceback first."""
    def showtraceback(exc_tuple=None, *args, **kwargs):
        try:
            exc = exc_tuple[1] if exc_tuple else sys.exc_info()[1]
            if isinstance(exc, BaseException):
                _shorten_tracebacks(exc)
        except Exception:  # noqa: BLE001 - printing the error matters more
            pass
        return original(exc_tuple, *args, **kwargs)
    return showtraceback
