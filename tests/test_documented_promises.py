"""Promises the docs make that had no test (issue 21), each checked here
against the behaviour a user depends on.

- docs/cancellation.md: ``CellCancelled`` is not caught by ``except
  Exception:``; a C call blocking a worker thread (``cancel()`` True, the
  session busy, the raise after the call, ``close(timeout)`` False); signals
  pyrepl3 did not send reach the previous handler.
- docs/architecture.md: an idle component's per-cell hooks are never called.
- docs/protocol.md: -32003 and -32007 on the wire; the connection dropped
  after three wrong tokens; a cell's output held at ``max_buffer_bytes`` per
  connection (the printing cell waits for its client).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import threading

import pytest

import pyrepl3_ext
from pyrepl3_ext import CellCancelled, Engine, cancellation
from pyrepl3_ext import protocol as P
from pyrepl3_ext._compat import is_patched_build
from pyrepl3_ext.server import Limits, Server

from .polling import async_wait_until, wait_until

WAIT = 30


# -- cancellation ----------------------------------------------------------------------

def test_cell_cancelled_is_not_caught_by_except_exception(ip):
    assert issubclass(CellCancelled, BaseException)
    assert not issubclass(CellCancelled, Exception)
    assert not issubclass(CellCancelled, KeyboardInterrupt)
    ip.user_ns["_started"] = started = threading.Event()
    code = ("caught = []\ntry:\n    _started.set()\n    while True:\n        pass\n"
            "except Exception as e:\n    caught.append(e)\n")
    hit = {}

    def canceller():
        if started.wait(WAIT):
            hit["hit"] = pyrepl3_ext.cancel(ip, "exc", "stop")

    thread = threading.Thread(target=canceller, daemon=True)
    thread.start()
    try:
        result = pyrepl3_ext.run_cell(ip, code, execution_id="exc")
    finally:
        thread.join(WAIT)
        ip.user_ns.pop("_started", None)
    assert hit == {"hit": True}
    assert isinstance(result.error_in_exec, CellCancelled)
    assert ip.user_ns.pop("caught") == []


def test_a_worker_blocked_in_a_c_call(engine_session):
    """docs/engine.md "Limits", docs/cancellation.md: the cancel is accepted
    and reported pending, the session stays busy, ``close(timeout)`` returns
    False, and the cell raises ``CellCancelled`` at its first line after the
    call returns."""
    engine, session = engine_session
    gate, started = threading.Event(), threading.Event()
    session.shell.user_ns.update(_gate=gate, _started=started)
    # Event.wait() without a timeout: one C lock acquire, no Python in between
    handle = session.execute("_started.set()\n_gate.wait()\nafter = True", wait=False)
    try:
        assert started.wait(WAIT)
        wait_until(lambda: session.running is not None)
        report = session.cancel_report(handle.execution_id, "stop")
        assert report["cancelled"] and report["state"] == "pending", report
        assert session.cancel(handle.execution_id, "stop") is True  # and again
        # the report names the reason once no Python line has run for a while
        wait_until(lambda: "C call" in cancellation.cancel_status(
            session.shell, handle.execution_id).detail, interval=0.02)
        assert cancellation.cancel_status(session.shell, handle.execution_id).state == "pending"
        assert session.running == handle.execution_id  # still busy
        assert not handle.done()
        assert session.close(timeout=0.2) is False  # the cell cannot end yet
    finally:
        gate.set()  # the call returns: the cancel lands at the next line
    result = handle.result(WAIT)
    assert isinstance(result.error_in_exec or result.error_before_exec, CellCancelled)
    assert "after" not in session.shell.user_ns


@pytest.fixture
def engine_session():
    engine = Engine()
    try:
        yield engine, engine.create_session()
    finally:
        engine.close(timeout=WAIT)


@pytest.mark.skipif(threading.current_thread() is not threading.main_thread(),
                    reason="signal handlers are set in the main thread")
def test_signals_pyrepl3_did_not_send_reach_the_previous_handler(shell):
    assert cancellation._SIGNAL.users == 0, "a previous test left the handler in use"
    received = []

    def previous(signum, frame):
        received.append(signum)

    pyrepl3_ext.load_ipython_extension(shell)
    signum = cancellation._SIGNAL.signum
    pyrepl3_ext.unload_ipython_extension(shell)
    saved = signal.signal(signum, previous)
    try:
        pyrepl3_ext.load_ipython_extension(shell)
        try:
            assert signal.getsignal(signum) != previous  # pyrepl3's handler is installed
            signal.pthread_kill(threading.main_thread().ident, signum)  # a foreign signal
            assert received == [signum]
            # and one that pyrepl3 sends is its own (no cell: nothing happens)
            cancellation._SIGNAL.send()
            assert received == [signum]
            # signals coalesce: two sends while blocked are one delivery; the
            # next foreign signal is still chained (the count does not drift)
            signal.pthread_sigmask(signal.SIG_BLOCK, {signum})
            cancellation._SIGNAL.send()
            cancellation._SIGNAL.send()
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signum})
            assert received == [signum]
            signal.pthread_kill(threading.main_thread().ident, signum)
            assert received == [signum, signum]
        finally:
            pyrepl3_ext.unload_ipython_extension(shell)
        assert signal.getsignal(signum) == previous  # put back on unload
    finally:
        signal.signal(signum, saved)


# -- idle components ----------------------------------------------------------------------

def test_idle_components_hooks_are_never_called_per_cell(ip):
    """Trusted policy, transactions off, no subscriber: the idle components'
    ``before_cell``/``after_cell`` are not called, however many cells run;
    waking one (the control) makes its hooks run."""
    state = pyrepl3_ext.get_state(ip)
    calls: dict[str, int] = {}
    idle = [c for c in state.components if c.idle]
    assert {c.name for c in idle} >= {"security", "namespace"}, [c.name for c in idle]
    for component in state.components:
        for hook in ("before_cell", "after_cell"):
            if getattr(type(component), hook) is getattr(type(component).__mro__[-2], hook, None):
                continue
            real = getattr(component, hook)
            key = f"{component.name}.{hook}"
            calls[key] = 0

            def counted(*args, _real=real, _key=key, **kwargs):
                calls[_key] += 1
                return _real(*args, **kwargs)

            setattr(component, hook, counted)  # the instance attribute shadows the method
    try:
        state._bind_hooks()
        for i in range(5):
            assert pyrepl3_ext.run_cell(ip, f"{i} + 1").result == i + 1
        for component in idle:
            assert calls.get(f"{component.name}.before_cell", 0) == 0, component.name
            assert calls.get(f"{component.name}.after_cell", 0) == 0, component.name
        # control: the same counters see a woken component's hooks
        namespace = next(c for c in idle if c.name == "namespace")
        assert pyrepl3_ext.run_cell(ip, "x_tx = 1", transaction=True).success
        assert calls["namespace.before_cell"] >= 1
    finally:
        for component in state.components:
            for hook in ("before_cell", "after_cell"):
                component.__dict__.pop(hook, None)
        state._bind_hooks()
        ip.user_ns.pop("x_tx", None)
    assert namespace.idle


# -- the protocol server (in process, over a real socketpair) ------------------------------

class _Peer:
    """The client's end: JSON-RPC lines out, messages in."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader, self.writer = reader, writer
        self.seen: list[dict] = []

    def send(self, id_, method, **params):
        message = {"jsonrpc": "2.0", "method": method, "params": params}
        if id_ is not None:
            message["id"] = id_
        self.writer.write(json.dumps(message).encode() + b"\n")

    async def answer(self, id_) -> dict:
        while True:
            for message in self.seen:
                if message.get("id") == id_:
                    return message
            line = await asyncio.wait_for(self.reader.readline(), WAIT)
            assert line, f"connection closed before the answer to {id_}"
            self.seen.append(json.loads(line))


async def _connect(server: Server, *, require_auth: bool = False, sndbuf: int | None = None):
    ours, theirs = socket.socketpair()
    if sndbuf is not None:
        ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
        theirs.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, sndbuf)
    reader, writer = await asyncio.open_connection(sock=ours)
    task = asyncio.get_running_loop().create_task(
        server.handle(reader, writer, require_auth=require_auth, name="test"))
    peer = _Peer(*await asyncio.open_connection(sock=theirs))
    return task, peer


@pytest.fixture
def engine():
    eng = Engine()
    try:
        yield eng
    finally:
        eng.close(timeout=WAIT)


def test_the_connection_is_dropped_after_three_wrong_tokens(engine):
    server = Server(engine, token="right")

    async def main():
        task, peer = await _connect(server, require_auth=True)
        for i in range(2):
            peer.send(i, "auth", token="wrong")
            assert (await peer.answer(i))["error"]["code"] == P.UNAUTHORIZED
        peer.send("still", "server.info")  # two failures: still connected
        assert (await peer.answer("still"))["error"]["code"] == P.UNAUTHORIZED
        peer.send(2, "auth", token="wrong")
        assert (await peer.answer(2))["error"]["code"] == P.UNAUTHORIZED
        # the third: the server closes the connection
        assert await asyncio.wait_for(peer.reader.read(), WAIT) == b""
        await asyncio.wait_for(task, WAIT)
        peer.writer.close()

    asyncio.run(main())


def test_busy_session_with_queue_false_is_32003_on_the_wire(engine):
    session = engine.create_session("s")
    session.shell.user_ns.update(_gate=threading.Event(), _started=threading.Event())
    server = Server(engine)

    async def main():
        task, peer = await _connect(server)
        peer.send(1, "execute", session="s", code="_started.set()\n_gate.wait(60)\n'done'")
        await asyncio.get_running_loop().run_in_executor(
            None, session.shell.user_ns["_started"].wait, WAIT)
        peer.send(2, "execute", session="s", code="1", queue=False)
        error = (await peer.answer(2))["error"]
        assert error["code"] == P.SESSION_BUSY == -32003, error
        session.shell.user_ns["_gate"].set()
        assert (await peer.answer(1))["result"]["status"] == "ok"
        peer.writer.close()
        await asyncio.wait_for(task, WAIT)

    asyncio.run(main())


@pytest.mark.skipif(is_patched_build(), reason="the patched build runs sessions concurrently")
def test_a_second_busy_session_on_stock_ipython_is_32007_on_the_wire(engine):
    first = engine.create_session("a")
    engine.create_session("b")
    first.shell.user_ns.update(_gate=threading.Event(), _started=threading.Event())
    server = Server(engine)

    async def main():
        task, peer = await _connect(server)
        peer.send(1, "execute", session="a", code="_started.set()\n_gate.wait(60)\n'done'")
        await asyncio.get_running_loop().run_in_executor(
            None, first.shell.user_ns["_started"].wait, WAIT)
        peer.send(2, "execute", session="b", code="1")
        error = (await peer.answer(2))["error"]
        assert error["code"] == P.CONCURRENCY_UNSUPPORTED == -32007, error
        first.shell.user_ns["_gate"].set()
        assert (await peer.answer(1))["result"]["status"] == "ok"
        peer.writer.close()
        await asyncio.wait_for(task, WAIT)

    asyncio.run(main())


def test_a_cells_output_is_held_at_max_buffer_bytes(engine):
    """A client that does not read: the printing cell waits once the
    connection holds ``max_buffer_bytes``; it goes on when the client reads,
    and nothing is dropped."""
    limit = 64 * 1024
    server = Server(engine, limits=Limits(max_buffer_bytes=limit))
    session = engine.create_session("p")
    session.shell.user_ns["_progress"] = progress = []
    # 4 MiB, 64 times the limit: events are queued by the cell's thread and
    # written by the loop in batches, so the cell can run ahead of the loop
    # by one batch before the limit is seen (a few hundred lines at most)
    lines = 4096

    async def main():
        task, peer = await _connect(server, sndbuf=4096)
        peer.send(1, "execute", session="p",
                  code=f"for i in range({lines}):\n    print('x' * 1023)\n    _progress.append(i)")
        (connection,) = server.connections
        # the cell stops printing: it waits for the client, part way
        await async_wait_until(lambda: progress and not connection.writable.is_set(),
                               interval=0.01)
        held_at = len(progress)
        assert held_at < lines - 1
        # nothing moves while the client reads nothing (the cell is parked on
        # the connection's writable event, not slowed down)
        assert not connection.writable.is_set()
        answer = await peer.answer(1)  # reading lets it finish
        assert answer["result"]["status"] == "ok"
        text = "".join(m["params"]["event"]["text"] for m in peer.seen
                       if m.get("method") == "execution.event"
                       and m["params"]["event"]["type"] == "output")
        assert text == ("x" * 1023 + "\n") * lines  # nothing dropped
        peer.writer.close()
        await asyncio.wait_for(task, WAIT)

    asyncio.run(main())
    assert len(progress) == lines
