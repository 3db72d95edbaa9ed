"""Hostile input for the protocol server: 100,000 malformed or hostile messages
(hypothesis) through a real server's request path, then a valid request."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from pyrepl3_ext import protocol as P
from pyrepl3_ext.engine import Engine
from pyrepl3_ext.server import Connection, Limits, Server

#: How many messages: 10,000 in every nox session; the newest session of the
#: matrix sets PYREPL3_FUZZ_MESSAGES=100000 (noxfile.py), which takes
#: minutes on a loaded 2-core machine
TOTAL = int(os.environ.get("PYREPL3_FUZZ_MESSAGES", "10000"))
PER_EXAMPLE = 50

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True)
    | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=4),
    max_leaves=10)
methods = st.sampled_from(sorted(P.METHODS)) | st.text(max_size=12)
param_names = st.sampled_from(["session", "code", "execution_id", "timeout", "queue",
                               "name", "value", "input_id", "token", "reason"]) | st.text(max_size=6)
requests = st.fixed_dictionaries(
    {"jsonrpc": st.sampled_from(["2.0", "1.0", 2.0]) | json_values,
     "method": methods | json_values},
    optional={"id": st.integers() | st.text(max_size=5) | json_values,
              "params": st.dictionaries(param_names, json_values, max_size=5) | json_values,
              "extra": json_values})
hostile_lines = st.one_of(
    st.binary(max_size=60),
    st.text(max_size=60).map(lambda t: t.encode("utf-8", "surrogatepass")),
    json_values.map(lambda v: json.dumps(v).encode()),
    requests.map(lambda r: json.dumps(r).encode()),
    st.integers(min_value=1, max_value=5000).map(lambda n: b"[" * n + b"]" * n),  # deep nesting
)


class _Peer:
    """The client's end of a socketpair whose other end is the connection's
    real asyncio transport (small kernel buffers, so the transport's own
    buffer fills and the server's backpressure branch runs under fuzz)."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.sock.setblocking(False)
        self.pending = b""

    def read_lines(self) -> list[bytes]:
        while True:
            try:
                chunk = self.sock.recv(65536)
            except BlockingIOError:
                break
            if not chunk:
                break
            self.pending += chunk
        *lines, self.pending = self.pending.split(b"\n")
        return lines


def _connection(server):
    """A Connection on a real transport, and the peer that reads its output."""
    ours, theirs = socket.socketpair()
    for sock, option in ((ours, socket.SO_SNDBUF), (theirs, socket.SO_RCVBUF)):
        sock.setsockopt(socket.SOL_SOCKET, option, 4096)

    async def make():
        _reader, writer = await asyncio.open_connection(sock=ours)
        return Connection(server, writer, require_auth=False, name="fuzz")

    return make, _Peer(theirs)


@pytest.mark.timeout(1200)
def test_hostile_messages_never_break_the_server():
    engine = Engine()
    # the smallest buffer limit: the fuzz's answers, left unread for one
    # example, go past it, so the backpressure path is taken for real
    server = Server(engine, limits=Limits(max_buffer_bytes=1024))
    sessions_before = len(engine.sessions)
    loop = asyncio.new_event_loop()
    make, peer = _connection(server)
    conn = loop.run_until_complete(make())
    sent = {"messages": 0, "backpressure": 0}

    def drain_all() -> list[bytes]:
        """Read the answers while the loop writes the rest and the drain ends."""
        out = []
        while True:
            loop.run_until_complete(asyncio.sleep(0))
            got = peer.read_lines()
            out += got
            if not got and not conn._draining and not conn.writer.transport.get_write_buffer_size():
                loop.run_until_complete(asyncio.sleep(0))
                out += peer.read_lines()
                return out

    @settings(max_examples=max(TOTAL // PER_EXAMPLE, 1), deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(st.lists(hostile_lines, min_size=PER_EXAMPLE, max_size=PER_EXAMPLE))
    def fuzz(lines):
        for line in lines:
            if b"\n" in line:
                line = line.replace(b"\n", b" ")
            conn.handle_line(line)  # must never raise
            sent["messages"] += 1
            if conn._draining:
                sent["backpressure"] += 1
                assert not conn.writable.is_set()  # cells' threads would wait now
        out = drain_all()
        assert conn.writable.is_set() and not conn.closed
        for raw in out:  # every answer is one well-formed JSON-RPC message
            message = json.loads(raw)
            assert message["jsonrpc"] == "2.0"
            assert ("result" in message) != ("error" in message) or "method" in message
            if "error" in message:
                assert isinstance(message["error"]["code"], int)
                assert message["error"]["code"] != P.INTERNAL_ERROR, message
        assert len(out) <= len(lines)  # one response per request at most

    try:
        fuzz()
        assert sent["messages"] >= TOTAL
        assert sent["backpressure"] > 0, "the backpressure branch never ran"
        # still serving: a valid request gets its answer
        conn.handle_line(b'{"jsonrpc": "2.0", "id": "ok", "method": "session.list"}')
        answer = json.loads(drain_all()[-1])
        assert answer["id"] == "ok" and "sessions" in answer["result"]
    finally:
        conn.writer.close()
        loop.run_until_complete(conn.writer.wait_closed())  # the transport's socket too
        peer.sock.close()
        for session in engine.sessions[sessions_before:]:
            session.close()
        engine.close()
        loop.close()


def test_a_real_server_survives_a_stream_of_garbage():
    """The same over a pipe, end to end: 5,000 hostile lines, then a request."""
    import random

    rng = random.Random(5)
    lines = []
    for i in range(5000):
        kind = i % 5
        if kind == 0:
            lines.append(bytes(rng.randrange(256) for _ in range(rng.randrange(1, 40)))
                         .replace(b"\n", b" "))
        elif kind == 1:
            lines.append(b'{"jsonrpc": "2.0", "id": %d, "method": "execute", "params": '
                         b'{"session": 7}}' % i)
        elif kind == 2:
            lines.append(b'{"jsonrpc": "2.0", "method": "session.close", "params": '
                         b'{"session": "nope"}}')  # a notification: no answer
        elif kind == 3:
            lines.append(b"[" * 3000)
        else:
            lines.append(b'{"jsonrpc": "2.0", "id": %d, "method": "\xff"}' % i)
    lines.append(b'{"jsonrpc": "2.0", "id": "last", "method": "server.info"}')
    out = subprocess.run([sys.executable, "-m", "pyrepl3_ext.cli", "serve", "--stdio"],
                         input=b"\n".join(lines) + b"\n", capture_output=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    answers = [json.loads(line) for line in out.stdout.splitlines()]
    assert answers[-1]["id"] == "last" and "result" in answers[-1]
    assert all(a.get("error", {}).get("code") != P.INTERNAL_ERROR for a in answers)
    # every line got exactly one answer, but notifications and blank lines
    expected = sum(1 for line in lines if line.strip() and b"session.close" not in line)
    assert len(answers) == expected
