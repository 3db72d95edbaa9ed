"""The one vocabulary of execution events, and where events go.

Every event is a plain ``dict`` that ``json.dumps`` accepts, with ``type``,
``execution_id``, ``session``, ``seq`` and ``ts`` plus its own fields.  Per
execution, in order::

    started -> (output | display | input_requested)* -> (result | error)? -> finished

Invariants (the tests check each):

* ``seq`` is gapless per execution, from 0, and events reach every sink in
  ``seq`` order (assignment and dispatch happen under the session's
  ``emit_lock``).
* At most one ``result`` or ``error``; ``finished`` is the last event: once it
  has been emitted, :meth:`Execution.emit` refuses and counts what it refused.
* When nothing listens (no subscriber, no log) nothing is built: the cost of
  an execution is then one object and two method calls.

The same events feed in-process subscribers, the JSON-lines log and (later)
the protocol server's notifications.
"""

from __future__ import annotations

import base64
import json
import os
import sys
import threading
import time
from typing import Any, Callable, Mapping

EVENT_TYPES = ("started", "output", "display", "input_requested", "audit",
               "result", "error", "finished")
#: ``error.kind`` values.
ERROR_KINDS = ("exception", "cancelled", "timeout", "security", "syntax")
#: ``finished.status`` values.
STATUSES = ("ok", "error", "cancelled")

Subscriber = Callable[[dict], None]


class EventBus:
    """Fan-out of one session's events to subscribers, with failure isolation.

    A subscriber that raises is reported once (through ``report``) and stays
    subscribed; it never breaks the cell or the other subscribers.
    """

    def __init__(self, report: Callable[[str, BaseException], None]):
        self._subscribers: tuple[Subscriber, ...] = ()
        self._lock = threading.Lock()
        #: Serialises seq assignment and dispatch of every execution of this
        #: session (re-entrant: a subscriber may cause another event).
        self.emit_lock = threading.RLock()
        self._report = report

    @property
    def active(self) -> bool:
        return bool(self._subscribers)

    def subscribe(self, callback: Subscriber) -> Callable[[], None]:
        """Call ``callback(event)`` for every event; returns an unsubscribe function."""
        if not callable(callback):
            raise TypeError(f"subscriber must be callable, got {callback!r}")
        with self._lock:
            self._subscribers = self._subscribers + (callback,)

        def unsubscribe() -> None:
            self.unsubscribe(callback)

        return unsubscribe

    def unsubscribe(self, callback: Subscriber) -> bool:
        with self._lock:
            subs = list(self._subscribers)
            try:
                subs.remove(callback)
            except ValueError:
                return False
            self._subscribers = tuple(subs)
            return True

    def publish(self, event: dict) -> None:
        for callback in self._subscribers:  # a snapshot: tuples are immutable
            try:
                callback(event)
            except Exception as exc:  # noqa: BLE001 - a sink must not break a cell
                self._report(f"event subscriber {callback!r}", exc)


class Execution:
    """One run of one cell: its id, its metadata and its ordered events.

    Other capabilities hang per-execution state off ``extras`` (keyed by
    their own name) rather than adding attributes here.
    """

    # One is created per cell: the per-instance work is only what differs
    # between executions; the rest are class-level defaults until assigned.
    status: str | None = None
    #: the ``before_cell`` hooks that ran for this execution: the shell's
    #: usual tuple itself unless others ran too (``ShellState._bind_hooks``)
    hooked: tuple = ()
    _seq = 0
    _closed = False
    outcome_sent = False
    dropped_after_finish = 0

    def __init__(self, execution_id: str, session: str, code: str, mode: str,
                 execution_count: int | None, options: Mapping[str, Any], bus: EventBus):
        self.id = execution_id
        self.session = session
        self.code = code
        self.mode = mode
        #: as in the ``started`` event; None when nobody listened then
        self.execution_count = execution_count
        #: the cell's options (timeout, transaction, ...); read-only, and
        #: shared by every cell that has none
        self.options = options
        self.t0 = time.monotonic()
        self._bus = bus

    @property
    def extras(self) -> dict[str, Any]:
        """Per-capability state of this execution, created on first use."""
        try:
            return self.__dict__["_extras"]
        except KeyError:
            extras = self.__dict__["_extras"] = {}
            return extras

    def extra(self, key: str) -> Any:
        """``extras.get(key)`` without creating ``extras`` (per-cell hot paths)."""
        extras = self.__dict__.get("_extras")
        return extras.get(key) if extras else None

    @property
    def finished(self) -> bool:
        return self._closed

    def emit(self, type_: str, **fields: Any) -> dict | None:
        """Emit one event of this execution; returns it, or None if nobody listens.

        After ``finished`` nothing more is emitted (the count of refused
        events is kept in ``dropped_after_finish``).  Emitting a second
        ``result``/``error`` is a programming error and raises.
        """
        bus = self._bus
        if not bus._subscribers:
            if type_ == "finished":
                self._closed = True
            return None
        with bus.emit_lock:
            if self._closed:
                self.dropped_after_finish += 1
                return None
            if type_ in ("result", "error"):
                if self.outcome_sent:
                    raise RuntimeError(
                        f"execution {self.id!r} already has a result or error")
                self.outcome_sent = True
            event = {"type": type_, "execution_id": self.id,
                     "session": self.session, "seq": self._seq,
                     "ts": time.time()}
            self._seq += 1
            event.update(fields)
            if type_ == "finished":
                self._closed = True
            self._bus.publish(event)
            return event


def lost_outcome(execution_id: str, session: str, next_seq: int, kind: str, message: str,
                 status: str, duration: float) -> tuple[dict, dict]:
    """The ``error`` and ``finished`` events of an execution whose process (or
    node) died under it: whoever outlives it says how it ended, continuing
    its ``seq``.  One shape for a crashed worker and a lost node."""
    now = time.time()
    common = {"execution_id": execution_id, "session": session}
    return ({**common, "type": "error", "seq": next_seq, "ts": now, "ename": "SessionLost",
             "evalue": message, "traceback": [], "kind": kind},
            {**common, "type": "finished", "seq": next_seq + 1, "ts": now, "status": status,
             "duration": duration})


def _json_default(value: Any) -> Any:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return base64.b64encode(bytes(value)).decode("ascii")
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    return repr(value)


def dumps(event: dict) -> str:
    """Serialise an event to one line of JSON (non-JSON values are made safe)."""
    return json.dumps(event, default=_json_default, ensure_ascii=False,
                      separators=(",", ":"))


class JSONLinesSink:
    """Appends each event as one JSON line to a file, a descriptor or stderr.

    ``target`` is a path, ``fd:N`` or ``stderr``.  Lines are written whole
    under a lock and flushed, so concurrent sessions never interleave.

    Only whole executions are logged: one already running when the sink
    subscribed (the cell that switched the log on) is skipped, so every
    execution in the log begins with ``started``.
    """

    def __init__(self, target: str):
        self.target = target
        self._lock = threading.Lock()
        #: executions whose ``started`` this sink wrote and whose ``finished`` it has not
        self._open: set[str] = set()
        if target == "stderr":
            self._stream = sys.__stderr__
            self._owns = False
        elif target.startswith("fd:"):
            try:
                fd = int(target[3:])
            except ValueError:
                raise ValueError(f"event_log {target!r}: expected fd:<integer>") from None
            self._stream = os.fdopen(fd, "a", encoding="utf-8", closefd=False)
            self._owns = True
        else:
            path = os.path.expanduser(target)
            self._stream = open(path, "a", encoding="utf-8")  # noqa: SIM115
            self._owns = True

    def __call__(self, event: dict) -> None:
        kind, execution_id = event.get("type"), event.get("execution_id")
        with self._lock:
            if kind == "started":
                self._open.add(execution_id)
            elif execution_id not in self._open:
                return  # began before this sink existed
            elif kind == "finished":
                self._open.discard(execution_id)
        line = dumps(event) + "\n"
        with self._lock:
            self._stream.write(line)
            self._stream.flush()

    def close(self) -> None:
        with self._lock:
            if self._owns and not self._stream.closed:
                self._stream.close()

    def __repr__(self) -> str:
        return f"<JSONLinesSink {self.target!r}>"
