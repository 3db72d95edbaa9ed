"""The supervisor: starts session processes from the fork server and watches them.

One :class:`Supervisor` per engine owns one fork server (:mod:`.forkserver`)
and every session process forked from it.  It is the only place that knows
processes: sessions (:mod:`.process_session`) ask it for a
:class:`WorkerProcess` and are told when theirs ends, with the ``waitpid``
status the fork server reported.

Invariants:

* a session process is killed through its pidfd where the kernel has them
  (a pid can be reused once the fork server has reaped it; a pidfd cannot),
  and its process group goes with it, so what a cell started ends too
  (the session's cgroup catches the rest when the session closes);
* every worker's end is observed exactly once: ``exited`` from the fork
  server sets :attr:`WorkerProcess.status` and fires its callbacks;
* the fork server never outlives the supervisor: closing the control
  socket (explicitly, or by this process dying) makes it kill every
  session process and exit.
"""

from __future__ import annotations

import heapq
import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Any, Callable

from . import forkserver
from .channel import Channel


#: Environment variables a session process inherits from the host; the rest
#: (tokens, keys, credentials) never reach code that may be hostile, where
#: ``os.environ`` and ``/proc/self/environ`` would show them.
INHERITED_ENV = ("PATH", "HOME", "LANG", "LANGUAGE", "TZ", "TERM", "TMPDIR", "PYTHONPATH",
                 "PYTHONHOME", "VIRTUAL_ENV", "IPYTHONDIR", "PYENV_VERSION", "PYENV_ROOT",
                 "PYTHONIOENCODING", "PYTHONUTF8")


#: glibc's malloc asks for transparent huge pages (where the kernel offers them
#: on request, ``madvise`` mode): a checkpoint's fork then copies one page
#: table entry per 2 MiB instead of 512, 3-4x faster for a 100 MiB session.
HUGE_PAGES_TUNABLE = "glibc.malloc.hugetlb=1"


def worker_environment(environ: dict | None = None) -> dict:
    """The host's environment reduced to :data:`INHERITED_ENV` and the locale,
    plus :data:`HUGE_PAGES_TUNABLE` (after any tunables the host set)."""
    environ = os.environ if environ is None else environ
    kept = {k: v for k, v in environ.items() if k in INHERITED_ENV or k.startswith("LC_")}
    tunables = environ.get("GLIBC_TUNABLES")
    kept["GLIBC_TUNABLES"] = f"{tunables}:{HUGE_PAGES_TUNABLE}" if tunables \
        else HUGE_PAGES_TUNABLE
    return kept


class SupervisorError(RuntimeError):
    """The fork server could not be started or stopped answering."""


def _config_data(config: Any) -> dict:
    """A traitlets ``Config`` as JSON data (the fork server gets it as text)."""
    if config is None:
        return {}
    try:
        return json.loads(json.dumps(config))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"a config for process sessions must hold plain data "
                         f"(it is sent to the session processes): {exc}") from None


class WorkerProcess:
    """The parent's handle on one session process."""

    def __init__(self, supervisor: "Supervisor", pid: int, channel: Channel):
        self.supervisor = supervisor
        self.pid = pid
        self.channel = channel
        self.started_at = time.monotonic()
        #: the thread its session reads ``channel`` on (set by the session)
        self.reader: threading.Thread | None = None
        #: the waitpid status once the process is gone (None while alive)
        self.status: int | None = None
        #: the CPU time it used, once it is gone
        self.cpu_seconds: float | None = None
        self.exited = threading.Event()
        self._on_exit: list[Callable[[int], None]] = []
        self._lock = threading.Lock()
        try:
            self._pidfd: int | None = os.pidfd_open(pid)
        except (AttributeError, OSError):
            self._pidfd = None

    @property
    def alive(self) -> bool:
        return self.status is None

    def on_exit(self, callback: Callable[[int], None]) -> None:
        with self._lock:
            if self.status is None:
                self._on_exit.append(callback)
                return
        callback(self.status)

    def _exited(self, status: int) -> None:
        with self._lock:
            if self.status is not None:
                return
            self.status = status
            callbacks, self._on_exit = self._on_exit, []
        if self._pidfd is not None:
            try:
                os.close(self._pidfd)
            except OSError:
                pass
            self._pidfd = None
        self.exited.set()
        for callback in callbacks:
            try:
                callback(status)
            except Exception as exc:  # noqa: BLE001 - one callback must not hide the rest
                self.supervisor.log(f"exit callback of session process {self.pid} "
                                    f"failed: {exc!r}")

    def kill(self) -> None:
        """SIGKILL the process and its process group (idempotent).

        The session's cgroup, shared with the session's checkpoints, is the
        session's to kill (``ProcessSession``), not one process's.
        """
        with self._lock:
            alive = self.status is None
            pidfd = self._pidfd
        # the group first (pgid == pid: every session process leads its own
        # group): what the cells started.  It outlives a worker that exited;
        # its id can only be taken again by a new group leader given the same
        # pid, never by a plain process.
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except OSError:
            pass
        if alive:
            try:
                if pidfd is not None:
                    signal.pidfd_send_signal(pidfd, signal.SIGKILL)
                else:
                    os.kill(self.pid, signal.SIGKILL)
            except OSError:
                pass

    def wait(self, timeout: float | None = None) -> int | None:
        self.exited.wait(timeout)
        return self.status


class _Timers:
    """One thread for every deadline the supervisor keeps (kill after grace, hard wall time).

    A timer is *live* from ``call_at`` until it fires or is cancelled; only
    live timers fire, and nothing is kept for a timer once it is not live.
    """

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, Callable[[], None]]] = []
        self._live: set[int] = set()
        self._cond = threading.Condition()
        self._ids = itertools.count()
        self._thread: threading.Thread | None = None
        self._closed = False

    def close(self) -> None:
        """Stop the thread (timers not yet due never fire)."""
        with self._cond:
            self._closed = True
            self._live.clear()
            self._cond.notify()

    def call_at(self, when: float, callback: Callable[[], None]) -> int:
        with self._cond:
            timer_id = next(self._ids)
            heapq.heappush(self._heap, (when, timer_id, callback))
            self._live.add(timer_id)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, daemon=True,
                                                name="pyrepl3-supervisor-timers")
                self._thread.start()
            self._cond.notify()
            return timer_id

    def cancel(self, timer_id: int) -> None:
        with self._cond:
            self._live.discard(timer_id)

    def _run(self) -> None:
        while True:
            with self._cond:
                while True:
                    if self._closed:
                        return
                    now = time.monotonic()
                    if self._heap and self._heap[0][0] <= now:
                        _when, timer_id, callback = heapq.heappop(self._heap)
                        if timer_id in self._live:
                            self._live.discard(timer_id)
                            break
                        continue
                    self._cond.wait(None if not self._heap else self._heap[0][0] - now)
            try:
                callback()
            except Exception as exc:  # noqa: BLE001 - a timer must not end the thread
                print(f"[pyrepl3 supervisor] timer failed: {exc!r}", file=sys.__stderr__)


class Supervisor:
    """Starts the fork server once and session processes from it."""

    def __init__(self, config: Any = None, *, start_timeout: float = 120.0,
                 log: Callable[[str], None] | None = None):
        self._config = _config_data(config)
        self.start_timeout = start_timeout
        self.log = log or (lambda text: print(f"[pyrepl3 supervisor] {text}",
                                              file=sys.__stderr__, flush=True))
        self.timers = _Timers()
        self._lock = threading.Lock()
        self._started = threading.Event()
        self._start_error: BaseException | None = None
        self._starting = False
        self._ctl: socket.socket | None = None
        self._proc: subprocess.Popen | None = None
        self._tags = itertools.count(1)
        self._spawns: dict[int, list] = {}
        self._workers: dict[int, WorkerProcess] = {}
        self._early_exits: dict[int, int] = {}
        self._closed = False
        self.forkserver_pid: int | None = None

    # -- the fork server --------------------------------------------------------
    def start(self, wait: bool = True) -> None:
        """Start the fork server (in the background unless ``wait``); idempotent."""
        with self._lock:
            if self._closed:
                raise SupervisorError("the supervisor is closed")
            first = not self._starting
            self._starting = True
        if first:
            if wait:
                self._start()
            else:
                threading.Thread(target=self._start, daemon=True,
                                 name="pyrepl3-forkserver-start").start()
                return
        if wait:
            self._wait_started()

    def _wait_started(self) -> None:
        if not self._started.wait(self.start_timeout):
            raise SupervisorError(f"the fork server did not start within "
                                  f"{self.start_timeout} s")
        if self._start_error is not None:
            raise SupervisorError(f"the fork server failed to start: "
                                  f"{self._start_error}") from self._start_error

    def _start(self) -> None:
        try:
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            package_parent = os.path.dirname(os.path.dirname(os.path.dirname(
                os.path.abspath(__file__))))
            code = ("import sys; sys.path.insert(0, sys.argv.pop(1)); "
                    "from pyrepl3_ext.engine.forkserver import main; main()")
            theirs.set_inheritable(True)
            self._proc = subprocess.Popen(
                [sys.executable, "-c", code, package_parent, str(theirs.fileno())],
                pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL,
                env=worker_environment(),
                stdout=sys.__stderr__.fileno() if sys.__stderr__ else subprocess.DEVNULL,
                close_fds=True, start_new_session=True)
            theirs.close()
            self._ctl = ours
            forkserver.send(ours, {"op": "hello", "config": self._config})
            ours.settimeout(self.start_timeout)
            reply, _ = forkserver.recv(ours)
            ours.settimeout(None)
            if reply is None or reply.get("op") != "ready":
                detail = reply.get("error") if reply else "it exited"
                raise SupervisorError(f"the fork server did not start: {detail}")
            self.forkserver_pid = reply.get("pid")
            threading.Thread(target=self._read_control, daemon=True,
                             name="pyrepl3-forkserver").start()
        except BaseException as exc:  # noqa: BLE001 - kept for every waiter
            self._start_error = exc
            if self._proc is not None:
                self._proc.kill()
        finally:
            self._started.set()
        if self._start_error is not None:
            raise SupervisorError(str(self._start_error)) from self._start_error

    def _read_control(self) -> None:
        ctl = self._ctl
        while True:
            try:
                message, fds = forkserver.recv(ctl)
            except (OSError, ValueError):
                message, fds = None, []
            if message is None:
                break
            op = message.get("op")
            if op == "spawned":
                with self._lock:
                    slot = self._spawns.pop(message.get("tag"), None)
                if slot is None:
                    for fd in fds:
                        os.close(fd)
                    continue
                slot[1] = (message.get("pid"), fds[0] if fds else None)
                slot[0].set()
            elif op == "exited":
                pid, status = message.get("pid"), message.get("status")
                with self._lock:
                    if pid in self._workers:
                        self._workers[pid].cpu_seconds = message.get("cpu_seconds")
                    worker = self._workers.pop(pid, None)
                    if worker is None:
                        # a process not (yet) known: one being adopted right now,
                        # or a process a cell forked; keep the last few only
                        self._early_exits[pid] = status
                        while len(self._early_exits) > 256:
                            self._early_exits.pop(next(iter(self._early_exits)))
                if worker is not None:
                    worker._exited(status)
        # the fork server is gone: so is every session process
        with self._lock:
            workers = list(self._workers.values())
            self._workers.clear()
            spawns = list(self._spawns.values())
            self._spawns.clear()
        for slot in spawns:
            slot[0].set()
        for worker in workers:
            worker._exited(-1)
        if not self._closed:
            self.log("the fork server exited; session processes ended with it")

    def spawn(self, timeout: float = 30.0) -> WorkerProcess:
        """A new session process (a fresh fork of the warm template)."""
        self.start(wait=True)
        tag = next(self._tags)
        slot: list = [threading.Event(), None]
        with self._lock:
            if self._closed:
                raise SupervisorError("the supervisor is closed")
            self._spawns[tag] = slot
        try:
            forkserver.send(self._ctl, {"op": "spawn", "tag": tag})
        except OSError as exc:
            raise SupervisorError(f"the fork server is gone: {exc}") from None
        if not slot[0].wait(timeout) or slot[1] is None:
            with self._lock:
                self._spawns.pop(tag, None)
            raise SupervisorError("the fork server did not fork a session process")
        pid, fd = slot[1]
        return self.adopt(pid, Channel(socket.socket(fileno=fd)))

    def adopt(self, pid: int, channel: Channel) -> WorkerProcess:
        """Watch a session process forked elsewhere (a checkpoint, a worker
        resumed from one): the fork server reaps it, as their subreaper."""
        worker = WorkerProcess(self, pid, channel)
        with self._lock:
            early = self._early_exits.pop(pid, None)
            if early is None:
                self._workers[pid] = worker
        if early is not None:
            worker._exited(early)
        return worker

    def close(self) -> None:
        """Kill every session process and the fork server."""
        with self._lock:
            self._closed = True
            workers = list(self._workers.values())
        self.timers.close()
        for worker in workers:
            worker.kill()
        if self._ctl is not None:
            try:
                self._ctl.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self._ctl.close()
        if self._proc is not None:
            try:
                self._proc.wait(5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
