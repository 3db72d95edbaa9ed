"""The fork server: a warm template process that session processes are forked from.

Starting Python, importing IPython and creating a shell costs 0.3-1 s, and
even a forked process needs ~70 ms to create its shell.  The supervisor
therefore starts this process once: it imports everything, creates one
session (the *template*: a shell with pyrepl3_ext loaded, never used to run
a cell) and then only forks.  Each fork is a complete, fresh session in the
time it takes to copy page tables; the worker's code takes over in the
child (:mod:`.worker`).  Pages stay shared copy-on-write until a session
writes them, which is what keeps an idle session process small.

Invariants:

* the template process has exactly one thread when it forks (asserted at
  start), so no lock can be inherited held and every thread a session
  needs is started in the session itself;
* it is the parent of every session process (and, as a subreaper, adopts
  the checkpoints and resumed workers whose parent died), so it alone can
  reap them:
  each exit is reported to the supervisor as ``{"op": "exited", "pid",
  "status", "cpu_seconds"}`` (a ``waitpid`` status and the CPU time used);
* when the supervisor goes away (its end of the control socket closes),
  every session process is killed and the fork server exits: nothing
  outlives the host.

Control messages are JSON datagrams on a ``SOCK_SEQPACKET`` socket; a
``spawned`` reply carries the new session's channel descriptor
(``SCM_RIGHTS``).
"""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import sys
from typing import Any

#: The most descriptors one control datagram carries.
MAX_FDS = 1
DATAGRAM = 1 << 16


def send(sock: socket.socket, message: dict, fds: list[int] = ()) -> None:
    """One control datagram (with descriptors, if any)."""
    data = json.dumps(message).encode()
    if fds:
        socket.send_fds(sock, [data], list(fds))
    else:
        sock.send(data)


def recv(sock: socket.socket) -> tuple[dict | None, list[int]]:
    """The next control datagram and its descriptors; ``(None, [])`` at EOF."""
    data, fds, _flags, _addr = socket.recv_fds(sock, DATAGRAM, MAX_FDS)
    if not data:
        for fd in fds:
            os.close(fd)
        return None, []
    return json.loads(data), fds


def _template(config: dict) -> Any:
    """The warm session every session process starts as."""
    from traitlets.config import Config

    from .engine import Engine

    cfg = Config(config)
    # a session process answers to its supervisor, never to a terminal
    cfg.PyREPL3.output_tee = False
    engine = Engine(config=cfg)
    return engine.create_session("template")


def _reap(ctl: socket.socket, children: set[int]) -> None:
    # every child: the ones forked here and the orphans adopted as subreaper
    # (checkpoints whose worker died, workers resumed from a checkpoint)
    while True:
        try:
            pid, status, usage = os.wait4(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        children.discard(pid)
        try:
            send(ctl, {"op": "exited", "pid": pid, "status": status,
                       "cpu_seconds": usage.ru_utime + usage.ru_stime})
        except OSError:
            return


def _own_children() -> set[int]:
    """Every live child of this process, adopted ones included (from /proc)."""
    me = os.getpid()
    found = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == me:
            found.add(int(entry))
    return found


def _kill_all(children: set[int]) -> None:
    """Kill every session process, and what is adopted while doing it."""
    for _ in range(10):  # a killed worker's checkpoints are adopted next round
        pids = children | _own_children()
        if not pids:
            return
        for pid in pids:
            for kill in (os.killpg, os.kill):
                try:
                    kill(pid, signal.SIGKILL)
                except OSError:
                    pass
        children.clear()
        for pid in pids:
            try:
                os.waitpid(pid, 0)
            except ChildProcessError:
                pass


def _set_child_subreaper() -> None:
    import ctypes

    try:
        ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
    except (OSError, AttributeError):  # not Linux: checkpoints are not offered there
        pass


def serve(ctl: socket.socket) -> None:
    hello, _ = recv(ctl)
    if hello is None:
        return
    import threading

    session = _template(hello.get("config") or {})
    if threading.active_count() != 1:
        names = [t.name for t in threading.enumerate()]
        send(ctl, {"op": "failed", "error": f"the template process has threads {names}: "
                                            f"forking it would copy their locks"})
        return
    # orphaned session processes (a checkpoint whose worker is gone, a worker
    # resumed from a checkpoint) are adopted here, so their ends are reported
    _set_child_subreaper()
    # SIGCHLD wakes the select below through this pipe
    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    children: set[int] = set()
    send(ctl, {"op": "ready", "pid": os.getpid()})
    try:
        while True:
            readable, _, _ = select.select([ctl, wake_r], [], [])
            if wake_r in readable:
                try:
                    os.read(wake_r, 4096)
                except BlockingIOError:
                    pass
                _reap(ctl, children)
            if ctl not in readable:
                continue
            message, _fds = recv(ctl)
            if message is None:
                break
            if message.get("op") != "spawn":
                continue
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            pid = os.fork()
            if pid == 0:  # the session process
                code = 1
                try:
                    signal.set_wakeup_fd(-1)
                    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
                    os.close(wake_r)
                    os.close(wake_w)
                    ctl.close()
                    ours.close()
                    from .worker import run

                    code = run(session, theirs)
                finally:
                    os._exit(code)
            children.add(pid)
            theirs.close()
            send(ctl, {"op": "spawned", "tag": message.get("tag"), "pid": pid},
                 [ours.fileno()])
            ours.close()
    finally:
        _kill_all(children)


def main() -> None:
    fd = int(sys.argv[1])
    ctl = socket.socket(fileno=fd)
    try:
        serve(ctl)
    finally:
        os._exit(0)


if __name__ == "__main__":
    main()
