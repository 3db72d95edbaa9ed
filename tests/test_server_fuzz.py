"""Hostile input for the protocol server: 100,000 malformed or hostile messages
(hypothesis) through a real server's request path, then a valid request."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from pyrepl3_ext import protocol as P
from pyrepl3_ext.engine import Engine
from pyrepl3_ext.server import Connection, Server

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


class _Sink:
    """A StreamWriter stand-in that keeps what the server sends."""

    def __init__(self):
        self.lines: list[bytes] = []
        self.transport = self

    def write(self, data: bytes) -> None:
        self.lines.append(data)

    def get_write_buffer_size(self) -> int:
        return 0

    async def drain(self) -> None:
        pass

    def close(self) -> None:
        pass


@pytest.mark.timeout(1200)
def test_hostile_messages_never_break_the_server():
    engine = Engine()
    server = Server(engine)
    sessions_before = len(engine.sessions)

    async def make_connection():
        return Connection(server, asyncio.StreamReader(), _Sink(), require_auth=False,
                          name="fuzz")

    loop = asyncio.new_event_loop()
    conn = loop.run_until_complete(make_connection())
    sent = {"messages": 0}

    @settings(max_examples=max(TOTAL // PER_EXAMPLE, 1), deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(st.lists(hostile_lines, min_size=PER_EXAMPLE, max_size=PER_EXAMPLE))
    def fuzz(lines):
        for line in lines:
            if b"\n" in line:
                line = line.replace(b"\n", b" ")
            before = len(conn.writer.lines)
            conn.handle_line(line)  # must never raise
            sent["messages"] += 1
            out = conn.writer.lines[before:]
            for raw in out:  # every answer is one well-formed JSON-RPC message
                message = json.loads(raw)
                assert message["jsonrpc"] == "2.0"
                assert ("result" in message) != ("error" in message) or "method" in message
                if "error" in message:
                    assert isinstance(message["error"]["code"], int)
                    assert message["error"]["code"] != P.INTERNAL_ERROR, message
            assert len(out) <= 1  # one response per request at most

    try:
        fuzz()
        assert sent["messages"] >= TOTAL
        # still serving: a valid request gets its answer
        conn.writer.lines.clear()
        conn.handle_line(b'{"jsonrpc": "2.0", "id": "ok", "method": "session.list"}')
        answer = json.loads(conn.writer.lines[-1])
        assert answer["id"] == "ok" and "sessions" in answer["result"]
    finally:
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
