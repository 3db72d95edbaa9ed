"""A session process: one session, its cells on the process's main thread.

The fork server forks this process from its warm template session, so the
shell already exists; :func:`run` makes it the session the supervisor asked
for and serves the channel until the session closes.

Order matters, and is the reason this module exists:

1. ``setsid`` (the session's processes are one process group the
   supervisor can kill) and a parent-death signal;
2. the ``assign`` message, read on the main thread while the process has
   one thread: the session id, its settings and policy, resource limits,
   and OS confinement, which must be applied before any other thread
   exists (Landlock and seccomp bind the calling thread) and before any
   cell code runs;
3. ``ready``, then a reader thread for the channel and the session's
   executor on the **main thread**: cancellation uses the signal path
   there, which interrupts blocking calls (``sleep``, lock and queue
   waits, socket reads, ``input()``).

The worker trusts nothing it did not get from its channel, and the parent
trusts nothing the worker sends beyond its JSON (see :mod:`.channel`).
Capabilities stay in the parent: a granted ``files`` capability is a
:class:`RemoteCapability` here, which asks the parent over the channel, so
no host object, grant or root descriptor exists in this process.
"""

from __future__ import annotations

import contextlib
import ctypes
import itertools
import os
import select
import signal
import socket
import threading
from typing import Any, Callable

from .channel import Channel, ChannelError

_PR_SET_PDEATHSIG = 1

#: Host API calls the parent may make (method name -> keyword names it passes).
CALLS = {
    "variables": ("max_repr",),
    "variable": ("name", "max_repr", "max_value_bytes"),
    "set_variable": ("name", "value"),
    "delete_variable": ("name",),
    "take_snapshot": ("name",),
    "restore_snapshot": ("name",),
    "delete_snapshot": ("name",),
    "reply_input": ("input_id", "text"),
    "set_policy": ("policy",),
    "grant_input": (),
    "export_snapshot": ("name", "key"),
    "import_snapshot": ("name", "data", "key", "restore"),
}

#: Exception types a call may report back by name (anything else: RuntimeError).
_ERRORS = ("VariableNotFound", "ProtectedName", "NamespaceError", "SnapshotNotFound",
           "SnapshotRefused", "SessionClosed", "SecurityError", "ValueError", "TypeError",
           "KeyError")


def _set_parent_death_signal() -> None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: the channel's EOF still ends us
        pass


def describe_error(exc: BaseException) -> dict:
    """An exception as plain data for the channel."""
    described = {"type": type(exc).__name__, "message": str(exc)}
    if isinstance(exc, OSError) and exc.errno is not None:
        described["type"] = "OSError"
        described["errno"] = exc.errno
        described["message"] = exc.strerror or str(exc)
    return described


def rebuild_error(described: Any) -> BaseException:
    """The exception a described error stands for, built from its data only."""
    from .. import errors

    if not isinstance(described, dict):
        return RuntimeError(f"malformed error report: {described!r}"[:500])
    kind = described.get("type")
    message = str(described.get("message", ""))[:10000]
    if kind == "OSError" and isinstance(described.get("errno"), int):
        return OSError(described["errno"], message)
    if kind in _ERRORS:
        cls = getattr(errors, kind, None) or {"ValueError": ValueError,
                                              "TypeError": TypeError,
                                              "KeyError": KeyError}[kind]
        return cls(message)
    return RuntimeError(f"{kind}: {message}")


class RemoteCapability:
    """A capability implementation whose calls the parent serves.

    It has the shape the security layer's ``Grant`` expects (``methods``,
    ``method(name)``, ``callable``); the grant freezes arguments to plain
    data before they get here, and the parent freezes them again.
    """

    def __init__(self, host: "WorkerHost", name: str, methods: list[str], callable_: bool):
        self._host = host
        self.name = name
        self.methods = tuple(methods)
        self.callable = callable_

    def method(self, name: str) -> Callable:
        if name not in self.methods and not (self.callable and name == "__call__"):
            raise AttributeError(name)

        def call(*args: Any, **kwargs: Any) -> Any:
            return self._host.call_parent(self.name, name, list(args), kwargs)

        return call


class WorkerHost:
    """The worker's side of the channel: requests in, events and replies out."""

    def __init__(self, session: Any, channel: Channel):
        self.session = session
        self.channel = channel
        self._ids = itertools.count(1)
        self._pending: dict[int, list] = {}
        self._pending_lock = threading.Lock()
        # an execution's ``finished`` event waits for its ``done`` (one write for both)
        self._finished: dict | None = None
        self._pending_finished: dict | None = None
        #: checkpoints this process forked and has not reaped (each one the
        #: parent drops would stay a zombie, holding a pid, until we exit)
        self._checkpoint_pids: set[int] = set()
        #: a checkpoint forked while idle, not yet asked for: (pid, our end)
        self._standby: tuple[int, socket.socket] | None = None
        #: the pages the last cells wrote, copied ahead after a standby fork
        self._hot_pages: list[tuple[int, int]] = []

    # -- to the parent ---------------------------------------------------------
    def send(self, message: dict) -> None:
        try:
            self.channel.send(message)
        except TypeError:  # something in an event JSON cannot carry: its repr
            import json

            self.channel.send(json.loads(json.dumps(message, default=repr)))
        except OSError:  # the parent is gone: nothing left to serve
            os._exit(0)

    def on_event(self, event: dict) -> None:
        if event.get("type") == "finished":
            # the last event goes out with the outcome, in one write (see on_done)
            self._finished = event
            return
        self.send({"op": "event", "event": event})

    def on_done(self, execution_id: str, handle: Any) -> None:
        from ..extension import classify_error

        finished, self._finished = self._finished, None
        if finished is not None and finished.get("execution_id") != execution_id:
            self.send({"op": "event", "event": finished})  # not this execution's: as is
            finished = None
        if finished is not None:
            self._pending_finished = finished

        try:
            result = handle.result(0)
        except BaseException as exc:  # noqa: BLE001 - reported to the parent
            self.send({"op": "done", "execution_id": execution_id, "status": "error",
                       "execution_count": None, "finished": self._take_finished(),
                       "error": {"ename": type(exc).__name__, "evalue": str(exc),
                                 "kind": "exception"}})
            return
        error = result.error_before_exec or result.error_in_exec
        status, described = "ok", None
        if error is not None:
            kind = classify_error(error, before_exec=result.error_before_exec is not None)
            status = "cancelled" if kind in ("cancelled", "timeout") else "error"
            described = {"ename": type(error).__name__, "evalue": str(error), "kind": kind,
                         "before_exec": result.error_before_exec is not None}
        self.send({"op": "done", "execution_id": execution_id, "status": status,
                   "execution_count": result.execution_count, "error": described,
                   "finished": self._take_finished()})

    def _take_finished(self) -> dict | None:
        finished, self._pending_finished = self._pending_finished, None
        return finished

    def call_parent(self, capability: str, method: str, args: list, kwargs: dict) -> Any:
        """Ask the parent to run a capability method; its answer or its error."""
        call_id = next(self._ids)
        slot: list = [threading.Event(), None]
        with self._pending_lock:
            self._pending[call_id] = slot
        try:
            self.send({"op": "capability", "id": call_id, "name": capability,
                       "method": method, "args": args, "kwargs": kwargs})
            slot[0].wait()
        finally:
            with self._pending_lock:
                self._pending.pop(call_id, None)
        reply = slot[1]
        if "error" in reply:
            raise rebuild_error(reply["error"])
        return reply.get("result")

    # -- from the parent ---------------------------------------------------------
    def serve(self) -> None:
        """The reader thread: runs until the channel ends, then ends the process."""
        try:
            while True:
                try:
                    message = self.channel.recv()
                except ChannelError:
                    message = None
                if message is None:
                    break
                self.handle(message)
        finally:
            # the parent is gone or closed us: nobody is left to report to
            os._exit(0)

    def handle(self, message: dict) -> None:
        op = message.get("op")
        if self._standby is not None and op not in ("checkpoint", "standby"):
            self._drop_standby()
        if op == "execute":
            self._execute(message)
        elif op == "cancel":
            self.session.cancel(str(message.get("execution_id")),
                                str(message.get("reason") or "cancelled"))
        elif op == "call":
            threading.Thread(target=self._call, args=(message,), daemon=True,
                             name="pyrepl3-call").start()
        elif op == "capability_reply":
            with self._pending_lock:
                slot = self._pending.get(message.get("id"))
            if slot is not None:
                slot[1] = message
                slot[0].set()
        elif op == "grant":
            self._grant(message)
        elif op == "checkpoint":
            # on this (the reader) thread: while it forks, no other request
            # is read, so no other thread of ours holds a lock the copy needs
            self._checkpoint(message)
        elif op == "standby":
            self._make_standby(message)
        elif op == "close":
            self.session._executor.shutdown(str(message.get("reason") or "session closed"))
            running = self.session.running
            if running is not None:
                self.session.cancel(running, "session closed")

    def _reap_checkpoints(self) -> None:
        """Reap the checkpoints that ended (only ours: a cell's own children
        are its ``subprocess``'s to wait for)."""
        for pid in list(self._checkpoint_pids):
            try:
                done, _status = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                done = pid
            if done:
                self._checkpoint_pids.discard(pid)

    def _execute(self, message: dict) -> None:
        if self._checkpoint_pids:
            self._reap_checkpoints()
        execution_id = str(message.get("execution_id"))
        try:
            handle = self.session.execute(
                str(message.get("code", "")), execution_id=execution_id,
                timeout=message.get("timeout"), transaction=message.get("transaction"),
                store_history=bool(message.get("store_history", True)),
                silent=bool(message.get("silent", False)), wait=False, queue=True)
        except Exception as exc:  # noqa: BLE001 - a refused request is answered
            self.send({"op": "done", "execution_id": execution_id, "status": "error",
                       "execution_count": None, "refused": describe_error(exc),
                       "error": {"ename": type(exc).__name__, "evalue": str(exc),
                                 "kind": "exception", "before_exec": True}})
            return
        handle.add_done_callback(lambda h: self.on_done(execution_id, h))

    def _call(self, message: dict) -> None:
        method = message.get("method")
        reply: dict = {"op": "reply", "id": message.get("id")}
        try:
            if method not in CALLS:
                raise ValueError(f"unknown call {method!r}")
            params = message.get("params") or {}
            kwargs = {k: params[k] for k in CALLS[method] if k in params}
            if method in ("export_snapshot", "import_snapshot"):
                reply["result"] = getattr(self, "_" + method)(**kwargs)
            else:
                reply["result"] = getattr(self.session, method)(**kwargs)
        except Exception as exc:  # noqa: BLE001 - reported to the parent
            reply["error"] = describe_error(exc)
        self.send(reply)

    def _export_snapshot(self, name: str, key: bytes) -> bytes:
        """Snapshot ``name`` as a signed file's bytes, for the parent to keep
        or write (a confined worker may write only its scratch directory)."""
        from ..namespace import manager

        return manager(self.session.shell).snapshot_bytes(name, key=key)[0]

    def _import_snapshot(self, name: str | None, data: bytes, key: bytes,
                         restore: bool = True) -> dict:
        """Load bytes :meth:`_export_snapshot` made (checked against ``key``)
        as snapshot ``name`` (None: the name they carry); restore them unless
        ``restore`` is False."""
        import tempfile

        from ..namespace import manager

        names = manager(self.session.shell)
        with tempfile.TemporaryDirectory(prefix="pyrepl3-snapshot-") as tmp:
            path = os.path.join(tmp, "snapshot")
            with open(path, "wb") as f:
                f.write(data)
            info = names.load_snapshot(path, name=name, key=key)
        info.pop("source", None)
        return names.restore_snapshot(info["name"]) if restore else info

    # -- checkpoints: a paused fork of this process ---------------------------------
    def _checkpoint(self, message: dict) -> None:
        """Answer a checkpoint request with the standby, if one is waiting,
        else with a copy forked now."""
        reply: dict = {"op": "reply", "id": message.get("id")}
        from ..errors import SnapshotRefused

        standby, self._standby = self._standby, None
        if standby is not None and self._alive(standby[0]):
            pid, ours = standby
        else:
            if standby is not None:
                standby[1].close()
            try:
                pid, ours = self._fork_checkpoint()
            except SnapshotRefused as exc:
                reply["error"] = describe_error(exc)
                self.send(reply)
                return
        reply["result"] = {"pid": pid}
        try:
            self.channel.send(reply, fds=[ours.fileno()])
        except OSError:
            os._exit(0)
        finally:
            ours.close()

    def _fork_checkpoint(self) -> tuple[int, socket.socket]:
        """Fork a paused copy of this process; its pid and our end of its channel."""
        from ..errors import SnapshotRefused

        _check_forkable(self.session)
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            with _quiet_background():
                pid = os.fork()
        except OSError as exc:  # confined without fork: no pids limit to bound copies
            ours.close()
            theirs.close()
            raise SnapshotRefused(
                f"this session cannot fork a checkpoint ({exc.strerror}): its confinement "
                f"allows fork only where a pids cgroup bounds the copies") from None
        if pid == 0:  # the checkpoint: this thread is all it has
            code = 1
            try:
                ours.close()
                code = self._wait_as_checkpoint(Channel(theirs))
            finally:
                os._exit(code)
        theirs.close()
        self._reap_checkpoints()
        self._checkpoint_pids.add(pid)
        return pid, ours

    def _alive(self, pid: int) -> bool:
        try:
            return os.waitpid(pid, os.WNOHANG)[0] == 0
        except ChildProcessError:
            return False

    # -- the standby: a checkpoint forked while idle ------------------------------
    def _make_standby(self, message: dict) -> None:
        """Fork a checkpoint now, while the session is idle, for the next
        transaction cell (or ``take_snapshot``) to take without waiting for
        a fork; then copy ahead the pages the last cells wrote (``prefault``).

        Only after ``idle`` seconds in which no request came: a session fed
        cell after cell would throw each standby away.  The standby is the
        state as it is now, so any request but a checkpoint ends it
        (``handle``).  With ``learn``, a checkpoint forked before the last
        cell is still alive, so the pages this process maps alone are the
        ones it wrote since: they become the set copied ahead."""
        from ..errors import SnapshotRefused
        from . import prefault

        reply: dict = {"op": "reply", "id": message.get("id")}
        idle = message.get("idle")
        idle = float(idle) if isinstance(idle, (int, float)) and 0 <= idle <= 1 else 0.005
        if self._standby is not None:
            reply["result"] = {"standby": True, "pid": self._standby[0], "prefaulted": 0}
        elif self.channel.buffered() or select.select([self.channel.sock], [], [], idle)[0]:
            reply["result"] = {"standby": False, "why": "a request came"}
        elif self.session.busy:
            # a cell queued or running (the parent asked as another request
            # of its went out first): a copy now would not be the state a
            # later checkpoint request means
            reply["result"] = {"standby": False, "why": "busy"}
        else:
            learn = bool(message.get("learn")) and prefault.supported()
            if learn:
                self._hot_pages = prefault.written_pages()
            try:
                self._standby = self._fork_checkpoint()
            except SnapshotRefused as exc:
                reply["result"] = {"standby": False, "why": str(exc)}
            else:
                copied = prefault.prefault(self._hot_pages) if self._hot_pages else 0
                reply["result"] = {"standby": True, "pid": self._standby[0],
                                   "prefaulted": copied}
        self.send(reply)

    def _drop_standby(self) -> None:
        """The session is about to change: the standby no longer matches it."""
        standby, self._standby = self._standby, None
        if standby is not None:
            pid, ours = standby
            ours.close()  # its end of the channel: it exits by itself
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def _wait_as_checkpoint(self, channel: Channel) -> int:
        """Hold this copy of the session until the parent resumes or drops it."""
        os.setpgid(0, 0)  # its own group: killing the live worker's group spares it
        self.channel.detach()  # the live worker's connection is not ours
        self._checkpoint_pids.clear()  # its siblings: not its children
        if self._standby is not None:  # a sibling's channel: not ours either
            self._standby[1].close()
            self._standby = None
        while True:
            try:
                message = channel.recv()
            except ChannelError:
                return 1
            if message is not None and message.get("op") == "export":
                try:
                    channel.send({"op": "exported", "data": self._pickle_namespace(
                        str(message.get("name") or "checkpoint"), message.get("key"))})
                except Exception as exc:  # noqa: BLE001 - told to the parent
                    channel.send({"op": "exported", "error": describe_error(exc)})
                continue
            if message is None or message.get("op") != "resume":
                return 0
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            middle = os.fork()
            if middle == 0:
                # double fork: the new worker is orphaned at once, so the fork
                # server (a subreaper) reaps it and reports how it ended
                if os.fork() == 0:
                    ours.close()
                    channel.detach()
                    self._serve_as_worker(Channel(theirs))
                os._exit(0)
            os.waitpid(middle, 0)
            theirs.close()
            try:
                channel.send({"op": "resumed"}, fds=[ours.fileno()])
            except OSError:
                return 0
            finally:
                ours.close()

    def _pickle_namespace(self, name: str, key: Any) -> bytes:
        """This checkpoint's namespace as a signed snapshot file's bytes (what
        pickle can carry of it), for the parent to write to a file."""
        from ..namespace import manager

        names = manager(self.session.shell)
        names.take_snapshot(name)
        return names.snapshot_bytes(name, key=key)[0]

    def _serve_as_worker(self, channel: Channel) -> None:
        """A fresh copy of the checkpoint becomes the session's worker; never returns."""
        code = 1
        try:
            # its own group; no parent-death signal: its parent (the double
            # fork's middle) is gone already, and the end of its channel is
            # what ends it when the host goes (the fork server kills it too)
            os.setpgid(0, 0)
            self.channel = channel
            self._pending.clear()
            executor = self.session._executor
            executor.adopt_after_fork()
            self.send({"op": "ready", "pid": os.getpid(),
                       "execution_count": self.session.execution_count})
            threading.Thread(target=self.serve, name="pyrepl3-channel", daemon=True).start()
            executor.serve()
            code = 0
        finally:
            os._exit(code)

    def _grant(self, message: dict) -> None:
        name = str(message.get("name"))
        methods = [str(m) for m in message.get("methods") or []]
        impl = RemoteCapability(self, name, methods, bool(message.get("callable")))
        from .. import grant

        try:
            grant(self.session.shell, name, impl)
        except Exception as exc:  # noqa: BLE001
            self.session._state.report_internal_error(f"grant of {name}", exc)


def _confine(assign: dict, channel: Channel) -> dict | None:
    """OS confinement, last step before serving (``confine.py`` says what it does)."""
    wanted = assign.get("confine")
    if not wanted:
        return None
    import tempfile

    from .confine import ConfineSpec, apply

    scratch = wanted.get("scratch")
    if scratch:
        # the one place this session may write: its temporary files go there
        os.chdir(scratch)
        os.environ["TMPDIR"] = scratch
        tempfile.tempdir = None
    spec = ConfineSpec(writable=tuple(wanted.get("writable") or ()),
                       readable=tuple(wanted.get("readable") or ()),
                       network=bool(wanted.get("network", False)),
                       subprocesses=bool(wanted.get("subprocesses", False)),
                       fork=bool(wanted.get("fork", False)),
                       required=frozenset(wanted.get("required") or ()))
    return apply(spec, keep_fds=[channel.fileno()])


@contextlib.contextmanager
def _quiet_background() -> Any:
    """Hold, across a fork, the locks our own background thread takes.

    The cancellation timer thread is the one thread of ours besides the
    reader and the worker that may run between cells; a fork while it held
    its lock or the cancellation lock would leave that lock held for ever
    in the copy.  Holding both while forking means neither is held by
    anyone else when the copy starts, and the copy gets a fresh timer
    (its thread is not in the copy).
    """
    from ..cancellation import scope, timers

    timer = timers._TIMER
    locks = [scope._lock, timer._cond]
    for lock in locks:
        lock.acquire()
    pid = os.getpid()
    try:
        yield
    finally:
        if os.getpid() != pid:  # the copy: a timer of its own
            timers._TIMER = type(timer)()
        for lock in reversed(locks):
            lock.release()


def _check_forkable(session: Any) -> None:
    """Refuse (``SnapshotRefused``) a checkpoint that could not hold the whole session.

    A fork keeps only the thread that forks: threads a cell started would
    be missing in the copy (and any lock they held would stay held), and an
    event loop with pending tasks would resume without its thread.
    """
    from ..errors import SnapshotRefused

    if session.running is not None:
        raise SnapshotRefused("a checkpoint is taken between cells, and a cell is running")
    for thread in threading.enumerate():
        # a host call just answered may still be returning; no new one starts
        # meanwhile (the reader thread, which starts them, is the one forking)
        if thread.name == "pyrepl3-call":
            thread.join(2.0)
    ours = {threading.main_thread(), threading.current_thread()}
    others = [t.name for t in threading.enumerate()
              if t not in ours and t.name != "pyrepl3-cancel-timer"]
    if others:
        raise SnapshotRefused(f"the session has threads a checkpoint cannot copy (a fork keeps "
                           f"only one thread): {', '.join(others)}; end them first")
    loop = session._executor._loop
    if loop is not None:
        import asyncio

        if asyncio.all_tasks(loop):
            raise SnapshotRefused("the session has pending asyncio tasks, which a checkpoint "
                               "cannot copy; let them finish or cancel them first")


def _configure(session: Any, assign: dict) -> None:
    """Apply the ``assign`` message (on the main thread, one thread alive)."""
    from traitlets.config import Config

    session_id = assign.get("session_id")
    if isinstance(session_id, str) and session_id:
        session._state.rename(session_id)
        session.id = session_id
    config = assign.get("config") or {}
    if config:
        cfg = Config(config)
        shell = session.shell
        for configurable in [shell, *shell.configurables]:
            configurable.update_config(cfg)
    session.serve_input()  # the parent answers input(): no terminal here


def run(session: Any, sock: socket.socket) -> int:
    """Become the assigned session and serve it; the process's exit code."""
    os.setsid()
    _set_parent_death_signal()
    channel = Channel(sock)
    try:
        assign = channel.recv()
    except ChannelError:
        return 1
    if assign is None or assign.get("op") != "assign":
        return 0
    try:
        _configure(session, assign)
        if assign.get("limits") is not None:
            from .limits import Limits, apply_rlimits

            apply_rlimits(Limits.parse(assign["limits"]),
                          memory_fallback=bool(assign.get("memory_fallback")))
        confinement = _confine(assign, channel)
    except BaseException as exc:  # noqa: BLE001 - told to the parent, then exit
        channel.send({"op": "failed", "error": describe_error(exc)})
        return 1
    host = WorkerHost(session, channel)
    # every event of this process is the parent's: one subscription for the
    # process's life, not one per execution (no hook re-sorting per cell)
    from .. import subscribe

    subscribe(session.shell, host.on_event)
    from ..cancellation.handoff import shorten_switch_interval

    # the channel reader must get the GIL from a computing cell at once to
    # deliver a cancel (handoff.py)
    shorten_switch_interval()
    session._executor.adopt_current_thread()
    channel.send({"op": "ready", "pid": os.getpid(), "session": session.id,
                  "execution_count": session.execution_count, "confinement": confinement})
    threading.Thread(target=host.serve, name="pyrepl3-channel", daemon=True).start()
    session._executor.serve()
    return 0
