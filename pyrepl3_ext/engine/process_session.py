"""A session that lives in a process of its own (``isolation="process"``).

:class:`ProcessSession` has the API of the in-process
:class:`~pyrepl3_ext.engine.engine.Session` (execute, cancel, input,
namespace, snapshots, grants, close), so hosts and the server treat both
alike.  The difference is what a failure costs: a crash, a memory bomb or
a cell that ignores its cancel ends this session's process, never the host
or another session.

What the parent keeps, and why:

* the queue: one execution is in the worker at a time; queued ones wait
  here, so cancelling them never involves the worker;
* the deadlines that do not trust the worker: a cell that has not ended
  ``kill_grace`` seconds after a cancel (or after its timeout) is killed
  with its process, and reported as ``error`` with kind ``killed``;
* what a death means: the worker's exit status (and, where limits are on,
  its cgroup's OOM count) becomes the *cause* (``crashed``, ``oom``,
  ``exited``, ``killed``...), reported once on every affected execution
  (an ``error`` and a ``finished`` event, ``seq`` continuing the worker's)
  and in :attr:`ProcessSession.lost`; :meth:`restart` gives the session a
  fresh process under the same id.
* the capabilities: a grant's implementation stays here and serves the
  worker's calls; the worker holds a handle only.

Results cross as data: ``execute`` returns a :class:`ProcessExecutionResult`
whose ``result`` is None (the object lives in the worker) and whose
``data`` is the result's mime bundle.
"""

from __future__ import annotations

import asyncio
import collections
import os
import threading
import time
import types
from typing import Any, Callable

from ..errors import (CellCancelled, CellError, CellTimeout, SessionBusy, SessionClosed,
                      SessionLost, SnapshotRefused)
from ..events import lost_outcome
from .channel import ChannelError
from .engine import ExecutionHandle, SessionBase
from .executor import Job
from .worker import describe_error, rebuild_error


class ProcessExecutionResult:
    """What IPython's ``ExecutionResult`` says about a cell, carried as data."""

    def __init__(self, code: str, execution_id: str, *, store_history: bool, silent: bool):
        self.info = types.SimpleNamespace(raw_cell=code, store_history=store_history,
                                          silent=silent, transformed_cell=None)
        self.pyrepl3_execution_id = execution_id
        self.execution_count: int | None = None
        self.error_before_exec: BaseException | None = None
        self.error_in_exec: BaseException | None = None
        #: the result object stays in the session process: see :attr:`data`
        self.result = None
        #: the ``result`` event's mime bundle (``{"text/plain": "42"}``), or None
        self.data: dict | None = None

    @property
    def success(self) -> bool:
        return self.error_before_exec is None and self.error_in_exec is None

    def raise_error(self) -> None:
        if self.error_before_exec is not None:
            raise self.error_before_exec
        if self.error_in_exec is not None:
            raise self.error_in_exec

    def __repr__(self) -> str:
        state = "ok" if self.success else repr(self.error_before_exec or self.error_in_exec)
        return f"<ProcessExecutionResult {self.pyrepl3_execution_id!r} {state}>"


def _error_from(described: dict, *, reason_kind: str | None = None) -> BaseException:
    kind = described.get("kind", "exception")
    ename = str(described.get("ename", "Exception"))
    evalue = str(described.get("evalue", ""))
    if kind == "cancelled":
        return CellCancelled(evalue or "cancelled")
    if kind == "timeout":
        return CellTimeout(evalue or "deadline exceeded")
    return CellError(ename, evalue, kind)


class _Running:
    """The parent's record of the execution now in the worker."""

    __slots__ = ("job", "result", "on_event", "last_seq", "started_at", "cancelled",
                 "timers", "transaction")

    def __init__(self, job: Job, result: ProcessExecutionResult,
                 on_event: Callable[[dict], None] | None):
        self.job = job
        self.result = result
        self.on_event = on_event
        self.last_seq = -1
        self.started_at: float | None = None
        self.cancelled: str | None = None
        #: the supervisor's deadlines armed for this execution (cancelled when it ends)
        self.timers: list[int] = []
        #: a transaction cell's checkpoint request: its reply slot, answered
        #: before the cell's first event (the worker reads requests in order)
        self.transaction: list | None = None


class ProcessSession(SessionBase):
    """One session in a supervised process of its own; create it with
    ``Engine.create_session(..., isolation="process")``."""

    isolation = "process"

    def __init__(self, engine: Any, session_id: str, config: dict, *,
                 limits: Any = None, confine: Any = None, kill_grace: float = 3.0,
                 spawn_timeout: float = 30.0):
        self.engine = engine
        self.id = session_id
        self._config = config
        from .limits import Limits

        #: what the session may use (``limits.Limits``; ``docs/isolation.md``)
        self.limits = Limits.parse(limits)
        #: what ``confine.apply`` is asked for (None: not confined)
        self.confine = confine
        self._scratch: str | None = None
        self.kill_grace = kill_grace
        self.spawn_timeout = spawn_timeout
        self._supervisor = engine._supervisor_for_processes()
        self._lock = threading.RLock()
        self._queue: collections.deque = collections.deque()
        self._running: _Running | None = None
        self._closed = False
        #: None while the process lives; else {"kind", "message", "status"}
        self.lost: dict | None = None
        self._lost_callbacks: list[Callable[["ProcessSession", dict], None]] = []
        #: the worker's answer to the last standby request (``_after_cell``):
        #: ``{"standby": bool, "pid"/"why", "prefaulted"}``, for diagnostics
        self.standby: dict | None = None
        #: checkpoints of finished transactions, ended once a standby is made
        self._retiring: list[Any] = []
        self._grants: dict[str, Any] = {}
        #: durable snapshots: name -> signed bytes the worker made (opaque here)
        self._durable: dict[str, bytes] = {}
        self._snapshot_key = os.urandom(32)
        self._calls: dict[int, list] = {}
        self._call_ids = iter(range(1, 1 << 62))
        self._policy: Any = None
        self.confinement: dict = {}
        self._execution_count: int | None = None
        self._kill_reason: tuple[str, str] | None = None
        self._closing_cleanly = False
        self._said_no_cgroup = False
        #: the session's cgroup: its worker, the worker's children and its
        #: checkpoints (one lineage; a fresh start makes a new one)
        self._cgroup: Any = None
        self._oom_base = 0
        #: checkpoints: name -> the paused fork's WorkerProcess
        self._checkpoints: dict[str, Any] = {}
        self.worker: Any = None
        self.pid: int | None = None
        self._start_worker()

    # -- the process ------------------------------------------------------------
    def _release_cgroup(self) -> None:
        cgroup, self._cgroup = self._cgroup, None
        if cgroup is not None:
            try:
                cgroup.kill_all()
                cgroup.remove()
            except Exception as exc:  # noqa: BLE001
                self.engine._log(f"session {self.id!r}: removing its cgroup: {exc!r}")

    def _confine_request(self, *, fork: bool = False) -> dict | None:
        """What the worker confines itself to.  ``fork``: it may fork copies of
        itself (checkpoints), offered only where a pids cgroup bounds them."""
        if self.confine is None:
            return None
        import shutil
        import tempfile

        if self._scratch is not None:  # a restart: the new process starts clean
            shutil.rmtree(self._scratch, ignore_errors=True)
        self._scratch = tempfile.mkdtemp(prefix=f"pyrepl3-{_safe_name(self.id)}-")
        return {**self.confine, "scratch": self._scratch, "fork": fork,
                "writable": [self._scratch, *self.confine.get("writable", ())]}

    def _start_worker(self) -> None:
        from .limits import SessionCgroup

        worker = self._supervisor.spawn(self.spawn_timeout)
        try:
            # into the session's cgroup before it runs anything of the session
            cgroup = SessionCgroup.create(f"{self.id}-{worker.pid}", self.limits)
            if cgroup is not None:
                cgroup.add(worker.pid)
                self._cgroup = cgroup
                self._oom_base = cgroup.oom_kills()
            elif not self._said_no_cgroup:
                self._said_no_cgroup = True
                self.engine._log(f"session {self.id!r}: no cgroup ({SessionCgroup.last_reason}); "
                                 f"memory is limited per process (RLIMIT_DATA), processes "
                                 f"not at all")
            config = self._config
            if self.limits.output_bytes is not None:
                config = {**config, "PyREPL3": {**config.get("PyREPL3", {}),
                                                "output_limit": self.limits.output_bytes}}
            worker.channel.send({"op": "assign", "session_id": self.id, "config": config,
                                 "limits": self.limits.as_dict(),
                                 "memory_fallback": cgroup is None or not cgroup.has_memory,
                                 "confine": self._confine_request(
                                     fork=cgroup is not None and "pids" in cgroup.controllers)})
            worker.channel.sock.settimeout(self.spawn_timeout)
            try:
                reply = worker.channel.recv()
            finally:
                worker.channel.sock.settimeout(None)
            if reply is None or reply.get("op") != "ready":
                detail = reply.get("error") if reply else None
                if isinstance(detail, dict) and detail.get("type") == "ConfinementUnavailable":
                    from .confine import ConfinementUnavailable

                    raise ConfinementUnavailable(str(detail.get("message", ""))[:2000])
                raise SessionLost("failed", f"the session process did not start: "
                                            f"{rebuild_error(detail) if detail else 'it exited'}")
        except BaseException:
            worker.kill()
            worker.channel.close()
            self._release_cgroup()
            raise
        self.worker = worker
        self.pid = worker.pid
        self._execution_count = reply.get("execution_count")
        self.confinement = reply.get("confinement") or {}
        for gap in self.confinement.get("degraded", ()):
            self.engine._log(f"session {self.id!r}: confinement degraded: "
                             f"{gap.get('layer')}: {gap.get('reason')}")
        self._watch(worker)

    def _read(self, worker: Any) -> None:
        channel = worker.channel
        while True:
            try:
                message = channel.recv()
            except ChannelError as exc:
                self.engine._log(f"session {self.id!r} sent a malformed message ({exc}); "
                                 f"killing its process")
                worker.kill()
                break
            if message is None:
                break
            try:
                self._handle(worker, message)
            except Exception as exc:  # noqa: BLE001 - a bad message must not end the reader
                self.engine._log(f"session {self.id!r}: message {message.get('op')!r} "
                                 f"failed: {exc!r}")
        # end of stream: the process is exiting or gone; its status follows
        # from the fork server (a live one that closed its channel is killed)
        if worker.wait(2.0) is None:
            worker.kill()
        # the process is gone: its socket is closed now, not when the gc finds it
        # (sending on it fails as for a dead process; _send expects that)
        channel.close()

    def _handle(self, worker: Any, message: dict) -> None:
        op = message.get("op")
        if op == "event":
            self._forward(message.get("event"))
        elif op == "done":
            self._done(message)
        elif op == "reply":
            with self._lock:
                slot = self._calls.pop(message.get("id"), None)
            if slot is not None:
                _fulfil(slot, message)
        elif op == "capability":
            threading.Thread(target=self._serve_capability, args=(worker, message),
                             daemon=True, name="pyrepl3-capability").start()

    def _forward(self, event: Any) -> None:
        if not isinstance(event, dict):
            return
        with self._lock:
            running = self._running
            if running is None or event.get("execution_id") != running.job.execution_id:
                return
            seq = event.get("seq")
            if isinstance(seq, int):
                running.last_seq = max(running.last_seq, seq)
            kind = event.get("type")
            if kind == "started":
                running.job.started = True
                running.job.mode = str(event.get("mode") or "")
                running.started_at = time.monotonic()
                self._arm_wall_clock(running)
            elif kind == "result":
                running.result.data = event.get("data")
            callback = running.on_event
        if kind == "input_requested" and callback is None:
            # nobody here answers input(): end it, as a closed stdin would
            self._send({"op": "call", "id": 0, "method": "reply_input",
                        "params": {"input_id": event.get("input_id"), "text": None}})
        if callback is not None:
            try:
                callback(event)
            except Exception as exc:  # noqa: BLE001 - a host callback must not break the reader
                self.engine._log(f"on_event callback of session {self.id!r} failed: {exc!r}")

    def _arm_wall_clock(self, running: _Running) -> None:
        """The deadlines that do not trust the worker, from the cell's start."""
        timers = self._supervisor.timers
        now = time.monotonic()
        timeout = running.job.timeout
        if timeout is not None:
            # the cooperative timeout runs in the worker; a cell that ignores
            # it loses its process ``kill_grace`` later
            running.timers.append(timers.call_at(
                now + timeout + self.kill_grace,
                lambda: self._kill_running(running, "killed",
                                           f"the cell ignored its timeout of {timeout} s "
                                           f"for {self.kill_grace} s")))
        cell_seconds = self.limits.cell_seconds
        if cell_seconds is not None:
            running.timers.append(timers.call_at(
                now + cell_seconds, lambda: self._hard_deadline(running, cell_seconds)))

    def _hard_deadline(self, running: _Running, seconds: float) -> None:
        with self._lock:
            if self._running is not running:
                return
        self._send({"op": "cancel", "execution_id": running.job.execution_id,
                    "reason": f"the session's cell time limit ({seconds} s)"})
        running.timers.append(self._supervisor.timers.call_at(
            time.monotonic() + self.kill_grace,
            lambda: self._kill_running(running, "cell_timeout",
                                       f"the cell passed the session's cell time limit "
                                       f"of {seconds} s")))

    def _kill_running(self, running: _Running, kind: str, message: str) -> None:
        """The cell did not stop when asked: the process goes, ``kind`` says why."""
        with self._lock:
            if self._running is not running or self.lost is not None:
                return
            self._kill_reason = (kind, f"{message}: the session process was killed")
        self.engine._log(f"session {self.id!r}: {message}; killing its process")
        self.worker.kill()

    def _done(self, message: dict) -> None:
        finished = message.get("finished")
        if isinstance(finished, dict):
            self._forward(finished)
        with self._lock:
            running = self._running
            if running is None or message.get("execution_id") != running.job.execution_id:
                return
            self._running = None
            result = running.result
        self._disarm(running)
        checkpoint = self._transaction_checkpoint(running)
        transaction = checkpoint is not None
        if transaction and message.get("status") != "ok":
            self._roll_back(checkpoint)  # before the next cell: it runs on the old state
            checkpoint = None
        result.execution_count = message.get("execution_count")
        if isinstance(result.execution_count, int):
            # the shell's count after a stored cell is one more than the cell's
            self._execution_count = result.execution_count + (1 if running.job.store_history
                                                              else 0)
        error = message.get("error")
        if isinstance(error, dict):
            exc = _error_from(error)
            if message.get("refused"):
                exc = rebuild_error(message["refused"])
            if error.get("before_exec"):
                result.error_before_exec = exc
            else:
                result.error_in_exec = exc
        self._settle(running.job, result)
        self._next()
        self._after_cell(transaction, retire=checkpoint)

    def _after_cell(self, transaction: bool, retire: Any) -> None:
        """Ask for a standby checkpoint when the session went idle after a
        transaction cell (or transactions are its default): the next one
        then starts without a fork.  ``retire``, the checkpoint of a
        transaction that succeeded, lives until the standby is made, so the
        worker can tell the pages the cell wrote (``prefault.py``), or until
        the next request, whichever comes first: alive, it would make the
        next cell's writes copy pages three ways."""
        if retire is not None:
            with self._lock:
                self._retiring.append(retire)
        wanted = transaction or self._transactions_by_default()
        if not wanted or self.busy or self.lost is not None or self._closed:
            self._end_retiring()
            return
        # learning needs ``retire`` alive, which costs the next cell when it
        # comes at once (three-way page copies): only while the session
        # idles between cells, as its last standby request found
        last = self.standby
        learn = retire is not None and (last is None or bool(last.get("standby")))
        if not learn:
            self._end_retiring()

        def made(reply: dict) -> None:
            self.standby = reply.get("result")
            self._end_retiring()

        try:
            self._ask({"op": "standby", "idle": self.standby_idle, "learn": learn},
                      on_reply=made)
        except (SessionClosed, SessionLost):
            self._end_retiring()

    def _end_retiring(self) -> None:
        with self._lock:
            retiring, self._retiring = self._retiring, []
        for checkpoint in retiring:
            self._end_checkpoint(checkpoint)

    def _disarm(self, running: _Running) -> None:
        for timer in running.timers:
            self._supervisor.timers.cancel(timer)

    def _settle(self, job: Job, result: Any = None, exc: BaseException | None = None) -> None:
        from .executor import _settle

        _settle(job.future, result, exc)

    def _next(self) -> None:
        if self._retiring:
            self._end_retiring()
        with self._lock:
            if self._running is not None or not self._queue or self.lost is not None:
                return
            job, on_event = self._queue.popleft()
            result = ProcessExecutionResult(job.code, job.execution_id,
                                            store_history=job.store_history, silent=job.silent)
            running = self._running = _Running(job, result, on_event)
            cancelled = job.cancel_reason
        if cancelled is not None:
            with self._lock:
                self._running = None
            result.error_before_exec = CellCancelled(cancelled)
            self._settle(job, result)
            self._next()
            return
        if self._wants_transaction(job):
            # a checkpoint first, pipelined: the worker forks before it reads
            # the execute, and the parent never waits for it on this thread
            running.transaction = self._ask({"op": "checkpoint"})
        self._send({"op": "execute", "execution_id": job.execution_id, "code": job.code,
                    "timeout": job.timeout, "transaction": job.transaction,
                    "store_history": job.store_history, "silent": job.silent})

    def _send(self, message: dict) -> bool:
        worker = self.worker
        if worker is None:
            return False
        try:
            worker.channel.send(message)
            return True
        except OSError:
            return False

    # -- a death ------------------------------------------------------------------
    def _watch(self, worker: Any) -> None:
        """Read what ``worker`` sends, and learn of its end."""
        worker.reader = threading.Thread(target=self._read, args=(worker,), daemon=True,
                                         name=f"pyrepl3-process-{self.id}")
        worker.reader.start()
        worker.on_exit(lambda status, w=worker: self._worker_exited(w, status))

    def _worker_exited(self, worker: Any, status: int) -> None:
        if worker is not self.worker:
            return
        # What the process wrote before it died comes first: its reader
        # reaches the end of the stream once the last frame is handled (a
        # cell that crashes at once must still count as started).  Bounded:
        # a copy the cell forked may hold the socket open.
        reader = worker.reader
        if reader is not None and reader is not threading.current_thread():
            reader.join(2.0)
        if self._closing_cleanly:
            self._fail_all(SessionClosed(f"session {self.id!r} is closed"), None)
            return
        kind, message = self._cause(status)
        lost = {"kind": kind, "message": message, "status": status}
        running = self._running
        checkpoint = self._transaction_checkpoint(running) if running is not None else None
        if checkpoint is not None:
            # a transaction cell's process died: the session goes on from the
            # checkpoint taken before the cell; only the cell is lost
            rolled = {**lost, "message": f"{message}; the session was rolled back to "
                                         f"before the cell"}
            try:
                self._roll_back(checkpoint)
            except Exception as exc:  # noqa: BLE001 - then the session is lost after all
                self.engine._log(f"session {self.id!r}: the transaction's checkpoint did "
                                 f"not resume: {exc!r}")
            else:
                self.engine._log(f"session {self.id!r}: {rolled['message']}")
                self._fail_running(SessionLost(kind, rolled["message"]), rolled)
                self._next()
                return
        with self._lock:
            self.lost = lost
            callbacks = list(self._lost_callbacks)
        self.engine._log(f"session {self.id!r} lost: {message}")
        self._fail_all(SessionLost(kind, message), lost)
        for callback in callbacks:
            try:
                callback(self, lost)
            except Exception as exc:  # noqa: BLE001
                self.engine._log(f"lost callback of session {self.id!r} failed: {exc!r}")

    def _cause(self, status: int) -> tuple[str, str]:
        killed = self._kill_reason
        if killed is not None:
            self._kill_reason = None
            return killed
        if status == -1:
            return "exited", "the fork server ended, and every session process with it"
        from .limits import explain_exit

        cgroup = self._cgroup
        oom_kills = 0
        if cgroup is not None:
            try:
                oom_kills = cgroup.oom_kills() - self._oom_base
            except OSError:
                pass
        used = self.worker.cpu_seconds
        cpu_limited = (self.limits.cpu_seconds is not None and used is not None
                       and used >= self.limits.cpu_seconds)
        return explain_exit(status, limits=self.limits, oom_kills=oom_kills,
                            cpu_limited=cpu_limited)

    def _fail_all(self, error: BaseException, lost: dict | None) -> None:
        self._fail_running(error, lost)
        with self._lock:
            queued = list(self._queue)
            self._queue.clear()
        for job, _on_event in queued:
            result = ProcessExecutionResult(job.code, job.execution_id,
                                            store_history=job.store_history, silent=job.silent)
            result.error_before_exec = error
            self._settle(job, result)
        with self._lock:
            calls = list(self._calls.values())
            self._calls.clear()
        for slot in calls:
            _fulfil(slot, {"error": {"type": "SessionClosed" if lost is None else "RuntimeError",
                                     "message": error.args[-1] if error.args else str(error)}})

    def _fail_running(self, error: BaseException, lost: dict | None) -> None:
        with self._lock:
            running, self._running = self._running, None
        if running is not None:
            self._disarm(running)
            result = running.result
            if running.job.started:
                result.error_in_exec = error
                if lost is not None:
                    self._report_lost(running, lost)
            else:
                result.error_before_exec = error
            self._settle(running.job, result)

    def _report_lost(self, running: _Running, lost: dict) -> None:
        """The worker cannot say how its cell ended: the parent says it, once."""
        if running.on_event is None:
            return
        asked = lost["kind"] == "cell_timeout" or (lost["kind"] == "killed" and running.cancelled)
        duration = (time.monotonic() - running.started_at) if running.started_at else 0.0
        for event in lost_outcome(running.job.execution_id, self.id, running.last_seq + 1,
                                  lost["kind"], lost["message"],
                                  "cancelled" if asked else "error", duration):
            try:
                running.on_event(event)
            except Exception as exc:  # noqa: BLE001
                self.engine._log(f"on_event callback of session {self.id!r} failed: {exc!r}")

    def add_lost_callback(self, callback: Callable[["ProcessSession", dict], None]) -> None:
        """``callback(session, lost)`` when the session's process dies (once per death)."""
        with self._lock:
            self._lost_callbacks.append(callback)

    def restart(self, *, from_snapshot: str | None = None) -> dict | None:
        """Give a lost session a fresh process (same id, settings, policy and
        grants; an empty namespace, or the durable snapshot ``from_snapshot``
        restored into it, whose ``{"restored", "removed"}`` is returned)."""
        if from_snapshot is not None and from_snapshot not in self._durable \
                and from_snapshot not in self._checkpoints:
            from ..errors import SnapshotNotFound

            raise SnapshotNotFound(f"session {self.id!r} has no durable snapshot "
                                   f"{from_snapshot!r} (take_snapshot(name, durable=True))")
        with self._lock:
            if self._closed:
                raise SessionClosed(f"session {self.id!r} is closed")
            if self.lost is None:
                raise ValueError(f"session {self.id!r} is not lost: close it, or cancel "
                                 f"its cell, instead of restarting it")
        old = self.worker
        if old is not None:
            old.channel.close()
        checkpoint = self._checkpoints.get(from_snapshot) if from_snapshot else None
        if checkpoint is not None:
            self._resume(checkpoint)  # the whole interpreter as it was, same lineage
            with self._lock:
                self.lost = None
            self._next()
            return {"restored": "checkpoint", "removed": []}
        self._drop_checkpoints()
        self._release_cgroup()
        self._start_worker()
        with self._lock:
            self.lost = None
        if self._policy is not None:
            self._call("set_policy", policy=self._policy)
        for name, impl in list(self._grants.items()):
            self._send_grant(name, impl)
        restored = None
        if from_snapshot is not None:
            restored = self._call("import_snapshot", timeout=None, name=from_snapshot,
                                  data=self._durable[from_snapshot], key=self._snapshot_key)
        self._next()
        return restored

    # -- checkpoints: paused forks of the worker -------------------------------------
    #: live checkpoints a session may hold (each is a process; its memory counts)
    max_checkpoints = 8
    #: seconds without a request before a worker forks a standby checkpoint
    #: (``_after_cell``): a client sending cell after cell never waits for one
    standby_idle = 0.005

    def _wants_transaction(self, job: Job) -> bool:
        """A transaction cell: the job says so, a ``%%transaction`` line, or the default."""
        if job.transaction is not None:
            return bool(job.transaction)
        if "%%transaction" in job.code:
            from ..extension import parse_directives

            try:
                return bool(parse_directives(job.code)[0].get("transaction"))
            except ValueError:  # a malformed directive: the worker reports it
                return False
        return self._transactions_by_default()

    def _transactions_by_default(self) -> bool:
        return bool(_setting("transactions", self.engine.config, self._config))

    def _adopt_checkpoint(self, reply: dict) -> Any:
        import socket

        fds = list(reply.get("fds") or [])
        pid = (reply.get("result") or {}).get("pid")
        if not fds or not isinstance(pid, int):
            for fd in fds:
                os.close(fd)
            raise RuntimeError(f"session {self.id!r} sent a malformed checkpoint")
        for extra in fds[1:]:
            os.close(extra)
        from .channel import Channel

        return self._supervisor.adopt(pid, Channel(socket.socket(fileno=fds[0])))

    def _transaction_checkpoint(self, running: _Running) -> Any:
        """The checkpoint taken before a transaction cell, or None (and why, logged)."""
        slot, running.transaction = running.transaction, None
        if slot is None:
            return None
        reply = slot[1] if slot[0].is_set() else None
        with self._lock:
            for call_id, pending in list(self._calls.items()):
                if pending is slot:
                    del self._calls[call_id]
        if reply is None or "error" in reply:
            if reply is not None:
                _close_fds(reply)
            detail = reply["error"].get("message") if reply else "no answer"
            self.engine._log(f"session {self.id!r}: no checkpoint for a transaction cell "
                             f"({detail}); its rollback covers names only")
            return None
        try:
            return self._adopt_checkpoint(reply)
        except RuntimeError as exc:
            self.engine._log(str(exc))
            return None

    def _end_checkpoint(self, checkpoint: Any) -> None:
        checkpoint.kill()
        checkpoint.channel.close()

    def _drop_checkpoints(self) -> None:
        self._end_retiring()
        with self._lock:
            checkpoints = list(self._checkpoints.values())
            self._checkpoints.clear()
        for checkpoint in checkpoints:
            self._end_checkpoint(checkpoint)

    def _roll_back(self, checkpoint: Any) -> None:
        """A transaction's checkpoint becomes the worker, then goes (it served once)."""
        try:
            self._resume(checkpoint)
        finally:
            self._end_checkpoint(checkpoint)

    def _resume(self, checkpoint: Any) -> None:
        """A fresh copy of ``checkpoint`` becomes the session's worker; the
        checkpoint stays, to be resumed again.  The old worker is killed."""
        import socket

        from .channel import Channel

        control = checkpoint.channel
        control.send({"op": "resume"})
        control.sock.settimeout(self.spawn_timeout)
        try:
            reply = control.recv()
        finally:
            control.sock.settimeout(None)
        fds = (reply or {}).get("fds") or []
        if not reply or reply.get("op") != "resumed" or not fds:
            for fd in fds:
                os.close(fd)
            raise SessionLost("failed", f"session {self.id!r}: the checkpoint did not resume")
        for extra in fds[1:]:
            os.close(extra)
        channel = Channel(socket.socket(fileno=fds[0]))
        channel.sock.settimeout(self.spawn_timeout)
        try:
            ready = channel.recv()
        finally:
            channel.sock.settimeout(None)
        if not ready or ready.get("op") != "ready" or not isinstance(ready.get("pid"), int):
            channel.close()
            raise SessionLost("failed", f"session {self.id!r}: the resumed copy did not start")
        worker = self._supervisor.adopt(ready["pid"], channel)
        old, self.worker = self.worker, worker  # from now on the old one's end is no death
        self.pid = worker.pid
        self._execution_count = ready.get("execution_count")
        if self._cgroup is not None:
            try:
                self._oom_base = self._cgroup.oom_kills()
            except OSError:
                pass
        if old is not None:
            old.kill()  # its reader sees the end and closes its channel
        self._watch(worker)

    def _take_checkpoint(self, name: str) -> dict:
        with self._lock:
            if self.busy:
                raise SnapshotRefused(f"session {self.id!r} is running a cell: a checkpoint is "
                                   f"taken between cells")
            if name not in self._checkpoints and len(self._checkpoints) >= self.max_checkpoints:
                raise SnapshotRefused(f"session {self.id!r} holds {self.max_checkpoints} "
                                   f"checkpoints, the most it may; delete one first")
        reply = self._answer(self._ask({"op": "checkpoint"}), "checkpoint", 60.0)
        checkpoint = self._adopt_checkpoint(reply)
        with self._lock:
            replaced = self._checkpoints.pop(name, None)
            self._checkpoints[name] = checkpoint
        if replaced is not None:
            self._end_checkpoint(replaced)
        return {"name": name, "kind": "checkpoint", "pid": checkpoint.pid,
                "created": time.time()}

    # -- properties ---------------------------------------------------------------
    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def busy(self) -> bool:
        return self._running is not None or bool(self._queue)

    @property
    def running(self) -> str | None:
        running = self._running
        return running.job.execution_id if running is not None else None

    @property
    def execution_count(self) -> int | None:
        """The shell's execution count, as the worker last reported it (no round trip)."""
        return self._execution_count

    def __repr__(self) -> str:
        state = ("closed" if self._closed else "lost" if self.lost else
                 "busy" if self.busy else "idle")
        return f"<ProcessSession {self.id!r} pid={self.pid} {state}>"

    # -- executing ------------------------------------------------------------------
    def _submit(self, code: str, execution_id: str | None, timeout: float | None,
                transaction: bool | None, on_event: Callable[[dict], None] | None,
                queue: bool | None, store_history: bool, silent: bool,
                host_loop: Any = None) -> ExecutionHandle:
        # host_loop is ignored: the host's event loop is in another process, so
        # an await cell runs on the session process's own loop (mode "async")
        from .. import _options

        if not isinstance(code, str):
            raise TypeError(f"code must be a string, got {type(code).__name__}")
        _options(execution_id, timeout, transaction, None)
        if on_event is not None and not callable(on_event):
            raise TypeError(f"on_event must be callable, got {on_event!r}")
        queue = self.engine.queue if queue is None else queue
        with self._lock:
            if self._closed:
                raise SessionClosed(f"session {self.id!r} is closed")
            if self.lost is not None:
                raise SessionLost(self.lost["kind"],
                                  f"session {self.id!r} is lost ({self.lost['message']}); "
                                  f"restart it with session.restart()")
            if execution_id is None:
                execution_id = f"{self.id}-{os.urandom(3).hex()}-{next(self._call_ids)}"
            elif self._find(execution_id) is not None:
                raise ValueError(f"execution {execution_id!r} is already queued or running "
                                 f"in session {self.id!r}")
            if not queue and self.busy:
                raise SessionBusy(f"session {self.id!r} is running {self.running!r}; "
                                  f"pass queue=True to wait for it")
            job = Job(code, execution_id, timeout=timeout, transaction=transaction,
                      store_history=store_history, silent=silent, host_loop=None)
            self._queue.append((job, on_event))
        self._next()
        return ExecutionHandle(self, job)

    def _find(self, execution_id: str) -> Job | None:
        running = self._running
        if running is not None and running.job.execution_id == execution_id:
            return running.job
        for job, _ in self._queue:
            if job.execution_id == execution_id:
                return job
        return None

    def cancel(self, execution_id: str, reason: str = "cancelled") -> bool:
        """Cancel a queued or running execution; a running cell that has not
        ended ``kill_grace`` seconds later is killed with the process."""
        return bool(self.cancel_report(execution_id, reason)["cancelled"])

    def cancel_report(self, execution_id: str, reason: str = "cancelled") -> dict:
        """:meth:`cancel` with its state: ``dropped`` (queued: never runs),
        ``sent`` (to the session process, which interrupts the cell; the
        supervisor kills the process ``kill_grace`` seconds later if it has
        not ended), or ``not-running``."""
        with self._lock:
            running = self._running
            if running is not None and running.job.execution_id == execution_id:
                if running.cancelled is None:
                    running.cancelled = reason
                    running.timers.append(self._supervisor.timers.call_at(
                        time.monotonic() + self.kill_grace,
                        lambda: self._kill_running(
                            running, "killed",
                            f"the cell ignored a cancel for {self.kill_grace} s")))
                found = "running"
            else:
                found = None
                for entry in self._queue:
                    if entry[0].execution_id == execution_id:
                        self._queue.remove(entry)
                        found = entry[0]
                        break
        if found is None:
            return {"cancelled": False, "state": "not-running", "detail": ""}
        if found == "running":
            self._send({"op": "cancel", "execution_id": execution_id, "reason": reason})
            return {"cancelled": True, "state": "sent",
                    "detail": f"the session process interrupts the cell; its process is "
                              f"killed if it has not ended {self.kill_grace} s from now"}
        result = ProcessExecutionResult(found.code, found.execution_id,
                                        store_history=found.store_history, silent=found.silent)
        result.error_before_exec = CellCancelled(reason)
        self._settle(found, result)
        return {"cancelled": True, "state": "dropped", "detail": ""}

    # -- host API calls (answered by the worker) ------------------------------------
    def _ask(self, message: dict, on_reply: Callable[[dict], Any] | None = None) -> list:
        """Send a request the worker answers with ``reply``; its slot
        ``[event, reply, on_reply]`` (``reply`` set, event set, then
        ``on_reply`` called, when it comes, or when the session ends)."""
        with self._lock:
            if self._closed:
                raise SessionClosed(f"session {self.id!r} is closed")
            if self.lost is not None:
                raise SessionLost(self.lost["kind"], f"session {self.id!r} is lost "
                                                     f"({self.lost['message']})")
            call_id = next(self._call_ids)
            slot: list = [threading.Event(), None, on_reply]
            self._calls[call_id] = slot
        if not self._send({**message, "id": call_id}):
            with self._lock:
                self._calls.pop(call_id, None)
            raise SessionLost("exited", f"session {self.id!r}: its process is gone")
        return slot

    def _answer(self, slot: list, what: str, timeout: float | None) -> dict:
        if not slot[0].wait(timeout):
            raise TimeoutError(f"session {self.id!r} did not answer {what} in {timeout} s")
        reply = slot[1]
        if "error" in reply:
            _close_fds(reply)
            raise rebuild_error(reply["error"])
        return reply

    def _call(self, method: str, timeout: float | None = 60.0, **params: Any) -> Any:
        slot = self._ask({"op": "call", "method": method, "params": params})
        return self._answer(slot, method, timeout).get("result")

    def variables(self, *, max_repr: int = 100) -> list[dict]:
        return self._call("variables", max_repr=max_repr)

    def variable(self, name: str, *, max_repr: int = 1000,
                 max_value_bytes: int | None = None) -> dict:
        return self._call("variable", name=name, max_repr=max_repr,
                          max_value_bytes=max_value_bytes)

    def set_variable(self, name: str, value: Any) -> None:
        self._call("set_variable", name=name, value=value)

    def delete_variable(self, name: str) -> None:
        self._call("delete_variable", name=name)

    def take_snapshot(self, name: str, *, durable: bool = False) -> dict:
        """A checkpoint of the whole interpreter: a paused ``fork()`` of the
        session's process (every object, every in-place mutation, nothing
        pickled; pages shared copy-on-write).  ``restore_snapshot(name)``
        continues from it, as often as wanted; it also survives the
        worker's death (``restart(from_snapshot=name)``).

        ``durable=True`` takes a pickled snapshot instead and keeps a signed
        copy here, for saving or a restart without the checkpoint (opaque
        bytes to the parent, never unpickled here; values that cannot be
        pickled are left out: ``info["skipped"]``).
        """
        if not durable:
            return self._take_checkpoint(name)
        info = self._call("take_snapshot", timeout=None, name=name)
        if durable:
            data = self._call("export_snapshot", timeout=None, name=name,
                              key=self._snapshot_key)
            if not isinstance(data, bytes):
                raise RuntimeError(f"session {self.id!r} sent a malformed snapshot")
            self._durable[name] = data
            info = {**info, "durable": True, "bytes": len(data)}
        return info

    def restore_snapshot(self, name: str) -> dict:
        """Continue from checkpoint ``name`` (the current process is replaced by
        a fresh copy of it), or restore the pickled snapshot ``name``."""
        checkpoint = self._checkpoints.get(name)
        if checkpoint is None:
            return self._call("restore_snapshot", timeout=None, name=name)
        with self._lock:
            if self.busy:
                raise SnapshotRefused(f"session {self.id!r} is running a cell: cancel it or "
                                   f"wait before restoring a checkpoint")
        self._resume(checkpoint)
        return {"name": name, "kind": "checkpoint", "pid": self.pid}

    def delete_snapshot(self, name: str) -> None:
        with self._lock:
            checkpoint = self._checkpoints.pop(name, None)
        if checkpoint is not None:
            self._end_checkpoint(checkpoint)
            return
        self._durable.pop(name, None)
        self._call("delete_snapshot", name=name)

    def save_snapshot(self, name: str, path: str, *, key: bytes | None = None) -> dict:
        """Write snapshot ``name`` to the signed file ``path``.  The worker
        signs and sends the bytes; this process writes them (a confined
        worker cannot reach ``path``), never unpickling them."""
        from ..namespace import default_key_file, load_or_create_key, write_snapshot_file

        key = key if key is not None else load_or_create_key(default_key_file())
        checkpoint = self._checkpoints.get(name)
        if checkpoint is not None:
            # the checkpoint pickles what it holds (what pickle can carry of it)
            control = checkpoint.channel
            control.send({"op": "export", "name": name, "key": key})
            control.sock.settimeout(300)
            try:
                reply = control.recv() or {"error": {"type": "SnapshotRefused",
                                                     "message": "the checkpoint is gone"}}
            finally:
                control.sock.settimeout(None)
            if "error" in reply:
                raise rebuild_error(reply["error"])
            data = reply.get("data")
        else:
            data = self._call("export_snapshot", timeout=None, name=name, key=key)
        if not isinstance(data, bytes):
            raise RuntimeError(f"session {self.id!r} sent a malformed snapshot")
        write_snapshot_file(os.fspath(path), data)
        return {"name": name, "path": os.fspath(path), "bytes": len(data)}

    def load_snapshot(self, path: str, *, name: str | None = None, key: bytes | None = None,
                      restore: bool = False) -> dict:
        """Read the signed file ``path`` here, check its signature, and hand
        the bytes to the worker, which loads them as snapshot ``name`` and,
        with ``restore``, applies them."""
        from ..errors import NamespaceError
        from ..namespace import default_key_file, load_or_create_key, verify_snapshot

        key = key if key is not None else load_or_create_key(default_key_file())
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as exc:
            raise NamespaceError(f"cannot read snapshot file {os.fspath(path)!r}: "
                                 f"{exc}") from exc
        verify_snapshot(data, key, os.fspath(path))  # refused before it crosses
        return self._call("import_snapshot", timeout=None, name=name, data=data, key=key,
                          restore=restore)

    def reply_input(self, input_id: str, text: str | None) -> bool:
        return bool(self._call("reply_input", input_id=input_id, text=text))

    def serve_input(self) -> Callable[[], None]:
        """Input is always the host's in a session process (there is no
        terminal); an execution without ``on_event`` gets end-of-input."""
        return lambda: None

    def set_policy(self, policy: Any) -> None:
        from ..security.policy import SecurityPolicy

        name = policy if isinstance(policy, str) else None
        if name is None:
            raise TypeError("a process session takes a policy preset name (trusted, "
                            "guarded, restricted); a SecurityPolicy object stays in its "
                            "own process")
        SecurityPolicy.preset(name)  # unknown names fail here, in the caller
        self._call("set_policy", policy=name)
        self._policy = name

    def grant(self, name: str, capability: Any) -> None:
        """Grant ``capability`` as ``name``: it runs here, the worker gets a handle."""
        methods = getattr(capability, "methods", None)
        if methods is None or not callable(getattr(capability, "method", None)):
            raise TypeError(f"a capability implementation has methods and method(name), "
                            f"got {capability!r}")
        self._grants[name] = capability
        self._send_grant(name, capability)

    def _send_grant(self, name: str, capability: Any) -> None:
        self._send({"op": "grant", "name": name, "methods": list(capability.methods),
                    "callable": bool(getattr(capability, "callable", False))})

    def grant_input(self) -> None:
        self._call("grant_input")

    def _serve_capability(self, worker: Any, message: dict) -> None:
        """Run one capability call the worker asked for; everything it sent is data."""
        from ..security.capabilities import freeze

        reply: dict = {"op": "capability_reply", "id": message.get("id")}
        try:
            impl = self._grants.get(message.get("name"))
            if impl is None:
                raise PermissionError(f"no capability {message.get('name')!r} is granted")
            method = message.get("method")
            if not isinstance(method, str):
                raise TypeError("malformed capability call")
            args = freeze(list(message.get("args") or []))
            kwargs = message.get("kwargs") or {}
            if not isinstance(kwargs, dict) or not all(isinstance(k, str) for k in kwargs):
                raise TypeError("malformed capability call")
            fn = impl.method(method)
            reply["result"] = fn(*args, **freeze(kwargs))
        except AttributeError as exc:
            reply["error"] = {"type": "TypeError", "message": f"no method {exc}"}
        except Exception as exc:  # noqa: BLE001 - described to the worker, never raised here
            reply["error"] = describe_error(exc)
        try:
            worker.channel.send(reply)
        except (OSError, TypeError) as exc:
            try:
                worker.channel.send({"op": "capability_reply", "id": message.get("id"),
                                     "error": describe_error(exc)})
            except OSError:
                pass

    # -- closing ----------------------------------------------------------------------
    def close(self, timeout: float | None = 10.0) -> bool:
        """Cancel the running cell, drop queued ones, end the process.

        True when the process ended within ``timeout`` (a cell that ignores
        the cancel is killed once ``kill_grace`` has passed, so a close never
        hangs on a stuck cell)."""
        with self._lock:
            already = self._closed
            self._closed = True
            self._closing_cleanly = True
        worker = self.worker
        if already:
            return worker is None or worker.wait(timeout) is not None
        self._fail_all(SessionClosed(f"session {self.id!r} is closed"), None)
        if worker is not None and worker.alive:
            self._send({"op": "close", "reason": "session closed"})
            wait = self.kill_grace if timeout is None else min(timeout, self.kill_grace)
            if worker.wait(wait) is None:
                worker.kill()
                worker.wait(None if timeout is None else max(timeout - wait, 0.5))
        if worker is not None:
            worker.kill()  # what its cells started ends with it
            worker.channel.close()
        self._drop_checkpoints()
        self._release_cgroup()
        self.engine._forget(self)
        if self._scratch is not None:
            import shutil

            shutil.rmtree(self._scratch, ignore_errors=True)
        for impl in self._grants.values():
            closer = getattr(impl, "close", None)
            if callable(closer):
                try:
                    closer()
                except Exception:  # noqa: BLE001
                    pass
        return worker is None or not worker.alive

    async def aclose(self, timeout: float | None = 10.0) -> bool:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(None, self.close, timeout)

    def _begin_close(self, reason: str) -> None:
        with self._lock:
            running = self._running
        if running is not None:
            self._send({"op": "cancel", "execution_id": running.job.execution_id,
                        "reason": reason})

    def _finish_close(self, timeout: float | None) -> bool:
        return self.close(timeout)


#: What ``confine=`` may say beyond True/False (``confine.ConfineSpec``'s fields).
CONFINE_KEYS = ("network", "subprocesses", "readable", "writable", "required")


def _close_fds(reply: dict) -> None:
    for fd in reply.get("fds") or ():
        if isinstance(fd, int):
            os.close(fd)


def confine_request(confine: Any, policy: str | None) -> dict | None:
    """``create_session``'s ``confine`` as the worker's request (None: not confined).

    None means "the policy decides": on for ``restricted``, off otherwise.
    """
    if confine is None:
        confine = policy == "restricted"
    if confine is False:
        return None
    if confine is True:
        return {}
    if not isinstance(confine, dict):
        raise ValueError(f"confine must be True, False, None or a mapping, got {confine!r}")
    unknown = sorted(set(confine) - set(CONFINE_KEYS))
    if unknown:
        raise ValueError(f"confine: unknown key(s) {unknown}; allowed: {', '.join(CONFINE_KEYS)}")
    from .confine import LAYERS

    request = {"network": bool(confine.get("network", False)),
               "subprocesses": bool(confine.get("subprocesses", False))}
    for key in ("readable", "writable"):
        paths = confine.get(key, ())
        if isinstance(paths, str) or not all(isinstance(p, str) for p in paths):
            raise ValueError(f"confine: {key} must be a list of paths, got {paths!r}")
        request[key] = [os.path.abspath(p) for p in paths]
    required = confine.get("required", ())
    if required == "all":
        required = LAYERS
    bad = sorted(set(required) - set(LAYERS))
    if isinstance(required, str) or bad:
        raise ValueError(f"confine: required names layers from {', '.join(LAYERS)} "
                         f"(or 'all'), got {required!r}")
    request["required"] = list(required)
    return request


def _safe_name(session_id: str) -> str:
    import re

    return re.sub(r"[^A-Za-z0-9_-]", "_", session_id)[:40]


def _fulfil(slot: list, reply: dict) -> None:
    """Answer a request's slot (see ``ProcessSession._ask``)."""
    slot[1] = reply
    slot[0].set()
    if slot[2] is not None:
        slot[2](reply)


def _setting(name: str, *configs: Any) -> Any:
    """``PyREPL3.<name>`` as the last of ``configs`` that sets it says (None: none does)."""
    found = None
    for config in configs:
        try:
            found = config["PyREPL3"][name]
        except (KeyError, TypeError):
            continue
    return found


def create(engine: Any, session_id: str | None, config: Any, *, limits: Any,
           confine: Any, kill_grace: float) -> ProcessSession:
    """A process session for ``Engine.create_session`` (arguments checked here)."""
    from .supervisor import _config_data

    if session_id is None:
        session_id = os.urandom(6).hex()
    data = _config_data(config)
    policy = _setting("security_policy", engine.config, data)
    request = confine_request(confine, policy if isinstance(policy, str) else None)
    return ProcessSession(engine, session_id, data, limits=limits, confine=request,
                          kill_grace=kill_grace)
