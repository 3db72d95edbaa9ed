"""``pyrepl3 serve``: the protocol (``protocol.py``) over stdio, TCP or a unix socket.

One asyncio loop serves every connection; sessions and their cells live in
an :class:`~pyrepl3_ext.engine.Engine` (cells run on the sessions' worker
threads, never on the loop).  Invariants:

* one response per request (notifications get none), and a malformed or
  hostile message costs the sender an error, never the server;
* per execution: its ``execution.event`` notifications in ``seq`` order,
  then the ``execute`` response (both are sent from the cell's thread, in
  order, through the connection's outbox; see :class:`Connection` for how
  they reach the transport: a quiet window and the write-through);
* bounded memory per connection: a message longer than
  ``max_message_bytes`` is refused and skipped (answered with its id when
  the line's start gives it); when a client reads slower than its cells
  print, the cells' threads wait (backpressure) instead of the server
  buffering without bound, and past the same limit no further request of
  that client is read, so the server's own replies are bounded too; the
  read-ahead of requests is bounded; an event larger than
  ``max_event_bytes`` is truncated and says so (``"truncated": true``);
* a client that disconnects has its queued and running executions
  cancelled, and nothing it sent that was not yet handled runs; its
  sessions stay open for other clients;
* TCP needs the token (``auth`` first, compared in constant time) and
  binds to loopback unless told otherwise; an unauthenticated connection
  has a deadline, and only so many may wait; a unix socket is created
  owner-only (0600);
* shutdown (a signal, the end of stdio) answers every execution in flight
  within a grace period, then closes the engine and its processes.
"""

from __future__ import annotations

import asyncio
import hmac
import os
import re
import secrets
import signal
import socket
import stat
import sys
import threading
import time
import weakref
from typing import Any, Callable, Sequence

from . import protocol as P
from .errors import ConcurrencyUnsupported, SessionBusy, SessionClosed, SessionLost

MiB = 1024 * 1024

#: seconds an execution's events may wait in the outbox for its response
#: (the quiet window, :meth:`Connection.open_quiet_window`); its end is a loop
#: timer, and the loops' timers tick in milliseconds, so 1-2 ms in practice
QUIET_WINDOW = 0.001


class Limits:
    """Per-connection limits (defaults suit local tool hosts)."""

    def __init__(self, *, max_message_bytes: int = 16 * MiB, max_event_bytes: int = 4 * MiB,
                 max_buffer_bytes: int = 8 * MiB, max_auth_failures: int = 3,
                 auth_timeout: float = 10.0, max_unauthenticated: int = 64):
        for name, value in (("max_message_bytes", max_message_bytes),
                            ("max_event_bytes", max_event_bytes),
                            ("max_buffer_bytes", max_buffer_bytes)):
            if not isinstance(value, int) or value < 1024:
                raise ValueError(f"{name} must be an integer >= 1024, got {value!r}")
        if not isinstance(auth_timeout, (int, float)) or not auth_timeout > 0:
            raise ValueError(f"auth_timeout must be a positive number of seconds, "
                             f"got {auth_timeout!r}")
        if not isinstance(max_unauthenticated, int) or max_unauthenticated < 1:
            raise ValueError(f"max_unauthenticated must be an integer >= 1, "
                             f"got {max_unauthenticated!r}")
        self.max_message_bytes = max_message_bytes
        self.max_event_bytes = max_event_bytes
        self.max_buffer_bytes = max_buffer_bytes
        self.max_auth_failures = max_auth_failures
        #: a connection that has not authenticated this many seconds after it
        #: opened is closed; at most ``max_unauthenticated`` may wait at once
        self.auth_timeout = float(auth_timeout)
        self.max_unauthenticated = max_unauthenticated

    def as_dict(self) -> dict:
        """The keyword arguments that make these limits again."""
        return {name: getattr(self, name) for name in (
            "max_message_bytes", "max_event_bytes", "max_buffer_bytes", "max_auth_failures",
            "auth_timeout", "max_unauthenticated")}


def shrink_event(event: dict, limit: int) -> dict:
    """``event`` with its long strings cut so it encodes to about ``limit`` bytes.

    Outputs and mime bundles are the only large members; each string longer
    than a quarter of the limit is cut there, and the event says
    ``"truncated": true`` with the original sizes in ``"truncated_from"``.
    """
    keep = max(limit // 4, 256)
    sizes: dict[str, int] = {}

    def cut(value: Any, path: str) -> Any:
        if isinstance(value, str) and len(value) > keep:
            sizes[path] = len(value)
            return value[:keep]
        if isinstance(value, dict):
            return {k: cut(v, f"{path}.{k}" if path else k) for k, v in value.items()}
        if isinstance(value, list):
            return [cut(v, f"{path}[{i}]") for i, v in enumerate(value)]
        return value

    small = cut(event, "")
    small["truncated"] = True
    small["truncated_from"] = sizes
    return small


class Connection:
    """One client: framing in, ordered writes out, its executions.

    Cells' threads queue what they send in the outbox; it reaches the
    transport in one of three ways, each under ``_lock`` so no two of them
    interleave their bytes:

    * the loop writes it (``_flush``, one wake-up of the loop per batch),
      and before each message of its own (a cancel's answer, an answer at
      shutdown), so nothing overtakes what was queued before it;
    * an answer (a response, ``input_requested``) is written by the thread
      that has it, together with everything queued before it, when the
      transport has nothing buffered (the write-through): waking the loop
      and handing it the GIL costs more than the write itself, and a
      computing cell would make the loop wait for the GIL first;
    * during a quiet window, opened on the loop when an execution starts or
      is cancelled, events wait for their response instead of waking the
      loop; the window's end (a loop timer) writes what is still waiting.
      A short cell's events and response thus leave in one write, and the
      loop is not woken to contend for the GIL with the cell that emits
      them.  An event waits at most the window (``QUIET_WINDOW``).
    """

    def __init__(self, server: "Server", writer: asyncio.StreamWriter, *, require_auth: bool,
                 name: str, finish_on_eof: bool = False, write_through: bool = False):
        self.server = server
        self.writer = writer
        self.name = name
        self.loop = asyncio.get_running_loop()
        self.authenticated = not require_auth
        #: stdio: end of input means "no more requests", not "gone": the
        #: executions already sent run to the end and their responses go out
        self.finish_on_eof = finish_on_eof
        #: stdio: tells whether the reader of our output is gone (the parent died)
        self.peer_gone: Callable[[], bool] | None = None
        #: no more requests will come (EOF): nobody can answer input() any more
        self.input_closed = False
        #: input_id -> (session, execution_id) of input() calls waiting for this client
        self.inputs: dict[str, tuple[Any, str]] = {}
        self.auth_failures = 0
        self.closed = False
        #: set while the transport's buffer is below the limit (cells' threads wait on it)
        self.writable = threading.Event()
        self.writable.set()
        self._draining = False
        #: the loop's view of ``writable``: request reading waits on it
        self._drained = asyncio.Event()
        self._drained.set()
        #: execution_id -> (session, handle, request id or None) of this client's
        #: unanswered executions
        self.executions: dict[str, tuple[Any, Any, Any]] = {}
        self._lock = threading.Lock()
        self._tasks: set[asyncio.Task] = set()
        # messages from other threads, written by one loop callback per batch
        self._outbox: list[bytes] = []
        self._flush_scheduled = False
        #: time.monotonic() before which queued events do not wake the loop
        self._quiet_until = 0.0
        self._quiet_timer: asyncio.TimerHandle | None = None
        #: writes from other threads when the transport holds nothing (None: not
        #: offered); only on the server's own plain sockets and pipes: a writer
        #: handed in by an embedder (``Server.handle``) may wrap its descriptor
        self._through = _WriteThrough.of(writer) if write_through else None
        # input framing (``feed``): the partial line, whether an oversize
        # one is being skipped, what arrived while replies were backed up
        self._partial = bytearray()
        self._discarding = False
        self._held: bytes | None = None  # None: not holding back
        self._eof = False
        #: set when no request can come any more (EOF, lost, closed)
        self._input_ended = asyncio.Event()
        #: the transport's read flow control (set by the protocol that feeds us)
        self.pause_reading: Callable[[], None] = _nothing
        self.resume_reading: Callable[[], None] = _nothing

    # -- output ---------------------------------------------------------------
    def write(self, data: bytes | None) -> None:
        """Write on the loop, after what the outbox holds (FIFO with every
        other write of this connection); None writes just the outbox."""
        with self._lock:
            if data is None:
                self._flush_scheduled = False
            if self._outbox:  # queued earlier (an event waiting in a quiet window)
                if data:
                    self._outbox.append(data)
                data = b"".join(self._outbox)
                self._outbox.clear()
            if self.closed or not data:
                return
            try:
                self.writer.write(data)
            except (ConnectionError, RuntimeError):
                failed = True
            else:
                failed = False
        if failed:
            self._lost()
            return
        transport = self.writer.transport
        if transport.get_write_buffer_size() > self.server.limits.max_buffer_bytes \
                and not self._draining:
            self.writable.clear()
            self._drained.clear()
            self._draining = True
            task = self.loop.create_task(self._drain())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _drain(self) -> None:
        try:
            await self.writer.drain()
        except (ConnectionError, RuntimeError):
            self._lost()
        finally:
            self._draining = False
            self.writable.set()
            self._drained.set()
            self._release_held()

    def send(self, message: dict) -> None:
        """Send from the loop's thread."""
        self.write(P.encode(message))

    def send_threadsafe(self, message: dict | bytes, *, wait_writable: bool = True,
                        answer: bool = True) -> None:
        """Send from any thread (a cell's); waits while the client is behind.

        ``answer=False`` marks an event that something will follow (its
        execution's response): it may wait for it in a quiet window.  An
        answer is written at once, by this thread when it can (the class
        docstring)."""
        data = message if isinstance(message, bytes) else P.encode(message)
        if wait_writable:
            # backpressure: a cell that prints faster than its client reads waits
            # here; a lost client sets the event so nobody waits for ever
            while not self.writable.wait(0.5):
                if self.closed:
                    return
        with self._lock:
            self._outbox.append(data)
            if answer:
                if self._write_through():
                    return
            elif time.monotonic() < self._quiet_until:
                return  # the response, or the window's end, writes it
            schedule = not self._flush_scheduled
            self._flush_scheduled = True
        if schedule:  # one wake-up of the loop per batch, not per event
            try:
                self.loop.call_soon_threadsafe(self._flush)
            except RuntimeError:  # loop closed: the server is gone
                pass

    def _write_through(self) -> bool:
        """Write the outbox from this thread if the transport holds nothing
        (so nothing the loop wrote can be behind it); caller holds the lock.
        False: the loop must write (what is left of) it."""
        through = self._through
        if through is None:
            return False
        transport = self.writer.transport
        if transport.is_closing() or transport.get_write_buffer_size():
            return False
        data = b"".join(self._outbox)
        self._outbox.clear()
        try:
            sent = through.write(data)
        except OSError:  # full (BlockingIOError), or gone: the loop's write finds out
            sent = 0
        if sent == len(data):
            return True
        self._outbox.append(data[sent:])
        return False

    def _flush(self) -> None:
        self.write(None)

    def open_quiet_window(self) -> None:
        """(On the loop.)  An execution starts or is being cancelled: for
        ``QUIET_WINDOW`` its events wait for its response, which then
        carries them in the same write.  Executions already running keep
        the window they have: reopening it would keep delaying theirs."""
        now = time.monotonic()
        with self._lock:
            if now < self._quiet_until and self.executions:
                return
            self._quiet_until = now + QUIET_WINDOW
        if self._quiet_timer is not None:
            self._quiet_timer.cancel()
        self._quiet_timer = self.loop.call_later(QUIET_WINDOW, self._end_quiet_window)

    def _end_quiet_window(self) -> None:
        self._quiet_timer = None
        with self._lock:
            self._quiet_until = 0.0
            waiting = bool(self._outbox) and not self._flush_scheduled
        if waiting:
            self.write(None)

    def _lost(self) -> None:
        if not self.closed:
            self.closed = True
            self._close_through()
            if self._quiet_timer is not None:
                self._quiet_timer.cancel()
                self._quiet_timer = None
            self.writable.set()
            self._drained.set()
            self._input_ended.set()
            self.cancel_executions("the client disconnected")

    def close_input(self) -> None:
        """End of requests: every input() waiting for this client gets EOF,
        and so does every later one (see ``input_requested``)."""
        self.input_closed = True
        with self._lock:
            waiting = list(self.inputs.items())
            self.inputs.clear()
        if waiting:
            threading.Thread(target=_answer_eof, args=(waiting,), daemon=True,
                             name="pyrepl3-input-eof").start()

    def input_requested(self, session: Any, event: dict) -> None:
        """An execution of this client waits in input() (from the cell's thread)."""
        input_id = event.get("input_id")
        if self.input_closed:
            threading.Thread(target=_answer_eof, args=([(input_id, (session, ""))],),
                             daemon=True, name="pyrepl3-input-eof").start()
            return
        with self._lock:
            self.inputs[input_id] = (session, event["execution_id"])

    def execution_finished(self, execution_id: str) -> None:
        with self._lock:
            for input_id in [k for k, (_s, e) in self.inputs.items() if e == execution_id]:
                del self.inputs[input_id]

    def answer_abandoned(self, reason: str) -> None:
        """Answer every execution of this client still unanswered (shutdown,
        after the drain): ``cancelled``, with ``reason``."""
        with self._lock:
            pending = list(self.executions.items())
            self.executions.clear()
        for execution_id, (_session, _handle, request_id) in pending:
            if request_id is None:
                continue  # a notification
            self.send(P.response(request_id, {
                "execution_id": execution_id, "status": "cancelled", "execution_count": None,
                "error": {"ename": "CellCancelled", "evalue": reason, "kind": "cancelled"}}))

    def close_transport(self) -> None:
        """Close the socket (the read loop then ends with EOF).  What the
        client has not read by now is dropped: a graceful close would wait
        for a client that does not read, and so would the server's exit."""
        self._close_through()  # the socket ends when the transport's descriptor does
        try:
            transport = getattr(self.writer, "transport", None)  # not the stdio fallback's
            if transport is not None and transport.get_write_buffer_size():
                transport.abort()
            else:
                self.writer.close()
        except Exception:  # noqa: BLE001 - already closed
            pass

    def _close_through(self) -> None:
        with self._lock:
            through, self._through = self._through, None
        if through is not None:
            through.close()

    def auth_expired(self) -> None:
        """The auth deadline passed (a loop timer): a peer that has not
        authenticated by now is told so and disconnected."""
        if self.authenticated or self.closed:
            return
        self.send(P.error_response(None, P.RPCError(
            P.UNAUTHORIZED, f"not authenticated within {self.server.limits.auth_timeout:g} s: "
                            f"closed")))
        self._lost()
        self.close_transport()

    def cancel_executions(self, reason: str) -> None:
        """Cancel every execution of this client: the queued ones first, in
        order, then the running ones.  Cancelling a running cell ends it, and
        its session would start the next queued cell at once; with the running
        one first, queued cells ran in the window before their own cancel."""
        with self._lock:
            pending = list(self.executions.items())
        running = [p for p in pending if getattr(p[1][0], "running", None) == p[0]]
        pending = [p for p in pending if p not in running] + running
        for execution_id, (session, _handle, _request_id) in pending:
            try:
                session.cancel(execution_id, reason)
            except Exception:  # noqa: BLE001 - the session may be closing
                pass

    # -- input ----------------------------------------------------------------
    def feed(self, data: bytes) -> None:
        """Bytes from the client, handled in the transport's read callback:
        a request is acted on in the loop wake-up that read it (a hop
        through a reader task costs one more GIL hand-off while a cell
        computes: the wait a cancel would add to its answer)."""
        if self._held is not None:
            self._held += data
            return
        limit = self.server.limits.max_message_bytes
        buffer = self._partial
        start = 0
        # a line read before the client went away is not handled after
        while not self.closed:
            newline = data.find(b"\n", start)
            if newline < 0:
                if not self._discarding:
                    buffer += data[start:]
                    if len(buffer) > limit:
                        self._too_large(buffer)
                        buffer.clear()
                        self._discarding = True
                return
            if self._discarding:
                self._discarding = False
            else:
                buffer += data[start:newline]
                if len(buffer) > limit:
                    self._too_large(buffer)
                elif buffer.strip():
                    self.handle_line(bytes(buffer))
                buffer.clear()
            start = newline + 1
            if self.auth_failures >= self.server.limits.max_auth_failures:
                self._lost()
                return
            if self._draining:
                # backpressure for the server's own replies: a client that
                # does not read gets no new request handled, and nothing more
                # read, until its backlog drains
                self._held = data[start:]
                self.pause_reading()
                return

    def feed_eof(self) -> None:
        """The client sent its last byte (acted on once what is held is)."""
        self._eof = True
        if self._held is None:
            self._input_ended.set()

    def _release_held(self) -> None:
        """The backlog drained: handle what arrived meanwhile, read on."""
        held = self._held
        if held is None or self.closed:
            return
        self._held = None
        if held:
            self.feed(held)
        if self._held is None:
            if self._eof:
                self._input_ended.set()
            else:
                self.resume_reading()

    async def serve(self) -> None:
        """Until the client's input ends (requests arrive through :meth:`feed`)."""
        try:
            await self._input_ended.wait()
            if self._eof and not self.closed and self.finish_on_eof:
                # no more requests: the executions already sent run to the end,
                # except that no input.reply can come (input() gets EOF), and
                # all of them are cancelled if the reader of our output is gone
                self.close_input()
                while self.executions and not self.closed:
                    if self.peer_gone is not None and self.peer_gone():
                        self._lost()
                        break
                    await asyncio.sleep(0.02)
                await asyncio.sleep(0)  # the last response's write is queued on the loop
                if not self.closed:
                    await self.writer.drain()
        except ConnectionError:
            pass
        finally:
            self._lost()
            for task in list(self._tasks):
                task.cancel()
            try:
                self.writer.close()
            except Exception:  # noqa: BLE001
                pass

    def _too_large(self, start: bytes | bytearray) -> None:
        """Refuse an oversize message, answering its own id when its start
        gives it (so a client waiting for that id is not left waiting)."""
        limit = self.server.limits.max_message_bytes
        self.send(P.error_response(P.leading_id(bytes(start[:4096])), P.RPCError(
            P.MESSAGE_TOO_LARGE, f"message longer than {limit} bytes: skipped",
            {"limit": limit})))

    def handle_line(self, line: bytes) -> None:
        if self.closed:
            return  # the client is gone: nothing it sent runs any more
        try:
            request = P.parse(line)
        except P.RPCError as exc:
            if not getattr(exc, "notification", False):
                self.send(P.error_response(getattr(exc, "request_id", None), exc))
            return
        if not self.authenticated and request.method != "auth":
            self._reply(request, error=P.RPCError(P.UNAUTHORIZED, P.ERROR_CODES[P.UNAUTHORIZED]))
            return
        if self.server.shutting_down:
            self._reply(request, error=P.RPCError(P.SESSION_CLOSED,
                                                  "the server is shutting down"))
            return
        handler = self.server.handlers[request.method]
        try:
            result = handler(self, request)
        except Exception as exc:  # noqa: BLE001 - a bug must not take the server down
            message = self.server.response_to(request, error=exc)
            if not request.is_notification:
                self.send(message)
        else:
            if result is not _DEFERRED:
                self._reply(request, result=result)

    def _reply(self, request: P.Request, *, result: Any = None,
               error: P.RPCError | None = None) -> None:
        if request.is_notification:
            return
        if error is not None:
            self.send(P.error_response(request.id, error))
        else:
            self.send(P.response(request.id, result))


#: returned by a handler whose response is sent later (``execute``)
_DEFERRED = object()


def _nothing() -> None:
    """No read flow control to apply."""


def _answer_eof(waiting: list) -> None:
    """EOF to input() calls nobody can answer any more (a helper thread: a
    process session's reply crosses its channel)."""
    for input_id, (session, _execution_id) in waiting:
        try:
            session.reply_input(input_id, None)
        except Exception:  # noqa: BLE001 - answered, cancelled or closed meanwhile
            pass


def _session(conn: Connection, params: dict) -> Any:
    try:
        return conn.server.engine.get_session(params["session"])
    except KeyError:
        raise P.RPCError(P.UNKNOWN_SESSION, f"no open session {params['session']!r}") from None


def _session_errors(call: Callable[[], Any]) -> Any:
    """``call()``, with the host API's errors turned into protocol errors."""
    from .errors import NamespaceError, ProtectedName, SnapshotNotFound, VariableNotFound

    try:
        return call()
    except (VariableNotFound, SnapshotNotFound) as exc:
        raise P.RPCError(P.UNKNOWN_NAME, str(exc)) from None
    except (ProtectedName, NamespaceError) as exc:
        raise P.RPCError(P.INVALID_PARAMS, str(exc)) from None
    except SessionClosed as exc:
        raise P.RPCError(P.SESSION_CLOSED, str(exc)) from None
    except SessionLost as exc:
        raise P.RPCError(P.SESSION_LOST, str(exc), {"kind": exc.kind}) from None
    except ValueError as exc:  # the host API's word for a request that cannot apply
        raise P.RPCError(P.INVALID_PARAMS, str(exc)) from None


def _jsonable(value: Any) -> Any:
    """``value`` with anything JSON cannot carry shown as its repr."""
    import json

    return json.loads(json.dumps(value, default=repr))


def _status(result: Any) -> tuple[str, dict | None]:
    from .extension import classify_error

    if result is None:
        return "error", {"ename": "RuntimeError", "evalue": "no result", "kind": "exception"}
    error = result.error_before_exec or result.error_in_exec
    if error is None:
        return "ok", None
    kind = classify_error(error, before_exec=result.error_before_exec is not None)
    # a process killed after a cancel or past its time ended the way it was asked to
    status = "cancelled" if kind in ("cancelled", "timeout", "killed", "cell_timeout") \
        else "error"
    from .errors import CellError

    if isinstance(error, CellError):  # a process session's: the cell's own name and message
        return status, {"ename": error.ename, "evalue": error.evalue, "kind": kind}
    return status, {"ename": type(error).__name__, "evalue": str(error), "kind": kind}


class Server:
    """Serves the protocol for one :class:`Engine` (created when not given)."""

    def __init__(self, engine: Any = None, *, token: str | None = None,
                 limits: Limits | None = None, log: Callable[[str], None] | None = None,
                 files_roots: Sequence[str] = (), snapshot_dir: str | None = None,
                 snapshot_key_file: str | None = None):
        if engine is None:
            from .engine import Engine

            engine = Engine()
        self.engine = engine
        self.token = token
        self.limits = limits or Limits()
        #: directories inside which clients may grant the ``files`` capability
        self.files_roots = [os.path.realpath(r) for r in files_roots]
        for root in self.files_roots:
            if not os.path.isdir(root):
                raise ValueError(f"--files-root {root!r} is not a directory")
        #: where snapshot.save/load keep signed files (None: not offered)
        self.snapshot_dir = os.path.realpath(snapshot_dir) if snapshot_dir else None
        if self.snapshot_dir is not None and not os.path.isdir(self.snapshot_dir):
            raise ValueError(f"--snapshot-dir {snapshot_dir!r} is not a directory")
        self._snapshot_key_file = snapshot_key_file
        self._snapshot_key_value: bytes | None = None
        self.log = log or (lambda text: print(f"[pyrepl3 serve] {text}", file=sys.stderr,
                                              flush=True))
        self.connections: set[Connection] = set()
        #: connections that must authenticate and have not yet
        self._unauthenticated: set[Connection] = set()
        #: the task serving each connection (held: the loop keeps weak references)
        self._serving: set[asyncio.Task] = set()
        #: set by :meth:`shutdown`: requests are refused from then on
        self.shutting_down = False
        self.handlers: dict[str, Callable[[Connection, P.Request], Any]] = {
            "auth": self._auth, "server.info": self._info, "server.schema": self._schema,
            "session.create": self._session_create, "session.close": self._session_close,
            "session.restart": self._session_restart,
            "session.list": self._session_list, "session.info": self._session_info,
            "execute": self._execute, "cancel": self._cancel,
            "input.reply": self._input_reply,
            "namespace.get": self._namespace, "namespace.set": self._namespace,
            "namespace.delete": self._namespace, "namespace.list": self._namespace,
            "snapshot.take": self._snapshot, "snapshot.restore": self._snapshot,
            "snapshot.delete": self._snapshot,
            "snapshot.save": self._snapshot_file, "snapshot.load": self._snapshot_file,
        }
        missing = set(P.METHODS) - set(self.handlers)
        assert not missing, f"methods without a handler: {missing}"

    # -- connections ----------------------------------------------------------
    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *,
                     require_auth: bool, name: str = "client",
                     finish_on_eof: bool = False,
                     peer_gone: Callable[[], bool] | None = None) -> None:
        """Serve one client whose requests come from a ``StreamReader``
        (for embedders and tests; the server's own transports feed their
        connection from the read callback, see :class:`_ClientProtocol`)."""
        conn = Connection(self, writer, require_auth=require_auth, name=name,
                          finish_on_eof=finish_on_eof)
        conn.peer_gone = peer_gone
        reading = asyncio.Event()
        reading.set()
        conn.pause_reading, conn.resume_reading = reading.clear, reading.set

        async def pump() -> None:
            try:
                while not conn.closed:
                    await reading.wait()
                    chunk = await reader.read(65536)
                    if not chunk:
                        conn.feed_eof()
                        return
                    conn.feed(chunk)
            except ConnectionError:
                conn._lost()

        serving = self.accept(conn)
        if serving is None:
            return
        task = asyncio.get_running_loop().create_task(pump())
        conn._tasks.add(task)
        task.add_done_callback(conn._tasks.discard)
        await serving

    def accept(self, conn: Connection) -> "asyncio.Task | None":
        """Admit a new connection and serve it until its input ends (the task
        returned), or refuse it (None: too many waiting to authenticate)."""
        deadline = None
        if not conn.authenticated:
            # an unauthenticated peer holds a descriptor and memory: a bounded
            # number of them, each for a bounded time
            if len(self._unauthenticated) >= self.limits.max_unauthenticated:
                conn.send(P.error_response(None, P.RPCError(
                    P.UNAUTHORIZED, f"too many connections waiting to authenticate "
                                    f"(at most {self.limits.max_unauthenticated}): closed")))
                conn._lost()
                conn.close_transport()
                return None
            self._unauthenticated.add(conn)
            deadline = asyncio.get_running_loop().call_later(
                self.limits.auth_timeout, conn.auth_expired)
        self.connections.add(conn)
        task = asyncio.get_running_loop().create_task(self._serve(conn, deadline))
        self._serving.add(task)
        task.add_done_callback(self._serving.discard)
        return task

    async def _serve(self, conn: Connection, deadline: asyncio.TimerHandle | None) -> None:
        try:
            await conn.serve()
        finally:
            if deadline is not None:
                deadline.cancel()
            self._unauthenticated.discard(conn)
            self.connections.discard(conn)
            self.connection_ended(conn)

    def connection_ended(self, conn: Connection) -> None:
        """A client is gone (a hook: the gateway closes its links)."""

    # -- handlers (run on the loop; never block) --------------------------------
    def _auth(self, conn: Connection, request: P.Request) -> dict:
        if self.token is None:
            conn.authenticated = True
            return {"ok": True}
        given = request.params["token"].encode("utf-8", "surrogatepass")
        if hmac.compare_digest(given, self.token.encode("utf-8")):
            conn.authenticated = True
            self._unauthenticated.discard(conn)
            return {"ok": True}
        conn.auth_failures += 1
        raise P.RPCError(P.UNAUTHORIZED, "wrong token")

    def _info(self, conn: Connection, request: P.Request) -> dict:
        import IPython

        from . import _compat
        from ._version import __version__

        limits = self.limits
        return {"pyrepl3": __version__, "ipython": IPython.__version__,
                "python": sys.version.split()[0],
                "build": "patched" if _compat.is_patched_build() else "stock",
                "concurrent_sessions": bool(self.engine.concurrent),
                "isolation": self.engine.isolation,
                "session_limits": (self.engine.limits.as_dict()
                                   if self.engine.limits is not None else None),
                "json": P.CODEC, "event_loop": _loop_name(),
                "limits": {"max_message_bytes": limits.max_message_bytes,
                           "max_event_bytes": limits.max_event_bytes,
                           "max_buffer_bytes": limits.max_buffer_bytes}}

    def _schema(self, conn: Connection, request: P.Request) -> dict:
        return P.schema()

    def _session_create(self, conn: Connection, request: P.Request) -> dict:
        from traitlets.config import Config

        params = request.params
        config = Config()
        # the events carry the output: no copy on the server's own streams
        config.PyREPL3.output_tee = False
        if "timeout" in params:
            config.PyREPL3.cell_timeout = float(params["timeout"])
        if "policy" in params:
            config.PyREPL3.security_policy = params["policy"]
        wanted = [{"name": c} if isinstance(c, str) else c
                  for c in params.get("capabilities", ())]
        names = [c["name"] for c in wanted]
        if len(set(names)) != len(names):
            raise P.RPCError(P.INVALID_PARAMS, f"capabilities: each may be granted once, "
                                               f"got {names}")
        for cap in wanted:
            if cap["name"] not in P.CAPABILITIES:
                raise P.RPCError(P.INVALID_PARAMS, f"capabilities: unknown capability "
                                                   f"{cap['name']!r} (expected: "
                                                   f"{', '.join(P.CAPABILITIES)})")
            if cap["name"] != "files" and set(cap) - {"name"}:
                raise P.RPCError(P.INVALID_PARAMS, f"capabilities: {cap['name']!r} takes no "
                                                   f"options, got {sorted(set(cap) - {'name'})}")
            if cap["name"] == "files" and not self.files_roots:
                raise P.RPCError(P.NOT_AVAILABLE, "the files capability is not offered by "
                                                  "this server (start it with --files-root DIR)")
        isolation = params.get("isolation")
        if isolation != "process" and (isolation is not None or
                                        self.engine.isolation != "process") \
                and ("limits" in params or params.get("confine")):
            raise P.RPCError(P.INVALID_PARAMS, "limits and confine apply to process sessions "
                                               "(isolation: \"process\")")
        options = {}
        if "limits" in params:
            options["limits"] = self._session_limits(params["limits"])
        if "confine" in params:
            if self.engine.confine is True and not params["confine"]:
                raise P.RPCError(P.INVALID_PARAMS, "confine: this server confines every "
                                                   "process session (--confine on)")
            options["confine"] = params["confine"]
        from traitlets import TraitError

        try:
            session = self.engine.create_session(params.get("session_id"), config=config,
                                                 isolation=isolation, **options)
        except (ValueError, TraitError) as exc:  # a setting the shell refused
            raise P.RPCError(P.INVALID_PARAMS, str(exc)) from None
        except SessionClosed as exc:
            raise P.RPCError(P.SESSION_CLOSED, str(exc)) from None
        except (SessionLost, RuntimeError) as exc:
            raise P.RPCError(P.NOT_AVAILABLE, f"the session could not start: {exc}") from None
        try:
            for cap in wanted:
                self._grant(session, cap)
            # the server answers input(): the cell's input_requested event goes
            # to the client that sent the execute, which replies with input.reply
            session.serve_input()
        except BaseException:
            session.close()
            raise
        if getattr(session, "isolation", None) == "process":
            session.add_lost_callback(self._session_lost)
        return {"session": session.id}

    def _session_limits(self, requested: dict) -> Any:
        """A client's limits over the server's (``--limits``), which are ceilings."""
        from .engine.limits import Limits

        ceiling = self.engine.limits or Limits()
        try:
            wanted = Limits.parse({**ceiling.as_dict(), **requested})
        except ValueError as exc:
            raise P.RPCError(P.INVALID_PARAMS, f"limits: {exc}") from None
        for key, cap in ceiling.as_dict().items():
            value = getattr(wanted, key)
            if cap is not None and (value is None or value > cap):
                raise P.RPCError(P.INVALID_PARAMS, f"limits: {key} may be at most {cap} on "
                                                   f"this server (its --limits), got {value}")
        return wanted

    def _session_lost(self, session: Any, lost: dict) -> None:
        """Tell every client that a process session died (from the supervisor's thread)."""
        message = P.notification("session.lost", {"session": session.id,
                                                  "kind": lost["kind"],
                                                  "message": lost["message"]})
        for conn in list(self.connections):
            if conn.authenticated:
                conn.send_threadsafe(message, wait_writable=False)

    def _session_restart(self, conn: Connection, request: P.Request) -> Any:
        session = _session(conn, request.params)
        if getattr(session, "isolation", None) != "process":
            raise P.RPCError(P.INVALID_PARAMS, f"session {session.id!r} lives in the server's "
                                               f"process: there is nothing to restart")

        params = request.params
        if "snapshot" in params and "file" in params:
            raise P.RPCError(P.INVALID_PARAMS, "give snapshot or file, not both")
        path = self._snapshot_path(params["file"], load=True) if "file" in params else None

        def restart() -> dict:
            restored = session.restart(from_snapshot=params.get("snapshot"))
            answer = {"session": session.id}
            if restored is not None:
                answer["restored"] = _jsonable(restored)
            if path is not None:
                answer["restored"] = self._load_snapshot_file(session, path, None, True)
            return answer

        # starting a process takes milliseconds, but never on the loop
        return self._session_call(conn, request, session, restart, off_loop=True)

    def _grant(self, session: Any, cap: dict) -> None:
        """Grant one requested capability (validated by the schema) to ``session``."""
        if cap["name"] == "input":
            session.grant_input()
            return
        from .security import FilesCapability

        root = cap.get("root")
        if root is None:
            root = os.path.join(self.files_roots[0], _directory_name(session.id))
            os.makedirs(root, mode=0o700, exist_ok=True)
        real = os.path.realpath(root)
        if not any(os.path.commonpath([real, base]) == base for base in self.files_roots):
            raise P.RPCError(P.NOT_AVAILABLE, f"capabilities: files root {root!r} is outside "
                                              f"the server's --files-root directories")
        try:
            impl = FilesCapability(real, read_only=bool(cap.get("read_only", False)))
        except (OSError, ValueError) as exc:
            raise P.RPCError(P.INVALID_PARAMS, f"capabilities: files root {root!r}: "
                                               f"{exc}") from None
        session.grant("files", impl)

    def _session_close(self, conn: Connection, request: P.Request) -> Any:
        session = _session(conn, request.params)

        def close() -> None:
            try:
                closed = session.close()
                message = P.response(request.id, {"closed": bool(closed)})
            except Exception as exc:  # noqa: BLE001 - one response per request, always
                self.log(f"closing session {session.id!r} failed: {exc!r}")
                message = P.error_response(request.id, P.RPCError(
                    P.INTERNAL_ERROR, f"closing the session failed: {type(exc).__name__}: {exc}"))
            if not request.is_notification:
                conn.send_threadsafe(message, wait_writable=False)

        # closing waits for a running cell to stop: not on the loop
        threading.Thread(target=close, name="pyrepl3-session-close", daemon=True).start()
        return _DEFERRED

    def _describe(self, session: Any) -> dict:
        described = {"session": session.id, "busy": session.busy, "running": session.running,
                     "isolation": getattr(session, "isolation", "in-process")}
        lost = getattr(session, "lost", None)
        if lost is not None:
            described["lost"] = {"kind": lost["kind"], "message": lost["message"]}
            described["execution_count"] = None
        else:
            described["execution_count"] = session.execution_count
        return described

    def _session_list(self, conn: Connection, request: P.Request) -> dict:
        return {"sessions": [self._describe(s) for s in self.engine.sessions if not s.closed]}

    def _session_info(self, conn: Connection, request: P.Request) -> dict:
        session = _session(conn, request.params)
        try:
            return self._describe(session)
        except SessionClosed as exc:
            raise P.RPCError(P.SESSION_CLOSED, str(exc)) from None

    def _execute(self, conn: Connection, request: P.Request) -> Any:
        params = request.params
        session = _session(conn, params)
        limit = self.limits.max_event_bytes
        session_id = session.id

        def on_event(event: dict) -> None:
            kind = event.get("type")
            if kind == "input_requested":
                conn.input_requested(session, event)
            elif kind == "finished" and conn.inputs:
                conn.execution_finished(event["execution_id"])
            message = P.notification("execution.event", {
                "session": session_id, "execution_id": event["execution_id"], "event": event})
            # the loop's own thread must never wait for itself
            in_loop = threading.get_ident() == self._loop_thread
            data = P.encode(message)
            if len(data) > limit:
                message["params"]["event"] = shrink_event(event, limit)
                data = P.encode(message)
            # the cell waits for an answer to input_requested; a notification's
            # finished has no response to carry it
            answer = kind == "input_requested" or (kind == "finished"
                                                   and request.is_notification)
            conn.send_threadsafe(data, wait_writable=not in_loop, answer=answer)

        try:
            handle = session.execute(
                params["code"], execution_id=params.get("execution_id"),
                timeout=params.get("timeout"), transaction=params.get("transaction"),
                queue=params.get("queue", True), store_history=params.get("store_history", True),
                on_event=on_event, wait=False)
        except SessionBusy as exc:
            raise P.RPCError(P.SESSION_BUSY, str(exc)) from None
        except ConcurrencyUnsupported as exc:
            raise P.RPCError(P.CONCURRENCY_UNSUPPORTED, str(exc)) from None
        except SessionClosed as exc:
            raise P.RPCError(P.SESSION_CLOSED, str(exc)) from None
        except SessionLost as exc:
            raise P.RPCError(P.SESSION_LOST, str(exc), {"kind": exc.kind}) from None
        except (ValueError, TypeError) as exc:
            raise P.RPCError(P.INVALID_PARAMS, str(exc)) from None
        # opened once the cell is submitted: its thread, waking meanwhile,
        # needs the GIL this thread holds before it can emit anything
        conn.open_quiet_window()
        execution_id = handle.execution_id
        with conn._lock:  # the request id: for an answer at shutdown
            conn.executions[execution_id] = (session, handle, request.id)
        if conn.closed:  # lost while it was being submitted: it must not run
            session.cancel(execution_id, "the client disconnected")

        def done(handle: Any) -> None:
            with conn._lock:
                mine = conn.executions.pop(execution_id, None) is not None
            if request.is_notification or not mine:
                return  # a notification, or answered already (shutdown)
            try:
                result = handle.result(0)
            except BaseException as exc:  # noqa: BLE001 - reported to the client
                message = P.error_response(request.id, P.RPCError(
                    P.INTERNAL_ERROR, f"execution failed: {type(exc).__name__}: {exc}"))
            else:
                status, error = _status(result)
                message = P.response(request.id, {
                    "execution_id": execution_id, "status": status,
                    "execution_count": getattr(result, "execution_count", None),
                    "error": error})
            conn.send_threadsafe(message, wait_writable=False)

        handle.add_done_callback(done)
        return _DEFERRED

    def _cancel(self, conn: Connection, request: P.Request) -> dict:
        session = _session(conn, request.params)
        conn.open_quiet_window()  # the cell's error and finished go with its response
        report = session.cancel_report(request.params["execution_id"],
                                       request.params.get("reason", "cancelled by the client"))
        if not report["cancelled"]:
            raise P.RPCError(P.UNKNOWN_EXECUTION, "no queued or running execution "
                                                  f"{request.params['execution_id']!r} in "
                                                  f"session {session.id!r}")
        return report

    def _input_reply(self, conn: Connection, request: P.Request) -> Any:
        session = _session(conn, request.params)
        params = request.params
        if params.get("eof") and "text" in params:
            raise P.RPCError(P.INVALID_PARAMS, "give text or eof, not both")
        text = None if params.get("eof") else params.get("text", "")

        def reply() -> dict:
            if not session.reply_input(params["input_id"], text):
                raise P.RPCError(P.UNKNOWN_INPUT, f"no input request {params['input_id']!r} "
                                                  f"is waiting in session {session.id!r} "
                                                  f"(answered, timed out or cancelled)")
            return {"delivered": True}

        return self._session_call(conn, request, session, reply)

    def _namespace(self, conn: Connection, request: P.Request) -> Any:
        """namespace.get/set/delete/list through the session's host API
        (thread-safe while a cell runs; IPython's names protected)."""
        session = _session(conn, request.params)
        name = request.params.get("name")

        def call() -> dict:
            if request.method == "namespace.list":
                return {"variables": session.variables(max_repr=100)}
            if request.method == "namespace.get":
                return session.variable(name, max_repr=1000,
                                        max_value_bytes=self.limits.max_event_bytes)
            if request.method == "namespace.set":
                session.set_variable(name, request.params["value"])
                return {"name": name}
            session.delete_variable(name)
            return {"name": name}

        return self._session_call(conn, request, session, call)

    def _snapshot(self, conn: Connection, request: P.Request) -> Any:
        """snapshot.take/restore: deep copies, so always off the loop's thread."""
        session = _session(conn, request.params)
        name = request.params["name"]

        def call() -> dict:
            if request.method == "snapshot.take":
                info = session.take_snapshot(name,
                                             durable=bool(request.params.get("durable")))
            elif request.method == "snapshot.delete":
                session.delete_snapshot(name)
                info = {"name": name, "deleted": True}
            else:
                info = session.restore_snapshot(name)
            return {"snapshot": _jsonable(info)}

        return self._session_call(conn, request, session, call, off_loop=True)

    def _snapshot_key(self) -> bytes:
        """The key that signs the snapshot directory's files (read once; created
        owner-only if missing): ``--snapshot-key-file``, else the per-user key."""
        if self._snapshot_key_value is None:
            from .namespace import default_key_file, load_or_create_key

            path = os.path.expanduser(self._snapshot_key_file or default_key_file())
            self._snapshot_key_value = load_or_create_key(path)
        return self._snapshot_key_value

    def _snapshot_file(self, conn: Connection, request: P.Request) -> Any:
        """snapshot.save/load: signed files in the operator's directory, written
        and read by this process for both kinds of session."""
        session = _session(conn, request.params)
        params = request.params
        file = params.get("file") or params["name"]
        path = self._snapshot_path(file, load=request.method == "snapshot.load")

        def call() -> dict:
            if request.method == "snapshot.load":
                info = self._load_snapshot_file(session, path, params.get("name"),
                                                bool(params.get("restore")))
            else:
                info = _jsonable(self._public_snapshot_info(
                    session.save_snapshot(params["name"], path, key=self._snapshot_key_or_error())))
            return {"snapshot": info, "file": file}

        return self._session_call(conn, request, session, call, off_loop=True)

    def _snapshot_path(self, file: str, *, load: bool) -> str:
        """The path of snapshot file ``file`` in the snapshot directory (which
        must be offered; for ``load``, the file must exist)."""
        if self.snapshot_dir is None:
            raise P.RPCError(P.NOT_AVAILABLE, "snapshot files are not offered by this server "
                                              "(start it with --snapshot-dir DIR)")
        if not re.fullmatch(P.FILE_NAME, file):
            raise P.RPCError(P.INVALID_PARAMS, f"file must be a plain name (letters, digits, "
                                               f"'.', '_', '-'; not starting with '.'), "
                                               f"got {file!r}")
        path = os.path.join(self.snapshot_dir, file + ".snapshot")
        if load and not os.path.isfile(path):
            raise P.RPCError(P.UNKNOWN_NAME, f"no snapshot file {file!r} in the server's "
                                             f"snapshot directory")
        return path

    def _snapshot_key_or_error(self) -> bytes:
        from .errors import NamespaceError

        try:
            return self._snapshot_key()
        except NamespaceError as exc:
            raise P.RPCError(P.NOT_AVAILABLE, f"snapshot key: {exc}") from None

    def _load_snapshot_file(self, session: Any, path: str, name: str | None,
                            restore: bool) -> Any:
        """Verify and hold a snapshot file as a snapshot of ``session`` (off the loop)."""
        info = session.load_snapshot(path, name=name, key=self._snapshot_key_or_error(),
                                     restore=restore)
        return _jsonable(self._public_snapshot_info(info))

    @staticmethod
    def _public_snapshot_info(info: Any) -> dict:
        info = dict(info)
        info.pop("path", None)  # the server's directory is not the client's business
        info.pop("source", None)
        return info

    def _session_call(self, conn: Connection, request: P.Request, session: Any,
                      call: Callable[[], Any], *, off_loop: bool = False) -> Any:
        """Run one host-API call of a session and answer with its result.

        In-process sessions answer at once, on the loop; a process session
        answers over its channel, which the loop must never wait for, so
        the call runs on a helper thread and the response follows.
        """
        if not off_loop and getattr(session, "isolation", None) != "process":
            return _session_errors(call)

        def work() -> None:
            try:
                message = self.response_to(request, _session_errors(call))
            except Exception as exc:  # noqa: BLE001 - one response per request, always
                message = self.response_to(request, error=exc)
            if not request.is_notification:
                conn.send_threadsafe(message, wait_writable=False)

        threading.Thread(target=work, name=f"pyrepl3-{request.method}", daemon=True).start()
        return _DEFERRED

    def response_to(self, request: P.Request, result: Any = None, *,
                    error: BaseException | None = None) -> dict:
        """The response to ``request``: its result, or its error (one that is
        not an ``RPCError`` is a bug: logged, and answered as internal)."""
        if error is None:
            return P.response(request.id, result)
        if not isinstance(error, P.RPCError):
            self.log(f"internal error in {request.method}: {error!r}")
            error = P.RPCError(P.INTERNAL_ERROR,
                               f"internal error: {type(error).__name__}: {error}")
        return P.error_response(request.id, error)

    # -- transports ---------------------------------------------------------------
    _loop_thread = 0

    def _started(self) -> None:
        from .cancellation import timers

        self._loop_thread = threading.get_ident()
        # a cancel request arms its cell on this thread: its grace-period
        # re-arm is this loop's timer, not a wake-up of the timer thread
        timers.use_loop(asyncio.get_running_loop())

    async def serve_stdio(self) -> None:
        """Serve one client on this process's stdin/stdout.

        The protocol keeps private copies of fds 0 and 1; fd 1 then points at
        stderr and fd 0 at /dev/null, so anything a cell (or a C library)
        writes to stdout cannot corrupt the stream, and nothing reads the
        protocol's input but the server.
        """
        self._started()
        loop = asyncio.get_running_loop()
        proto_in = os.dup(0)
        proto_out = os.dup(1)
        os.dup2(2, 1)
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        os.close(devnull)
        sys.stdout = sys.stderr
        in_file = os.fdopen(proto_in, "rb", buffering=0)
        out_file = os.fdopen(proto_out, "wb", buffering=0)
        writer: Any
        try:
            transport, flow = await loop.connect_write_pipe(asyncio.streams.FlowControlMixin,
                                                            out_file)
            writer = asyncio.StreamWriter(transport, flow, None, loop)
        except ValueError:
            writer = _FdWriter(proto_out)
        conn = Connection(self, writer, require_auth=False, name="stdio", finish_on_eof=True,
                          write_through=True)
        conn.peer_gone = _hung_up(proto_out)
        serving = self.accept(conn)
        assert serving is not None  # no authentication: never refused
        try:
            await loop.connect_read_pipe(lambda: _RequestsProtocol(conn), in_file)
        except ValueError:  # a regular file: asyncio cannot watch it
            _FdReader(proto_in, conn, loop)
        await serving

    async def serve_tcp(self, host: str, port: int, *, ready: Callable[[str, int], None]
                        | None = None) -> None:
        self._started()
        if self.token is None:
            raise ValueError("a TCP server needs a token")

        loop = asyncio.get_running_loop()
        server = await loop.create_server(
            lambda: _ClientProtocol(self, require_auth=True, name="tcp"), host, port)
        bound = server.sockets[0].getsockname()
        if ready is not None:
            ready(bound[0], bound[1])
        async with server:
            await server.serve_forever()

    async def serve_unix(self, path: str, *, ready: Callable[[str], None] | None = None) -> None:
        self._started()
        if os.path.lexists(path):
            if not stat.S_ISSOCK(os.lstat(path).st_mode):
                raise FileExistsError(f"{path} exists and is not a socket: not replacing it")
            os.unlink(path)  # a stale socket of an earlier server

        loop = asyncio.get_running_loop()
        old = os.umask(0o177)  # created owner-only: no window with wider permissions
        try:
            server = await loop.create_unix_server(
                lambda: _ClientProtocol(self, require_auth=self.token is not None, name="unix"),
                path)
        finally:
            os.umask(old)
        os.chmod(path, 0o600)
        if ready is not None:
            ready(path)
        try:
            async with server:
                await server.serve_forever()
        finally:
            try:
                os.unlink(path)
            except OSError:
                pass

    async def shutdown(self, reason: str = "server shutdown", grace: float = 5.0) -> None:
        """Stop serving gracefully (SIGTERM/SIGINT, end of stdio).

        Every client gets a ``server.shutdown`` notification; every
        execution in flight is cancelled with ``reason`` and answered, by
        its own end or, past ``grace`` seconds, as ``cancelled``; what is
        queued for the clients is written (bounded), then the connections
        are closed.  Requests that arrive meanwhile are refused.
        """
        loop = asyncio.get_running_loop()
        self.shutting_down = True
        connections = [c for c in self.connections if not c.closed]
        note = P.notification("server.shutdown", {"reason": reason})
        for conn in connections:
            if conn.authenticated:
                conn.send(note)
            conn.close_input()
            conn.cancel_executions(reason)
        deadline = loop.time() + grace
        while loop.time() < deadline and any(c.executions and not c.closed
                                             for c in connections):
            await asyncio.sleep(0.02)
        await asyncio.sleep(0)  # responses sent from cells' threads reach the loop
        for conn in connections:
            if conn.closed:
                continue
            conn._flush()
            conn.answer_abandoned(reason)
            try:
                await asyncio.wait_for(conn.writer.drain(), max(deadline - loop.time(), 1.0))
            except (asyncio.TimeoutError, ConnectionError, RuntimeError):
                pass
            conn.closed = True
            conn.writable.set()
            conn._drained.set()
            conn.close_transport()

    def close(self, timeout: float | None = 10.0) -> bool:
        """Close the connections and the engine (its sessions, and for process
        sessions the fork server and every session process).  False when a
        cell did not end within ``timeout`` (an in-process cell blocked in a
        call no cancel reaches)."""
        for conn in list(self.connections):
            conn._lost()
        return bool(self.engine.close(timeout=timeout))


class _RequestsProtocol(asyncio.Protocol):
    """The read side of a connection: what the transport reads goes to
    :meth:`Connection.feed` in the same callback (stdio's read pipe)."""

    def __init__(self, conn: Connection):
        self.conn = conn

    def connection_made(self, transport: Any) -> None:
        self.conn.pause_reading = transport.pause_reading
        self.conn.resume_reading = transport.resume_reading

    def data_received(self, data: bytes) -> None:
        self.conn.feed(data)

    def eof_received(self) -> bool:
        self.conn.feed_eof()
        return True  # a pipe's write side (if any) stays ours to close

    def connection_lost(self, exc: BaseException | None) -> None:
        self.conn.feed_eof()


class _ClientProtocol(asyncio.streams.FlowControlMixin, _RequestsProtocol):
    """A client socket (TCP, unix): requests as :class:`_RequestsProtocol`,
    replies through a ``StreamWriter`` on the same transport, whose drain
    is this protocol's flow control."""

    def __init__(self, server: "Server", *, require_auth: bool, name: str):
        super().__init__()
        self.server = server
        self.require_auth = require_auth
        self.name = name

    def connection_made(self, transport: Any) -> None:
        name = self.name
        if name == "tcp":
            name = f"tcp:{transport.get_extra_info('peername')}"
        writer = asyncio.StreamWriter(transport, self, None, asyncio.get_running_loop())
        self.conn = Connection(self.server, writer, require_auth=self.require_auth, name=name,
                               write_through=True)
        super().connection_made(transport)
        self.server.accept(self.conn)

    def connection_lost(self, exc: BaseException | None) -> None:
        super().connection_lost(exc)  # wakes a drain that waits
        self.conn._lost()  # a socket's end is the client's: both ways


class _WriteThrough:
    """A descriptor of its own for a connection's socket or pipe, for the
    write-through (:class:`Connection`): the transport's descriptor may be
    closed on the loop at any moment, and a write to a closed number could
    land in whatever file reused it.  Closed when the connection ends (or,
    for a connection dropped without ending, when it is collected)."""

    def __init__(self, write: Callable[[bytes], int], close: Callable[[], None]):
        self.write = write
        self.close = weakref.finalize(self, close)  # runs once, whichever comes first

    @classmethod
    def of(cls, writer: Any) -> "_WriteThrough | None":
        # not the stdio fallback's writer; never under TLS (the bytes would go
        # out unencrypted)
        extra = getattr(getattr(writer, "transport", None), "get_extra_info", None)
        if extra is None or extra("sslcontext") is not None:
            return None
        source = extra("socket") or extra("pipe")
        if source is None:
            return None
        fd = os.dup(source.fileno())
        if stat.S_ISSOCK(os.fstat(fd).st_mode):
            own = socket.socket(fileno=fd)
            # never blocks (the writer holds the connection's lock), never
            # raises SIGPIPE in a host that did not ignore it
            flags = socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL
            return cls(lambda data: own.send(data, flags), own.close)
        if os.get_blocking(fd):  # a write could block: the loop writes instead
            os.close(fd)
            return None
        return cls(lambda data: os.write(fd, data), lambda: os.close(fd))


class _FdReader:
    """Feeds a connection from a file descriptor asyncio cannot watch (a
    reader thread; it stops reading while the connection holds back)."""

    def __init__(self, fd: int, conn: Connection, loop: asyncio.AbstractEventLoop):
        reading = threading.Event()
        reading.set()
        conn.pause_reading, conn.resume_reading = reading.clear, reading.set

        def pump() -> None:
            while True:
                reading.wait()
                chunk = os.read(fd, 65536)
                if not chunk:
                    loop.call_soon_threadsafe(conn.feed_eof)
                    return
                loop.call_soon_threadsafe(conn.feed, chunk)

        threading.Thread(target=pump, name="pyrepl3-stdin", daemon=True).start()


class _FdWriter:
    """The part of StreamWriter a Connection uses, for a file descriptor
    asyncio cannot watch (stdout redirected to a file): a writer thread."""

    def __init__(self, fd: int):
        self.fd = fd
        self.transport = self
        self._chunks: list[bytes] = []
        self._size = 0
        self._closed = False
        self._cond = threading.Condition()
        threading.Thread(target=self._run, name="pyrepl3-stdout", daemon=True).start()

    def write(self, data: bytes) -> None:
        with self._cond:
            self._chunks.append(data)
            self._size += len(data)
            self._cond.notify()

    def get_write_buffer_size(self) -> int:
        return self._size

    async def drain(self) -> None:
        while self._size > 64 * 1024 and not self._closed:
            await asyncio.sleep(0.005)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._chunks and not self._closed:
                    self._cond.wait()
                if not self._chunks:
                    return
                data = b"".join(self._chunks)
                self._chunks.clear()
            view = memoryview(data)
            while view:
                view = view[os.write(self.fd, view):]
            with self._cond:
                self._size -= len(data)


def _hung_up(fd: int) -> Callable[[], bool]:
    """A check that the other end of ``fd`` (our output) is closed: a pipe
    whose reader went away reports POLLERR, a socket POLLHUP."""
    import select

    def check() -> bool:
        try:
            poller = select.poll()
            poller.register(fd, 0)  # errors and hang-ups are always reported
            return any(events & (select.POLLERR | select.POLLHUP | select.POLLNVAL)
                       for _fd, events in poller.poll(0))
        except (OSError, ValueError):
            return True

    return check


def new_token() -> str:
    return secrets.token_urlsafe(24)


def _directory_name(session_id: str) -> str:
    """A directory name for a session's default files root (ids are any string)."""
    if re.fullmatch(r"[A-Za-z0-9_-]{1,64}", session_id):
        return session_id
    import hashlib

    return "session-" + hashlib.sha256(session_id.encode()).hexdigest()[:24]


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """``uvloop`` when installed (the ``fast`` extra; Python 3.11+, whose
    ``asyncio.Runner`` takes a loop factory), unless ``PYREPL3_LOOP=asyncio``:
    its loop wakes and writes with less Python per message: 0.02-0.2 ms
    less per round trip, the rest within noise (docs/protocol.md)."""
    if os.environ.get("PYREPL3_LOOP", "").lower() == "asyncio" or sys.version_info < (3, 11):
        return None
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def _loop_name() -> str:
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        return "none"
    return "uvloop" if type(loop).__module__.startswith("uvloop") else "asyncio"


def run(transport: str, address: str | None = None, *, token: str | None = None,
        limits: Limits | None = None, engine: Any = None,
        files_roots: Sequence[str] = (), isolation: str = "in-process",
        kill_grace: float = 3.0, session_limits: Any = None,
        confine: bool | None = None, shutdown_grace: float | None = None,
        snapshot_dir: str | None = None, snapshot_key_file: str | None = None) -> int:
    """Run a server until EOF (stdio) or SIGINT/SIGTERM; the CLI's entry.

    ``isolation`` is the default of ``session.create``; with ``"process"``
    the fork server starts at once, so the first session does not wait.

    Either way it ends with :meth:`Server.shutdown` (``shutdown_grace``
    seconds, default ``kill_grace + 2`` so a process session's kill fits)
    and closes the engine; returns 0.  If an in-process cell is still blocked
    where no cancel reaches it (a C call) once the engine's close gave up,
    the process leaves with ``os._exit(0)`` after flushing its streams,
    rather than run interpreter finalization under a live cell.
    """
    if shutdown_grace is None:
        shutdown_grace = kill_grace + 2.0
    from .cancellation.handoff import shorten_switch_interval

    # the loop must get the GIL from a computing cell within a fraction of a
    # millisecond to read a cancel and write the answer (handoff.py)
    shorten_switch_interval()
    if engine is None:
        from .engine import Engine

        engine = Engine(isolation=isolation, kill_grace=kill_grace, limits=session_limits,
                        confine=confine)
        if isolation == "process":
            engine.warm_up()
    server = Server(engine, token=token, limits=limits, files_roots=files_roots,
                    snapshot_dir=snapshot_dir, snapshot_key_file=snapshot_key_file)
    return serve_until_stopped(server, transport, address, shutdown_grace)


def serve_until_stopped(server: Server, transport: str, address: str | None,
                        shutdown_grace: float) -> int:
    """Serve on ``transport`` until EOF (stdio) or SIGINT/SIGTERM, shut down
    gracefully, close; 0.  (``run``'s loop, shared with the gateway.)"""

    async def main() -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                loop.add_signal_handler(sig, stop.set)
            except (NotImplementedError, RuntimeError, ValueError):
                pass
        if transport == "stdio":
            serving = loop.create_task(server.serve_stdio())
        elif transport == "tcp":
            host, _, port = (address or "").rpartition(":")
            serving = loop.create_task(server.serve_tcp(
                host or "127.0.0.1", int(port),
                ready=lambda h, p: server.log(f"listening on tcp {h}:{p}")))
        else:
            serving = loop.create_task(server.serve_unix(
                address or "", ready=lambda p: server.log(f"listening on unix {p}")))
        stopper = loop.create_task(stop.wait())
        done, _ = await asyncio.wait({serving, stopper}, return_when=asyncio.FIRST_COMPLETED)
        stopper.cancel()
        failure = None
        if serving in done and not serving.cancelled():
            failure = serving.exception()
        if stopper in done:
            server.log("shutting down (signal)")
        await server.shutdown("server shutdown", grace=shutdown_grace)
        serving.cancel()
        # awaited, so a cancelled connection task never reaches asyncio's logger
        await asyncio.gather(serving, stopper, return_exceptions=True)
        if failure is not None:
            raise failure

    closed = False
    try:
        factory = _loop_factory()
        if factory is None:
            asyncio.run(main())
        else:
            with asyncio.Runner(loop_factory=factory) as runner:
                runner.run(main())
    finally:
        # the grace was spent in shutdown(): what has not ended by now will not
        closed = server.close(timeout=1.0)
    if not closed:
        server.log("a cell did not stop (blocked where no cancel reaches it): exiting anyway")
        leave_now()
    return 0


def leave_now() -> None:
    """End the process without interpreter finalization: an in-process cell
    blocked where no cancel reaches it (a C call) would hang it, holding
    locks the finalization needs.  What was written is flushed first."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(0)
