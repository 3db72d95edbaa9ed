"""Where a cancel may raise: the safe-point analysis every mechanism
consults in the target thread before raising.

A raise is safe in frames running the cell's code (above IPython's
``run_code``), never in IPython's or pyrepl3's own frames, on a ``try:``
line, in a ``finally:`` body, in ``__enter__``/``__exit__`` or the import
system, unless ``HARD_DEADLINE`` passed (invariant 3).  ``_verdict`` answers
RAISE, DEFER or OUTSIDE from one bounded walk of the stack; the per-file
and per-code analyses it needs are cached by identity.
"""

from __future__ import annotations

import dis
import io
import linecache
import sys
import time
import tokenize
from typing import Callable, TYPE_CHECKING

from .scope import (CancelScope, _HAS_MONITORING, _PKG_DIR, _SWALLOWING_FILES, _UNSAFE_FUNCTIONS,
                    _UNSAFE_MODULE_PARTS, _foreign_stack, _shield_depth)

if TYPE_CHECKING:
    import asyncio

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
    elif code.co_name in _UNSAFE_FUNCTIONS or filename in _SWALLOWING_FILES:
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


#: How far ``_verdict`` walks a stack.  Only a runaway recursion of the
#: cell's code is deeper: walking 10^5-10^6 frames took 0.3-0.6 s per verdict
#: (each one materialised as a frame object), which was most of what such a
#: cancel cost.  Frames further out than this are taken to be the cell's
#: code in safe places; the one case that loses, a recursion this deep run
#: from a ``finally:`` or ``__exit__``, has its cleanup cut short, as every
#: cleanup is after ``HARD_DEADLINE``.
_VERDICT_WALK = 10_000


def _verdict(frame, scope: CancelScope) -> int:
    """May the target thread raise now, with ``frame`` its innermost frame?

    OUTSIDE when the cell's code is not running (no ``run_code`` on the
    stack, or what ``run_code`` runs is not the cell); DEFER when a frame
    between here and the cell is pyrepl3's, in ``__enter__``/``__exit__``,
    on a ``try:``/``with`` line or in a ``finally:`` body (an outer frame in
    one would have its cleanup cut short too), or innermost in the import
    system; RAISE otherwise, and after the hard deadline.  One walk of the
    stack, at most ``_VERDICT_WALK`` frames with a dict lookup each.
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
            and time.monotonic() - scope.requested_at <= scope.hard_deadline:
        # the innermost frame alone says no, and was seen before: a loop in
        # a ``finally`` pays no stack walk per line
        return DEFER
    # First pass, identities only: is the cell's code running at all?  No
    # per-file analysis happens for IPython's own frames (tokenizing
    # interactiveshell.py takes ~100 ms), and none on a stack that is not
    # the cell's.  A runaway recursion can be 10^5-10^6 frames deep: no
    # list, and no walk past ``_VERDICT_WALK`` frames (see there).
    roots = _RUN_CODE_IDS
    last = None
    f = frame
    for _ in range(_VERDICT_WALK):
        if f is None:
            return OUTSIDE
        if id(f.f_code) in roots:
            if last is None or not _is_cell_code(last.f_code):
                # run_code itself (its start), or IPython's work inside it
                # (printing the traceback of the exception that just left
                # the cell's code)
                return OUTSIDE
            break
        last = f
        f = f.f_back
    else:
        scope.deep = True
    late = time.monotonic() - scope.requested_at > scope.hard_deadline
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
    for _ in range(_VERDICT_WALK):
        if f is None:
            break
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
    """Whether another thread is inside a cell's code: ``run_code`` is on
    its stack and what it runs is the cell (not the traceback printing).
    A stack deeper than ``_VERDICT_WALK`` is a runaway in the cell's code
    (IPython's own work is never that deep)."""
    with _foreign_stack(thread_id) as f:
        above = None
        for _ in range(_VERDICT_WALK):
            if f is None:
                return False
            if _is_root(f.f_code):
                return above is not None and _is_cell_code(above.f_code)
            above = f
            f = f.f_back
        return True


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
