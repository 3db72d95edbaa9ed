"""Delivery through ``sys.monitoring`` (3.12+, every thread).

LINE/JUMP events on the code objects running the cell's code,
PY_START/PY_RESUME for what that code calls (O(1) for anything else), and a
LINE watch on ``run_code``; armed when a cancel arrives, or just before a
deadline (``scope.due()`` holds the raise until it has passed).
Invariants: a JUMP event never raises (CPython would attribute the raise
outside a ``try``/``with`` that starts at the jump's target), a one-line
loop gets INSTRUCTION events and raises at its jump; every event of ours is
off while the cell's code is not running and before the exception unwinds;
callbacks raise only in the target thread.
"""

from __future__ import annotations

import sys
from typing import Any

from .scope import (CancelScope, _HAS_MONITORING, _MONITORING_TOOL_IDS, _cancelled_threads,
                    _get_ident, _lock)
from .safepoints import (OUTSIDE, RAISE, _CELL_START_LINES, _OWN, _RUN_CODE_CODES, _RUN_CODE_IDS,
                         _back_jumps, _code_info, _innermost_cell_frames, _is_cell_code,
                         _same_line_back_jumps, _verdict)

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
        elif frame is not None and id(frame.f_code) in _RUN_CODE_IDS and (
                (id(frame.f_code), frame.f_lineno) in _CELL_START_LINES
                or not _CELL_START_LINES):
            # run_code is on the line that starts the cell's code, past its
            # LINE event: the cell's first call is the next event to watch
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
    if not scope.due():  # watched, before its deadline: the events stay on
        return
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
