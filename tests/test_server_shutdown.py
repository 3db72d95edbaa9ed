"""How a real ``pyrepl3 serve`` process ends: the end of stdio (its parent
closed the pipes or died) and SIGTERM/SIGINT, with cells still running.

Each test runs the server as a child process and bounds every wait
generously ("must not hang"); none measures speed.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from pyrepl3_ext.client import Client, ServerProcess

from .polling import wait_until

#: costly and not about the IPython version (tests/conftest.py)
pytestmark = pytest.mark.heavy

WAIT = 60
SERVE = [sys.executable, "-m", "pyrepl3_ext.cli", "serve"]


def _descendants(pid: int) -> set[int]:
    """Every process below ``pid`` (the fork server and the session processes)."""
    found: set[int] = set()
    todo = [pid]
    while todo:
        parent = todo.pop()
        try:
            tids = os.listdir(f"/proc/{parent}/task")
        except FileNotFoundError:
            continue
        for tid in tids:
            try:
                with open(f"/proc/{parent}/task/{tid}/children") as f:
                    children = {int(c) for c in f.read().split()}
            except (FileNotFoundError, ProcessLookupError):
                continue
            todo.extend(children - found)
            found |= children
    return found


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def _stdio_server(*args: str) -> subprocess.Popen:
    # unbuffered, so select() on stdout tells whether a line is waiting
    return subprocess.Popen([*SERVE, "--stdio", *args], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, bufsize=0)


def _end(proc: subprocess.Popen) -> None:
    """Kill the server if the test left it running, and close our ends of its pipes."""
    if proc.poll() is None:
        proc.kill()
        proc.wait()
    for pipe in (proc.stdin, proc.stdout, proc.stderr):
        pipe.close()


def _send(proc: subprocess.Popen, id_, method: str, **params) -> None:
    proc.stdin.write(json.dumps({"jsonrpc": "2.0", "id": id_, "method": method,
                                 "params": params}).encode() + b"\n")
    proc.stdin.flush()


def _read_until(proc: subprocess.Popen, predicate) -> list[dict]:
    """Messages from the server until one satisfies ``predicate``."""
    import select

    seen = []
    while True:
        ready, _, _ = select.select([proc.stdout], [], [], WAIT)
        assert ready, f"no answer from the server in {WAIT} s; got {seen}"
        line = proc.stdout.readline()
        assert line, f"the server closed its output early; got {seen}"
        message = json.loads(line)
        seen.append(message)
        if predicate(message):
            return seen


def _event(kind: str):
    return lambda m: m.get("method") == "execution.event" and m["params"]["event"]["type"] == kind


def _quiet(log: str) -> None:
    for noise in ("Traceback", "CancelledError", "TypeError", "Exception in callback",
                  "Exception ignored"):
        assert noise not in log, log


# -- item 13: the end of stdio -------------------------------------------------------

@pytest.mark.parametrize("isolation", ["in-process", "process"])
def test_stdio_eof_answers_a_waiting_input_with_eof_and_exits(isolation):
    """stdin closes while a cell waits in input(): no input.reply can come any
    more, so input() gets EOF, the response is written and the server exits."""
    proc = _stdio_server("--isolation", isolation)
    try:
        _send(proc, 1, "session.create", session_id="s")
        _read_until(proc, lambda m: m.get("id") == 1)
        _send(proc, 2, "execute", session="s", code="answer = input('name? ')",
              execution_id="e")
        _read_until(proc, _event("input_requested"))
        proc.stdin.close()
        rest = _read_until(proc, lambda m: m.get("id") == 2)
        assert rest[-1]["result"]["status"] == "error"
        assert rest[-1]["result"]["error"]["ename"] == "EOFError"
        assert proc.wait(WAIT) == 0
        _quiet(proc.stderr.read().decode())
    finally:
        _end(proc)


@pytest.mark.parametrize("isolation", ["in-process", "process"])
def test_stdio_server_exits_when_its_parent_goes_away(isolation):
    """The parent dies (both pipes close) while a cell sleeps: the server
    cancels it and exits, leaving no process behind."""
    proc = _stdio_server("--isolation", isolation, "--shutdown-grace", "2")
    try:
        _send(proc, 1, "session.create", session_id="s")
        _read_until(proc, lambda m: m.get("id") == 1)
        _send(proc, 2, "execute", session="s", code="import time\ntime.sleep(600)")
        _read_until(proc, _event("started"))
        children = _descendants(proc.pid)
        proc.stdin.close()
        proc.stdout.close()
        assert proc.wait(WAIT) == 0
        _quiet(proc.stderr.read().decode())
        # every session process ends with the server
        wait_until(lambda: not any(_alive(pid) for pid in children),
                   interval=0.05)
    finally:
        _end(proc)


def test_stdio_eof_still_finishes_what_was_sent():
    """Closing stdin alone (the parent still reads) keeps the documented
    behaviour: executions already sent run to the end and are answered.

    The cell waits in ``input()``, which only the end of input answers (with
    EOF): it can only go on after the server has seen the EOF, whatever the
    timing."""
    proc = _stdio_server()
    try:
        _send(proc, 1, "session.create", session_id="s")
        _send(proc, 2, "execute", session="s",
              code="try:\n    input('never answered: ')\nexcept EOFError:\n    eof = True\n6 * 7")
        proc.stdin.close()
        rest = _read_until(proc, lambda m: m.get("id") == 2)
        assert rest[-1]["result"]["status"] == "ok", rest[-1]
        results = [m["params"]["event"] for m in rest if m.get("method") == "execution.event"
                   and m["params"]["event"]["type"] == "result"]
        assert [r["data"]["text/plain"] for r in results] == ["42"]
        assert proc.wait(WAIT) == 0
    finally:
        _end(proc)


# -- item 14: SIGTERM / SIGINT ----------------------------------------------------------

@pytest.mark.parametrize("isolation, sig", [("in-process", signal.SIGTERM),
                                            ("process", signal.SIGTERM),
                                            ("process", signal.SIGINT)])
def test_signal_shuts_down_gracefully(tmp_path, isolation, sig):
    """Clients are told (server.shutdown), every execution in flight is
    answered as cancelled with the reason, the fork server and the session
    processes go with the server, it exits 0 and its log stays quiet."""
    path = str(tmp_path / "s.sock")
    server = ServerProcess("--unix", path, "--isolation", isolation, "--shutdown-grace", "2")
    try:
        async def main():
            client = await Client.connect_unix(path)
            notes = []
            client.on_notification = lambda method, params: notes.append((method, params))
            session = await client.create_session("s")
            if isolation == "process":  # cancellable anywhere: it is on its main thread
                running = client.execute(session, "import time\ntime.sleep(600)")
            else:  # an in-process cell ends at its next line
                running = client.execute(session, "while True:\n    pass")
            queued = client.execute(session, "1 + 1")
            async for event in running:
                if event["type"] == "started":
                    break
            children = _descendants(server.process.pid)
            server.process.send_signal(sig)
            answers = [await asyncio.wait_for(r.response(), WAIT) for r in (running, queued)]
            await client.close()
            return notes, answers, children

        notes, answers, children = asyncio.run(main())
        assert server.process.wait(WAIT) == 0
        assert ("server.shutdown", {"reason": "server shutdown"}) in notes
        for answer in answers:
            assert answer["status"] == "cancelled", answer
            assert answer["error"]["evalue"] == "server shutdown", answer
        time.sleep(0.2)  # the stderr pump reads the last lines
        _quiet("".join(server.log))
        # every process ends with the server
        wait_until(lambda: not any(_alive(pid) for pid in children),
                   interval=0.05)
        if isolation == "process":
            assert children, "expected the fork server and a session process"
    finally:
        server.stop()


def test_requests_during_shutdown_are_refused(tmp_path):
    """While the server drains, a request gets -32004 instead of starting work."""
    path = str(tmp_path / "s.sock")
    server = ServerProcess("--unix", path, "--shutdown-grace", "30")
    try:
        async def main():
            async with await Client.connect_unix(path) as client:
                session = await client.create_session("s")
                stuck = client.execute(session, "import time\nwhile True:\n    time.sleep(0.01)")
                async for event in stuck:
                    if event["type"] == "started":
                        break
                shutdown = asyncio.get_running_loop().create_future()
                client.on_notification = lambda method, params: (
                    shutdown.done() or shutdown.set_result(method))
                server.process.send_signal(signal.SIGTERM)
                await asyncio.wait_for(shutdown, WAIT)
                try:
                    await asyncio.wait_for(client.call("session.list"), WAIT)
                except Exception as exc:  # noqa: BLE001 - refused or already closed
                    return exc
                return None

        refused = asyncio.run(main())
        assert refused is not None
        assert getattr(refused, "code", -1) in (-32004, -1)
        assert server.process.wait(WAIT) == 0
    finally:
        server.stop()
