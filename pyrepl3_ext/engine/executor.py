"""Hybrid executor: one session's cells, strictly in order, off the caller's thread.

A :class:`SessionExecutor` owns one worker thread per session (started on
the first cell) and a FIFO of :class:`Job` objects.  The worker takes one
job at a time and routes it:

* a cell without top-level ``await`` runs on the worker thread with the
  shell's ``run_cell`` (``started.mode == "thread"``): the caller's thread,
  and an asyncio loop running there, stay free;
* a top-level-``await`` cell submitted through the synchronous API runs
  through IPython's ``run_cell_async`` on the session's own event loop, in
  the worker thread (``mode == "async"``);
* a top-level-``await`` cell submitted through the coroutine API runs
  through ``run_cell_async`` on the *host's* loop, in a task of its own
  (``mode == "async-host"``), so it can await the host's futures.  The
  worker waits for it, which keeps the session's order strict.

Why the session's own loop for the synchronous API: IPython's autoawait
runner shares one module-global loop between every shell (concurrent
await-cells fail with "This event loop is already running"), and a sync
caller has no loop to lend.  The loop is run only while an async cell runs
and while the session is idle with tasks pending (tasks a cell spawned keep
running between cells), never while a sync cell runs, so ``asyncio.run()``
inside a sync cell works as in plain Python.

Routing is decided in the worker just before the cell runs (IPython's own
``should_run_async`` on the transformed cell), never in the caller's
thread: transforming a cell enters the shell's builtin trap, which must not
happen concurrently with the shell's running cell.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import threading
import types
from typing import Any, Callable

from .. import _compat
from ..errors import CellCancelled, SessionBusy, SessionClosed

#: ``started.mode`` of each route (docs/events.md).
MODE_THREAD = "thread"
MODE_ASYNC = "async"
MODE_ASYNC_HOST = "async-host"

_STOP = object()


class Job:
    """One execute request: what to run, where it reports, and its state."""

    __slots__ = ("code", "execution_id", "timeout", "transaction", "store_history",
                 "silent", "host_loop", "future", "cancel_reason", "mode", "started")

    def __init__(self, code: str, execution_id: str, *, timeout: float | None,
                 transaction: bool | None, store_history: bool, silent: bool,
                 host_loop: asyncio.AbstractEventLoop | None):
        self.code = code
        self.execution_id = execution_id
        self.timeout = timeout
        self.transaction = transaction
        self.store_history = store_history
        self.silent = silent
        self.host_loop = host_loop
        self.future: concurrent.futures.Future = concurrent.futures.Future()
        #: set (under the executor lock) when a cancel arrives for this job
        self.cancel_reason: str | None = None
        self.mode = ""
        self.started = False


def not_run_result(job: Job, reason: str) -> Any:
    """The ``ExecutionResult`` of a job cancelled before its cell started."""
    from IPython.core.interactiveshell import ExecutionInfo, ExecutionResult

    info = ExecutionInfo(job.code, job.store_history, job.silent, True, None)
    result = ExecutionResult(info)
    result.error_before_exec = CellCancelled(reason, execution_id=job.execution_id)
    result.pyrepl3_execution_id = job.execution_id
    return result


def _uses_asyncio(shell: Any) -> bool:
    """Whether the shell's autoawait runner is IPython's asyncio one.

    With ``%autoawait trio`` (or curio, or a custom runner) the cell goes
    through ``run_cell`` on the worker thread and IPython's runner runs it.
    """
    runner = getattr(shell, "loop_runner", None)
    return getattr(runner, "__name__", "") == "_asyncio_runner" or \
        type(runner).__name__ == "_AsyncIORunner"


class SessionExecutor:
    """Runs one session's jobs one at a time, in arrival order (module docstring).

    ``around_job`` is a context-manager factory the engine wraps around
    each job (the stock build uses it to lend ``__main__`` to the session).
    """

    def __init__(self, shell: Any, name: str,
                 around_job: Callable[[], Any] | None = None):
        self.shell = shell
        self.name = name
        self._around_job = around_job
        self._cond = threading.Condition(threading.Lock())
        self._jobs: collections.deque[Job] = collections.deque()
        self._running: Job | None = None
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._idle_waiter: asyncio.Future | None = None
        self._stopping = False
        self._exited = False
        self._after_exit: list[Callable[[], None]] = []

    # -- state ----------------------------------------------------------------
    @property
    def busy(self) -> bool:
        """A cell is running or waiting to run."""
        return self._running is not None or bool(self._jobs)

    @property
    def running(self) -> Job | None:
        return self._running

    @property
    def thread(self) -> threading.Thread | None:
        return self._thread

    def find(self, execution_id: str) -> Job | None:
        with self._cond:
            if self._running is not None and self._running.execution_id == execution_id:
                return self._running
            for job in self._jobs:
                if job.execution_id == execution_id:
                    return job
        return None

    # -- requests -------------------------------------------------------------
    def submit(self, job: Job, *, queue: bool) -> None:
        """Append ``job``; ``queue=False`` refuses it with ``SessionBusy`` if busy."""
        with self._cond:
            if self._stopping:
                raise SessionClosed(f"session {self.name!r} is closed")
            if not queue and self.busy:
                running = self._running.execution_id if self._running else self._jobs[0].execution_id
                raise SessionBusy(
                    f"session {self.name!r} is running {running!r}; "
                    f"pass queue=True to wait for it")
            self._jobs.append(job)
            if self._thread is None:
                self._thread = threading.Thread(target=self._work, daemon=True,
                                                name=f"pyrepl3-session-{self.name}")
                self._thread.start()
            self._cond.notify()
            self._wake_idle_loop()

    def cancel(self, execution_id: str, reason: str) -> Job | None:
        """Drop a queued job (resolved as cancelled) or mark the running one.

        Returns the job it found (None if none).  For the running job the
        caller cancels the cell itself; the mark covers the moment before
        the cell's cancel scope exists (see :meth:`cancel_pending_for`).
        """
        with self._cond:
            running = self._running
            if running is not None and running.execution_id == execution_id:
                if running.cancel_reason is None:
                    running.cancel_reason = reason
                return running
            for job in self._jobs:
                if job.execution_id == execution_id:
                    self._jobs.remove(job)
                    break
            else:
                return None
        _settle(job.future, not_run_result(job, reason))
        return job

    def cancel_pending_for(self, execution_id: str) -> str | None:
        """The cancel reason if the running job ``execution_id`` was cancelled
        before its cell started (called from the cell's ``pre_run_cell``)."""
        running = self._running
        if running is not None and running.execution_id == execution_id:
            return running.cancel_reason
        return None

    def shutdown(self, reason: str) -> list[Job]:
        """Refuse new jobs, resolve the queued ones as cancelled, stop the
        worker after the running cell.  Returns the jobs it dropped."""
        with self._cond:
            self._stopping = True
            dropped = list(self._jobs)
            self._jobs.clear()
            if self._running is not None and self._running.cancel_reason is None:
                self._running.cancel_reason = reason
            self._cond.notify()
            self._wake_idle_loop()
            thread = self._thread
            if thread is None:
                self._exited = True
        for job in dropped:
            _settle(job.future, not_run_result(job, reason))
        return dropped

    def join(self, timeout: float | None) -> bool:
        """Wait for the worker to exit; True if it did (or never started)."""
        thread = self._thread
        if thread is None or thread is threading.current_thread():
            return thread is None
        thread.join(timeout)
        return not thread.is_alive()

    def after_exit(self, callback: Callable[[], None]) -> None:
        """Run ``callback`` once the worker has exited (now, if it has)."""
        with self._cond:
            if not self._exited:
                self._after_exit.append(callback)
                return
        callback()

    # -- the worker -----------------------------------------------------------
    def adopt_current_thread(self) -> None:
        """Make the calling thread this session's worker (a session process's
        main thread, where signals interrupt blocking calls); it then runs
        the jobs in :meth:`serve`.  Call before the first :meth:`submit`."""
        with self._cond:
            if self._thread is not None:
                raise RuntimeError(f"session {self.name!r} already has a worker thread")
            self._thread = threading.current_thread()

    def adopt_after_fork(self) -> None:
        """In a forked copy of the session's process (a checkpoint resumed):
        the calling thread, the copy's only one, becomes the worker.  The
        condition is made anew: the dead worker's waiter is still queued in
        the old one, and a notify would go to it instead of to us."""
        self._cond = threading.Condition(threading.Lock())
        self._thread = threading.current_thread()
        self._idle_waiter = None
        self._exited = False
        self._after_exit = []

    def serve(self) -> None:
        """Run jobs in the adopted thread until :meth:`shutdown`."""
        if self._thread is not threading.current_thread():
            raise RuntimeError("serve() runs in the thread that adopt_current_thread() named")
        self._work()

    def _wake_idle_loop(self) -> None:
        # caller holds the lock
        waiter = self._idle_waiter
        if waiter is not None:
            self._idle_waiter = None
            try:
                self._loop.call_soon_threadsafe(_resolve, waiter)
            except RuntimeError:
                pass  # loop closed

    def _next_job(self) -> Job | None:
        while True:
            with self._cond:
                if self._jobs:
                    job = self._jobs.popleft()
                    self._running = job
                    return job
                if self._stopping:
                    return None
                loop = self._loop
                if loop is None or not asyncio.all_tasks(loop):
                    self._cond.wait()
                    continue
                # idle with tasks a cell spawned: let them run until work arrives
                waiter = self._idle_waiter = loop.create_future()
            loop.run_until_complete(waiter)

    def _work(self) -> None:
        try:
            while True:
                job = self._next_job()
                if job is None:
                    break
                outcome: tuple | None = None
                try:
                    if not job.future.done() and job.future.set_running_or_notify_cancel():
                        outcome = self._run(job)
                finally:
                    with self._cond:
                        self._running = None
                # resolved only once the session is idle again: a caller that
                # sends the next request (to this or, on stock IPython, to
                # another session) as soon as it has the result finds it idle
                if outcome is not None:
                    _settle(job.future, *outcome)
        finally:
            self._close_loop()
            with self._cond:
                self._exited = True
                callbacks, self._after_exit = self._after_exit, []
            for callback in callbacks:
                callback()

    def _run(self, job: Job) -> tuple:
        """Run the job; returns ``(result, exception)`` for the caller to settle."""
        if job.cancel_reason is not None:
            return not_run_result(job, job.cancel_reason), None
        try:
            if self._around_job is not None:
                with self._around_job():
                    result = self._route(job)
            else:
                result = self._route(job)
        except BaseException as exc:  # noqa: BLE001 - handed to the caller
            return None, exc
        if result is not None and not hasattr(result, "pyrepl3_execution_id"):
            result.pyrepl3_execution_id = job.execution_id  # silent cells fire no hooks
        return result, None

    def _route(self, job: Job) -> Any:
        from .. import run_cell, run_cell_async

        shell = self.shell
        kwargs = dict(execution_id=job.execution_id, timeout=job.timeout,
                      transaction=job.transaction, store_history=job.store_history,
                      silent=job.silent)
        info = types.SimpleNamespace(raw_cell=job.code, transformed_cell=None)
        if _uses_asyncio(shell) and _compat.cell_is_async(shell, info):
            job.started = True
            if job.host_loop is not None:
                job.mode = MODE_ASYNC_HOST
                return self._run_on_host_loop(job, run_cell_async(
                    shell, job.code, mode=MODE_ASYNC_HOST, **kwargs))
            job.mode = MODE_ASYNC
            loop = self._session_loop()
            return loop.run_until_complete(run_cell_async(
                shell, job.code, mode=MODE_ASYNC, **kwargs))
        job.started = True
        job.mode = MODE_THREAD
        return run_cell(shell, job.code, mode=MODE_THREAD, **kwargs)

    def _session_loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            self._loop = asyncio.new_event_loop()
        return self._loop

    def _run_on_host_loop(self, job: Job, coro: Any) -> Any:
        loop = job.host_loop
        try:
            future = asyncio.run_coroutine_threadsafe(coro, loop)
        except RuntimeError:
            coro.close()
            raise SessionClosed("the host's event loop is closed") from None
        while True:
            try:
                return future.result(timeout=0.5)
            except concurrent.futures.TimeoutError:
                if loop.is_closed():
                    raise SessionClosed("the host's event loop closed while the "
                                        "cell was running on it") from None

    def _close_loop(self) -> None:
        loop, self._loop = self._loop, None
        if loop is None:
            return
        try:
            tasks = asyncio.all_tasks(loop)
            for task in tasks:
                task.cancel()
            if tasks:
                loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
            loop.run_until_complete(loop.shutdown_asyncgens())
        finally:
            loop.close()


def _settle(future: concurrent.futures.Future, result: Any = None,
            exc: BaseException | None = None) -> None:
    """Resolve a job's future unless it already is (never kills the worker)."""
    try:
        if exc is not None:
            future.set_exception(exc)
        else:
            future.set_result(result)
    except concurrent.futures.InvalidStateError:
        pass


def _resolve(future: asyncio.Future) -> None:
    if not future.done():
        future.set_result(None)
