"""``pyrepl3 serve`` end to end: a real server process over stdio, TCP and a unix
socket, driven by ``pyrepl3_ext.client``; plus the protocol layer in process."""

from __future__ import annotations

import asyncio
import json
import os
import stat
import subprocess
import sys
import tempfile

import pytest

from pyrepl3_ext import protocol as P
from pyrepl3_ext.client import Client, ClientError, ServerProcess

WAIT = 60


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 120))


async def spawn(*args: str) -> Client:
    return await Client.spawn_stdio(*args)


def types(events):
    return [e["type"] for e in events]


# -- stdio ----------------------------------------------------------------------

def test_stdio_execute_events_and_response():
    async def main():
        async with await spawn() as client:
            info = await client.call("server.info")
            assert info["build"] in ("stock", "patched")
            session = await client.create_session("s1")
            assert session == "s1"
            response, events = await client.run(session, "x = 6\nx * 7", execution_id="e1")
            assert response == {"execution_id": "e1", "status": "ok",
                                "execution_count": 1, "error": None}
            assert types(events) == ["started", "result", "finished"]
            assert [e["seq"] for e in events] == [0, 1, 2]
            assert events[1]["data"]["text/plain"] == "42"
            assert all(e["execution_id"] == "e1" and e["session"] == "s1" for e in events)

            response, events = await client.run(session, "1 / 0")
            assert response["status"] == "error"
            assert response["error"]["ename"] == "ZeroDivisionError"
            assert types(events) == ["started", "error", "finished"]
            response, _ = await client.run(session, "def (:")
            assert response["status"] == "error" and response["error"]["kind"] == "syntax"
            # the session goes on, with its namespace
            response, events = await client.run(session, "x")
            assert events[1]["data"]["text/plain"] == "6"
            listed = await client.call("session.list")
            assert [s["session"] for s in listed["sessions"]] == ["s1"]
    run(main())


def test_stdio_cancel_and_timeout():
    async def main():
        async with await spawn() as client:
            session = await client.create_session()
            execution = client.execute(session, "while True:\n    pass")
            started = await anext(aiter(execution))
            assert started["type"] == "started"
            assert await execution.cancel("stop it") is True
            response = await execution.response()
            assert response["status"] == "cancelled"
            assert response["error"]["kind"] == "cancelled" and "stop it" in response["error"]["evalue"]
            response, events = await client.run(session, "while True:\n    pass", timeout=0.2)
            assert response["status"] == "cancelled" and response["error"]["kind"] == "timeout"
            assert types(events)[-1] == "finished"
            with pytest.raises(ClientError) as info:
                await client.cancel(session, "no-such-execution")
            assert info.value.code == P.UNKNOWN_EXECUTION
            response, _ = await client.run(session, "1 + 1")
            assert response["status"] == "ok"
    run(main())


def test_errors_are_answered_and_the_server_keeps_serving():
    async def main():
        async with await spawn("--max-message-bytes", "4096") as client:
            session = await client.create_session()
            raw = client._writer

            async def send_raw(line: bytes) -> dict:
                future = asyncio.get_running_loop().create_future()
                client._pending[None] = future  # errors for unreadable ids come with id null
                raw.write(line + b"\n")
                await raw.drain()
                return await asyncio.wait_for(asyncio.shield(future), WAIT)

            for line, code in [(b"{not json", P.PARSE_ERROR),
                               (b"[1, 2]", P.INVALID_REQUEST),
                               (b'{"jsonrpc": "2.0", "method": 5, "id": null}', P.INVALID_REQUEST),
                               (b"\xff\xfe", P.PARSE_ERROR),
                               (b"x" * 10_000, P.MESSAGE_TOO_LARGE)]:
                with pytest.raises(ClientError) as info:
                    await send_raw(line)
                assert info.value.code == code, line[:40]
            for method, params, code in [
                    ("no.such", {}, P.METHOD_NOT_FOUND),
                    ("execute", {"session": session}, P.INVALID_PARAMS),
                    ("execute", {"session": session, "code": 5}, P.INVALID_PARAMS),
                    ("execute", {"session": session, "code": "1", "timeout": -1}, P.INVALID_PARAMS),
                    ("execute", {"session": session, "code": "1", "bogus": 1}, P.INVALID_PARAMS),
                    ("execute", {"session": "nope", "code": "1"}, P.UNKNOWN_SESSION),
                    ("session.info", {"session": "nope"}, P.UNKNOWN_SESSION)]:
                with pytest.raises(ClientError) as info:
                    await client.call(method, **params)
                assert info.value.code == code, (method, params)
            with pytest.raises(ClientError) as info:
                await client.call("execute", session=session, code="1", bogus=1)
            assert "unknown parameter 'bogus'" in info.value.message
            response, _ = await client.run(session, "2 + 2")
            assert response["status"] == "ok"
    run(main())


def test_huge_result_is_truncated_and_the_session_goes_on():
    async def main():
        async with await spawn("--max-event-bytes", "100000") as client:
            session = await client.create_session()
            response, events = await client.run(session, "'x' * 5_000_000")
            assert response["status"] == "ok"
            result = events[1]
            assert result["type"] == "result" and result["truncated"] is True
            # each long string is cut to a quarter of the limit (docs/protocol.md)
            assert len(result["data"]["text/plain"]) == 100_000 // 4
            assert result["truncated_from"] == {"data.text/plain": 5_000_002}  # the repr's quotes
            response, events = await client.run(session, "3")
            assert events[1]["data"]["text/plain"] == "3"
    run(main())


def test_stdio_cell_output_cannot_corrupt_the_stream():
    async def main():
        async with await spawn() as client:
            session = await client.create_session()
            code = "import os, sys\nos.write(1, b'raw fd write\\n')\nsys.__stdout__.write('x\\n')\n1"
            response, _ = await client.run(session, code)
            assert response["status"] == "ok"
            # and nothing reads the protocol's input but the server
            response, _ = await client.run(session, "import sys\nsys.stdin.read()")
            assert response["status"] == "ok"
    run(main())


# -- sockets ----------------------------------------------------------------------

def test_tcp_needs_the_token_and_binds_loopback():
    with ServerProcess("--tcp", "127.0.0.1:0", "--token", "s3cret") as server:
        host, port = server.address.rsplit(":", 1)

        async def main():
            reader, writer = await asyncio.open_connection(host, int(port))
            anonymous = Client(reader, writer)
            with pytest.raises(ClientError) as info:
                await anonymous.call("session.list")
            assert info.value.code == P.UNAUTHORIZED
            with pytest.raises(ClientError) as info:
                await anonymous.call("auth", token="wrong")
            assert info.value.code == P.UNAUTHORIZED
            await anonymous.close()
            async with await Client.connect_tcp(host, int(port), "s3cret") as client:
                session = await client.create_session()
                response, events = await client.run(session, "21 * 2")
                assert events[1]["data"]["text/plain"] == "42"
        run(main())
    refused = subprocess.run([sys.executable, "-m", "pyrepl3_ext.cli", "serve", "--tcp",
                              "0.0.0.0:0"], capture_output=True, text=True, timeout=WAIT)
    assert refused.returncode == 2 and "--allow-remote" in refused.stderr


def test_unix_socket_is_owner_only_and_disconnect_cancels():
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "pyrepl3.sock")
        with ServerProcess("--unix", path):
            assert stat.S_IMODE(os.stat(path).st_mode) == 0o600

            async def main():
                first = await Client.connect_unix(path)
                session = await first.create_session("shared")
                execution = first.execute(session, "while True:\n    pass", execution_id="spin")
                assert (await anext(aiter(execution)))["type"] == "started"
                await first.close()  # gone mid-execution
                async with await Client.connect_unix(path) as second:
                    for _ in range(200):
                        info = await second.call("session.info", session="shared")
                        if not info["busy"]:
                            break
                        await asyncio.sleep(0.05)
                    assert info["busy"] is False, "the abandoned execution was not cancelled"
                    response, _ = await second.run("shared", "'still here'")
                    assert response["status"] == "ok"
            run(main())
        assert not os.path.exists(path)


# -- the protocol layer, in process ----------------------------------------------

def test_schema_covers_every_method_and_is_json():
    document = json.loads(json.dumps(P.schema()))
    assert set(document["methods"]) >= {
        "session.create", "session.close", "session.list", "session.info", "execute",
        "cancel", "input.reply", "namespace.get", "namespace.set", "namespace.delete",
        "namespace.list", "snapshot.take", "snapshot.restore"}
    assert "execution.event" in document["notifications"]
    out = subprocess.run([sys.executable, "-m", "pyrepl3_ext.cli", "serve", "--schema"],
                         capture_output=True, text=True, timeout=WAIT)
    assert json.loads(out.stdout) == document


@pytest.mark.parametrize("params, message", [
    ({"session": "s"}, "params is missing 'code'"),
    ({"session": "s", "code": 1}, "code must be string, got int"),
    ({"session": "s", "code": "1", "timeout": 0}, "timeout must be > 0"),
    ({"session": "", "code": "1"}, "session must not be empty"),
    ({"session": "s", "code": "1", "queue": "yes"}, "queue must be boolean, got str"),
])
def test_invalid_params_say_what_is_wrong(params, message):
    line = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "execute", "params": params})
    with pytest.raises(P.RPCError) as info:
        P.parse(line)
    assert info.value.code == P.INVALID_PARAMS and info.value.message == message


def _loads_outcome(read, line):
    try:
        value = read(line)
    except (ValueError, RecursionError) as exc:  # what parse() turns into PARSE_ERROR
        return "error", type(exc).__name__, str(exc)
    # repr tells 1 from 1.0, -0.0 from 0.0 and keeps NaN equal to itself
    return "value", repr(value)


# what orjson refuses or reads otherwise than the stdlib, and plain requests
_DECODE_CASES = [
    b'{"jsonrpc":"2.0","id":7,"method":"cancel","params":{"session":"s","execution_id":"e"}}',
    b'{"id":123456789012345678901234567890}', b'{"id":-9223372036854775809}',
    b'{"id":18446744073709551616}', b'{"a":12345678901234567890.5}',
    b'{"a":NaN,"b":-Infinity}', b'{"a":"\\udc80"}', b'\xef\xbb\xbf{"a":1}', b'{"a":1e400}',
    b'{"a":-0.0,"b":1.5e-320,"c":0.1}', b'{"a":"\xff"}', b'{"a":1}\x00', b'{"a":1,"a":2}',
    b"[" * 3000 + b"]" * 3000, b' {"a": [1, 2.0, true, null]} \r', b"", b"{", b'"\\ud83d\\ude00"',
    '{"a":"\u00e9"}',
]


needs_fast_decoder = pytest.mark.skipif(P.decode is json.loads,
                                        reason="no orjson (the fast extra): decode is the stdlib")


@needs_fast_decoder
@pytest.mark.parametrize("line", _DECODE_CASES)
def test_requests_are_read_exactly_as_the_stdlib_reads_them(line):
    """The fast decoder (orjson, when installed) never changes what a request
    says or which error its line gets: a 30-digit id stays an exact integer."""
    assert _loads_outcome(P.decode, line) == _loads_outcome(json.loads, line)


@needs_fast_decoder
def test_the_stdlibs_reading_holds_for_any_json_line():
    from hypothesis import given, settings, strategies as st

    scalars = (st.none() | st.booleans() | st.integers(min_value=-(10 ** 40), max_value=10 ** 40)
               | st.floats(allow_nan=True, allow_infinity=True) | st.text())
    values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                          | st.dictionaries(st.text(max_size=5), inner, max_size=4), max_leaves=12)

    @settings(max_examples=300, deadline=None)
    @given(values, st.booleans())
    def check(value, ascii_only):
        line = json.dumps(value, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass")
        assert _loads_outcome(P.decode, line) == _loads_outcome(json.loads, line)

    check()


def test_namespace_and_snapshots_over_the_protocol():
    async def main():
        async with await spawn() as client:
            session = await client.create_session()
            await client.call("namespace.set", session=session, name="cfg",
                              value={"depth": 3, "tags": ["a", "b"]})
            response, events = await client.run(session, "cfg['depth'] * 2")
            assert events[1]["data"]["text/plain"] == "6"
            await client.run(session, "import collections\nodd = {1, 2}")
            got = await client.call("namespace.get", session=session, name="cfg")
            assert got["value"] == {"depth": 3, "tags": ["a", "b"]}
            odd = await client.call("namespace.get", session=session, name="odd")
            assert "value" not in odd and odd["type"] == "builtins.set"  # not JSON: repr only
            assert odd["repr"] == "{1, 2}"
            listed = await client.call("namespace.list", session=session)
            assert {v["name"] for v in listed["variables"]} == {"cfg", "collections", "odd"}
            with pytest.raises(ClientError) as info:
                await client.call("namespace.get", session=session, name="nope")
            assert info.value.code == P.UNKNOWN_NAME
            with pytest.raises(ClientError) as info:
                await client.call("namespace.set", session=session, name="In", value=1)
            assert info.value.code == P.INVALID_PARAMS
            taken = await client.call("snapshot.take", session=session, name="before")
            assert taken["snapshot"]["name"] == "before"
            await client.run(session, "cfg = None\nnew = 1")
            await client.call("snapshot.restore", session=session, name="before")
            got = await client.call("namespace.get", session=session, name="cfg")
            assert got["value"]["depth"] == 3
            await client.call("namespace.delete", session=session, name="cfg")
            with pytest.raises(ClientError) as info:
                await client.call("namespace.get", session=session, name="cfg")
            assert info.value.code == P.UNKNOWN_NAME
            with pytest.raises(ClientError) as info:
                await client.call("snapshot.restore", session=session, name="missing")
            assert info.value.code == P.UNKNOWN_NAME
    run(main())


def test_input_over_the_protocol_and_output_events():
    async def main():
        async with await spawn() as client:
            session = await client.create_session()
            for cell in range(2):  # input works in every cell, not just the first
                run = client.execute(session, "name = input('who? ')\nprint('hi', name)")
                kinds = []
                async for event in run:
                    kinds.append(event["type"])
                    if event["type"] == "input_requested":
                        assert event["prompt"] == "who? " and event["password"] is False
                        assert await client.reply_input(session, event["input_id"], f"ada{cell}")
                    if event["type"] == "output" and "hi" in event["text"]:
                        assert event["text"] == f"hi ada{cell}\n"
                assert (await run.response())["status"] == "ok"
                assert kinds.index("input_requested") < kinds.index("finished")
            with pytest.raises(ClientError) as info:
                await client.reply_input(session, "no-such-input", "x")
            assert info.value.code == P.UNKNOWN_INPUT
            run = client.execute(session, "input()")
            async for event in run:
                if event["type"] == "input_requested":
                    await client.reply_input(session, event["input_id"], eof=True)
            response = await run.response()
            assert response["status"] == "error" and response["error"]["ename"] == "EOFError"
    run(main())


def test_capabilities_granted_at_session_create(tmp_path):
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    (tmp_path / "secret.txt").write_text("not yours")

    async def main():
        async with await spawn("--files-root", str(allowed)) as client:
            session = await client.create_session(
                "agent-1", policy="restricted", capabilities=["input", {"name": "files"}])
            # files: the default root is <files-root>/<session id>
            response, events = await client.run(
                session, "files.write('notes.txt', 'kept')\nfiles.read('notes.txt')")
            assert response["status"] == "ok", events
            assert events[-2]["data"]["text/plain"] == "'kept'"
            assert (allowed / "agent-1" / "notes.txt").read_text() == "kept"
            response, events = await client.run(session, "files.read('../../secret.txt')")
            assert response["status"] == "error"
            assert response["error"]["kind"] == "security", response
            assert response["error"]["ename"] == "SecurityError"
            assert "'..' could leave" in response["error"]["evalue"]
            # input: the builtin is gone under restricted, the capability answers
            run = client.execute(session, "answer = input('which? ')\nanswer.upper()")
            async for event in run:
                if event["type"] == "input_requested":
                    assert event["prompt"] == "which? "
                    await client.reply_input(session, event["input_id"], "blue")
                if event["type"] == "result":
                    assert event["data"]["text/plain"] == "'BLUE'"
            assert (await run.response())["status"] == "ok"
            # without the grant, input is refused before the cell runs
            plain = await client.create_session(policy="restricted")
            response, _ = await client.run(plain, "input('x')")
            assert response["error"]["kind"] == "security"

            # an explicit root must be inside a --files-root directory
            (allowed / "shared").mkdir()
            ro = await client.create_session(capabilities=[
                {"name": "files", "root": str(allowed / "shared"), "read_only": True}])
            response, _ = await client.run(ro, "files.write('x', 'y')")
            assert response["status"] == "error"
            assert response["error"]["kind"] == "security", response
            assert response["error"]["ename"] == "SecurityError"
            assert "read-only" in response["error"]["evalue"]
            assert not (allowed / "shared" / "x").exists()
            for bad, code in ([{"name": "files", "root": str(tmp_path)}], P.NOT_AVAILABLE), \
                             ([{"name": "files", "root": str(allowed / ".." / "..")}],
                              P.NOT_AVAILABLE), \
                             (["network"], P.INVALID_PARAMS), \
                             (["input", "input"], P.INVALID_PARAMS), \
                             ([{"name": "input", "root": "/"}], P.INVALID_PARAMS):
                with pytest.raises(ClientError) as info:
                    await client.create_session("refused", capabilities=bad)
                assert info.value.code == code, (bad, info.value)
            # a refused create leaves no session behind
            listed = await client.call("session.list")
            assert "refused" not in [s["session"] for s in listed["sessions"]]

        async with await spawn() as client:  # no --files-root: files is not offered
            with pytest.raises(ClientError) as info:
                await client.create_session(capabilities=[{"name": "files"}])
            assert info.value.code == P.NOT_AVAILABLE
            assert "--files-root" in info.value.message
    run(main())


def test_a_cancel_answer_says_what_happened():
    """dropped (it was queued), or the state of the delivery (never a bare yes)."""
    async def main():
        async with await spawn() as client:
            session = await client.create_session("c")
            running = client.execute(session, "while True:\n    pass", execution_id="r")
            queued = client.execute(session, "1", execution_id="q")
            for _ in range(200):
                info = await client.call("session.info", session=session)
                if info["running"] == "r":
                    break
                await asyncio.sleep(0.01)
            answer = await client.call("cancel", session=session, execution_id="q")
            assert answer["cancelled"] and answer["state"] == "dropped"
            answer = await client.call("cancel", session=session, execution_id="r")
            assert answer["cancelled"]
            assert answer["state"] in ("delivered", "pending", "escalated"), answer
            assert (await running.response())["status"] == "cancelled"
            assert (await queued.response())["status"] == "cancelled"

    run(main())


def test_a_cancel_the_cell_swallows_is_delivered_again_after_the_grace():
    """The grace-period re-arm of a cancel requested over the protocol runs
    on the server's loop (cancellation/timers.py): the cell that catches
    its first ``CellCancelled`` and loops on is cancelled again."""
    # a statement before the loop: on 3.10/3.11 a worker's cancel is an
    # asynchronous exception, which a loop that starts the try block can see
    # attributed outside it (docs/cancellation.md)
    code = ("try:\n    n = 0\n    while True:\n        n += 1\nexcept BaseException:\n"
            "    print('caught it')\nwhile True:\n    pass")

    async def main():
        async with await spawn() as client:
            session = await client.create_session()
            execution = client.execute(session, code)
            assert (await anext(aiter(execution)))["type"] == "started"
            await asyncio.sleep(0.05)
            assert await execution.cancel("stop it") is True
            response = await asyncio.wait_for(execution.response(), 30)
            assert response["status"] == "cancelled", response
            events = [e async for e in execution]
            printed = "".join(e.get("text", "") for e in events if e["type"] == "output")
            assert "caught it" in printed, events  # the first delivery was swallowed
    run(main())


# -- how replies reach the socket: the write-through and the quiet window ----------

class _BlockingPeer:
    """A client of an in-process server on a unix socket, read on its own
    thread, so the test can hold the server's loop while it reads."""

    def __init__(self, path: str):
        import socket

        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.connect(path)
        self.sock.settimeout(WAIT)
        self.buf = b""

    def send(self, id_, method: str, **params) -> None:
        message = {"jsonrpc": "2.0", "method": method, "params": params}
        if id_ is not None:
            message["id"] = id_
        self.sock.sendall(json.dumps(message).encode() + b"\n")

    def next(self) -> dict:
        while b"\n" not in self.buf:
            chunk = self.sock.recv(65536)
            assert chunk, "the server closed the connection"
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return json.loads(line)

    def until(self, done) -> list[dict]:
        seen = []
        while not seen or not done(seen[-1]):
            seen.append(self.next())
        return seen


def _served(tmp_path, scenario) -> None:
    """Run ``scenario(peer, hold_loop, session)`` on a thread against an
    in-process server whose loop is this test's; ``hold_loop(event)``
    blocks the loop until ``event`` is set (or WAIT passes) and says
    whether it was."""
    import threading

    from pyrepl3_ext.engine import Engine
    from pyrepl3_ext.server import Server

    engine = Engine()
    server = Server(engine)
    session = engine.create_session("s")
    path = str(tmp_path / "s.sock")

    async def main():
        loop = asyncio.get_running_loop()
        listening = asyncio.Event()
        serving = loop.create_task(server.serve_unix(path, ready=lambda _p: listening.set()))
        await listening.wait()

        def hold_loop(event: threading.Event) -> bool:
            held = threading.Event()
            result = []

            def hold():
                held.set()
                result.append(event.wait(WAIT))
            loop.call_soon_threadsafe(hold)
            held.wait(WAIT)
            return result

        peer = _BlockingPeer(path)
        try:
            return await loop.run_in_executor(None, scenario, peer, hold_loop, session)
        finally:
            peer.sock.close()
            serving.cancel()

    try:
        return run(main())
    finally:
        engine.close(timeout=WAIT)


def test_a_response_is_written_while_the_servers_loop_is_busy(tmp_path):
    """The thread that has an answer writes it, with the events queued
    before it, when the transport holds nothing: the client gets it even
    while the server's loop cannot run (a waking loop would first wait
    for the GIL).  Here the loop is held until the client has the answer."""
    import threading

    def scenario(peer, hold_loop, session):
        gate = threading.Event()
        session.shell.user_ns["gate"] = gate
        peer.send(1, "execute", session="s", code="gate.wait(60)\n'done'")
        messages = peer.until(lambda m: m.get("params", {}).get("event", {}).get("type")
                              == "started")
        answered = threading.Event()
        holding = hold_loop(answered)
        gate.set()  # the cell ends while the loop is held
        messages += peer.until(lambda m: m.get("id") == 1)
        answered.set()
        return holding, messages

    holding, messages = _served(tmp_path, scenario)
    assert holding == [True], "the response only came once the loop ran again"
    kinds = [m["params"]["event"]["type"] for m in messages if "params" in m]
    assert kinds == ["started", "result", "finished"]
    assert messages[-1]["result"]["status"] == "ok"


def test_events_reach_the_client_while_their_cell_runs(tmp_path):
    """The quiet window is bounded: a cell that runs on (here: until the
    client has seen its ``started`` and what it printed) has its events
    sent without waiting for its response."""
    import threading

    def scenario(peer, hold_loop, session):
        gate = threading.Event()
        session.shell.user_ns["gate"] = gate
        peer.send(1, "execute", session="s",
                  code="print('working')\nassert gate.wait(60)\n'done'")
        messages = peer.until(lambda m: m.get("params", {}).get("event", {}).get("type")
                              == "output")
        gate.set()
        return messages + peer.until(lambda m: m.get("id") == 1)

    messages = _served(tmp_path, scenario)
    assert messages[-1]["result"]["status"] == "ok", messages[-1]
    kinds = [m["params"]["event"]["type"] for m in messages if "params" in m]
    assert kinds == ["started", "output", "result", "finished"]


def test_a_notifications_last_event_does_not_wait_for_a_response(tmp_path):
    """An execute sent as a notification has no response to carry its
    events: its ``finished`` is written at once, like an answer."""
    import threading

    def scenario(peer, hold_loop, session):
        gate = threading.Event()
        session.shell.user_ns["gate"] = gate
        peer.send(None, "execute", session="s", code="_ = gate.wait(60)", execution_id="n1")
        messages = peer.until(lambda m: m["params"]["event"]["type"] == "started")
        finished = threading.Event()
        holding = hold_loop(finished)
        gate.set()
        messages += peer.until(lambda m: m["params"]["event"]["type"] == "finished")
        finished.set()
        return holding, messages

    holding, messages = _served(tmp_path, scenario)
    assert holding == [True], "finished only came once the loop ran again"
    assert [m["params"]["event"]["type"] for m in messages] == ["started", "finished"]


# -- codec, event loop, GIL hand-off ---------------------------------------------

@pytest.mark.parametrize("message", [
    {"jsonrpc": "2.0", "method": "execution.event",
     "params": {"event": {"type": "output", "text": "é☃\n", "seq": 3, "ts": 1.5e16}}},
    {"id": 1, "result": {"nested": [1, 2.5, None, True, "x"], "tuple": (1, 2)}},
    {"lone surrogate": "\udc80", "big": 2 ** 70, 1: "int key"},  # the fallback's cases
    {"object": object, "date": __import__("datetime").date(2020, 1, 2)},  # repr default
])
def test_every_codec_writes_the_same_line(message):
    line = P.encode(message)
    assert line == P._encode_stdlib(message)
    assert line.endswith(b"\n") and line.count(b"\n") == 1


def test_the_server_says_which_codec_and_loop_and_hands_the_gil_off_fast():
    async def main():
        async with await spawn() as client:
            info = await client.call("server.info")
            assert info["json"] in ("stdlib", "orjson")
            assert info["event_loop"] in ("asyncio", "uvloop")
            session = await client.create_session()
            response, events = await client.run(
                session, "import sys\nsys.getswitchinterval()")
            assert float(events[1]["data"]["text/plain"]) <= 0.0005

    run(main())
