"""Cooperative cancellation of running cells: by id, from any thread, or by deadline.

The model is trio's cancel scope, reduced to what a cell needs:

* Every execution runs inside its own :class:`CancelScope` (a new object
  per cell, never reused) carrying its ``execution_id`` and an optional
  deadline.  Scopes
  nest per thread (a cell that runs a cell); cancelling a scope cancels the
  scopes nested in it.
* ``cancel(shell, execution_id, reason)`` marks the scope and arms a
  mechanism that makes the cell's thread raise :class:`CellCancelled` (or
  :class:`CellTimeout`) at its next *safe point*.  It returns whether it
  hit a running execution.
* Cancellation is level-triggered: a cell that catches the exception and
  carries on is cancelled again after ``c.PyREPL3.cancel_grace`` seconds.
* :func:`shield` marks a block (the engine's bookkeeping, a host's critical
  section) where cancellation is deferred until the block ends.

Invariants (each has a test):

1. Nothing is installed while nobody cancels: no tracer, no monitoring
   events, no thread.  A signal handler (main thread) and, on 3.12+, a
   ``sys.monitoring`` tool with zero events are registered at load; both
   cost nothing measurable (``bench/bench_cancel.py``).
2. A cancel aimed at execution N never lands in N+1: every mechanism looks
   the target up again in the target thread (the same scope object, still
   running) before raising, and the scope is closed under the manager
   lock before anything is disarmed.
3. The exception is raised only in frames that run the cell's code (above
   IPython's ``run_code``), never in IPython's or pyrepl3's own frames, and
   not while a frame is in a ``finally:`` body, on a ``try:`` line, in an
   ``__enter__``/``__exit__`` (or their async forms), or in the import
   system, unless the hard deadline (``HARD_DEADLINE`` after the cancel)
   passed.
4. After a cell ends (or the extension unloads) no tracer or monitoring
   event of ours stays installed, and the previous ``sys.settrace`` function
   (a debugger, coverage) is back.

Mechanisms, chosen per thread and Python version (numbers in
``docs/cancellation.md``):

* Python 3.12+, every thread: ``sys.monitoring`` LINE/JUMP events on the
  code objects running the cell's code, PY_START/PY_RESUME (O(1) for code
  the cell did not call) and a LINE watch on ``run_code``; nothing but that
  watch while the cell's code is not running (IPython printing a
  traceback).  A JUMP event never raises (CPython attributes that raise to
  the instruction before the jump's target, outside a ``try``/``with`` that
  starts there): a one-line loop gets INSTRUCTION events and raises at the
  jump itself.  The callback raises only in the target thread.
* main thread: ``signal.pthread_kill`` of ``SIGUSR1`` at once and every
  ``escalate_after`` seconds while pending; the handler raises inside a
  blocking call (``sleep``, ``queue.get``, ``input()``, a ``with``'s
  ``__enter__``...) at a safe point.  Before 3.12 the first handler also
  sets ``f_trace`` on the innermost cell frames and ``sys.settrace`` so the
  next line event raises; 3.11's one-line loop (no line event ever) is
  raised from the handler.
* worker threads, Python 3.10/3.11: ``PyThreadState_SetAsyncExc`` while the
  cell is inside ``run_code``; it cannot honour safe points (documented).
* async cells waiting in the event loop: the cell's task is cancelled from
  the loop (``call_soon_threadsafe``) and the ``CancelledError`` is reported
  as the cell's ``CellCancelled``.
* waits the engine owns use :func:`interruptible_wait`; a cancel sets the
  event they block on, so they wake at once in any thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import dis
import gc
import heapq
import io
import itertools
import linecache
import os
import signal
import sys
import threading
import time
import tokenize
from typing import Any, Callable, Iterator

from .errors import CellCancelled, CellTimeout
from .extension import Component, InstancePatches, get_state

#: Seconds after the first cancel request when safe points stop deferring.
HARD_DEADLINE = 2.0
#: ``sys.monitoring`` tool ids we try, in order (0-2 are used by debuggers,
#: coverage and profilers by convention).
_MONITORING_TOOL_IDS = (4, 3, 5)
_HAS_MONITORING = sys.version_info >= (3, 12)
_PKG_DIR = os.path.dirname(os.path.abspath(__file__))
_UNSAFE_MODULE_PARTS = ("importlib/_bootstrap",)
_UNSAFE_FUNCTIONS = ("__enter__", "__exit__", "__aenter__", "__aexit__")

# The one lock of the mechanism.  It is a C-level lock (never a Python-level
# wrapper such as Condition) because the target thread takes it while an
# asynchronous exception may be pending for it.
_lock = threading.Lock()
_get_ident = threading.get_ident
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
    _frames_lock = threading.RLock()

    def _thread_frames() -> dict:
        """``sys._current_frames()`` with the cyclic collector off.

        On 3.10/3.11 it holds the runtime's thread-list lock while it
        allocates frame objects; a collection started by one of those
        allocations can run code that needs that lock or the GIL, and the
        process deadlocks (CPython gh-106883, not fixed before 3.12; seen
        here in CI as a thread starting while another ran its first cell).
        Our callers take turns so that one's ``gc.enable()`` never lands in
        another's call.
        """
        with _frames_lock:
            enabled = gc.isenabled()
            if enabled:
                gc.disable()
            try:
                return sys._current_frames()
            finally:
                if enabled:
                    gc.enable()


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
        return self.exception()

    def exception(self) -> CellCancelled:
        if self.kind == "timeout":
            return CellTimeout(self.reason, execution_id=self.execution_id)
        return CellCancelled(self.reason, kind=self.kind, execution_id=self.execution_id)

    def __repr__(self) -> str:
        state = "finished" if self.finished else ("cancelled" if self.cancel_called else "running")
        return f"<CancelScope {self.execution_id!r} {state}>"


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
    if scope is not None and not scope.finished:
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


# -- safe points --------------------------------------------------------------

_unsafe_lines_cache: dict[str, frozenset[int]] = {}


def _unsafe_lines(filename: str) -> frozenset[int]:
    """Lines of ``filename`` where a raise could cut cleanup short.

    ``try:`` lines (their NOP is outside the protected range), ``with``
    header lines (entering and the normal-path ``__exit__`` call run outside
    the protected range), the statement just before a ``try:`` (a resource taken there is not protected yet:
    ``threading.Condition.wait``), and every line of a ``finally:`` clause.
    Computed once per file from linecache (IPython registers cell sources
    there).

    Found with :mod:`tokenize`, not :mod:`ast`: this runs inside signal
    handlers, trace and monitoring callbacks, which can fire in the middle of
    an ``ast.parse`` (a finalizer run by the GC during AST conversion), and
    the AST converter is not reentrant (3.11 raises "AST constructor
    recursion depth mismatch" in the interrupted parse).
    """
    cached = _unsafe_lines_cache.get(filename)
    if cached is not None:
        return cached
    lines: set[int] = set()
    depth = 0             # indentation level
    line_start = True     # the next token starts a logical line
    # the logical line before the current one at this depth: (first, last, depth)
    previous = (0, 0, -1)
    current = (0, 0, 0)
    clause = None         # an open ``finally`` clause: [first line, header state, body level]
    with_line = 0         # first line of an open ``with`` header
    after_async = False
    last_line = 0
    source = "".join(linecache.getlines(filename))
    try:
        for tok in tokenize.generate_tokens(io.StringIO(source).readline):
            kind = tok.type
            if kind in (tokenize.NL, tokenize.COMMENT):
                continue
            if kind == tokenize.INDENT:
                depth += 1
                if clause is not None and clause[1] == "newline":
                    clause[1], clause[2] = "body", depth
                continue
            if kind == tokenize.DEDENT:
                depth -= 1
                if clause is not None and clause[1] == "body" and depth < clause[2]:
                    lines.update(range(clause[0], last_line + 1))
                    clause = None
                continue
            if kind == tokenize.NEWLINE:
                line_start = True
                previous = (current[0], tok.start[0], current[2])
                if with_line:
                    # ``with`` header lines: their instructions enter the
                    # context before the protected range starts, and after
                    # the body call ``__exit__`` outside it (the body's end
                    # emits a line event back on the header)
                    lines.update(range(with_line, tok.start[0] + 1))
                    with_line = 0
                if clause is not None and clause[1] in ("header", "colon"):
                    clause[1] = "newline"  # an indented body follows
                elif clause is not None and clause[1] == "inline":
                    lines.add(clause[0])   # ``finally: stmt`` on one line
                    clause = None
                continue
            if line_start:
                current = (tok.start[0], tok.start[0], depth)
            if line_start and kind == tokenize.NAME:
                if tok.string == "try":
                    lines.add(tok.start[0])
                    if previous[2] == depth:
                        # the statement just before ``try:`` runs after the
                        # resource was taken and before anything releases it
                        # (threading.Condition.wait: ``_release_save()``,
                        # ``gotit = False``, ``try:``)
                        lines.update(range(previous[0], tok.start[0]))
                elif tok.string == "finally" and clause is None:
                    clause = [tok.start[0], "header", None]
                elif tok.string == "with":
                    with_line = tok.start[0]
                elif tok.string == "async":
                    after_async = True
                    last_line = tok.end[0]
                    continue  # ``async with``: the next token still starts the statement
            elif after_async and kind == tokenize.NAME and tok.string == "with":
                with_line = tok.start[0]
            elif clause is not None and clause[1] == "header" and tok.string == ":":
                clause[1] = "colon"
            elif clause is not None and clause[1] == "colon":
                clause[1] = "inline"
            line_start = False
            after_async = False
            last_line = tok.end[0]
    except (tokenize.TokenError, SyntaxError):
        pass  # incomplete source: what was found so far
    if clause is not None:  # the source ended inside a finally clause
        lines.update(range(clause[0], last_line + 1))
    result = frozenset(lines)
    _unsafe_lines_cache[filename] = result
    return result


_RUN_CODE_CODES: set = set()
#: ids of the codes in ``_RUN_CODE_CODES``: code objects hash their whole
#: contents on every lookup, and these lookups run per frame and per call
_RUN_CODE_IDS: set = set()


#: (code, line) of the lines of ``run_code`` that start the cell's code
#: (``exec(code_obj, ...)``/``await eval(code_obj, ...)``); empty: any line
_CELL_START_LINES: set = set()


def _register_root(code) -> None:
    """Record ``run_code``'s code object and the lines that run the cell."""
    if code in _RUN_CODE_CODES:
        return
    _RUN_CODE_CODES.add(code)
    _RUN_CODE_IDS.add(id(code))
    lines = linecache.getlines(code.co_filename)
    for _, _, line in code.co_lines():
        if line and line <= len(lines):
            text = lines[line - 1]
            if "code_obj" in text and ("exec(" in text or "eval(" in text):
                _CELL_START_LINES.add((id(code), line))


def _is_root(code) -> bool:
    return id(code) in _RUN_CODE_IDS


def _is_cell_code(code) -> bool:
    """Whether ``code`` (run by ``run_code``) is a cell's own code: compiled
    from the cell, it is module-level code.  Anything else ``run_code``
    calls (``showtraceback``, a custom exception handler) is not."""
    return code.co_name == "<module>"


#: What a raise attempt finds (``_verdict``).  OUTSIDE is not DEFER: outside
#: the cell's code (IPython's preamble, its traceback printing, its wrap-up)
#: no instrumentation of ours may stay on, or that code pays per line.
RAISE, DEFER, OUTSIDE = 0, 1, 2

# per code object: (kind, offsets of instructions on unsafe lines)
_PLAIN, _OWN, _UNSAFE_FUNCTION, _BOOTSTRAP = 0, 1, 2, 3
_code_info_cache: dict = {}


def _code_info(code) -> tuple:
    """``(kind, unsafe offsets, code)`` of ``code``, computed once per code object.

    Offsets, not lines: ``f_lasti`` is a plain read where ``f_lineno``
    searches the line table, and the 900- or 100,000-frame walk of a deep
    recursion pays it per frame.
    """
    entry = _code_info_cache.get(id(code))
    if entry is not None and entry[2] is code:
        return entry
    filename = code.co_filename
    if filename.startswith(_PKG_DIR):
        kind = _OWN
    elif code.co_name in _UNSAFE_FUNCTIONS:
        kind = _UNSAFE_FUNCTION
    elif any(part in filename for part in _UNSAFE_MODULE_PARTS):
        kind = _BOOTSTRAP
    else:
        kind = _PLAIN
    offsets: frozenset = frozenset()
    if kind in (_PLAIN, _BOOTSTRAP):
        unsafe = _unsafe_lines(filename)
        if unsafe:
            offsets = frozenset(off for start, end, line in code.co_lines()
                                if line in unsafe for off in range(start, end, 2))
    # keyed by id (a code object hashes its whole contents on every lookup),
    # holding the code so that id is not reused while cached
    info = (kind, offsets, code)
    if len(_code_info_cache) > 20_000:  # cells come and go: bounded, rebuilt on demand
        _code_info_cache.clear()
    _code_info_cache[id(code)] = info
    return info


def _verdict(frame, scope: CancelScope) -> int:
    """May the target thread raise now, with ``frame`` its innermost frame?

    OUTSIDE when the cell's code is not running (no ``run_code`` on the
    stack, or what ``run_code`` runs is not the cell); DEFER when a frame
    between here and the cell is pyrepl3's, in ``__enter__``/``__exit__``,
    on a ``try:``/``with`` line or in a ``finally:`` body (an outer frame in
    one would have its cleanup cut short too), or innermost in the import
    system; RAISE otherwise, and after the hard deadline.  One walk of the
    stack, O(depth) with a dict lookup per frame.
    """
    if getattr(_shield_depth, "n", 0):
        return DEFER
    if frame.f_code.co_filename.startswith(_PKG_DIR):
        # pyrepl3's own code (a signal that arrived during a callback's
        # walk): O(1), not another walk of a deep stack
        return DEFER
    cached = _code_info_cache.get(id(frame.f_code))
    if cached is not None and cached[2] is frame.f_code and cached[1] \
            and frame.f_lasti in cached[1] and not _entering(frame) \
            and time.monotonic() - scope.requested_at <= HARD_DEADLINE:
        # the innermost frame alone says no, and was seen before: a loop in
        # a ``finally`` pays no stack walk per line
        return DEFER
    # First pass, identities only: is the cell's code running at all?  No
    # per-file analysis happens for IPython's own frames (tokenizing
    # interactiveshell.py takes ~100 ms), and none on a stack that is not
    # the cell's.  A runaway recursion can be 10^5-10^6 frames deep: no list.
    roots = _RUN_CODE_IDS
    last = None
    f = frame
    while f is not None:
        if id(f.f_code) in roots:
            break
        last = f
        f = f.f_back
    else:
        return OUTSIDE
    if last is None or not _is_cell_code(last.f_code):
        # run_code itself (its start), or IPython's work inside it (printing
        # the traceback of the exception that just left the cell's code)
        return OUTSIDE
    late = time.monotonic() - scope.requested_at > HARD_DEADLINE
    kind, offsets, _ = _code_info(frame.f_code)
    if kind == _OWN:
        return DEFER  # never in pyrepl3's own frames, not even late
    entering = bool(offsets) and frame.f_lasti in offsets and _entering(frame)
    if not late and (kind == _UNSAFE_FUNCTION or kind == _BOOTSTRAP
                     or (offsets and frame.f_lasti in offsets and not entering)):
        return DEFER  # the innermost frame alone says no
    # Second pass: an outer frame in a finally/with/__exit__ would have its
    # cleanup cut short too
    info_of = _code_info_cache.get
    f = frame.f_back
    while f is not None:
        code = f.f_code
        key = id(code)
        if key in roots:
            break
        info = info_of(key)
        if info is None or info[2] is not code:
            info = _code_info(code)
        if info[0] == _OWN:
            return DEFER
        if not late and (info[0] == _UNSAFE_FUNCTION or (info[1] and f.f_lasti in info[1])):
            return DEFER
        f = f.f_back
    return RAISE


def _safe_to_raise(frame, scope: CancelScope) -> bool:
    return _verdict(frame, scope) == RAISE


def _cell_code_on_stack(thread_id: int) -> bool:
    """Whether the thread is inside a cell's code: ``run_code`` is on its
    stack and what it runs is the cell (not the traceback printing)."""
    f = _thread_frames().get(thread_id)
    above = None
    while f is not None:
        if _is_root(f.f_code):
            return above is not None and _is_cell_code(above.f_code)
        above = f
        f = f.f_back
    return False


def _cell_suspended_in(task: "asyncio.Task | None") -> bool:
    """Whether ``task`` is suspended inside a cell's code: an async cell
    that caught the ``CancelledError`` and awaits again (its thread's stack
    then shows only the event loop, as it does once the cell is over)."""
    if task is None or task.done():
        return False
    coro = task.get_coro()
    after_root = False
    while coro is not None:
        code = getattr(coro, "cr_code", None) or getattr(coro, "gi_code", None)
        if after_root:
            return code is not None and _is_cell_code(code)
        after_root = code is not None and _is_root(code)
        coro = getattr(coro, "cr_await", None) or getattr(coro, "gi_yieldfrom", None)
    return False


def _cell_frames(frame) -> list:
    """The frames running the cell's code, innermost first (pyrepl3's own
    left out), or ``[]`` when the thread is not inside the cell's code (the
    cell has not started, or IPython is printing its traceback)."""
    frames = []
    f = frame
    last = None
    while f is not None and not _is_root(f.f_code):
        last = f
        if _code_info(f.f_code)[0] != _OWN:
            frames.append(f)
        f = f.f_back
    if f is None or last is None or not _is_cell_code(last.f_code):
        return []
    return frames


_frames_above_root = _cell_frames  # the name older callers (and tests) use

#: How far the canceller walks the target's stack to arm it.  A stack
#: 100,000 frames deep (a runaway recursion) would take the canceller a
#: second to walk while the target thread competes for the GIL; the
#: innermost frames are where the next event comes from, and the first
#: verdict in the target thread (one full walk) settles the rest.
_ARM_WALK = 256


def _innermost_cell_frames(frame) -> list:
    """``_cell_frames`` for at most ``_ARM_WALK`` frames: when ``run_code``
    is not found that near, the thread is taken to be in the cell's code."""
    frames = []
    f = frame
    last = None
    for _ in range(_ARM_WALK):
        if f is None:
            return []
        if _is_root(f.f_code):
            if last is None or not _is_cell_code(last.f_code):
                return []
            return frames
        last = f
        if _code_info(f.f_code)[0] != _OWN:
            frames.append(f)
        f = f.f_back
    return frames

#: opcodes at which a raise from the signal handler is attributed where it
#: happens: inside a call (a blocking C call checks signals there) or at a
#: function's start.  At a loop's backward jump (the other place the
#: handler runs) CPython attributes the raise to the instruction before the
#: jump's target, which for a one-line loop directly inside ``try``/``with``
#: lies outside the protected range: the cleanup would be skipped.
#: opcodes that call ``__enter__``: a raise while one is the current
#: instruction happens inside the call (a blocking ``Lock.acquire`` of a
#: ``with lock:``), before anything was acquired and before the protected
#: range starts, so it is safe although the ``with`` line is not
_ENTER_OPS = frozenset(op for name, op in dis.opmap.items()
                       if name in ("BEFORE_WITH", "BEFORE_ASYNC_WITH", "SETUP_WITH",
                                   "SETUP_ASYNC_WITH"))
_HANDLER_RAISE_OPS = frozenset(op for name, op in dis.opmap.items()
                               if name.startswith("CALL") or name in ("RESUME", "SEND")) \
    | _ENTER_OPS
#: of those, where Python code runs on (the monitoring events deliver there)
_PYTHON_RUNNING_OPS = frozenset(op for name, op in dis.opmap.items() if name == "RESUME")


def _entering(frame) -> bool:
    """Whether ``frame`` is inside the ``__enter__`` call of a ``with``."""
    code = frame.f_code.co_code
    lasti = frame.f_lasti
    return 0 <= lasti < len(code) and code[lasti] in _ENTER_OPS


def _in_python(frame) -> bool:
    """Whether the signal found ``frame`` running Python code (a function's
    start, a loop's jump), not blocked in a call."""
    code = frame.f_code.co_code
    lasti = frame.f_lasti
    return 0 <= lasti < len(code) and (code[lasti] not in _HANDLER_RAISE_OPS
                                       or code[lasti] in _PYTHON_RUNNING_OPS)


def _handler_may_raise(frame) -> bool:
    if not _HAS_MONITORING:
        # 3.10: the block stack, a raise anywhere in a try is inside it.
        # 3.11: the handler is the only way into a one-line loop or a
        # debugged cell; the jump attribution stays (docs/cancellation.md)
        return True
    code = frame.f_code.co_code
    lasti = frame.f_lasti
    return 0 <= lasti < len(code) and code[lasti] in _HANDLER_RAISE_OPS


# -- main thread: signal (+ lazy settrace before 3.12) -------------------------

#: 3.11 compiles a one-line loop to a jump to itself that emits no line
#: event, so a tracer never fires there; the handler raises at once instead
_SELF_LOOP_HAS_NO_LINE_EVENTS = sys.version_info[:2] == (3, 11)


def _by_identity(compute: Callable) -> Callable:
    """Cache ``compute(code)`` per code object, by identity: these run per
    event (per instruction, per loop iteration), and a code object hashes
    its whole contents on every ``lru_cache`` or dict lookup."""
    cache: dict = {}

    def cached(code):
        entry = cache.get(id(code))
        if entry is not None and entry[0] is code:
            return entry[1]
        if len(cache) > 4096:
            cache.clear()
        value = compute(code)
        cache[id(code)] = (code, value)  # holds the code: its id stays its own
        return value

    cached.cache_clear = cache.clear
    return cached


@_by_identity
def _same_line_back_jumps(code) -> frozenset[int]:
    """Offsets of backward jumps in ``code`` whose target is on the same line."""
    line_of = {}
    jumps = []
    for ins in dis.get_instructions(code):
        line_of[ins.offset] = ins.positions.lineno
        if ins.opname.startswith("JUMP_BACKWARD"):
            jumps.append(ins)
    return frozenset(ins.offset for ins in jumps
                     if line_of.get(ins.argval) == ins.positions.lineno)


@_by_identity
def _back_jumps(code) -> frozenset[int]:
    """Offsets of the backward jumps in ``code`` (where INSTRUCTION events raise)."""
    return frozenset(ins.offset for ins in dis.get_instructions(code)
                     if ins.opname.startswith("JUMP_BACKWARD")
                     or (ins.opname == "JUMP_ABSOLUTE" and ins.argval <= ins.offset))


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
            for f in _cell_frames(frame):
                f.f_trace = None
            _SIGNAL.disarm_current_thread()
            raise scope.raising()
        if verdict == OUTSIDE:
            # the cell's code has ended: IPython's work must not pay per line
            frame.f_trace = None
            _SIGNAL.disarm_current_thread()
            scope.mechanism = "escalate"  # the signal takes over, at no per-line cost
            return None
    return _local_tracer


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
            for f in _cell_frames(frame):
                f.f_trace = None
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
        frames = _cell_frames(frame)
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


# -- sys.monitoring (3.12+): every thread's Python code ------------------------

class _Monitoring:
    """A ``sys.monitoring`` tool with callbacks registered and no events.

    Invariants (the caller holds ``_lock`` for every change):

    * local events are on only for code objects some cancelled scope armed,
      each code's events are the union of what its scopes asked for
      (``users``), and a scope's own record is ``scope.armed_codes``;
    * LINE|JUMP go on code that was running the cell's code (its stack at
      the cancel, and what that code calls or resumes afterwards);
      INSTRUCTION only on a code where a backward jump was seen (a raise at
      a JUMP event can land outside the protected range);
    * the global PY_START|PY_RESUME events are on while any scope is armed;
      their callback costs O(1) for code the cell did not call.
    """

    def __init__(self) -> None:
        self.tool: int | None = None
        self.users = 0
        self.armed: dict[Any, dict] = {}  # code -> {scope: events}
        self.global_users = 0

    def acquire(self) -> bool:
        if not _HAS_MONITORING:
            return False
        if self.users:
            self.users += 1
            return True
        mon = sys.monitoring
        for tool in _MONITORING_TOOL_IDS:
            if mon.get_tool(tool) is None:
                mon.use_tool_id(tool, "pyrepl3-cancel")
                break
        else:
            return False
        ev = mon.events
        mon.register_callback(tool, ev.LINE, _mon_line)
        mon.register_callback(tool, ev.JUMP, _mon_jump)
        mon.register_callback(tool, ev.INSTRUCTION, _mon_instruction)
        mon.register_callback(tool, ev.PY_START, _mon_start)
        mon.register_callback(tool, ev.PY_RESUME, _mon_start)
        self.tool = tool
        self.users = 1
        return True

    def release(self) -> None:
        if not self.users:
            return
        self.users -= 1
        if self.users == 0 and self.tool is not None:
            mon = sys.monitoring
            mon.set_events(self.tool, 0)
            for code in self.armed:
                mon.set_local_events(self.tool, code, 0)
            self.armed.clear()
            self.global_users = 0
            ev = mon.events
            for event in (ev.LINE, ev.JUMP, ev.INSTRUCTION, ev.PY_START, ev.PY_RESUME):
                mon.register_callback(self.tool, event, None)
            mon.free_tool_id(self.tool)
            self.tool = None

    def arm_code(self, scope: CancelScope, code, events: int) -> None:
        """Turn ``events`` on for ``code`` on behalf of ``scope`` (caller holds ``_lock``)."""
        mine = scope.armed_codes if scope.armed_codes else {}
        had = mine.get(code, 0)
        if had & events == events or self.tool is None:
            return
        mine[code] = had | events
        scope.armed_codes = mine
        if not scope.armed_ids:
            scope.armed_ids = set()
        scope.armed_ids.add(id(code))
        users = self.armed.setdefault(code, {})
        before = 0
        for bits in users.values():
            before |= bits
        users[scope] = had | events
        if before | events != before:
            sys.monitoring.set_local_events(self.tool, code, before | events)

    def arm(self, scope: CancelScope, frame) -> None:
        """Arm ``scope``'s thread, whose innermost frame is ``frame`` (caller holds ``_lock``).

        Always a LINE watch on ``run_code``: its lines run just before the
        cell's code starts (and after it ended).  In the cell's code, also
        LINE|JUMP on the code objects on its stack and the global
        PY_START|PY_RESUME (for what that code calls).  Anywhere else (the
        cell not started yet, IPython printing its traceback) nothing more:
        IPython's own work runs without a callback per call.
        """
        ev = sys.monitoring.events
        for root in _RUN_CODE_CODES:
            self.arm_code(scope, root, ev.LINE)
        frames = _innermost_cell_frames(frame) if frame is not None else ()
        if frames:
            seen = set()
            for f in frames:
                code = f.f_code
                if code not in seen:
                    seen.add(code)
                    self.arm_code(scope, code, ev.LINE | ev.JUMP)
            self.arm_global(scope)

    def arm_global(self, scope: CancelScope) -> None:
        if not scope.armed_global and self.tool is not None:
            if self.global_users == 0:
                ev = sys.monitoring.events
                sys.monitoring.set_events(self.tool, ev.PY_START | ev.PY_RESUME)
            self.global_users += 1
            scope.armed_global = True

    def disarm_global(self, scope: CancelScope) -> None:
        if scope.armed_global:
            scope.armed_global = False
            self.global_users -= 1
            if self.global_users == 0 and self.tool is not None:
                sys.monitoring.set_events(self.tool, 0)

    def go_outside(self, scope: CancelScope) -> None:
        """The cell's code is not running: keep only the watch on
        ``run_code`` (caller holds ``_lock``)."""
        self.disarm_local(scope, keep_roots=True)
        self.disarm_global(scope)

    def disarm_local(self, scope: CancelScope, keep_roots: bool = False) -> None:
        """Local events of ``scope`` off (caller holds ``_lock``), but for
        the watch on ``run_code`` with ``keep_roots``."""
        if self.tool is None or not scope.armed_codes:
            scope.armed_codes = ()
            scope.armed_ids = frozenset()
            return
        mon = sys.monitoring
        kept = {}
        for code in scope.armed_codes:
            if keep_roots and id(code) in _RUN_CODE_IDS:
                kept[code] = scope.armed_codes[code]
                continue
            users = self.armed.get(code)
            if users is None:
                continue
            users.pop(scope, None)
            bits = 0
            for b in users.values():
                bits |= b
            if not users:
                del self.armed[code]
            mon.set_local_events(self.tool, code, bits)
        scope.armed_codes = kept or ()
        scope.armed_ids = {id(code) for code in kept}

    def disarm(self, scope: CancelScope) -> None:
        """Undo :meth:`arm` for ``scope`` (caller holds ``_lock``)."""
        if self.tool is None:
            return
        self.disarm_local(scope)
        self.disarm_global(scope)


def _mon_deliver(frame, scope: CancelScope) -> None:
    """Raise in the target thread at a safe point; outside the cell's code,
    switch the local events off (IPython's code must not pay per line)."""
    __tracebackhide__ = True
    verdict = _verdict(frame, scope)
    if verdict == RAISE:
        with _lock:
            # Events off as the exception leaves: the unwinding (and IPython
            # formatting a deep traceback) must not pay a callback per call.
            # If the cell swallows it, the grace-period re-arm turns them on.
            _MONITORING.disarm(scope)
        raise scope.raising()
    if verdict == OUTSIDE:
        with _lock:
            if not scope.finished:
                _MONITORING.go_outside(scope)


def _armed_scope():
    scope = _cancelled_threads.get(_get_ident())
    if scope is None or scope.finished or scope.mechanism != "armed":
        return None
    return scope


def _mon_line(code, line):
    scope = _armed_scope()
    if scope is not None:
        if id(code) in _RUN_CODE_IDS:
            # run_code is about to start the cell's code: watch calls (the
            # cell's code starting is one); on any other of its lines the
            # cell's code has ended: nothing but this watch stays on
            starts = (id(code), line) in _CELL_START_LINES or not _CELL_START_LINES
            if starts != scope.armed_global:
                with _lock:
                    if not scope.finished:
                        if starts:
                            _MONITORING.arm_global(scope)
                        else:
                            _MONITORING.go_outside(scope)
            return
        _mon_deliver(sys._getframe(1), scope)


def _mon_jump(code, src, dst):
    """Never raises: a raise at a JUMP event is attributed to the instruction
    before the jump's target, outside a ``try``/``with`` that starts there.
    A backward jump to its own line (a loop with no other event: ``while
    True: pass``) switches its code to INSTRUCTION events, which raise
    exactly."""
    if dst > src or src not in _same_line_back_jumps(code):
        # A loop over several lines has a LINE event per iteration: only a
        # jump to its own line needs more.  Decided by the location alone,
        # for good: this jump never calls us again (until some tool calls
        # sys.monitoring.restart_events()).
        return sys.monitoring.DISABLE
    scope = _armed_scope()
    if scope is not None:
        with _lock:
            if not scope.finished:
                _MONITORING.arm_code(scope, code, sys.monitoring.events.INSTRUCTION)


def _mon_instruction(code, offset):
    if offset not in _back_jumps(code):
        return sys.monitoring.DISABLE  # only the jumps raise: the rest, for good
    scope = _armed_scope()
    if scope is not None:
        _mon_deliver(sys._getframe(1), scope)


def _mon_start(code, offset):
    """A function starts or resumes.  O(1) unless the cell's code called it:
    its caller is ``run_code`` starting the cell, or code armed for this scope."""
    scope = _armed_scope()
    if scope is None:
        return
    frame = sys._getframe(1)
    caller = frame.f_back
    if caller is None:
        return
    ccode = caller.f_code
    if id(ccode) in _RUN_CODE_IDS:
        if not _is_cell_code(code):
            # IPython's own work inside run_code (``self.user_global_ns``
            # on the line that starts the cell; its other lines switch the
            # watch off through the LINE event)
            return
    elif id(ccode) not in scope.armed_ids:
        return
    if _code_info(code)[0] == _OWN:
        return
    with _lock:
        if scope.finished:
            return
        ev = sys.monitoring.events
        _MONITORING.arm_code(scope, code, ev.LINE | ev.JUMP)
    _mon_deliver(frame, scope)


_MONITORING = _Monitoring()


# -- worker threads on 3.10/3.11: asynchronous exception ----------------------

_set_async_exc = ctypes.pythonapi.PyThreadState_SetAsyncExc
_set_async_exc.restype = ctypes.c_int


class _AsyncCellCancelled(CellCancelled):
    """Delivered by ``PyThreadState_SetAsyncExc`` (created without arguments;
    the manager fills in reason and kind when the cell ends)."""

    def __init__(self, *args: Any):
        super().__init__(*args) if args else super().__init__("cancelled")


def _post_async_exc(thread_id: int, exc: type[BaseException]) -> None:
    """Post ``exc`` (a class) to the thread.

    Never called with NULL to retract: on 3.10/3.11 that leaves the
    interpreter-wide "async exception pending" flag set with nothing to
    deliver, so the eval breaker fires on every backward jump forever.
    A pending exception is instead drained by the ``run_code`` wrapper.
    """
    _set_async_exc(ctypes.c_ulong(thread_id), ctypes.py_object(exc))


# -- timers -------------------------------------------------------------------

class _Timer:
    """One daemon thread running callbacks at given times; started on first use."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, Callable[[], None]]] = []
        self._ids = itertools.count()
        self._cond = threading.Condition(threading.Lock())
        self._thread: threading.Thread | None = None

    def call_at(self, when: float, callback: Callable[[], None]) -> None:
        with self._cond:
            heapq.heappush(self._heap, (when, next(self._ids), callback))
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="pyrepl3-cancel-timer",
                                                daemon=True)
                self._thread.start()
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
            try:
                callback()
            except Exception as exc:  # noqa: BLE001 - a timer must keep running
                print(f"[pyrepl3_ext] cancellation timer error: {exc!r}", file=sys.__stderr__)


_TIMER = _Timer()


# -- deep tracebacks -----------------------------------------------------------

#: Frames kept at each end of a traceback deeper than their sum.  IPython
#: formats a traceback at about 0.1 ms per frame and more (``inspect.getmodule``
#: per frame): a cancel or a RecursionError 100,000 frames deep (after
#: ``sys.setrecursionlimit(10**6)``) would take minutes to print, and the
#: cell ends only after that.
_TB_HEAD, _TB_TAIL = 20, 80


def _shorten_tracebacks(error: BaseException) -> None:
    """Cut the middle out of ``error``'s traceback (and of the exceptions it
    chains) when deeper than ``_TB_HEAD + _TB_TAIL`` frames, with a note."""
    seen = 0
    while error is not None and seen < 8:
        seen += 1
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
        error = error.__cause__ or error.__context__


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
        self._patches.wrap(self.state.shell, "showtraceback", _bounded_showtraceback)
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
        _TIMER.call_at(scope.deadline, lambda: self._deadline(scope, timeout))

    def after_cell(self, execution: Any, result: Any) -> None:
        # The cell's scope is on top of this thread's stack (inner cells
        # close before outer ones); anything else means before_cell did not
        # open one (it failed, or the extension loaded mid-cell).
        if result is not None and result.error_in_exec is not None:
            _shorten_tracebacks(result.error_in_exec)  # before the error event formats it
        stack = _thread_scopes.get(_get_ident())
        scope = stack[-1] if stack else None
        if scope is None or scope.execution is not execution:
            scope = self._find(execution.id, prefer=stack)
            if scope is None:
                return
            stack = None  # not on top: _forget finds it
        scope.finished = True  # from now on cancel() misses it (checked under the lock)
        if not scope.cancel_called:
            # Never cancelled, the common case: no lock.  A cancel racing this
            # sees ``finished`` and arms nothing here (``_arm`` passes it on to
            # a cancelled enclosing scope).
            if stack is not None:
                stack.pop()
            else:
                self._forget(scope)
        else:
            with _lock:
                self._close_scope(scope)
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
        self._forget(scope)
        if _cancelled_threads.get(scope.thread_id) is scope:
            del _cancelled_threads[scope.thread_id]
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
            replacement = scope.exception()
            replacement.__cause__ = error
            replacement.__traceback__ = error.__traceback__
            result.error_in_exec = replacement

    # cancel requests
    def cancel(self, execution_id: str, reason: str = "cancelled", *,
               kind: str = "cancelled") -> bool:
        scope = self._find(execution_id)
        with _lock:
            if scope is None or scope.finished:
                return False
            if scope.cancel_called:
                return True  # already on its way; re-arming is the timer's job
            targets = [scope]
            # nested scopes started by this cell are cancelled with it
            for inner in _thread_scopes.get(scope.thread_id, []):
                if inner is not scope and self._is_inside(inner, scope):
                    targets.append(inner)
            for target in targets:
                if not target.cancel_called:
                    target.cancel_called = True
                    target.reason = reason
                    target.kind = kind
                    target.requested_at = time.monotonic()
            innermost = targets[-1]
        innermost.manager._arm(innermost)
        return True

    @staticmethod
    def _is_inside(inner: CancelScope, outer: CancelScope) -> bool:
        p = inner.parent
        while p is not None:
            if p is outer:
                return True
            p = p.parent
        return False

    def _deadline(self, scope: CancelScope, timeout: float) -> None:
        if scope.finished:
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
        config = self.state.config
        if tid == _MAIN_THREAD_ID and self._signal:
            if _HAS_MONITORING and self._monitoring:
                # 3.12+: the same events as in workers for Python code (they
                # raise exactly where a one-line loop sits in a try/with);
                # the signal only for blocking calls
                with _lock:
                    if scope.finished:
                        return
                    scope.mechanism = "armed"
                    scope.monitored = True
                    _MONITORING.arm(scope, _thread_frames().get(tid))
            self._signal_main(scope, config.cancel_escalate_after)
        elif _HAS_MONITORING and self._monitoring:
            with _lock:
                if scope.finished:
                    return
                frame = _thread_frames().get(tid)
                if frame is not None:
                    scope.mechanism = "armed"
                    scope.monitored = True
                    _MONITORING.arm(scope, frame)
        else:
            with _lock:
                if scope.finished:
                    return
                scope.mechanism = "armed"
                # an async cell suspended in its loop (worker thread) is run
                # by the loop's machinery: the task cancel below stops it, an
                # exception posted now would land in the loop, not the cell
                # and one in IPython's traceback printing must not be cut
                # short there: posted only while the cell's code runs
                if scope.in_code and not scope.async_exc_pending and \
                        _cell_frames(_thread_frames().get(tid)):
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
        _TIMER.call_at(time.monotonic() + max(config.cancel_grace, 0.05),
                       lambda: self._rearm_if_running(scope))

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
            _TIMER.call_at(time.monotonic() + interval, escalate)

        _TIMER.call_at(time.monotonic() + interval, escalate)

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
            _TIMER.call_at(time.monotonic() + max(self.state.config.cancel_grace, 0.05),
                           lambda: self._rearm_if_running(scope))
        elif scope.mechanism == "raised" or uses_async_exc:
            with _lock:
                if scope.finished:
                    return
                if _HAS_MONITORING and _MONITORING.tool is not None:
                    _MONITORING.disarm(scope)
                scope.async_exc_pending = False
            self._arm(scope, rearm=True)
        else:  # not raised yet: no safe point reached, or blocked in C code
            _TIMER.call_at(time.monotonic() + max(self.state.config.cancel_grace, 0.05),
                           lambda: self._rearm_if_running(scope))

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
        if scope.thread_id == _MAIN_THREAD_ID and self._signal and age > HARD_DEADLINE:
            return CancelReport(True, "escalated", "no safe point for 2 s: the next one "
                                "raises even in a finally/__exit__")
        if scope.mechanism == "escalate":
            return CancelReport(True, "escalated", "the signal raises inside the blocking "
                                                   "call at its next safe point")
        detail = ""
        frame = _thread_frames().get(scope.thread_id)
        verdict = _verdict(frame, scope) if frame is not None else OUTSIDE
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
