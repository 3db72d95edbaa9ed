"""The engine API: isolated IPython sessions driven from any thread or event loop.

An :class:`Engine` creates and closes :class:`Session` objects; a session is
one ``InteractiveShell`` of its own (never the host's) with pyrepl3_ext
loaded and a :class:`~pyrepl3_ext.engine.executor.SessionExecutor` that runs its
cells strictly in order on the session's worker thread (see
``executor.py`` beside this module for the routing rule).

Stock IPython vs the patched build (``_compat.is_patched_build()``):

* patched: every session is a non-singleton shell; sessions run cells
  concurrently (the patch series keeps them apart).
* stock: shells share process-wide hooks, so cells of different sessions
  must not overlap.  Several sessions may be alive (each keeps its own
  namespace, ``In``/``Out``, execution count and in-memory history), but a
  request to a session while *another* session has a cell running or
  queued raises :class:`~pyrepl3_ext.errors.ConcurrencyUnsupported`.  The
  first session created while the process has no IPython shell becomes the
  singleton, so ``IPython.get_ipython()`` and ``display()`` answer for it;
  further sessions are secondary shells, where those two answer for the
  singleton (docs/engine.md lists the limits).  During a stock session's
  cell ``sys.modules['__main__']`` is its module (pickling cell classes
  works) and the host's module is back afterwards.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import sys
import threading
import time
from typing import Any, Callable, Iterator

from .. import _compat
from ..errors import ConcurrencyUnsupported, SessionClosed
from .executor import Job, SessionExecutor

#: The kinds of session an engine creates (``create_session(isolation=...)``).
ISOLATIONS = ("in-process", "process")

#: Stock IPython: the session that last had work; another session may
#: submit only while this one is idle.  Process-wide because the state the
#: shells share is process-wide.
_gate_lock = threading.Lock()
_gate_owner: "Session | None" = None


class ExecutionHandle:
    """A submitted execution (``execute(..., wait=False)``): await it, or
    call :meth:`result`.  The result is IPython's ``ExecutionResult``."""

    def __init__(self, session: "Session", job: Job):
        self.session = session
        self._job = job
        self._future = job.future

    @property
    def execution_id(self) -> str:
        return self._job.execution_id

    @property
    def mode(self) -> str:
        """The route the cell took (``thread``, ``async``, ``async-host``); empty until it starts."""
        return self._job.mode

    def done(self) -> bool:
        return self._future.done()

    def result(self, timeout: float | None = None) -> Any:
        """Wait for the cell (at most ``timeout`` seconds; ``TimeoutError`` after
        that, the cell keeps running) and return its ``ExecutionResult``."""
        try:
            return self._future.result(timeout)
        except concurrent.futures.TimeoutError:
            raise TimeoutError(f"execution {self.execution_id!r} is still running") from None

    def cancel(self, reason: str = "cancelled") -> bool:
        return self.session.cancel(self.execution_id, reason)

    def add_done_callback(self, callback: Callable[["ExecutionHandle"], None]) -> None:
        self._future.add_done_callback(lambda _f: callback(self))

    def __await__(self):
        return asyncio.wrap_future(self._future).__await__()

    def __repr__(self) -> str:
        state = "done" if self.done() else ("running" if self._job.started else "queued")
        return f"<ExecutionHandle {self.execution_id!r} {state}>"


class SessionBase:
    """What both kinds of session share: the ``execute`` family and context
    management.  A kind supplies ``_submit`` (queue a ``Job``, return its
    ``ExecutionHandle``), ``cancel``, ``close`` and ``aclose``."""

    #: where the session lives (``Engine.create_session(isolation=...)``)
    isolation = ""

    def _check_can_wait(self) -> None:
        """Refuse a blocking ``execute`` that could only wait for itself."""

    def execute(self, code: str, *, execution_id: str | None = None,
                timeout: float | None = None, transaction: bool | None = None,
                on_event: Callable[[dict], None] | None = None, wait: bool = True,
                queue: bool | None = None, store_history: bool = True,
                silent: bool = False) -> Any:
        """Run ``code`` in this session and return its ``ExecutionResult``.

        Thread-safe.  ``on_event(event)`` receives this execution's events
        (in the thread that produced them).  ``wait=False`` returns an
        :class:`ExecutionHandle` at once.  ``queue`` (default: the engine's)
        says what happens while the session is busy: wait in line, or raise
        ``SessionBusy``.  ``timeout`` counts from the moment the cell starts.
        A caller interrupted while waiting (``KeyboardInterrupt``) cancels it.
        """
        if wait:
            self._check_can_wait()
        handle = self._submit(code, execution_id, timeout, transaction, on_event,
                              queue, store_history, silent, host_loop=None)
        if not wait:
            return handle
        try:
            return handle._future.result()
        except BaseException:
            if not handle.done():
                self.cancel(handle.execution_id, "the caller stopped waiting")
            raise

    def submit(self, code: str, **options: Any) -> ExecutionHandle:
        """``execute(code, wait=False, **options)``."""
        return self.execute(code, wait=False, **options)

    async def execute_async(self, code: str, *, execution_id: str | None = None,
                            timeout: float | None = None, transaction: bool | None = None,
                            on_event: Callable[[dict], None] | None = None,
                            queue: bool | None = None, store_history: bool = True,
                            silent: bool = False, async_on_host: bool = True) -> Any:
        """The coroutine form of :meth:`execute`, for hosts with an asyncio loop.

        Sync cells run on the session's worker thread while the loop goes
        on; a top-level-``await`` cell runs on the calling loop in a task of
        its own (``async_on_host=False``: on the session's loop instead; a
        process session always uses its own loop, in its process).
        Cancelling the awaiting task cancels the execution.
        """
        loop = asyncio.get_running_loop()
        handle = self._submit(code, execution_id, timeout, transaction, on_event,
                              queue, store_history, silent,
                              host_loop=loop if async_on_host else None)
        try:
            return await asyncio.shield(asyncio.wrap_future(handle._future))
        except asyncio.CancelledError:
            self.cancel(handle.execution_id, "the caller stopped waiting")
            raise

    def __enter__(self) -> Any:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    async def __aenter__(self) -> Any:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.aclose()


class Session(SessionBase):
    """One isolated IPython shell with pyrepl3_ext loaded; create it with
    :meth:`Engine.create_session`."""

    isolation = "in-process"

    def _check_can_wait(self) -> None:
        if threading.current_thread() is self._executor.thread:
            raise RuntimeError(
                "a cell cannot wait for another cell of its own session (it would "
                "wait for itself); use wait=False")

    def __init__(self, engine: "Engine", session_id: str | None, config: Any):
        from traitlets.config import Config

        from ..extension import load

        self.engine = engine
        cfg = Config()
        cfg.HistoryManager.hist_file = ":memory:"  # no shared sqlite file, no saver thread
        # the history database is written from the worker thread and closed
        # from whichever thread closes the session (IPython 9 sets this too)
        cfg.HistoryManager.connection_options = {"check_same_thread": False}
        # an embedded engine reports output through events and results: it does
        # not echo Out[n], tracebacks and listened-to output on the host's
        # stdout (the host's config may turn the tee back on)
        cfg.PyREPL3.output_tee = False
        for extra in (engine.config, config):
            if extra is not None:
                cfg.merge(extra)
        if session_id is not None:
            cfg.PyREPL3.session_id = session_id
        self.singleton = False
        self._main_before = sys.modules.get("__main__")
        self._shell = self._create_shell(cfg)
        self._state = load(self._shell)
        self.id: str = self._state.session_id
        self._lock = threading.Lock()
        self._closed = False
        self._torn_down = False
        self._watchers: dict[str, Callable[[dict], None]] = {}
        self._unsubscribe: Callable[[], None] | None = None
        around = None if engine.concurrent else self._lend_main
        self._executor = SessionExecutor(self._shell, self.id, around)
        self._shell.events.register("pre_run_cell", self._on_pre_run_cell)

    def _create_shell(self, cfg: Any) -> Any:
        from IPython.core.interactiveshell import InteractiveShell

        before = sys.modules.get("__main__")
        if self.engine.concurrent:
            shell = InteractiveShell(config=cfg)
        else:
            with _gate_lock:
                if not InteractiveShell.initialized():
                    shell = InteractiveShell.instance(config=cfg)
                    self.singleton = True
                else:
                    shell = InteractiveShell(config=cfg)
        # IPython puts the new shell's module in sys.modules['__main__'],
        # replacing the host's; give the host its module back (the stock
        # build lends the session's module per cell, see _lend_main).  The
        # patched build manages __main__ itself (0005): hands off there.
        if not self.engine.concurrent and sys.modules.get("__main__") is shell.user_module:
            if before is None:
                sys.modules.pop("__main__", None)
            else:
                sys.modules["__main__"] = before
        return shell

    # -- properties -------------------------------------------------------------
    @property
    def shell(self) -> Any:
        """The session's ``InteractiveShell``."""
        if self._shell is None:
            raise SessionClosed(f"session {self.id!r} is closed")
        return self._shell

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def busy(self) -> bool:
        """A cell is running or queued."""
        return self._executor.busy

    @property
    def running(self) -> str | None:
        """The id of the execution running now, if any."""
        job = self._executor.running
        return job.execution_id if job is not None else None

    def __repr__(self) -> str:
        state = "closed" if self._closed else ("busy" if self.busy else "idle")
        return f"<Session {self.id!r} {state}>"

    # -- executing --------------------------------------------------------------
    def _submit(self, code: str, execution_id: str | None, timeout: float | None,
                transaction: bool | None, on_event: Callable[[dict], None] | None,
                queue: bool | None, store_history: bool, silent: bool,
                host_loop: asyncio.AbstractEventLoop | None) -> ExecutionHandle:
        global _gate_owner

        if not isinstance(code, str):
            raise TypeError(f"code must be a string, got {type(code).__name__}")
        if self._closed:
            raise SessionClosed(f"session {self.id!r} is closed")
        from .. import _options

        _options(execution_id, timeout, transaction, None)  # validate now, in the caller
        if on_event is not None and not callable(on_event):
            raise TypeError(f"on_event must be callable, got {on_event!r}")
        if execution_id is None:
            execution_id = self._state.new_execution_id()
        elif self._executor.find(execution_id) is not None:
            raise ValueError(f"execution {execution_id!r} is already queued or running "
                             f"in session {self.id!r}")
        job = Job(code, execution_id, timeout=timeout, transaction=transaction,
                  store_history=store_history, silent=silent, host_loop=host_loop)
        queue = self.engine.queue if queue is None else queue
        if on_event is not None:
            self._watch(execution_id, on_event)
            job.future.add_done_callback(lambda _f: self._unwatch(execution_id))
        try:
            if self.engine.concurrent:
                self._executor.submit(job, queue=queue)
            else:
                with _gate_lock:
                    owner = _gate_owner
                    if owner is not None and owner is not self and owner.busy:
                        raise ConcurrencyUnsupported(_concurrency_message(owner))
                    self._executor.submit(job, queue=queue)
                    _gate_owner = self
        except BaseException:
            if on_event is not None:
                self._unwatch(execution_id)
            raise
        return ExecutionHandle(self, job)

    def cancel(self, execution_id: str, reason: str = "cancelled") -> bool:
        """Cancel a queued or running execution of this session, from any thread.

        A queued one never starts (its result has ``error_before_exec`` =
        ``CellCancelled``, and it emits no events); a running one raises
        ``CellCancelled`` at its next safe point (``cancellation/``).
        Returns whether such an execution was found.
        """
        return bool(self.cancel_report(execution_id, reason)["cancelled"])

    def cancel_report(self, execution_id: str, reason: str = "cancelled") -> dict:
        """:meth:`cancel`, answered honestly: ``{"cancelled", "state", "detail"}``
        with ``state`` ``dropped`` (it was queued: it never runs), ``delivered``,
        ``pending`` (armed; ``detail`` says why it waits when known: a C call
        on a worker thread, a ``finally``), ``escalated``, or ``not-running``."""
        job = self._executor.cancel(execution_id, reason)
        if job is None:
            return {"cancelled": False, "state": "not-running", "detail": ""}
        if not job.started:
            return {"cancelled": True, "state": "dropped", "detail": ""}
        from ..cancellation import cancel

        report = cancel(self._shell, execution_id, reason, report=True)
        if not report.hit:  # between leaving the queue and opening its scope
            return {"cancelled": True, "state": "pending",
                    "detail": "the cell is starting; it is cancelled as it starts"}
        return report.as_dict()

    def _on_pre_run_cell(self, info: Any) -> None:
        # A cancel that arrived after the job left the queue but before the
        # cell's cancel scope opened found no scope to mark; the scope is
        # open now (this hook runs after the extension's).
        execution = self._state.current_execution()
        if execution is None:
            return
        reason = self._executor.cancel_pending_for(execution.id)
        if reason is not None:
            from ..cancellation import cancel

            cancel(self._shell, execution.id, reason)

    # -- the host API of one session (the same on a process session) ----------------
    @property
    def execution_count(self) -> int:
        return self.shell.execution_count

    def variables(self, *, max_repr: int = 100) -> list[dict]:
        """Every user variable, described (name, type, repr cut at ``max_repr``)."""
        from ..namespace import manager

        names = manager(self.shell)
        return [names.describe(n, max_repr=max_repr) for n in names.names()]

    def variable(self, name: str, *, max_repr: int = 1000,
                 max_value_bytes: int | None = None) -> dict:
        """One variable described; with its ``value`` too when it is plain JSON
        data (str, numbers, lists, dicts) encoding to at most ``max_value_bytes``."""
        import json

        from ..namespace import manager

        names = manager(self.shell)
        described = names.describe(name, max_repr=max_repr)
        value = names.get(name)
        if isinstance(value, (str, int, float, bool, list, dict, type(None))):
            try:
                size = len(json.dumps(value))
            except (TypeError, ValueError, RecursionError):
                size = None
            if size is not None and (max_value_bytes is None or size <= max_value_bytes):
                described["value"] = value
        return described

    def set_variable(self, name: str, value: Any) -> None:
        from ..namespace import manager

        manager(self.shell).set(name, value)

    def delete_variable(self, name: str) -> None:
        from ..namespace import manager

        manager(self.shell).delete(name)

    def take_snapshot(self, name: str, *, durable: bool = False) -> dict:
        """Deep-copy the namespace under ``name``.  ``durable`` matters for
        process sessions only (an in-process snapshot lives as long as the host)."""
        from ..namespace import manager

        return manager(self.shell).take_snapshot(name)

    def restore_snapshot(self, name: str) -> dict:
        from ..namespace import manager

        return manager(self.shell).restore_snapshot(name)

    def delete_snapshot(self, name: str) -> None:
        from ..namespace import manager

        manager(self.shell).delete_snapshot(name)

    def save_snapshot(self, name: str, path: str, *, key: bytes | None = None) -> dict:
        """Write snapshot ``name`` to the signed file ``path`` (``key``: the
        signing key; None: the per-user key file)."""
        from ..namespace import manager

        return manager(self.shell).save_snapshot(name, path, key=key)

    def load_snapshot(self, path: str, *, name: str | None = None, key: bytes | None = None,
                      restore: bool = False) -> dict:
        """Verify the signed file ``path`` and hold it as snapshot ``name``
        (default: the name it was saved under); ``restore`` applies it too."""
        from ..namespace import manager

        names = manager(self.shell)
        info = names.load_snapshot(path, name=name, key=key)
        return names.restore_snapshot(info["name"]) if restore else info

    def reply_input(self, input_id: str, text: str | None) -> bool:
        """Answer an ``input_requested`` event of this session (None: end of input)."""
        from .. import reply_input

        return reply_input(self.shell, input_id, text)

    def serve_input(self) -> Callable[[], None]:
        """Declare that the host answers this session's ``input()`` calls
        (through :meth:`reply_input`); returns the function that takes it back."""
        from .. import subscribe

        return subscribe(self.shell, _ignore_event, handles_input=True)

    def set_policy(self, policy: Any) -> None:
        from .. import set_policy

        set_policy(self.shell, policy)

    def grant(self, name: str, capability: Any) -> None:
        """Grant a host capability (``FilesCapability``, ``CustomCapability``) as ``name``."""
        from .. import grant

        grant(self.shell, name, capability)

    def grant_input(self) -> None:
        """Grant the ``input`` capability (for policies that remove the builtin)."""
        from .. import grant
        from ..input_request import capability

        grant(self.shell, "input", capability())

    # -- per-execution events ---------------------------------------------------
    def _watch(self, execution_id: str, callback: Callable[[dict], None]) -> None:
        # One bus subscriber per session, only while some execution has a
        # callback: executions without one cost nothing extra (no events
        # are built when nobody listens).
        with self._lock:
            self._watchers[execution_id] = callback
            if self._unsubscribe is None:
                self._unsubscribe = self._state.bus.subscribe(self._dispatch)

    def _unwatch(self, execution_id: str) -> None:
        with self._lock:
            self._watchers.pop(execution_id, None)
            if not self._watchers and self._unsubscribe is not None:
                self._unsubscribe()
                self._unsubscribe = None

    def _dispatch(self, event: dict) -> None:
        callback = self._watchers.get(event["execution_id"])
        if callback is not None:
            try:
                callback(event)
            except Exception as exc:  # noqa: BLE001 - a host callback must not break the cell
                self._state.report_internal_error(f"on_event callback of session {self.id}", exc)

    # -- stock: lend __main__ ----------------------------------------------------
    @contextlib.contextmanager
    def _lend_main(self) -> Iterator[None]:
        module = self._shell.user_module
        name = getattr(module, "__name__", "__main__")
        before = sys.modules.get(name)
        sys.modules[name] = module
        try:
            yield
        finally:
            if sys.modules.get(name) is module:
                if before is None:
                    sys.modules.pop(name, None)
                else:
                    sys.modules[name] = before

    # -- closing ------------------------------------------------------------------
    def _begin_close(self, reason: str) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        running = self._executor.running
        self._executor.shutdown(reason)
        if running is not None and running.started:
            from ..cancellation import cancel

            cancel(self._shell, running.execution_id, reason)

    def _finish_close(self, timeout: float | None) -> bool:
        done = self._executor.join(timeout)
        if done:
            self._teardown()
        else:
            # the cell did not stop in time (blocked in C code): the worker
            # tears the session down when it ends
            self._executor.after_exit(self._teardown)
        self.engine._forget(self)
        return done

    def close(self, timeout: float | None = 10.0) -> bool:
        """Cancel the running cell and drop queued ones, then release the shell.

        Idempotent.  Returns True when the session is fully closed; False if
        the running cell did not end within ``timeout`` seconds (it is then
        released as soon as the cell ends).  A closed session refuses work
        with ``SessionClosed``.
        """
        self._begin_close("session closed")
        return self._finish_close(timeout)

    async def aclose(self, timeout: float | None = 10.0) -> bool:
        """:meth:`close` without blocking the caller's event loop."""
        self._begin_close("session closed")
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, self._executor.join, timeout)
        return self._finish_close(0)

    def _teardown(self) -> None:
        with self._lock:
            if self._torn_down:
                return
            self._torn_down = True
        shell = self._shell
        from ..extension import unload

        try:
            shell.events.unregister("pre_run_cell", self._on_pre_run_cell)
        except ValueError:
            pass
        with self._lock:
            self._watchers.clear()
            if self._unsubscribe is not None:
                self._unsubscribe()
                self._unsubscribe = None
        try:
            unload(shell)
        finally:
            try:
                _compat.close_shell(shell)
            finally:
                self._release(shell)

    def _release(self, shell: Any) -> None:
        """Give back what the session held of the process; drop the shell."""
        global _gate_owner

        if not self.engine.concurrent and sys.modules.get("__main__") is shell.user_module:
            if self._main_before is None:
                sys.modules.pop("__main__", None)
            else:
                sys.modules["__main__"] = self._main_before
        if self.singleton:
            from IPython.core.interactiveshell import InteractiveShell

            if InteractiveShell._instance is shell:
                InteractiveShell.clear_instance()
        with _gate_lock:
            if _gate_owner is self:
                _gate_owner = None
        self._executor.shell = None
        self._shell = None


def _positive(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"{name} must be a positive number of seconds, got {value!r}")
    return float(value)


def _ignore_event(event: dict) -> None:
    """The input host's subscription: events reach hosts per execution."""


def _concurrency_message(owner: Session) -> str:
    import IPython

    return (f"session {owner.id!r} has a cell running or queued, and this is stock "
            f"IPython {IPython.__version__}: its shells share sys.displayhook, the "
            f"history outputs and the asyncio loop, so sessions run one at a time "
            f"here. Run sessions concurrently on the pyrepl3-patched IPython build "
            f"(the `pyrepl3` package built by `nox -s patched`, docs/upstream.md), "
            f"or wait until the other session is idle (Session.busy).")


class Engine:
    """Creates and closes isolated sessions.

    ``config`` (a traitlets ``Config``) is applied to every session's shell
    (``c.PyREPL3...``, ``c.InteractiveShell...``); history is in memory
    unless it says otherwise.  ``queue`` is the default busy policy of
    ``Session.execute``.
    """

    def __init__(self, *, config: Any = None, queue: bool = True,
                 isolation: str = "in-process", kill_grace: float = 3.0,
                 limits: Any = None, confine: Any = None,
                 log: Callable[[str], None] | None = None):
        if isolation not in ISOLATIONS:
            raise ValueError(f"isolation must be one of {', '.join(ISOLATIONS)}, "
                             f"got {isolation!r}")
        self.config = config
        self.queue = queue
        #: the isolation of sessions created without saying (``create_session``)
        self.isolation = isolation
        #: seconds a process session's cell may ignore a cancel before its process is killed
        self.kill_grace = _positive("kill_grace", kill_grace)
        #: process sessions' limits and confinement when create_session does not say
        self.limits = limits
        self.confine = confine
        if limits is not None:
            from .limits import Limits

            self.limits = Limits.parse(limits)
        self._log_to = log
        self._sessions: dict[str, Any] = {}
        self._lock = threading.Lock()
        self._closed = False
        self._supervisor: Any = None
        #: Whether in-process sessions can run cells at the same time (the
        #: patched build; process sessions always can).
        self.concurrent: bool = _compat.is_patched_build()

    @property
    def sessions(self) -> list[Session]:
        with self._lock:
            return list(self._sessions.values())

    def get_session(self, session_id: str) -> Session:
        with self._lock:
            try:
                return self._sessions[session_id]
            except KeyError:
                raise KeyError(f"no open session {session_id!r}") from None

    def create_session(self, session_id: str | None = None, *, config: Any = None,
                       isolation: str | None = None, limits: Any = None,
                       confine: bool | None = None, kill_grace: float | None = None) -> Any:
        """A new isolated session (``session_id`` generated when omitted).

        ``isolation``: ``"in-process"`` (a shell in this process: dense and
        cheap, for trusted code) or ``"process"`` (a supervised process of
        its own, forked from a warm template: crashes, memory and CPU stay
        inside it and every blocking call can be cancelled); default the
        engine's.  ``limits`` and ``confine`` apply to process sessions
        (``docs/isolation.md``); ``confine`` defaults to on for the
        ``restricted`` policy.
        """
        if session_id is not None and (not isinstance(session_id, str) or not session_id):
            raise ValueError(f"session_id must be a non-empty string, got {session_id!r}")
        isolation = self.isolation if isolation is None else isolation
        if isolation not in ISOLATIONS:
            raise ValueError(f"isolation must be one of {', '.join(ISOLATIONS)}, "
                             f"got {isolation!r}")
        if isolation == "in-process" and (limits is not None or confine):
            raise ValueError("limits and confine need isolation='process' (an in-process "
                             "session shares this process's memory and privileges)")
        with self._lock:
            if self._closed:
                raise SessionClosed("the engine is closed")
            if session_id is not None and session_id in self._sessions:
                raise ValueError(f"a session {session_id!r} is already open")
        if isolation == "process":
            from .process_session import create

            session = create(self, session_id, config,
                             limits=self.limits if limits is None else limits,
                             confine=self.confine if confine is None else confine,
                             kill_grace=self.kill_grace if kill_grace is None
                             else _positive("kill_grace", kill_grace))
        else:
            session = Session(self, session_id, config)
        with self._lock:
            if self._closed or session.id in self._sessions:
                clash = not self._closed
                session.close()
                if clash:
                    raise ValueError(f"a session {session.id!r} is already open")
                raise SessionClosed("the engine is closed")
            self._sessions[session.id] = session
        return session

    def _supervisor_for_processes(self) -> Any:
        """The supervisor of this engine's session processes (started on first use)."""
        with self._lock:
            if self._closed:
                raise SessionClosed("the engine is closed")
            if self._supervisor is None:
                from .supervisor import Supervisor

                self._supervisor = Supervisor(self.config, log=self._log_to)
            supervisor = self._supervisor
        supervisor.start(wait=True)
        return supervisor

    def warm_up(self, wait: bool = False) -> None:
        """Start the fork server of process sessions now (in the background
        unless ``wait``), so the first ``isolation="process"`` session does
        not pay for importing IPython."""
        with self._lock:
            if self._supervisor is None:
                from .supervisor import Supervisor

                self._supervisor = Supervisor(self.config, log=self._log_to)
            supervisor = self._supervisor
        supervisor.start(wait=wait)

    def _log(self, text: str) -> None:
        if self._log_to is not None:
            self._log_to(text)
        else:
            print(f"[pyrepl3 engine] {text}", file=sys.__stderr__, flush=True)

    def _forget(self, session: Any) -> None:
        with self._lock:
            if self._sessions.get(session.id) is session:
                del self._sessions[session.id]

    def close(self, timeout: float | None = 10.0) -> bool:
        """Close every session (running cells are cancelled all at once first).

        Idempotent; True when every session closed within ``timeout``."""
        with self._lock:
            self._closed = True
            sessions = list(self._sessions.values())
        for session in sessions:
            session._begin_close("engine closed")
        ok = True
        # one deadline for all: N stuck cells cost ``timeout``, not N times it
        deadline = None if timeout is None else time.monotonic() + timeout
        for session in sessions:
            left = None if deadline is None else max(deadline - time.monotonic(), 0.0)
            ok = session._finish_close(left) and ok
        self._close_supervisor()
        return ok

    def _close_supervisor(self) -> None:
        with self._lock:
            supervisor, self._supervisor = self._supervisor, None
        if supervisor is not None:
            supervisor.close()

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    async def __aenter__(self) -> "Engine":
        return self

    async def aclose(self, timeout: float | None = 10.0) -> bool:
        """:meth:`close` without blocking the caller's event loop (the shells are
        released in the loop's thread, like :meth:`close` does in the caller's)."""
        with self._lock:
            self._closed = True
            sessions = list(self._sessions.values())
        for session in sessions:
            session._begin_close("engine closed")
        loop = asyncio.get_running_loop()
        in_process = [s for s in sessions if isinstance(s, Session)]
        others = [s for s in sessions if not isinstance(s, Session)]
        await asyncio.gather(*(loop.run_in_executor(None, s._executor.join, timeout)
                               for s in in_process))
        ok = True
        for session in in_process:
            ok = session._finish_close(0) and ok
        for closed in await asyncio.gather(*(loop.run_in_executor(None, s.close, timeout)
                                             for s in others)):
            ok = closed and ok
        await loop.run_in_executor(None, self._close_supervisor)
        return ok

    async def __aexit__(self, *exc: Any) -> None:
        await self.aclose()
