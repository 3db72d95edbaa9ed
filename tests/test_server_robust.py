"""The server's connection handling against clients that misbehave: dropped
mid-stream, never reading, hostile ids, notifications, no authentication.

Most tests drive a real ``Server`` and ``Connection`` in this process with a
stand-in transport (so a "disconnect" or "never reads" happens at an exact
point); the ones about processes use a real ``pyrepl3 serve``.
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time

import pytest

from pyrepl3_ext import protocol as P
from pyrepl3_ext.engine import Engine
from pyrepl3_ext.server import Connection, Limits, Server

from .polling import async_wait_until

#: costly and not about the IPython version (tests/conftest.py)
pytestmark = pytest.mark.heavy

WAIT = 60


class Transport:
    """A StreamWriter stand-in: keeps what the server writes; a client that
    does not read is one whose bytes are never taken out of the buffer."""

    def __init__(self, *, reads: bool = True, fail_after: int | None = None):
        self.lines: list[bytes] = []
        self.buffered = 0
        self.reads = reads
        #: writes after this many raise ConnectionResetError (the peer is gone)
        self.fail_after = fail_after
        self.gone = asyncio.Event()
        self.transport = self

    def write(self, data: bytes) -> None:
        if self.fail_after is not None and len(self.lines) >= self.fail_after:
            raise ConnectionResetError("the peer went away")
        self.lines.append(data)
        if not self.reads:
            self.buffered += len(data)

    def get_write_buffer_size(self) -> int:
        return self.buffered

    async def drain(self) -> None:
        if self.buffered:
            await self.gone.wait()  # never read: drained only by the disconnect
            raise ConnectionResetError("the peer went away")

    def close(self) -> None:
        pass

    def messages(self) -> list[dict]:
        return [json.loads(line) for data in self.lines for line in data.splitlines()]


def request(id_, method, **params) -> bytes:
    message = {"jsonrpc": "2.0", "method": method, "params": params}
    if id_ is not None:
        message["id"] = id_
    return json.dumps(message).encode() + b"\n"


@pytest.fixture
def engine():
    eng = Engine()
    try:
        yield eng
    finally:
        eng.close()


def serve(server: Server, data: bytes, transport: Transport, *, until=None,
          require_auth: bool = False) -> asyncio.Task:
    """Feed ``data`` to a new connection (then EOF unless ``until``)."""
    reader = asyncio.StreamReader()
    reader.feed_data(data)
    if until is None:
        reader.feed_eof()
    return asyncio.get_running_loop().create_task(
        server.handle(reader, transport, require_auth=require_auth, name="test"))


# -- item 6: a dropped client's queued executions do not run -----------------------

def test_lines_after_a_drop_are_not_run(engine):
    """The client vanishes while the server works through one read of its
    requests (the reply to the first cannot be written): no execute that
    followed it runs, and none of those already queued either."""
    session = engine.create_session("drop")
    session.set_variable("ran", 0)
    server = Server(engine)
    lines = [request(0, "no.such.method")]  # its error reply finds the peer gone
    lines += [request(i, "execute", session="drop", code="ran += 1") for i in range(1, 200)]

    async def main():
        transport = Transport(fail_after=0)
        await asyncio.wait_for(serve(server, b"".join(lines), transport), WAIT)

    asyncio.run(main())
    session.execute("pass")  # whatever was queued before has been dealt with
    assert session.variable("ran")["value"] == 0


def test_a_drop_cancels_what_was_queued(engine):
    """The running cell ends as soon as it is cancelled (a Python loop), so
    its session would start the next queued cell at once: the queued ones
    must be cancelled before it (cancelled after, up to all of them ran)."""
    session = engine.create_session("queued")
    session.set_variable("ran", 0)
    gate = threading.Event()
    session.shell.user_ns["gate"] = gate
    server = Server(engine)
    lines = [request(0, "execute", session="queued", code="while not gate.is_set():\n    pass")]
    lines += [request(i, "execute", session="queued", code="ran += 1") for i in range(1, 100)]

    async def main():
        transport = Transport()
        reader = asyncio.StreamReader()
        reader.feed_data(b"".join(lines))
        task = asyncio.get_running_loop().create_task(
            server.handle(reader, transport, require_auth=False, name="test"))
        # all submitted, the first running
        await async_wait_until(lambda: len(session._executor._jobs) >= 99,
                               interval=0.01)
        reader.feed_eof()  # the client went away (a socket, not stdio)
        await asyncio.wait_for(task, WAIT)

    asyncio.run(main())
    gate.set()
    session.execute("pass")
    assert session.variable("ran")["value"] == 0


# -- item 7: the server's own replies are bounded per connection --------------------

def test_replies_to_a_client_that_never_reads_are_bounded(engine):
    """20,000 ``server.schema`` requests from a client that reads nothing:
    the server stops taking requests once its backlog passes the limit."""
    limit = 64 * 1024
    server = Server(engine, limits=Limits(max_buffer_bytes=limit))
    schema_reply = len(P.encode(P.response(1, P.schema())))
    data = b"".join(request(i, "server.schema") for i in range(20000))

    async def main():
        transport = Transport(reads=False)
        task = serve(server, data, transport)
        # the connection's backlog passed the limit (it waits for the client),
        # or the server went through every request (asserted against next)
        await async_wait_until(lambda: task.done() or server.connections and not any(
            c.writable.is_set() for c in server.connections), "the backlog to fill")
        assert not task.done()  # waiting for the client to read
        backlog = transport.buffered
        transport.gone.set()  # now it disconnects
        await asyncio.wait_for(task, WAIT)
        return backlog, len(transport.lines)

    backlog, replies = asyncio.run(main())
    assert backlog <= limit + schema_reply
    assert replies < 20000


def test_a_real_server_stops_reading_from_a_client_that_never_reads(tmp_path):
    """End to end over a unix socket: a client writes requests as fast as it
    can and reads nothing.  The server takes a bounded amount (its read-ahead,
    its reply backlog, the socket buffers), then stops reading; its memory
    does not follow the client's 64 MiB."""
    import socket

    from pyrepl3_ext.client import ServerProcess

    path = str(tmp_path / "s.sock")
    line = request(1, "server.schema")
    total = 64 * 1024 * 1024
    data = line * (total // len(line))
    with ServerProcess("--unix", path) as server:
        sock = socket.socket(socket.AF_UNIX)
        sock.connect(path)
        sock.settimeout(3)
        sent = 0
        try:
            while sent < len(data):
                sent += sock.send(data[sent:sent + 65536])
        except socket.timeout:
            pass
        with open(f"/proc/{server.process.pid}/status") as status:
            rss = next(int(x.split()[1]) for x in status if x.startswith("VmRSS")) * 1024
        sock.close()
    assert sent < total // 4, f"the server accepted {sent} bytes"
    assert rss < 200 * 1024 * 1024


# -- item 8: an oversize request is answered with its own id -------------------------

def test_oversize_request_is_answered_with_its_id(engine):
    server = Server(engine, limits=Limits(max_message_bytes=1024))
    big = b'{"jsonrpc": "2.0", "id": 7, "method": "execute", "params": {"code": "' \
        + b"x" * 5000 + b'"}}\n'
    # no newline until far past the limit: the discarding path
    endless = b'{"id": "e", "jsonrpc": "2.0", "method": "execute", "params": {"code": "' \
        + b"y" * 200000 + b'"}}\n'
    nested_first = b'{"params": {"id": 1, "code": "' + b"z" * 5000 + b'"}, "id": 2}\n'

    async def main():
        transport = Transport()
        await asyncio.wait_for(serve(server, big + endless + nested_first
                                     + request(8, "session.list"), transport), WAIT)
        return transport.messages()

    replies = asyncio.run(main())
    assert [(r["id"], r.get("error", {}).get("code")) for r in replies] == [
        (7, P.MESSAGE_TOO_LARGE), ("e", P.MESSAGE_TOO_LARGE),
        (None, P.MESSAGE_TOO_LARGE),  # the id comes after params: not recoverable
        (8, None)]


def test_the_client_never_waits_for_ever_on_a_refused_request():
    """The bundled client's requests put the id first: an oversize one fails
    with -32005 instead of waiting for an answer that never names it."""
    from pyrepl3_ext.client import Client, ClientError

    async def main():
        async with await Client.spawn_stdio("--max-message-bytes", "4096") as client:
            session = await client.create_session("big")
            with pytest.raises(ClientError) as refused:
                await asyncio.wait_for(client.call("namespace.set", session=session,
                                                   name="x", value="v" * 10000), WAIT)
            assert refused.value.code == P.MESSAGE_TOO_LARGE
            with pytest.raises(ClientError) as refused:
                await asyncio.wait_for(client.run(session, "'" + "c" * 10000 + "'"), WAIT)
            assert refused.value.code == P.MESSAGE_TOO_LARGE
            response, _ = await asyncio.wait_for(client.run(session, "1 + 1"), WAIT)
            assert response["status"] == "ok"

    asyncio.run(main())


# -- item 9: ids that are not JSON or not ids --------------------------------------

@pytest.mark.parametrize("raw_id", [b"NaN", b"Infinity", b"-Infinity", b"1e400",
                                    b'"' + b"i" * 1_000_000 + b'"', b"1" + b"0" * 40])
def test_non_finite_and_oversize_ids_are_refused(engine, raw_id):
    server = Server(engine)
    line = b'{"jsonrpc": "2.0", "id": ' + raw_id + b', "method": "session.list"}\n'

    async def main():
        transport = Transport()
        await asyncio.wait_for(serve(server, line, transport), WAIT)
        return transport.lines

    lines = asyncio.run(main())
    assert len(lines) == 1 and len(lines[0]) < 1000
    reply = json.loads(lines[0])  # strict JSON: no NaN/Infinity in what is sent
    json.loads(lines[0], parse_constant=lambda name: pytest.fail(f"{name} sent"))
    assert reply["id"] is None and reply["error"]["code"] == P.INVALID_REQUEST
    assert "id must be" in reply["error"]["message"]


def test_ordinary_ids_are_echoed(engine):
    server = Server(engine)
    ids = [0, -5, 2.5, "a" * 200, 10 ** 29]

    async def main():
        transport = Transport()
        await asyncio.wait_for(serve(server, b"".join(request(i, "session.list")
                                                      for i in ids), transport), WAIT)
        return transport.messages()

    assert [r["id"] for r in asyncio.run(main())] == ids


# -- item 10: notifications are never answered -------------------------------------

def test_notifications_get_no_answer_even_when_wrong(engine):
    server = Server(engine)
    lines = [request(None, "no.such.method"),
             request(None, "session.info"),                # missing params
             request(None, "session.close", session="nope"),  # valid, fails: no answer
             b'{"jsonrpc": "2.0", "method": "session.list", "params": [1]}\n',
             request(None, "execute", session="nope", code="1"),
             request("last", "session.list")]

    async def main():
        transport = Transport()
        await asyncio.wait_for(serve(server, b"".join(lines), transport), WAIT)
        return transport.messages()

    assert [r["id"] for r in asyncio.run(main())] == ["last"]


def test_malformed_messages_without_id_are_still_answered(engine):
    """Not a request object at all: JSON-RPC answers those with id null."""
    server = Server(engine)
    lines = [b"not json\n", b'{"jsonrpc": "1.0", "method": "x"}\n', b'{"method": 5}\n',
             b'{"jsonrpc": "2.0", "method": "x", "extra": 1}\n']

    async def main():
        transport = Transport()
        await asyncio.wait_for(serve(server, b"".join(lines), transport), WAIT)
        return transport.messages()

    replies = asyncio.run(main())
    assert [(r["id"], r["error"]["code"]) for r in replies] == [
        (None, P.PARSE_ERROR)] + [(None, P.INVALID_REQUEST)] * 3


# -- item 11: unauthenticated connections are bounded in time and number -----------

def _recv_until_closed(sock) -> bytes:
    """Everything the server sends until it closes (a "must not hang" bound)."""
    sock.settimeout(WAIT)
    data = b""
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            return data
        data += chunk


def test_unauthenticated_connections_are_closed_after_the_deadline():
    import socket

    from pyrepl3_ext.client import ServerProcess

    with ServerProcess("--tcp", "127.0.0.1:0", "--token", "tok", "--auth-timeout", "1") as srv:
        host, port = srv.address.rsplit(":", 1)
        idle = socket.create_connection((host, int(port)))
        said = _recv_until_closed(idle)  # closed by the server, not by this test
        reply = json.loads(said.splitlines()[0])
        assert reply["error"]["code"] == P.UNAUTHORIZED
        assert "not authenticated within" in reply["error"]["message"]
        idle.close()
        # one that authenticates in time stays open past the deadline
        good = socket.create_connection((host, int(port)))
        good.sendall(request(1, "auth", token="tok"))
        good.settimeout(WAIT)
        assert json.loads(good.recv(65536))["result"] == {"ok": True}
        time.sleep(1.5)
        good.sendall(request(2, "session.list"))
        assert "sessions" in json.loads(good.recv(65536))["result"]
        good.close()


def test_at_most_n_connections_wait_to_authenticate():
    import socket

    from pyrepl3_ext.client import ServerProcess

    with ServerProcess("--tcp", "127.0.0.1:0", "--token", "tok",
                       "--max-unauthenticated", "3", "--auth-timeout", "600") as srv:
        host, port = srv.address.rsplit(":", 1)
        waiting = [socket.create_connection((host, int(port))) for _ in range(3)]
        for sock in waiting:  # each is being served (answers a request)
            sock.sendall(request(0, "server.info"))
            sock.settimeout(WAIT)
            assert json.loads(sock.recv(65536))["error"]["code"] == P.UNAUTHORIZED
        extra = socket.create_connection((host, int(port)))
        reply = json.loads(_recv_until_closed(extra).splitlines()[0])
        assert "too many connections waiting to authenticate" in reply["error"]["message"]
        extra.close()
        # authenticating frees a place
        waiting[0].sendall(request(1, "auth", token="tok"))
        assert json.loads(waiting[0].recv(65536))["result"] == {"ok": True}
        again = socket.create_connection((host, int(port)))
        again.sendall(request(2, "auth", token="tok"))
        again.settimeout(WAIT)
        assert json.loads(again.recv(65536))["result"] == {"ok": True}
        for sock in waiting + [again]:
            sock.close()


# -- item 12: invalid params are -32602, never an internal error --------------------

def _schema_values(spec: dict, st, names, depth: int = 0):
    """A hypothesis strategy for values that pass ``spec`` (the shape the
    server's schema accepts), with the awkward ones weighted in."""
    kinds = spec.get("type")
    kinds = kinds if isinstance(kinds, list) else [kinds] if kinds else \
        ["string", "number", "boolean", "null"] + (["object", "array"] if depth < 2 else [])
    if "enum" in spec:
        return st.sampled_from(spec["enum"])
    options = []
    for kind in kinds:
        if kind == "string":
            low, high = spec.get("minLength", 0), spec.get("maxLength", 300)
            options.append(st.sampled_from(names) | st.text(min_size=low,
                                                            max_size=min(high, 40)))
        elif kind in ("number", "integer"):
            low = spec.get("minimum", spec.get("exclusiveMinimum"))
            numbers = st.integers(-10, 10 ** 6) | st.sampled_from([1e308, 1e-308, 0, -1])
            if kind == "number":
                numbers |= st.floats(allow_nan=False, allow_infinity=False)
            if low is not None:
                numbers = numbers.filter(lambda v: v > low if "exclusiveMinimum" in spec
                                         else v >= low)
            options.append(numbers)
        elif kind == "boolean":
            options.append(st.booleans())
        elif kind == "null":
            options.append(st.none())
        elif kind == "array":
            options.append(st.lists(_schema_values(spec.get("items", {}), st, names,
                                                   depth + 1), max_size=3))
        elif kind == "object":
            if "properties" in spec:
                options.append(_schema_params(spec, st, names, depth + 1))
            else:
                options.append(st.dictionaries(st.sampled_from(names) | st.text(max_size=8),
                                               st.none() | st.integers() | st.text(max_size=8)
                                               | st.floats(allow_nan=False), max_size=3))
    return st.one_of(options)


def _schema_params(spec: dict, st, names, depth: int = 0):
    props = spec.get("properties", {})
    required = {k: _schema_values(props[k], st, names, depth)
                for k in spec.get("required", ())}
    optional = {k: _schema_values(v, st, names, depth)
                for k, v in props.items() if k not in required}
    return st.fixed_dictionaries(required, optional=optional)


@pytest.mark.timeout(900)
def test_schema_valid_params_never_cause_an_internal_error(engine, tmp_path):
    """Every method, params that pass the schema but mean nothing sensible:
    the answer is a result or a -32602-family error, never -32603."""
    from hypothesis import HealthCheck, given, settings, strategies as st

    root = tmp_path / "files"
    root.mkdir()
    snapdir = tmp_path / "snapshots"
    snapdir.mkdir()
    server = Server(engine, files_roots=[str(root)], snapshot_dir=str(snapdir),
                    snapshot_key_file=str(tmp_path / "snapshot.key"))
    names = ["s", "gone", "x", "In", "__builtins__", "snap", "e1", "trusted", str(root),
             "/etc", "input", "files", "memory", "512M", "cell_seconds"]
    methods = sorted(m for m in P.METHODS if m != "auth")
    found: list[dict] = []
    loop = asyncio.new_event_loop()
    transport = Transport()
    reader = None

    async def open_connection():
        nonlocal reader
        reader = asyncio.StreamReader()
        task = loop.create_task(server.handle(reader, transport, require_auth=False,
                                              name="audit"))
        return task

    task = loop.run_until_complete(open_connection())
    counter = {"id": 0}

    def exchange(method: str, params: dict) -> dict:
        counter["id"] += 1
        id_ = counter["id"]
        reader.feed_data(request(id_, method, **params))

        async def answered():
            found = []
            await async_wait_until(lambda: found.extend(
                m for m in transport.messages() if m.get("id") == id_) or found,
                interval=0.002)
            return found[0]

        return loop.run_until_complete(answered())

    exchange("session.create", {"session_id": "s"})

    @settings(max_examples=int(os.environ.get("PYREPL3_AUDIT_EXAMPLES", "400")),
              deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(st.sampled_from(methods).flatmap(
        lambda m: st.tuples(st.just(m), _schema_params(P.METHODS[m]["params"], st, names))))
    def audit(call):
        method, params = call
        if method == "execute":
            params["code"] = "1"  # the cell's own errors are not the point here
            params.pop("timeout", None) if params.get("timeout", 1) > 1e6 else None
        if method == "session.create":
            if os.environ.get("PYREPL3_AUDIT_PROCESS") is None:
                params.pop("isolation", None)  # process sessions: their own tests
        reply = exchange(method, params)
        if reply.get("error", {}).get("code") == P.INTERNAL_ERROR:
            found.append({"method": method, "params": params, "reply": reply})
        if method == "session.close" and params.get("session") == "s":
            exchange("session.create", {"session_id": "s"})

    try:
        audit()
    finally:
        reader.feed_eof()
        loop.run_until_complete(asyncio.wait_for(task, WAIT))
        loop.close()
    assert not found, json.dumps(found[:5], indent=1, default=repr)


def test_unknown_policy_is_invalid_params_listing_the_presets(engine):
    server = Server(engine)

    async def main():
        transport = Transport()
        await asyncio.wait_for(serve(server, request(1, "session.create", policy="strict"),
                                     transport), WAIT)
        return transport.messages()

    (reply,) = asyncio.run(main())
    assert reply["error"]["code"] == P.INVALID_PARAMS
    for preset in ("trusted", "guarded", "restricted"):
        assert preset in reply["error"]["message"]
    assert engine.sessions == []  # nothing half-created
    from pyrepl3_ext.security.policy import PRESETS

    assert tuple(PRESETS) == P.POLICIES  # the schema's list follows the presets


# -- order across threads: the outbox before the loop's own messages ---------------

def test_the_loops_own_message_goes_after_what_cells_queued(engine):
    """An event waiting in the connection's outbox (a quiet window: it waits
    for its response) is written before any later message of the loop's own,
    such as a cancel's answer or an answer at shutdown: a client never sees
    an execution answered and then more of its events."""
    server = Server(engine)

    async def main():
        transport = Transport()
        conn = Connection(server, transport, require_auth=False, name="test")
        conn.open_quiet_window()
        conn.send_threadsafe(b'{"queued": 1}\n', answer=False)
        conn.send({"then": 2})
        await asyncio.sleep(0.01)  # past the window: its end writes nothing twice
        return transport.messages()

    assert asyncio.run(main()) == [{"queued": 1}, {"then": 2}]
